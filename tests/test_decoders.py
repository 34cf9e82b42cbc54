"""More decoder families: parity with PEFT's forward, sliding windows, and the refusals."""

import copy

import peft
import pytest
import torch
import transformers as T

from prefix_kernels import PrefixTuningConfig, get_prefix_model

P = 5
COMMON = dict(vocab_size=97, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "gemma": (T.GemmaForCausalLM, T.GemmaConfig, dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                     num_attention_heads=4, num_key_value_heads=1, head_dim=16)),
    "gemma3": (T.Gemma3ForCausalLM, T.Gemma3TextConfig, dict(hidden_size=64, intermediate_size=96,
                                                            num_hidden_layers=2, num_attention_heads=4,
                                                            num_key_value_heads=2, head_dim=16, sliding_window=64)),
    # per-layer head dims (the global layers are twice as wide) and layers 2-3 reusing layers 0-1's keys/values
    "gemma4": (T.Gemma4ForCausalLM, T.Gemma4TextConfig, dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, global_head_dim=32, sliding_window=64, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])),
    # logits soft-capped at 50 in every attention, and sliding-window layers
    "gemma2": (T.Gemma2ForCausalLM, T.Gemma2Config, dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                        attn_logit_softcapping=5.0)),
    "qwen3": (T.Qwen3ForCausalLM, T.Qwen3Config, dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "phi": (T.PhiForCausalLM, T.PhiConfig, dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                num_attention_heads=4)),
    "phi3": (T.Phi3ForCausalLM, T.Phi3Config, dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2)),
    "gpt_neox": (T.GPTNeoXForCausalLM, T.GPTNeoXConfig, dict(hidden_size=64, intermediate_size=96,
                                                            num_hidden_layers=2, num_attention_heads=4)),
    "opt": (T.OPTForCausalLM, T.OPTConfig, dict(hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                               num_attention_heads=4, word_embed_proj_dim=64)),
    "gptj": (T.GPTJForCausalLM, T.GPTJConfig, dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8)),
}


def build(cls, config_cls, sizes):
    torch.manual_seed(0)
    return cls(config_cls(**COMMON, **sizes)).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_peft(family):
    base = build(*FAMILIES[family])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=P))
    ours = get_prefix_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    assert ours.peft_config["default"].token_dim == theirs.peft_config["default"].token_dim
    ours.prefix_encoders["default"].load_state_dict(theirs.prompt_encoder["default"].state_dict())
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=2e-5, rtol=1e-4)
    generated = ours.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 12)


def reference_with_prefix_in_cache(base, prefix, ids, sequence_visible):
    """The prefix pushed into an eager model's cache, with an explicit mask that keeps every prefix key
    visible and applies `sequence_visible` [S, S] to the sequence."""
    model = copy.deepcopy(base)
    model.set_attn_implementation("eager")
    b, s = ids.shape
    cache = T.DynamicCache()  # full layers: a sliding-window cache would drop the prefix
    for layer in range(prefix.shape[0]):
        cache.update(prefix[layer, 0].expand(b, -1, -1, -1), prefix[layer, 1].expand(b, -1, -1, -1), layer)
    visible = torch.cat([torch.ones(s, P, dtype=torch.bool), sequence_visible], dim=1)
    mask = torch.zeros(b, 1, s, P + s).masked_fill(~visible, float("-inf"))
    return model(input_ids=ids, attention_mask=mask, cache=cache, position_ids=torch.arange(s)[None] + P).logits


def test_sliding_window_keeps_the_prefix_visible():
    """PEFT's cached prefix falls out of the window after a few tokens; here every token keeps seeing it."""
    window = 3
    base = build(T.MistralForCausalLM, T.MistralConfig, dict(hidden_size=64, intermediate_size=96,
                                                              num_hidden_layers=2, num_attention_heads=4,
                                                              num_key_value_heads=2, sliding_window=window))
    ours = get_prefix_model(copy.deepcopy(base), PrefixTuningConfig(num_virtual_tokens=P))
    ids = torch.randint(3, 97, (2, 10))
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    with torch.no_grad():
        want = reference_with_prefix_in_cache(base, ours.get_prefix(), ids, (j <= i) & (j > i - window))
        got = ours(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
