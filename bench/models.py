"""The model-level contenders, all over one Llama-shaped model with random weights and one random prefix.

- `prefix_kernels`: `get_prefix_model`: the prefix read inside attention; the KV cache holds only the sequence.
- `peft`: real PEFT, `get_peft_model(model, PrefixTuningConfig(...))` (forward and training).
- `peft_cache`: PEFT's way of generating with a prefix, rebuilt here because PEFT's own `generate()` ignores the
  prefix under transformers 5: the base model with every layer's prefix copied per row into a `DynamicCache`,
  the attention mask widened by P ones, so real tokens sit at positions P.. (`generate_peft_cache`).
- `no_prefix`: the base model alone (SDPA attention), the floor.
"""

import copy
from dataclasses import dataclass

import peft
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from prefix_kernels import PrefixModel, PrefixTuningConfig, get_prefix_model

# LlamaConfig fields per size set.
SHAPES = {
    "smoke": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "cpu": dict(vocab_size=1000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2),
    "cuda": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=4),
}


@dataclass
class Contenders:
    base: LlamaForCausalLM  # no prefix; also what `generate_peft_cache` runs
    peft: peft.PeftModel  # over a copy of `base`
    ours: PrefixModel  # over another copy, holding the same prefix as `peft`
    prefix: torch.Tensor  # [L, 2, Hkv, P, D], detached: the prefix both read


def llama(size: str, device: str, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """A Llama-shaped model of the size set `size`, random weights fixed by `seed`, in eval mode."""
    config = LlamaConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2, **SHAPES[size])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype).eval()


def contenders(size: str, num_virtual_tokens: int, device: str, dtype: torch.dtype) -> Contenders:
    base = llama(size, device, dtype)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens))
    ours = get_prefix_model(copy.deepcopy(base), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens))
    ours.prefix_encoders["default"].load_state_dict(theirs.prompt_encoder["default"].state_dict())
    return Contenders(base, theirs.eval(), ours.eval(), ours.get_prefix().detach())


def generate_peft_cache(base: LlamaForCausalLM, prefix: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """`base.generate()` with `prefix` (`[L, 2, Hkv, P, D]`) in its KV cache, as PEFT puts it there.

    Each call builds a fresh cache holding B copies of every layer's prefix, as PEFT's forward does. Returns
    `[B, S + new tokens]`, as `generate()` does.
    """
    b, p = input_ids.shape[0], prefix.shape[-2]
    cache = DynamicCache(config=base.config)
    for layer, (keys, values) in enumerate(prefix.to(base.dtype)):  # [Hkv, P, D] each
        cache.update(keys.expand(b, -1, -1, -1).contiguous(), values.expand(b, -1, -1, -1).contiguous(), layer)
    widened = torch.cat([attention_mask.new_ones(b, p), attention_mask], dim=1)
    return base.generate(input_ids=input_ids, attention_mask=widened, cache=cache, **kwargs)
