"""Packed sequences for backend "torch": gathered into left-padded batches, so a call costs a few batched
computations whatever the number of sequences, instead of one per sequence.

A batch of n sequences pads its queries to Mq and its keys to Mk on the left. Left padding on both sides keeps
bottom-right causal exact: sequence i's query t sits at row Mq - Lq_i + t and its key j at column Mk - Lk_i + j, and
`column <= Mk - Mq + row` is `j <= Lk_i - Lq_i + t`. The padded keys are hidden by a key-padding mask, the padded
query rows are never read back (and carry zero output gradient).

Sequences go into the same batch while the logits their padding wastes cost less than another batched call
(`CALL_LOGITS`): a continuous-batching step's decode tokens (one query each over caches of any length) share one
batch, a packed training row's sequences of similar lengths share one, and a long prefill next to one-token decodes
gets its own. The batches of a call are planned once per offsets tensor (the same for every layer of a model call)
from host values: on CPU reading `cu_seqlens_*` costs nothing.
"""

import itertools
from dataclasses import dataclass, replace

import torch

from .memo import derived
from .problem import AttentionProblem

# One more batched call costs about as much host time as this many logits of arithmetic (a decode step's scale).
CALL_LOGITS = 1 << 15


@dataclass(frozen=True)
class Batch:
    """Some packed sequences as one left-padded batch: `rows` int64 `[n]` (which sequences), the padded lengths, and
    for queries and keys the packed token of each real entry (`src_*` int64 `[T]`) and its padded row (`dest_*`)."""

    rows: torch.Tensor
    mq: int
    mk: int
    src_q: torch.Tensor
    dest_q: torch.Tensor
    src_k: torch.Tensor
    dest_k: torch.Tensor
    keys: torch.Tensor  # bool [n, 1, 1, Mk]: the real keys

    def pad(self, t: torch.Tensor, src: torch.Tensor, dest: torch.Tensor, length: int):
        """Token-major `t` `[T, ...]` -> `[n, length, ...]`, each sequence's tokens last, zeros before them."""
        padded = t.new_zeros((self.rows.shape[0] * length, *t.shape[1:]))
        return padded.index_copy_(0, dest, t.index_select(0, src)).view(self.rows.shape[0], length, *t.shape[1:])

    def unpad(self, t: torch.Tensor, src: torch.Tensor, dest: torch.Tensor, into: torch.Tensor) -> None:
        """Copy the real entries of `[n, length, ...]` back to their tokens of `into` `[T, ...]`."""
        into.index_copy_(0, src, t.reshape(t.shape[0] * t.shape[1], *t.shape[2:]).index_select(0, dest))

    def problem(self, p: AttentionProblem) -> AttentionProblem:
        """This batch of `p` as a batched (not packed) problem with a key-padding mask."""
        q, k, v = (t[0].transpose(0, 1) for t in (p.q, p.k, p.v))  # token-major [T, H, D] views
        prefix_k, prefix_v, index = p.prefix_k, p.prefix_v, p.prefix_index
        if index is not None:
            index = index.index_select(0, self.rows)
        elif not p.shared_prefix:
            prefix_k, prefix_v = prefix_k.index_select(0, self.rows), prefix_v.index_select(0, self.rows)
        lengths = None if p.prefix_lengths is None else p.prefix_lengths.index_select(0, self.rows)
        return replace(
            p, q=self.pad(q, self.src_q, self.dest_q, self.mq).transpose(1, 2),
            k=self.pad(k, self.src_k, self.dest_k, self.mk).transpose(1, 2),
            v=self.pad(v, self.src_k, self.dest_k, self.mk).transpose(1, 2), prefix_k=prefix_k, prefix_v=prefix_v,
            prefix_index=index, prefix_lengths=lengths, mask=self.keys, cu_seqlens_q=None, cu_seqlens_k=None,
            max_seqlen_q=0, max_seqlen_k=0)


def batches(p: AttentionProblem) -> list[Batch]:
    """The left-padded batches of a packed problem, planned once per pair of offset tensors and their contents."""
    cu_q, cu_k = p.cu_seqlens_q, p.cu_seqlens_k

    def plan():
        return cu_k, _plan(cu_q.tolist(), cu_k.tolist(), cu_q.device)

    if cu_k.is_inference():
        return plan()[1]
    planned_k, found = derived(cu_q, ("batches", id(cu_k), cu_k._version), plan)
    return found if planned_k is cu_k else plan()[1]


def _plan(starts_q: list[int], starts_k: list[int], device: torch.device) -> list[Batch]:
    lengths = [(q1 - q0, k1 - k0, i) for i, (q0, q1, k0, k1)
               in enumerate(zip(starts_q, starts_q[1:], starts_k, starts_k[1:])) if q1 > q0]
    lengths.sort(reverse=True)  # longest queries first, then longest keys
    groups, group = [], []
    for lq, lk, i in lengths:
        if group:
            n, mq, mk = len(group), group[0][0], max(g[1] for g in group)
            real = sum(g[0] * g[1] for g in group)
            grown = (n + 1) * mq * max(mk, lk) - (real + lq * lk)
            if grown > n * mq * mk - real + CALL_LOGITS:
                groups.append(group)
                group = []
        group.append((lq, lk, i))
    if group:
        groups.append(group)
    return [_batch(group, starts_q, starts_k, device) for group in groups]


def _positions(group, starts: list[int], which: int, padded: int):
    """(src, dest) of one side (which = 0: queries, 1: keys): each real token's packed index and padded row."""
    src, dest = [], []
    for row, entry in enumerate(group):
        length, start = entry[which], starts[entry[2]]
        src.append(range(start, start + length))
        dest.append(range(row * padded + padded - length, (row + 1) * padded))
    return list(itertools.chain.from_iterable(src)), list(itertools.chain.from_iterable(dest))


def _batch(group, starts_q: list[int], starts_k: list[int], device: torch.device) -> Batch:
    mq, mk = group[0][0], max(entry[1] for entry in group)
    src_q, dest_q = _positions(group, starts_q, 0, mq)
    src_k, dest_k = _positions(group, starts_k, 1, mk)
    key_lengths = torch.tensor([entry[1] for entry in group], device=device)
    keys = torch.arange(mk, device=device) >= (mk - key_lengths)[:, None]

    def index(values):
        return torch.tensor(values, dtype=torch.int64, device=device)

    return Batch(index([entry[2] for entry in group]), mq, mk, index(src_q), index(dest_q), index(src_k),
                 index(dest_k), keys[:, None, None, :])
