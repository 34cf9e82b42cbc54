"""The one integration point with transformers: an attention function and its mask function, registered by name.

A model switched to `ATTENTION_NAME` computes every attention layer through `prefix_attention`. The layer's
prefix reaches the function as the keyword argument `prefix_states` (a `PrefixStates`), which transformers
passes from the model's forward down to each attention call; without it the function is plain attention.
The name is neutral on purpose: transformers treats names containing "sdpa", "flash" or "flex" specially.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..ops import prefix_attention

ATTENTION_NAME = "prefix_kernels"


@dataclass
class PrefixStates:
    """Every layer's prefix for one forward call.

    `kv` is `[L, 2, Hkv, P, D]` (shared by the batch) or a bank `[L, 2, N, Hkv, P, D]` read through `index`
    (int64 `[B]`, the bank entry of each row); `lengths` (int64 `[B]`) marks how many of the P prefix keys
    are real for each row when bank entries have different lengths.
    """

    kv: torch.Tensor
    index: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    slots: dict[torch.nn.Module, int] | None = None  # attention module -> its layer of `kv`; absent: no prefix
    # (Sq, past length) -> `[1 or B, Hq, Sq, P]`: T5's relative position bias of the prefix keys, placed as the
    # first P positions, as PEFT's cache places them.
    prefix_position_bias: Callable[[int, int], torch.Tensor] | None = None

    def slot(self, module: torch.nn.Module) -> int | None:
        """The layer of `kv` that `module` reads: its `layer_idx`, or per `slots` (encoder-decoders, KV sharing)."""
        if self.slots is not None:
            return self.slots.get(module)
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise ValueError(f"module: {type(module).__name__} has no layer_idx, so its prefix cannot be found")
        return layer


def prefix_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, Hq, Sq, D]
    key: torch.Tensor,  # [B, Hkv, Skv, D], cache included
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,  # bool [B, 1, Sq, Skv] from `prefix_mask`, or None
    scaling: float | None = None,
    dropout: float = 0.0,
    prefix_states: PrefixStates | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,  # T5's relative position bias [1, Hq, Sq, Skv]
    softcap: float | None = None,  # Gemma 2's logit cap
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature; returns (`[B, Sq, Hq, D]`, no attention weights).

    Attention-probability dropout is not applied (the fused kernels have none). T5's position bias applies to
    the sequence keys, and to the prefix keys when `prefix_states` says where they sit.
    """
    index = lengths = None
    slot = None if prefix_states is None else prefix_states.slot(module)
    if slot is None:
        prefix_k = prefix_v = key.new_empty(key.shape[1], 0, key.shape[-1])
    else:
        # [2, (N,) Hkv, P, D]; layers narrower than the widest (per-layer head dims) read a slice, as in PEFT
        kv = prefix_states.kv[slot][..., : key.shape[1], :, : key.shape[-1]].to(query.dtype)
        prefix_k, prefix_v, index, lengths = kv[0], kv[1], prefix_states.index, prefix_states.lengths
        if position_bias is not None and prefix_states.prefix_position_bias is not None:
            prefix_bias = prefix_states.prefix_position_bias(query.shape[2], key.shape[2] - query.shape[2])
            rows = max(prefix_bias.shape[0], position_bias.shape[0])
            position_bias = torch.cat([prefix_bias.to(position_bias.dtype).expand(rows, -1, -1, -1),
                                       position_bias.expand(rows, -1, -1, -1)], dim=-1)
    if attention_mask is not None:
        causal = False  # the mask already holds the causal pattern
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
        attention_mask = attention_mask[..., : key.shape[-2]]
    else:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = prefix_attention(
        query, key, value, prefix_k, prefix_v,
        causal=causal, scale=scaling, attention_mask=attention_mask, prefix_index=index, prefix_lengths=lengths,
        attention_bias=position_bias, softcap=softcap,
    )
    return out.transpose(1, 2), None


def prefix_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    **kwargs,
) -> torch.Tensor | None:
    """The sequence keys' mask: None when the kernel's own bottom-right causal (or no mask) is exact, else a
    boolean `[B, 1, Sq, Skv]` (True = attend) built by transformers' `sdpa_mask`.

    Prefix keys are never in this mask: every query sees them.
    """
    no_padding = attention_mask is None or bool(attention_mask.all())
    windowed = local_size is not None and kv_length >= local_size
    if no_padding and not windowed:
        if allow_is_causal_skip and (q_length == 1 or q_length == kv_length):
            return None
        if allow_is_bidirectional_skip:
            return None
    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        attention_mask=attention_mask, local_size=local_size,
        allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs,
    )


def register() -> str:
    """Register the attention and mask functions with transformers (idempotent); return their name."""
    AttentionInterface.register(ATTENTION_NAME, prefix_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, prefix_mask)
    return ATTENTION_NAME
