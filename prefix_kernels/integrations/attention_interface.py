"""The one integration point with transformers: an attention function and its mask function, registered by name.

A wrapped model's attention implementation is `ATTENTION_NAME` (or `EAGER_NAME` for a model that used eager
attention). Every attention layer then calls `prefix_attention_forward`:

- inside a `PrefixModel` call the layer receives the call's `PrefixPlan` as the keyword argument `prefix_plan`
  (transformers passes forward's keyword arguments down to every attention call) and computes attention over
  its prefix and the sequence with `prefix_attention`: a padded batch, packed sequences, or one step of
  transformers' continuous batching (`continuous_batching.py`), whose layers receive the engine's varlen offsets;
- outside one (the base model called directly, a PEFT model sharing it) it runs the implementation the model
  had before wrapping, SDPA or eager, on exactly the mask that implementation would have built, so the model
  computes what it computed before.

The mask function builds the sequence keys' mask in the form the op runs fastest with: None when the kernel's
own causal (or no mask) is exact, a key-padding mask `[B, Skv]` when padding plus bottom-right causal is exact
(left or right padding of a causal model, padded encoders) so causal block skipping stays on, and a boolean
`[B, 1, Sq, Skv]` only otherwise (sliding windows, static caches, custom mask functions).
The names are neutral on purpose: transformers treats names containing "sdpa", "flash" or "flex" specially.
"""

import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)
from transformers.utils.import_utils import is_tracing

from ..ops import prefix_attention
from ..plan import PrefixPlan

ATTENTION_NAME = "prefix_kernels"
EAGER_NAME = "prefix_kernels_eager"  # a model that used eager attention: the same, but eager outside calls


def prefix_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, Hq, Sq, D]
    key: torch.Tensor,  # [B, Hkv, Skv, D], cache included
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,  # from `prefix_mask`: None, bool [B, Skv] or bool [B, 1, Sq, Skv]
    scaling: float | None = None,
    dropout: float = 0.0,
    prefix_plan: PrefixPlan | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,  # T5's relative position bias [1 or B, Hq, Sq, Skv]
    softcap: float | None = None,  # Gemma 2's logit cap
    sliding_window: int | None = None,  # a windowed layer's window (Mistral, Qwen2, Gemma 2/3)
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature; returns (`[B, Sq, Hq, D]`, no attention weights).

    Inside a call, attention-probability dropout is not applied (the fused kernels have none). T5's position
    bias applies to the sequence keys, and to the prefix keys when the plan says where they sit.
    """
    if prefix_plan is None:
        return _as_before(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                          is_causal=is_causal, position_bias=position_bias, softcap=softcap,
                          sliding_window=sliding_window, **kwargs)
    if torch.is_autocast_enabled(query.device.type):  # as SDPA under autocast: q, k, v (and prefix) in its dtype
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    slot = prefix_plan.layout.slot(module)
    index = lengths = None
    if slot is None:
        prefix_k = prefix_v = key.new_empty(key.shape[1], 0, key.shape[-1])
    else:
        prefix_k, prefix_v = prefix_plan.layers[slot]  # [(N,) Hkv, P, D]
        start = prefix_plan.layout.head_start(module)
        if start or prefix_k.shape[-3] != key.shape[1] or prefix_k.shape[-1] != key.shape[-1]:
            # a tensor-parallel rank reads its own KV heads, and a layer narrower than the widest (per-layer head
            # dims) a slice, as in PEFT
            prefix_k, prefix_v = (t[..., start: start + key.shape[1], :, : key.shape[-1]] for t in (prefix_k, prefix_v))
        if prefix_k.dtype != query.dtype:
            prefix_k, prefix_v = prefix_k.to(query.dtype), prefix_v.to(query.dtype)
        index, lengths = prefix_plan.index, prefix_plan.lengths
        if position_bias is not None and prefix_plan.prefix_position_bias is not None:
            prefix_bias = prefix_plan.prefix_position_bias(query.shape[2], key.shape[2] - query.shape[2])
            rows = max(prefix_bias.shape[0], position_bias.shape[0])
            position_bias = torch.cat([prefix_bias.to(position_bias.dtype).expand(rows, -1, -1, -1),
                                       position_bias.expand(rows, -1, -1, -1)], dim=-1)
    packing = _packing(prefix_plan, kwargs)
    if packing is not None:  # packed sequences in a batch of one row: the varlen op
        cu_q, cu_k, longest_q, longest_k = packing
        out = prefix_attention(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), prefix_k, prefix_v,
            causal=causal, scale=scaling, prefix_index=index, prefix_lengths=lengths, softcap=softcap,
            window=sliding_window if causal else None, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
            max_seqlen_q=longest_q, max_seqlen_k=longest_k)
        return out[None], None
    if attention_mask is not None and attention_mask.dim() == 4:
        causal = False  # the 4-D mask holds the whole pattern
        if attention_mask.is_floating_point():  # an additive mask the caller gave: a bias on the sequence keys
            position_bias = _add_on_sequence_keys(position_bias, attention_mask)
            attention_mask = None
    out = prefix_attention(
        query, key, value, prefix_k, prefix_v, causal=causal, scale=scaling, attention_mask=attention_mask,
        prefix_index=index, prefix_lengths=lengths, attention_bias=position_bias, softcap=softcap)
    return out.transpose(1, 2), None


def _add_on_sequence_keys(bias: torch.Tensor | None, additive: torch.Tensor) -> torch.Tensor:
    """`bias` (None, over the sequence keys, or over `[prefix ; sequence]`) plus `additive` on the sequence keys."""
    if bias is None:
        return additive
    n_prefix = bias.shape[-1] - additive.shape[-1]
    sequence = bias[..., n_prefix:] + additive
    if not n_prefix:
        return sequence
    return torch.cat([bias[..., :n_prefix].expand(*sequence.shape[:-1], -1).to(sequence.dtype), sequence], dim=-1)


def _packing(plan: PrefixPlan, kwargs: dict) -> tuple | None:
    """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) of a batch of one row holding several sequences, or
    None. A step of continuous batching gives each layer its own: its queries are the requests' new tokens, its keys
    their cached and new ones (a sliding-window layer reads fewer). Packed training sequences attend to themselves."""
    if plan.paged:
        return kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], kwargs["max_length_q"], kwargs["max_length_k"]
    if plan.cu_seqlens is not None:
        return plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen
    return None


def _as_before(module, query, key, value, attention_mask, *, is_causal, **kwargs):
    """Outside a `PrefixModel` call: the model's previous attention (SDPA, or eager for `EAGER_NAME` models) on
    exactly the mask transformers would have built for it."""
    eager = module.config._attn_implementation == EAGER_NAME and _eager_attention(module) is not None
    mask = attention_mask
    if mask is None or mask.dim() == 2:  # the cases `prefix_mask` leaves to the kernel; rebuild SDPA's or eager's
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        sq, skv = query.shape[2], key.shape[2]
        no_padding = mask is None or (not is_tracing(mask) and bool(mask.all()))
        if eager or not no_padding or (causal and 1 < sq != skv):  # SDPA would have skipped the rest
            mask = torch.ones(1, skv, dtype=torch.bool, device=query.device) if mask is None else mask
            mask = mask[:, None, None, :]
            if causal and sq > 1:  # bottom-right, which `prefix_mask` checked is the model's alignment
                mask = mask & (torch.arange(skv, device=query.device)
                               <= torch.arange(sq, device=query.device)[:, None] + skv - sq)
        else:
            mask = None
    if eager:
        if not mask.is_floating_point():  # eager adds its mask (a caller's 4-D float mask already is one)
            additive = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
            mask = additive.masked_fill_(~mask, torch.finfo(query.dtype).min)
        return _eager_attention(module)(module, query, key, value, mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, mask, is_causal=is_causal, **kwargs)


def _eager_attention(module: torch.nn.Module):
    """The eager attention function of `module`'s model family (each modeling file defines its own), or None."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def prefix_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    **kwargs,
) -> torch.Tensor | None:
    """The sequence keys' mask: None, a key-padding `[B, Skv]`, or a boolean `[B, 1, Sq, Skv]` (True = attend).

    Prefix keys are never in this mask: every query sees them. Reads no tensor values.
    """
    window_reached = local_size is not None and kv_length >= local_size
    # Plain causal: no composed mask function (transformers then refuses the skip) and no window that bites.
    plain_causal = allow_is_causal_skip and (mask_function is causal_mask_function or local_size is not None)
    plain_causal = plain_causal and not window_reached
    plain_bidirectional = mask_function is bidirectional_mask_function and local_size is None
    bottom_right = isinstance(q_offset, int) and q_offset + q_length == kv_offset + kv_length
    if plain_bidirectional or (plain_causal and bottom_right):
        if attention_mask is None:
            return None
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        return padding[:, kv_offset: kv_offset + kv_length]
    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=attention_mask, local_size=local_size,
        allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs,
    )


def register(previous: str | None) -> str:
    """Register the attention and mask functions with transformers (idempotent); return the name for a model
    whose attention implementation was `previous`."""
    for name in (ATTENTION_NAME, EAGER_NAME):
        AttentionInterface.register(name, prefix_attention_forward)
        AttentionMaskInterface.register(name, prefix_mask)
    return EAGER_NAME if previous == "eager" else ATTENTION_NAME
