"""Encoder-decoders (T5, BART): the prefix in decoder self-attention, as in PEFT, with PEFT's numbers."""

import copy

import peft
import pytest
import torch
import transformers as T
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from prefix_kernels import PrefixTuningConfig, get_prefix_model
from prefix_kernels.integrations.attention_interface import prefix_mask

MODELS = {
    "t5": lambda layers: T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=layers, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, dropout_rate=0.0)),
    "bart": lambda layers: T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=100, d_model=32, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0,
        attention_dropout=0.0)),
}


def build(name, layers=2):
    torch.manual_seed(0)
    return MODELS[name](layers).eval()


def concat_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, prefix_plan=None,
                     is_causal=None, position_bias=None, **kwargs):
    """Attention with the prefix concatenated in front of the keys, written plainly (float64 models only). Reads
    `prefix_mask`'s masks: None (plain causal or bidirectional), key padding [B, Skv], or a 4-D pattern."""
    slot = None if prefix_plan is None else prefix_plan.layout.slot(module)
    b, s, t = query.shape[0], query.shape[2], key.shape[2]
    prefix = prefix_plan.kv[slot] if slot is not None else key.new_zeros(2, key.shape[1], 0, key.shape[-1])
    keys = torch.cat([prefix[0].expand(b, -1, -1, -1), key], dim=2)
    values = torch.cat([prefix[1].expand(b, -1, -1, -1), value], dim=2)
    scores = query @ keys.transpose(-1, -2) * scaling
    n = prefix.shape[2]
    if position_bias is not None:
        scores[..., n:] += position_bias
        if n and prefix_plan.prefix_position_bias is not None:  # T5: the prefix sits at the first P positions
            scores[..., :n] += prefix_plan.prefix_position_bias(s, t - s)
    if attention_mask is not None and attention_mask.dim() == 4:
        visible = attention_mask[..., :t]
    else:
        causal = is_causal if is_causal is not None else module.is_causal
        rows, cols = torch.arange(s)[:, None], torch.arange(t)[None, :]
        visible = cols <= rows + t - s if causal else torch.ones(s, t, dtype=torch.bool)
        if attention_mask is not None:
            visible = visible & attention_mask[:, None, None, :]
    visible = torch.cat([torch.ones(*visible.shape[:-1], n, dtype=torch.bool), visible.expand(*visible.shape[:-1], t)],
                        dim=-1)
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ values).transpose(1, 2), None


AttentionInterface.register("concat_reference", concat_reference)
AttentionMaskInterface.register("concat_reference", prefix_mask)


@pytest.mark.parametrize("placement", ["peft", "full"])
@pytest.mark.parametrize("name", MODELS)
def test_matches_a_plain_concatenation_reference(name, placement):
    model = get_prefix_model(build(name).double(), PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4, encoder_decoder_placement=placement))
    model.prefix_encoders.double()
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    decoder_ids = torch.randint(3, 100, (2, 5))
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        model.get_base_model().set_attn_implementation("concat_reference")
        reference = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(ours, reference, atol=1e-10, rtol=0)


@pytest.mark.parametrize("layers", [2, 4])
@pytest.mark.parametrize("name", MODELS)
def test_logits_match_peft(name, layers):
    """PEFT's decoder-only prefix: its layer slots, T5's position bias over the prefix, BART's shifted positions."""
    base = build(name, layers)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                                             num_virtual_tokens=4))
    ours = get_prefix_model(base, PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4))
    ours.prefix_encoders["default"].load_state_dict(theirs.prompt_encoder["default"].state_dict())
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    decoder_ids = torch.randint(3, 100, (2, 5))
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        got = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_learned_decoder_positions_need_one_prefix_length(tmp_path):
    short = get_prefix_model(build("bart"), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2))
    short.save_pretrained(tmp_path)
    model = get_prefix_model(build("bart"), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4))
    model.load_adapter(tmp_path, adapter_name="short")
    ids = torch.randint(3, 100, (2, 6))
    with pytest.raises(ValueError, match="^adapter_names: bart's learned decoder positions"):
        model(input_ids=ids, decoder_input_ids=ids[:, :3], adapter_names=["default", "short"])


@pytest.mark.parametrize("submodules, slots", [(2, [0, 2, 0, 2]), (1, [0, 1, 2, 3])])
def test_only_decoder_self_attention_reads_a_prefix(submodules, slots):
    """PEFT's layout: with num_transformer_submodules=2 decoder layer i reads PEFT's layer (2i mod L)."""
    model = get_prefix_model(build("t5", layers=4), PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4, num_transformer_submodules=submodules))
    layer_of = model._layout.slots
    named = {name: layer_of[m] for name, m in model.get_base_model().named_modules() if m in layer_of}
    assert list(named) == [f"decoder.block.{i}.layer.0.SelfAttention" for i in range(4)]
    assert list(named.values()) == slots


@pytest.mark.parametrize("placement", ["peft", "full"])
@pytest.mark.parametrize("name", MODELS)
def test_generate_uses_the_prefix(name, placement):
    base = build(name)
    model = get_prefix_model(copy.deepcopy(base), PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4, encoder_decoder_placement=placement))
    ids = torch.randint(3, 100, (1, 6))
    out = model.generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, num_beams=1, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    for step, step_logits in enumerate(out.logits):  # each cached step equals a full recomputation
        with torch.no_grad():
            full = model(input_ids=ids, decoder_input_ids=out.sequences[:, :step + 1], use_cache=False).logits
        torch.testing.assert_close(step_logits, full[:, -1], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        decoder_ids = out.sequences
        assert not torch.allclose(model(input_ids=ids, decoder_input_ids=decoder_ids).logits,
                                  base(input_ids=ids, decoder_input_ids=decoder_ids).logits, atol=1e-4)


def test_the_prefix_trains():
    model = get_prefix_model(build("t5"), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4))
    model.train()
    ids, labels = torch.randint(3, 100, (2, 6)), torch.randint(3, 100, (2, 4))
    model(input_ids=ids, labels=labels).loss.backward()
    grad = model.prefix_encoders["default"].embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_full_placement_reaches_every_attention():
    """The paper's form: encoder self-attention, decoder self-attention and cross-attention each have a prefix."""
    model = get_prefix_model(build("t5", layers=4), PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4, encoder_decoder_placement="full"))
    layer_of = model._layout.slots
    named = {name: layer_of[m] for name, m in model.get_base_model().named_modules() if m in layer_of}
    assert named == {**{f"encoder.block.{i}.layer.0.SelfAttention": i for i in range(4)},
                     **{f"decoder.block.{i}.layer.0.SelfAttention": 4 + i for i in range(4)},
                     **{f"decoder.block.{i}.layer.1.EncDecAttention": 8 + i for i in range(4)}}
    assert model.get_prefix().shape[0] == 12
    model.train()
    ids, labels = torch.randint(3, 100, (2, 6)), torch.randint(3, 100, (2, 4))
    model(input_ids=ids, labels=labels).loss.backward()
    grad = model.prefix_encoders["default"].embedding.weight.grad.view(4, 12, -1)
    assert all(grad[:, layer].abs().sum() > 0 for layer in range(12))  # every layer's prefix is used


def test_full_placement_needs_an_encoder_decoder():
    from tiny_models import tiny_decoder

    with pytest.raises(ValueError, match="^encoder_decoder_placement: 'full' needs an encoder-decoder model"):
        get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(num_virtual_tokens=4,
                                                                   encoder_decoder_placement="full"))
