"""The per-call plan: what one `PrefixModel.forward` or `generate` call needs in every attention layer.

A `PrefixPlan` is built once at the start of a call, from Python values only (adapter names, their lengths) and
the adapters' tables, computed once and already in the model's dtype. It travels with the call as the keyword
argument `prefix_plan`, which transformers passes from the model's forward down to every attention function,
so nothing per call is stored on the model: concurrent calls from several threads, and nested calls, each see
only their own. Inside `generate` the same plan serves every decoding step.

Nothing here reads device data on the host: row counts, lengths and offsets are Python values; the tensors
(tables, bank index, lengths, packed offsets) are only handed to the attention op.
"""

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from . import quirks
from .quirks import PrefixLayout


@dataclass(frozen=True)
class PrefixPlan:
    """Every layer's prefix for one call.

    `kv` is `[L, 2, Hkv, P, D]` (one adapter, shared by every row) or a bank `[L, 2, N, Hkv, P, D]` read through
    `index` (int64 `[R]`, the bank entry of each row); with adapters of different lengths the bank is
    zero-padded to the longest and `lengths` (int64 `[R]`) marks each row's real prefix keys. `row_lengths` holds
    the same lengths as Python ints (the positions of real tokens start there, as in PEFT). R is the batch size,
    the number of packed sequences when `cu_seqlens` is set, or the step's requests when `paged` is.
    """

    kv: torch.Tensor
    layout: PrefixLayout
    row_lengths: tuple[int, ...]  # each row's P (one entry when every row reads the same adapter)
    index: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    # Packed sequences of a batch of one row: offsets int32 [N + 1] along the sequence axis, and the longest.
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    # T5's relative position bias of the prefix keys, [1 or B, Hq, Sq, P], for the decoder's self-attention.
    prefix_position_bias: torch.Tensor | None = None
    # One step of transformers' continuous batching: the rows are the step's requests packed in one row, each layer's
    # queries their new tokens and its keys their cached and new ones, at the offsets the engine gives every layer
    # (`cu_seq_lens_q` / `cu_seq_lens_k`, `max_length_q` / `max_length_k`).
    paged: bool = False

    def __post_init__(self):
        # `layers`: each table layer's (keys, values), `[(N,) Hkv, P, D]` views of `kv`, split once per plan rather
        # than per attention layer. Not a field: `dataclasses.replace` (FSDP2 maps a call's keyword arguments
        # through it) builds it again from the new `kv`.
        object.__setattr__(self, "layers", tuple(tuple(layer.unbind(0)) for layer in self.kv.unbind(0)))

    @property
    def uniform(self) -> bool:
        """Whether every row's prefix has the same length."""
        return len(set(self.row_lengths)) == 1

    def for_rows(self, rows: int) -> "PrefixPlan":
        """This plan for `rows` rows, where `generate` has repeated each input row rows / R times (beams,
        num_return_sequences); itself when the rows already match."""
        if self.index is None or self.index.shape[0] == rows:
            return self
        repeat = rows // self.index.shape[0]
        return dataclasses.replace(
            self, index=self.index.repeat_interleave(repeat),
            lengths=None if self.lengths is None else self.lengths.repeat_interleave(repeat),
            row_lengths=tuple(n for n in self.row_lengths for _ in range(repeat)) if not self.uniform
            else self.row_lengths)


def single_plan(table: torch.Tensor, layout: PrefixLayout, length: int) -> PrefixPlan:
    """The plan of a call where every row reads one adapter, `table` `[L, 2, Hkv, P, D]`."""
    return PrefixPlan(kv=table, layout=layout, row_lengths=(length,))


def stack_bank(tables: Sequence[torch.Tensor]) -> torch.Tensor:
    """`[L, 2, N, Hkv, P, D]`: the adapters' tables (each `[L, 2, Hkv, P_a, D]`) zero-padded to the longest P."""
    longest = max(table.shape[3] for table in tables)
    return torch.stack([nn.functional.pad(table, (0, 0, 0, longest - table.shape[3])) for table in tables], dim=2)


def bank_plan(tables: dict[str, torch.Tensor], names: Sequence[str], layout: PrefixLayout) -> PrefixPlan:
    """The plan of a call whose rows read the adapters `names` (one per row) from `tables` (name ->
    `[L, 2, Hkv, P_a, D]`): one bank of just those adapters, zero-padded to the longest P, read by index."""
    return ServedBank.of({name: tables[name] for name in dict.fromkeys(names)}, ()).plan(names, layout)


@dataclass(frozen=True)
class ServedBank:
    """Every loaded adapter's table in one bank `[L, 2, N, Hkv, P, D]` (zero-padded to the longest P), for calls
    that train nothing: `key` says which adapters and parameter versions it holds."""

    kv: torch.Tensor
    entries: dict[str, int]  # adapter name -> bank entry
    entry_lengths: tuple[int, ...]  # each entry's P
    key: tuple

    @classmethod
    def of(cls, tables: dict[str, torch.Tensor], key: tuple) -> "ServedBank":
        return cls(stack_bank(list(tables.values())), {name: i for i, name in enumerate(tables)},
                   tuple(table.shape[3] for table in tables.values()), key)

    def plan(self, names: Sequence[str], layout: PrefixLayout) -> PrefixPlan:
        """The plan of a call whose rows read `names`: the whole bank, read by index. Its shapes, and whether it
        carries per-row lengths, depend on the loaded adapters only, not on which ones the call names."""
        entries = [self.entries[name] for name in names]
        row_lengths = tuple(self.entry_lengths[i] for i in entries)
        device = self.kv.device
        lengths = None if len(set(self.entry_lengths)) == 1 else torch.tensor(row_lengths, device=device)
        return PrefixPlan(kv=self.kv, layout=layout, row_lengths=row_lengths if lengths is not None
                          else row_lengths[:1], index=torch.tensor(entries, device=device), lengths=lengths)


@dataclass(frozen=True)
class Packing:
    """One row holding several sequences back to back: their offsets (int32 `[N + 1]`), the longest, and their
    lengths as Python ints."""

    cu_seqlens: torch.Tensor
    longest: int
    lengths: list[int]

    @property
    def sequences(self) -> int:
        return len(self.lengths)


def find_packing(kwargs: dict, encoder_decoder: bool) -> Packing | None:
    """The packing of a forward's inputs, decided here and nowhere else, as transformers' flash path finds it: from
    the data collator's `cu_seq_lens_q` / `cu_seq_lens_k`, else, in a decoder, from `position_ids` that restart at
    0 in a batch of one row with no attention mask and no cache; None for an ordinary batch.

    A packing signal that cannot be honoured is refused by name, never ignored: `cu_seq_lens_*` given to an
    encoder-decoder, for more than one row, beside an attention mask with padding or a filled cache, or with
    offsets that do not cover the row. Reads the sequence offsets once per call, never per layer."""
    given = [name for name in ("cu_seq_lens_q", "cu_seq_lens_k") if kwargs.get(name) is not None]
    if given:
        cu_seqlens = _collator_offsets(kwargs, given, encoder_decoder)
    elif encoder_decoder:
        return None
    else:
        positions = kwargs.get("position_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        tokens = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if positions is None or kwargs.get("attention_mask") is not None or cache is not None \
                or tokens is None or tokens.shape[0] != 1:
            return None
        positions = positions.reshape(-1)
        starts = (positions == 0).nonzero().reshape(-1).tolist()
        if starts[:1] != [0]:
            starts = [0, *starts]
        if len(starts) == 1:
            return None
        cu_seqlens = torch.tensor([*starts, positions.shape[0]], dtype=torch.int32, device=positions.device)
    lengths = cu_seqlens.diff().tolist()
    return Packing(cu_seqlens, max(lengths, default=0), lengths)


def _collator_offsets(kwargs: dict, given: list[str], encoder_decoder: bool) -> torch.Tensor:
    """The offsets (int32 `[N + 1]`) of the packed sequences `cu_seq_lens_*` name, checked against the inputs."""
    name = given[0]
    if encoder_decoder:
        raise ValueError(f"{name}: packed sequences are not supported by encoder-decoders (their decoder positions "
                         "and cross-attention are per row); expected a padded batch")
    offsets = kwargs[name]
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.is_floating_point():
        raise ValueError(f"{name}: expected integer offsets [N + 1], got {getattr(offsets, 'shape', offsets)!r}")
    if len(given) == 2 and not torch.equal(kwargs["cu_seq_lens_k"].to(offsets.device, offsets.dtype), offsets):
        raise ValueError("cu_seq_lens_k: expected the same offsets as cu_seq_lens_q (self-attention)")
    tokens = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if tokens is None:
        raise ValueError(f"{name}: packed sequences need input_ids or inputs_embeds, got neither")
    if tokens.shape[0] != 1:
        raise ValueError(f"{name}: packed sequences are one row of back-to-back tokens, got {tokens.shape[0]} rows; "
                         "expected a batch of one row")
    mask = kwargs.get("attention_mask")
    if mask is not None and (mask.dim() != 2 or not bool(mask.all())):
        raise ValueError(f"attention_mask: with {name} the packed sequences lie back to back with no padding, so "
                         f"the mask must be None or all ones; got {'padding' if mask.dim() == 2 else 'a 4-D mask'}. "
                         "Drop the padded tokens from the row, or the mask")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(f"{name}: packed sequences take no filled cache, got one holding {cache.get_seq_length()} "
                         "tokens")
    listed = offsets.tolist()
    if listed[:1] != [0] or listed[-1] != tokens.shape[1] or any(a > b for a, b in zip(listed, listed[1:])):
        raise ValueError(f"{name}: expected offsets from 0 to the row's {tokens.shape[1]} tokens, never decreasing, "
                         f"got {listed}")
    return offsets.to(torch.int32)


class Positions:
    """How a wrapped model numbers its tokens with P prefix positions in front (fixed when the model is
    wrapped): real tokens start at P, as in PEFT, per row with adapters of different lengths, restarting for each
    packed sequence."""

    def __init__(self, model: PreTrainedModel):
        self.model_type = model.config.model_type
        self.padding_numbering = quirks.PaddingIdxPositions.of(model)
        self.limit = None if model.config.is_encoder_decoder else quirks.learned_position_limit(model)

    @staticmethod
    def offsets(plan: PrefixPlan, packing: Packing | None) -> int | torch.Tensor:
        """Where real tokens start: P, `[B, 1]` per row, or `[1, T]` per packed token (per row whenever the plan has
        per-row lengths, so the positions' shape does not depend on which adapters a call names)."""
        if plan.lengths is None:
            return plan.row_lengths[0]
        if packing is None:
            return plan.lengths[:, None]
        return plan.lengths.repeat_interleave(torch.tensor(packing.lengths, device=plan.lengths.device))[None]

    def __call__(self, kwargs: dict, plan: PrefixPlan, packing: Packing | None) -> torch.Tensor:
        """The `position_ids` of this forward: the given ones shifted by P, else the model's own numbering as if P
        tokens came before the cache (restarting for every packed sequence)."""
        offsets = self.offsets(plan, packing)
        if packing is not None:
            self.check_length(packing.longest, 0, max(plan.row_lengths), packed=True)
        if kwargs.get("position_ids") is not None:
            return kwargs["position_ids"] + offsets
        tokens = kwargs.get("input_ids")
        tokens = tokens if tokens is not None else kwargs["inputs_embeds"]
        if packing is not None:
            starts = packing.cu_seqlens[:-1].long().repeat_interleave(
                torch.tensor(packing.lengths, device=packing.cu_seqlens.device))  # [T]: each token's sequence start
            if self.padding_numbering is not None:
                return self.padding_numbering(tokens, kwargs.get("input_ids"), offsets, starts)
            return (torch.arange(tokens.shape[1], device=tokens.device) - starts)[None] + offsets
        if kwargs.get("cache_position") is not None:
            return kwargs["cache_position"][None] + offsets
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        self.check_length(tokens.shape[1], past, max(plan.row_lengths))
        if self.padding_numbering is not None:
            return self.padding_numbering(tokens, kwargs.get("input_ids"), past + offsets)
        return torch.arange(past, past + tokens.shape[1], device=tokens.device)[None] + offsets

    def check_length(self, length: int, past: int, prefix: int, packed: bool = False) -> None:
        """Models with a table of learned positions: the prefix takes the first P of them (host ints only)."""
        if self.limit is not None and past + length + prefix > self.limit:
            tokens = f"the {length} tokens of a packed sequence" if packed else \
                f"{length} tokens after {past} cached ones"
            raise ValueError(f"input_ids: {tokens} need positions up to {past + length + prefix}, but "
                             f"{self.model_type} numbers only {self.limit} and the prefix takes the first {prefix}; "
                             f"give at most {self.limit - prefix - past} tokens{' per sequence' if packed else ''}")
