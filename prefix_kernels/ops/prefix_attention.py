"""`prefix_attention`: attention over a per-layer prefix and the sequence's keys/values, never concatenated."""

import torch

from .dispatch import select_backend
from .validate import check_inputs


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    prefix_index: torch.Tensor | None = None,
    prefix_lengths: torch.Tensor | None = None,
    attention_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Scaled dot-product attention of `q` over `[prefix_k ; k]` and `[prefix_v ; v]`.

    Equals `softmax(q @ [prefix_k ; k]^T * scale + mask) @ [prefix_v ; v]`, computed without building the
    concatenation and without copying a shared prefix per row.

    Args:
        q: `[B, Hq, Sq, D]` queries (strided views accepted, as transformers passes them).
        k, v: `[B, Hkv, Skv, D]` the sequence's keys/values (the KV cache included); `Hq % Hkv == 0`
            (MHA, GQA, MQA). Not repeated for GQA.
        prefix_k, prefix_v: `[Hkv, P, D]` one prefix shared by every row, `[B, Hkv, P, D]` one per row, or a
            bank `[N, Hkv, P, D]` read through `prefix_index`. `P = 0` gives plain attention.
        causal: bottom-right aligned on the sequence keys only: query i sees sequence key j iff
            `j <= Skv - Sq + i` (FlashAttention's convention with a KV cache). Prefix keys are always seen.
        scale: logit scale, default `D ** -0.5`.
        attention_mask: sequence keys only. None; a key-padding mask `[B, Skv]` (1/True = real token);
            or a boolean `[B, 1 or Hq, Sq, Skv]` (True = attend), combined with `causal`.
        prefix_index: int64 `[B]`, row b reads bank entry `prefix_index[b]`.
        prefix_lengths: int64 `[B]` (with a per-row or bank prefix): row b sees only its first
            `prefix_lengths[b]` prefix keys, the rest being padding — adapters of different lengths in one batch.
        attention_bias: float `[B or 1, Hq or 1, Sq or 1, Skv]` added to the logits of the sequence keys, or
            `[.., P + Skv]` added over `[prefix ; sequence]` (T5's relative position bias with the prefix as the
            first P positions). It receives no gradient.
        softcap: cap the logits as `softcap * tanh(logits / softcap)` before bias and mask (Gemma 2), or None.
        return_lse: also return the natural-log log-sum-exp of each query row.
        backend: "torch", "triton", "cuda" or None (triton on CUDA when importable, else torch;
            the environment variable `PREFIX_KERNELS_BACKEND` overrides None).

    Mask contract for Sq = 3, Skv = 4, P = 2, causal (■ attends, ⬚ masked)::

                   prefix | sequence
        query 0     ■ ■   | ■ ■ ⬚ ⬚
        query 1     ■ ■   | ■ ■ ■ ⬚
        query 2     ■ ■   | ■ ■ ■ ■

    A query row that sees no key at all (P = 0, every sequence key masked) returns zeros and lse = -inf.

    Returns:
        o `[B, Hq, Sq, D]` in q's dtype, and with `return_lse` also lse `[B, Hq, Sq]` float32 (no gradient).
        Differentiable in q, k, v, prefix_k and prefix_v; a prefix shared by several rows (or a bank entry)
        receives the sum of their gradients, accumulated in float32.

    >>> q = torch.randn(2, 8, 5, 64)
    >>> k = v = torch.randn(2, 2, 5, 64)
    >>> pk = pv = torch.randn(2, 16, 64)
    >>> prefix_attention(q, k, v, pk, pv).shape
    torch.Size([2, 8, 5, 64])
    """
    problem = check_inputs(
        q, k, v, prefix_k, prefix_v,
        causal=causal, scale=scale, attention_mask=attention_mask, prefix_index=prefix_index,
        prefix_lengths=prefix_lengths, attention_bias=attention_bias, softcap=softcap,
    )
    kernel = select_backend(backend, q.device, q.shape[-1])
    o, lse = kernel(problem)
    return (o, lse.detach()) if return_lse else o
