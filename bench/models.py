"""The model-level contenders, all over one Llama-shaped model with random weights and one random prefix, and what
the training benchmarks feed them (batches packed or padded, one training step).

- `prefix_kernels`: `get_prefix_model`: the prefix read inside attention; the KV cache holds only the sequence.
- `peft`: real PEFT, `get_peft_model(model, PrefixTuningConfig(...))` (forward and training).
- `peft_cache`: PEFT's way of generating with a prefix, rebuilt here because PEFT's own `generate()` ignores the
  prefix under transformers 5: the base model with every layer's prefix copied per row into a `DynamicCache`,
  the attention mask widened by P ones, so real tokens sit at positions P.. (`generate_peft_cache`).
- `no_prefix`: the base model alone (SDPA attention), the floor. For training it trains its input embeddings, so
  its backward runs through every layer as a prefix's does. On packed rows it runs SDPA once per packed sequence
  (`PER_SEQUENCE_SDPA`), as a varlen kernel would: transformers' own SDPA path builds a dense block-diagonal mask
  over all the packed tokens instead, and computes every block of it.
"""

import copy
from dataclasses import dataclass

import peft
import torch
from torch import nn
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    DataCollatorWithFlattening,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import flash_attention_mask

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


# ---- training -----------------------------------------------------------------------------------------------------

PER_SEQUENCE_SDPA = "sdpa_per_sequence"


def sdpa_per_sequence(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """transformers' SDPA attention run once per packed sequence of a batch of one row, the sequences found where
    `position_ids` restart at 0 (as transformers' flash path finds them): causal within each sequence, nothing
    across them, no mask. Returns `[1, S, Hq, D]`, as every attention function does."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    bounds = [*starts, query.shape[2]] if starts[:1] == [0] else [0, *starts, query.shape[2]]
    outputs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                      is_causal=True, **kwargs)[0] for a, b in zip(bounds, bounds[1:])]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(PER_SEQUENCE_SDPA, sdpa_per_sequence)
AttentionMaskInterface.register(PER_SEQUENCE_SDPA, flash_attention_mask)  # no mask: None for unpadded rows


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [param for param in model.parameters() if param.requires_grad]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    """One training step: forward with labels, backward, an optimizer step on what trains."""
    optimizer.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    optimizer.step()


def examples(lengths: list[int], vocab: int, seed: int = 0) -> list[torch.Tensor]:
    """Random token sequences of the given lengths (ids from 3: 0-2 are the special tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator) for n in lengths]


def right_padded(sequences: list[torch.Tensor], device: str) -> dict:
    """A batch with right padding: `input_ids`, `attention_mask`, `labels` (-100 on padding) `[B, longest]`."""
    ids = nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=0)
    mask = nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in sequences], batch_first=True)
    return {name: t.to(device) for name, t in
            dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).items()}


def packed(sequences: list[torch.Tensor], device: str) -> dict:
    """The sequences in one row, as transformers' `DataCollatorWithFlattening` packs them: `input_ids`, `labels`
    (-100 at each sequence's first token) and `position_ids` restarting at 0, `[1, total]`, no attention mask."""
    batch = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": s.tolist()} for s in sequences])
    return {name: t.to(device) for name, t in batch.items()}


def embeddings_trained(base: LlamaForCausalLM, attention: str = "sdpa") -> LlamaForCausalLM:
    """A copy of `base` with attention implementation `attention` that trains its input embeddings only: the model
    with no prefix whose backward still runs through every layer, as a prefix's does."""
    model = copy.deepcopy(base)
    model.set_attn_implementation(attention)
    model.requires_grad_(False)
    model.get_input_embeddings().requires_grad_(True)
    return model
