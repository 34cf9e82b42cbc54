"""Pieces shared by the Triton kernels: the online-softmax step, key visibility, a key-range loop, and the
launch arguments every kernel takes."""

import os

import torch
import triton
import triton.language as tl

from .problem import AttentionProblem

LOG2E = 1.4426950408889634
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def autotune_configs(names):
    if INTERPRETED:  # the interpreter runs every config it is given; one small config keeps CI fast
        return [triton.Config({names[0]: 16, names[1]: 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({names[0]: bm, names[1]: bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in ((128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (16, 64, 4, 2))
    ]


@triton.jit
def grouped_rows(first, hk, G, SQ, BLOCK_M: tl.constexpr):
    """Query rows [first, first + BLOCK_M) of KV head hk, in grouped order (the G query heads sharing it, each
    with its Sq positions): (row in range, position i, query head h)."""
    rows = first + tl.arange(0, BLOCK_M)
    return rows < G * SQ, rows % SQ, (hk * G + rows // SQ).to(tl.int64)


@triton.jit
def online_softmax_step(m_i, l_i, acc, s, v, PRECISION: tl.constexpr):
    """Fold one tile of base-2 logits `s` [BM, BN] and values `v` [BN, BD] into the running (max, sum, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def sequence_logits(s, n, n_ok, i, h, b, SQ, SKV, MASK, BIAS, s_mb, s_mh, s_mm, s_mn, s_bb, s_bh, s_bm, s_bn, row_ok,
                    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Base-2 logits `s` [BM, BN] of sequence keys `n`, plus the additive bias, with -inf where the query rows
    (position i, head h) may not attend: outside the causal band, masked out, or padding."""
    visible = n_ok[None, :] & row_ok[:, None]
    if CAUSAL:
        visible = visible & (n[None, :] <= (SKV - SQ + i)[:, None])
    if HAS_MASK:
        ptrs = MASK + b * s_mb + h[:, None] * s_mh + i[:, None] * s_mm + n[None, :] * s_mn
        visible = visible & (tl.load(ptrs, mask=visible, other=0) != 0)
    if HAS_BIAS:
        s = add_bias(s, BIAS, b, h, i, n, s_bb, s_bh, s_bm, s_bn, visible)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def add_bias(s, BIAS, b, h, i, n, s_bb, s_bh, s_bm, s_bn, visible):
    """Base-2 logits `s` [BM, BN] plus the additive bias of query rows (position i, head h) and keys n."""
    ptrs = BIAS + b * s_bb + h[:, None] * s_bh + i[:, None] * s_bm + n[None, :] * s_bn
    return s + tl.load(ptrs, mask=visible, other=0.0).to(tl.float32) * 1.4426950408889634


@triton.jit
def load_rows(PTR, b, h, i, s_b, s_h, s_m, s_d, d, mask):
    """The [BM, BD] tile of a [B, Hq, Sq, D] tensor (q, dO) at query rows (head h, position i) of batch row b."""
    return tl.load(PTR + b * s_b + h[:, None] * s_h + i[:, None] * s_m + d[None, :] * s_d, mask=mask, other=0.0)


@triton.jit
def empty_softmax(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The running (max, sum, output accumulator) of an online softmax that has seen no key yet."""
    return (tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
            tl.zeros([BLOCK_M, BLOCK_D], tl.float32))


@triton.jit
def qk_logits(q, kt, qk_scale, cap, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """Base-2 logits q . k * scale * log2(e) [BM, BN], soft-capped as cap * tanh(s / cap) when HAS_SOFTCAP (`cap`
    is the cap times log2(e), so capping in base 2 equals capping the natural logits)."""
    s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
    if HAS_SOFTCAP:
        s = cap * (2.0 * tl.sigmoid(2.0 * s / cap) - 1.0)  # tanh through the sigmoid
    return s


@triton.jit
def softcap_slope(s, cap, HAS_SOFTCAP: tl.constexpr):
    """d(capped logit) / d(logit) = 1 - tanh^2, from the capped logits `s` (1 without a cap)."""
    if HAS_SOFTCAP:
        return 1.0 - (s / cap) * (s / cap)
    return 1.0


@triton.jit
def attend_range(q, m_i, l_i, acc, k_base, v_base, s_kn, s_kd, s_vn, s_vd, lo, hi, n_end, qk_scale, cap, d, d_ok,
                 i, h, b, row_ok, SQ, SKV, MASK, BIAS, s_mb, s_mh, s_mm, s_mn, s_bb, s_bh, s_bm, s_bn,
                 IS_SEQUENCE: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                 PRECISION: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr):
    """Fold keys [lo, hi) (those >= n_end are padding) into the running softmax of the query rows `q` [BM, BD].
    Prefix keys are seen by every row; sequence keys pass the causal band and the mask. `BIAS` is the additive
    bias of these keys (the prefix's or the sequence's columns), applied when HAS_BIAS."""
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < n_end
        kt = tl.load(k_base + n[None, :] * s_kn + d[:, None] * s_kd, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + n[:, None] * s_vn + d[None, :] * s_vd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = qk_logits(q, kt, qk_scale, cap, HAS_SOFTCAP, PRECISION)  # [BM, BN], base-2 logits
        if IS_SEQUENCE:
            s = sequence_logits(s, n, n_ok, i, h, b, SQ, SKV, MASK, BIAS, s_mb, s_mh, s_mm, s_mn,
                                s_bb, s_bh, s_bm, s_bn, row_ok, CAUSAL, HAS_MASK, HAS_BIAS)
        else:
            visible = n_ok[None, :] & row_ok[:, None]
            if HAS_BIAS:
                s = add_bias(s, BIAS, b, h, i, n, s_bb, s_bh, s_bm, s_bn, visible)
            s = tl.where(visible, s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v, PRECISION)
    return m_i, l_i, acc


@triton.jit
def causal_end(i, row_ok, SQ, SKV, CAUSAL: tl.constexpr):
    """One past the last sequence key any of these query rows can see (bottom-right causal)."""
    if CAUSAL:
        return tl.minimum(SKV, tl.maximum(SKV - SQ + tl.max(tl.where(row_ok, i, 0), 0) + 1, 0))
    return SKV


@triton.jit
def finish_rows(m_i, l_i, acc):
    """(o, natural-log lse) of the running softmax; rows that saw no key give o = 0, lse = -inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    return acc / l_safe[:, None], lse


def prefix_views(p: AttentionProblem):
    """(prefix_k, prefix_v, their strides with batch stride 0 for a shared prefix, index tensor or None)."""
    pk, pv = p.prefix_k, p.prefix_v
    if pk.dim() == 3:
        return pk, pv, (0, *pk.stride()), (0, *pv.stride())
    return pk, pv, pk.stride(), pv.stride()


def broadcast_view(t: torch.Tensor | None, dtype: torch.dtype, dummy: torch.Tensor):
    """(t viewed as `dtype`, or a dummy; its strides with 0 on broadcast dims) for a mask or bias."""
    if t is None:
        return dummy, (0, 0, 0, 0)
    t = t.view(dtype)
    return t, tuple(0 if size == 1 else stride for size, stride in zip(t.shape, t.stride()))


def softcap_arg(p: AttentionProblem) -> float:
    """The logit cap in base-2 units (the kernels' `cap`), 0 when there is none."""
    return 0.0 if p.softcap is None else p.softcap * LOG2E


def launch_args(p: AttentionProblem):
    """(sizes, the tensors after Q, K, V in every kernel's argument list, their strides, constexprs)."""
    q, k = p.q, p.k
    b, hq, sq, d = q.shape
    hkv, skv, n_prefix = k.shape[1], k.shape[2], p.prefix_k.shape[-2]
    pk, pv, s_pk, s_pv = prefix_views(p)
    dummy = q.new_empty(1, dtype=torch.int64)
    mask, s_m = broadcast_view(p.mask, torch.uint8, dummy)
    bias, s_b = broadcast_view(p.sequence_bias, q.dtype if p.bias is None else p.bias.dtype, dummy)
    prefix_bias = p.prefix_bias if p.prefix_bias is not None else dummy
    # The kernels read row b's entry at offset b: a sliced (strided) index or lengths tensor gets a copy.
    index = p.prefix_index.contiguous() if p.prefix_index is not None else dummy
    lengths = p.prefix_lengths.contiguous() if p.prefix_lengths is not None else dummy
    consts = dict(
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), CAUSAL=p.causal, HAS_MASK=p.mask is not None,
        HAS_BIAS=p.bias is not None, HAS_PREFIX_BIAS=p.prefix_bias is not None,
        HAS_INDEX=p.prefix_index is not None, HAS_LENGTHS=p.prefix_lengths is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", HAS_SOFTCAP=p.softcap is not None,
    )
    extras = (pk, pv, index, lengths, mask, bias, prefix_bias)
    return (b, hq, sq, d, hkv, skv, n_prefix), extras, (*s_pk, *s_pv, *s_m, *s_b), consts
