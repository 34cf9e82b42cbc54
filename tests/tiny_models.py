"""Tiny transformers models with random weights, one per decoder family the drop-in is tested on."""

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 97

_DECODERS = {
    "llama": (LlamaForCausalLM, LlamaConfig, dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                                  num_attention_heads=8, num_key_value_heads=2)),
    "mistral": (MistralForCausalLM, MistralConfig, dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                                        num_attention_heads=4, num_key_value_heads=1,
                                                        sliding_window=None)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2)),
    "gpt2": (GPT2LMHeadModel, GPT2Config, dict(n_embd=48, n_layer=2, n_head=4, attn_pdrop=0.0, embd_pdrop=0.0,
                                               resid_pdrop=0.0, n_positions=128)),
}
DECODERS = tuple(_DECODERS)


def tiny_decoder(name: str, seed: int = 0):
    """The same weights for the same (name, seed), whatever the caller's random state."""
    cls, config_cls, kwargs = _DECODERS[name]
    config = config_cls(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return cls(config).eval()
