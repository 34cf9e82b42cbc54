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


@dataclass(frozen=True)
class PrefixLayout:
    """Which layer of the prefix table each attention module reads; fixed when the model is wrapped.

    `slots` maps attention modules to table layers; None means every attention reads its own `layer_idx`.
    """

    slots: dict[nn.Module, int] | None = None

    def slot(self, module: nn.Module) -> int | None:
        """The table layer `module` reads, or None if it has no prefix (an encoder-decoder's other attentions)."""
        if self.slots is not None:
            return self.slots.get(module)
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise ValueError(f"module: {type(module).__name__} has no layer_idx, so its prefix cannot be found")
        return layer


@dataclass(frozen=True)
class PrefixPlan:
    """Every layer's prefix for one call.

    `kv` is `[L, 2, Hkv, P, D]` (one adapter, shared by every row) or a bank `[L, 2, N, Hkv, P, D]` read through
    `index` (int64 `[R]`, the bank entry of each row); with adapters of different lengths the bank is
    zero-padded to the longest and `lengths` (int64 `[R]`) marks each row's real prefix keys. `row_lengths` holds
    the same lengths as Python ints (the positions of real tokens start there, as in PEFT). R is the batch size,
    or the number of packed sequences when `cu_seqlens` is set.
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


def bank_plan(tables: dict[str, torch.Tensor], names: Sequence[str], layout: PrefixLayout,
              device: torch.device) -> PrefixPlan:
    """The plan of a call whose rows read the adapters `names` (one per row) from `tables` (name ->
    `[L, 2, Hkv, P_a, D]`): one bank, zero-padded to the longest P, read by index."""
    distinct = list(dict.fromkeys(names))
    row_lengths = tuple(tables[name].shape[3] for name in names)
    longest = max(row_lengths)
    bank = torch.stack([nn.functional.pad(tables[name], (0, 0, 0, longest - tables[name].shape[3]))
                        for name in distinct], dim=2)
    index = torch.tensor([distinct.index(name) for name in names], device=device)
    lengths = None
    if len(set(row_lengths)) > 1:
        lengths = torch.tensor(row_lengths, device=device)
    return PrefixPlan(kv=bank, layout=layout, row_lengths=row_lengths if lengths is not None else row_lengths[:1],
                      index=index, lengths=lengths)
