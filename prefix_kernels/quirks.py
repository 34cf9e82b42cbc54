"""The per-family quirks of placing a prefix, each a named unit, all in one place.

Most models need none of these: every attention reads its own `layer_idx` of the prefix table, positions are
the model's own `position_ids` shifted by P. The families below deviate; each quirk is detected from the model's
structure (never from its class name), and the test that detects a regression is named beside it.

quirk                      families                    what it does (tested in)
-------------------------  --------------------------  ------------------------------------------------------
`encoder_decoder_slots`    T5, BART                    which table layer each attention reads: PEFT's
                                                       (2i mod L) slots, or the paper's full form
                                                       (test_encoder_decoder.py)
`kv_sharing_slots`         Gemma 3n, Gemma 4           layers reusing an earlier layer's K/V read its prefix
                                                       (test_decoders.py)
`T5PrefixBias`             T5                          relative position bias for the prefix keys, as the
                                                       first P positions (test_encoder_decoder.py)
`LearnedDecoderPositions`  BART, mBART, ...            learned decoder positions start at P
                                                       (test_encoder_decoder.py)
`PaddingIdxPositions`      RoBERTa, XLM-R, ...         positions numbered after padding_idx, shifted by P,
                                                       per packed sequence too (test_encoders.py)
`learned_position_limit`   GPT-2, OPT, BERT, ...       a table of learned positions: a prompt (or packed
                                                       sequence) that fits the model but not after P prefix
                                                       positions is refused by name (test_messages.py,
                                                       test_packed_models.py)
per-layer head dims        Gemma 4                     narrower layers read a slice of the widest layer's
                                                       prefix, in the attention function (test_decoders.py)
"""

import contextlib
import contextvars
import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from .config import PrefixTuningConfig
from .tensor_parallel import HeadShards, head_shards


@dataclass(frozen=True)
class PrefixLayout:
    """Which layer of the prefix table each attention module reads; fixed when the model is wrapped.

    `slots` maps attention modules to table layers; None means every attention reads its own `layer_idx`.
    `heads`: under tensor parallelism, the KV heads of the prefix this rank reads in each attention (its slice of
    the model's heads) and the group its gradient is summed over; None without tensor parallelism.
    """

    slots: dict[nn.Module, int] | None = None
    heads: HeadShards | None = None

    def slot(self, module: nn.Module) -> int | None:
        """The table layer `module` reads, or None if it has no prefix (an encoder-decoder's other attentions)."""
        if self.slots is not None:
            return self.slots.get(module)
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise ValueError(f"module: {type(module).__name__} has no layer_idx, so its prefix cannot be found")
        return layer

    def head_start(self, module: nn.Module) -> int:
        """The first KV head of the table that `module`'s keys hold on this rank (0 unless heads are sharded)."""
        return 0 if self.heads is None else self.heads.start(module)

    def whole_gradient(self, table: torch.Tensor) -> torch.Tensor:
        """A call's table, whose gradient is summed over the tensor-parallel ranks (itself without them)."""
        return table if self.heads is None else self.heads.whole_gradient(table)


def layout(model: PreTrainedModel, config: PrefixTuningConfig) -> PrefixLayout:
    """Which table layer each attention module of `model` reads, and which of its KV heads on this rank."""
    if getattr(model.config, "is_encoder_decoder", False):
        slots = encoder_decoder_slots(model, config)
    else:
        slots = kv_sharing_slots(model)
    return PrefixLayout(slots, head_shards(model, slots))


def encoder_decoder_slots(model: PreTrainedModel, config: PrefixTuningConfig) -> dict[nn.Module, int]:
    """Encoder-decoders. "peft" placement: decoder self-attention only, as in PEFT; with PEFT's
    `num_transformer_submodules=2`, decoder layer i reads PEFT's layer (2 * i) mod L, the slot PEFT's own cache
    construction gives it, so PEFT-trained tables keep their meaning. "full" placement: encoder self-attention
    reads layers [0, L), decoder self-attention [L, 2L), cross-attention [2L, 3L)."""
    full, n = config.encoder_decoder_placement == "full", config.num_layers
    slots = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        numbers = [int(part) for part in parts if part.isdigit()]
        if not numbers or parts[-1] not in ("SelfAttention", "self_attn", "EncDecAttention", "encoder_attn"):
            continue
        layer, is_self = numbers[0], parts[-1] in ("SelfAttention", "self_attn")
        if "decoder" in parts and is_self:
            slots[module] = n + layer if full else (2 * layer) % n if config.num_transformer_submodules == 2 else layer
        elif full and "encoder" in parts and is_self:
            slots[module] = layer
        elif full and "decoder" in parts:
            slots[module] = 2 * n + layer
    if not slots:
        raise ValueError(f"model: found no decoder self-attention in {model.config.model_type}")
    return slots


def kv_sharing_slots(model: PreTrainedModel) -> dict[nn.Module, int] | None:
    """Decoders whose later layers reuse an earlier layer's keys/values (Gemma's KV sharing): those layers read
    that layer's prefix too, as they see its cache in PEFT. None when no layer shares."""
    attentions = [m for m in model.modules() if hasattr(m, "is_kv_shared_layer")]
    if not any(m.is_kv_shared_layer for m in attentions):
        return None
    slots, stores = {}, {}
    for module in attentions:
        slots[module] = stores[module.layer_type] if module.is_kv_shared_layer else module.layer_idx
        if getattr(module, "store_full_length_kv", False):
            stores[module.layer_type] = module.layer_idx
    return slots


def _in_decoder(model: PreTrainedModel, predicate) -> nn.Module | None:
    return next((m for name, m in model.named_modules() if "decoder" in name.split(".") and predicate(name, m)),
                None)


class T5PrefixBias:
    """T5's relative position bias of the prefix keys as PEFT places them: the first P positions, before the
    sequence (so the queries sit at P + past + i). Only in PEFT's placement: in the full form the prefix also
    serves the encoder and cross-attention, where PEFT has none."""

    def __init__(self, attention: nn.Module):
        self.attention = attention  # the decoder attention that owns `relative_attention_bias`

    @classmethod
    def of(cls, model: PreTrainedModel, config: PrefixTuningConfig) -> "T5PrefixBias | None":
        if not getattr(model.config, "is_encoder_decoder", False) or config.encoder_decoder_placement != "peft":
            return None
        attention = _in_decoder(model, lambda name, m: hasattr(m, "relative_attention_bias"))
        return None if attention is None else cls(attention)

    def for_rows(self, row_lengths: tuple[int, ...]):
        """(Sq, past) -> `[1 or B, Hq, Sq, P]`, for rows whose prefixes have `row_lengths` (host ints)."""
        def bias(query_length: int, past: int) -> torch.Tensor:
            longest = max(row_lengths)
            rows = []
            for n in dict.fromkeys(row_lengths) if len(set(row_lengths)) == 1 else row_lengths:
                values = self.attention.compute_bias(query_length, n + past + query_length,
                                                     past_seen_tokens=n + past)[..., :n]
                rows.append(nn.functional.pad(values, (0, longest - n)))
            return torch.cat(rows, dim=0)
        return bias


_ACTIVE_CALL: contextvars.ContextVar = contextvars.ContextVar("prefix_kernels_active_call", default=None)


class LearnedDecoderPositions:
    """BART's family: the decoder numbers its learned positions itself, from the cache length, inside its forward,
    so no argument reaches them. A forward pre-hook on the positional embedding shifts them by P, but only while
    a call of the wrapper that owns the hook runs in this thread (a context variable set around the call), so the
    base model called directly is untouched. Removed by `remove()` (`unload`)."""

    def __init__(self, positions: nn.Module):
        self._hook = positions.register_forward_pre_hook(self._shift, with_kwargs=True)

    @classmethod
    def of(cls, model: PreTrainedModel) -> "LearnedDecoderPositions | None":
        if not getattr(model.config, "is_encoder_decoder", False):
            return None
        positions = _in_decoder(model, lambda name, m: name.endswith("embed_positions")
                                and "position_ids" in inspect.signature(m.forward).parameters)
        return None if positions is None else cls(positions)

    @contextlib.contextmanager
    def during(self, offset: int):
        """Shift the decoder positions by `offset` for the calls made inside the block (this thread only)."""
        token = _ACTIVE_CALL.set((self, offset))
        try:
            yield
        finally:
            _ACTIVE_CALL.reset(token)

    def _shift(self, module, args, kwargs):
        active = _ACTIVE_CALL.get()
        if active is not None and active[0] is self and kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + active[1]
        return args, kwargs

    def remove(self) -> None:
        self._hook.remove()


class PaddingIdxPositions:
    """RoBERTa's family numbers positions from padding_idx + 1, skipping padding tokens (which keep padding_idx);
    embeddings given instead of token ids are numbered in order. Real tokens are numbered as if the P prefix tokens
    came first: from padding_idx + 1 + P, in every row and in every packed sequence."""

    def __init__(self, padding_idx: int):
        self.padding_idx = padding_idx

    @classmethod
    def of(cls, model: PreTrainedModel) -> "PaddingIdxPositions | None":
        found = next((m for m in model.modules()
                      if hasattr(m, "create_position_ids_from_input_ids") and hasattr(m, "padding_idx")), None)
        return None if found is None else cls(found.padding_idx)

    def __call__(self, tokens: torch.Tensor, input_ids: torch.Tensor | None, offsets,
                 sequence_starts: torch.Tensor | None = None) -> torch.Tensor:
        """Positions `[B, T]` of `tokens` (`input_ids` `[B, T]`, or embeddings when `input_ids` is None), the first
        real token numbered padding_idx + 1 + `offsets` (cached tokens and P: an int, `[B, 1]` or `[1, T]`). With
        `sequence_starts` (int64 `[T]`, the index of each token's packed sequence's first token) the count restarts
        at every packed sequence."""
        if input_ids is None:
            real = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        else:
            real = input_ids.ne(self.padding_idx).long()
        count = real.cumsum(1)  # real tokens up to and including each one
        if sequence_starts is not None:
            count = count - (count - real)[:, sequence_starts]  # those before its packed sequence not counted
        return (count + offsets) * real + self.padding_idx


def learned_position_limit(model: PreTrainedModel) -> int | None:
    """How many positions a model with a table of learned absolute positions can number (GPT-2's `wpe`, OPT's
    offset table, BERT's `position_embeddings`, after RoBERTa's padding_idx); None for other models."""
    tables = [(name, m) for name, m in model.named_modules()
              if isinstance(m, nn.Embedding) and name.endswith(("wpe", "position_embeddings", "embed_positions"))]
    if len(tables) != 1:
        return None
    table = tables[0][1]
    skipped = getattr(table, "offset", 0)
    padding = PaddingIdxPositions.of(model)
    if padding is not None:
        skipped = padding.padding_idx + 1
    return table.num_embeddings - skipped
