"""`AttentionProblem`: the checked inputs of one `prefix_attention` call, the one thing every backend reads.

Batched and packed (varlen) calls share one layout. A packed call is a batch of one row whose sequence axis
holds every packed sequence back to back; `cu_seqlens_q` / `cu_seqlens_k` say where each starts, and the
per-sequence arguments (`prefix_index`, `prefix_lengths`, a per-row prefix) have one entry per sequence.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionProblem:
    """The inputs of one call, checked, in the layout every backend reads.

    Shapes (R = B rows, or N packed sequences when `cu_seqlens_q` is given, in which case B = 1)::

        q            [B, Hq, Sq, D]        Sq = total query tokens when packed
        k, v         [B, Hkv, Skv, D]      Skv = total key tokens when packed
        prefix_k/v   [Hkv, P, D]           shared by every row, read with batch stride 0
                     [R, Hkv, P, D]        one per row (sequence), or a bank [N_bank, ...] with prefix_index
        prefix_index int64 [R]             bank entry of each row (sequence)
        prefix_lengths int64 [R]           row r sees prefix keys [0, prefix_lengths[r])
        mask         bool [B|1, 1|Hq, Sq|1, Skv], True = attend (never when packed)
        bias         float [B|1, Hq|1, Sq|1, Skv or P + Skv], added to the logits (never when packed)
        cu_seqlens_q/k int32 [N + 1]       sequence starts along Sq / Skv, with the total last
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    prefix_k: torch.Tensor
    prefix_v: torch.Tensor
    causal: bool
    scale: float
    prefix_index: torch.Tensor | None = None
    prefix_lengths: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    softcap: float | None = None  # logits (before bias and mask) become softcap * tanh(logits / softcap)
    window: int | None = None  # causal only: sequence key j visible iff edge - window < j <= edge
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0  # the longest packed sequence (host ints: they size grids without reading devices)
    max_seqlen_k: int = 0

    @property
    def shared_prefix(self) -> bool:
        return self.prefix_k.dim() == 3

    @property
    def packed(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def rows(self) -> int:
        """R: batch rows, or packed sequences."""
        return self.cu_seqlens_q.shape[0] - 1 if self.packed else self.q.shape[0]

    @property
    def group(self) -> int:
        """G = Hq / Hkv: the query heads sharing one key/value head."""
        return self.q.shape[1] // self.k.shape[1]

    @property
    def sequence_bias(self) -> torch.Tensor | None:
        """The bias of the sequence keys, `[.., Skv]`."""
        return None if self.bias is None else self.bias[..., self.bias.shape[-1] - self.k.shape[2]:]

    @property
    def prefix_bias(self) -> torch.Tensor | None:
        """The bias of the prefix keys, `[.., P]`, when the bias covers them too."""
        if self.bias is None or self.bias.shape[-1] == self.k.shape[2]:
            return None
        return self.bias[..., : self.prefix_k.shape[-2]]
