"""Backend "triton", decode shapes (Sq <= 16): split-KV forward (flash-decoding) with the prefix as one split.

A decode step has few query rows and a long cache, so one program per (batch row, KV head) would leave most of
the GPU idle. The keys are split instead: program 0 of each (batch row, KV head) attends to the prefix, the
others to consecutive chunks of the sequence, each with all the query heads of the KV group as its rows (so a
K/V byte is read once). Every split writes its partial output and LSE; a second kernel merges them by LSE.
The split count is chosen so the first kernel's grid covers the SMs about twice.

Backward is the prefill kernels' (it needs only O and LSE), so decode shapes stay differentiable.
"""

import torch
import triton
import triton.language as tl

from .problem import AttentionProblem
from .triton_common import (
    INTERPRETED,
    LOG2E,
    attend_range,
    causal_end,
    empty_softmax,
    finish_rows,
    grouped_rows,
    launch_args,
    load_rows,
    softcap_arg,
)

MAX_DECODE_QUERIES = 16
MAX_DECODE_ROWS = 128  # one program holds every query row of a KV group; more would not fit in registers


def takes(p: AttentionProblem) -> bool:
    """Whether the split-KV kernel serves this problem: few queries, and a GQA group that fits one program."""
    sq, group = p.q.shape[2], p.q.shape[1] // p.k.shape[1]
    return sq <= MAX_DECODE_QUERIES and group * sq <= MAX_DECODE_ROWS
BLOCK_N = 16 if INTERPRETED else 64


@triton.jit
def _split_kernel(
    Q, K, V, PK, PV, PIDX, PLEN, MASK, BIAS, PBIAS, O_PART, LSE_PART,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_pkb, s_pkh, s_pkn, s_pkd, s_pvb, s_pvh, s_pvn, s_pvd, s_mb, s_mh, s_mm, s_mn, s_bb, s_bh, s_bm, s_bn,
    HKV, G, SQ, SKV, P, qk_scale, cap, KEYS_PER_SPLIT, SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_PREFIX_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_LENGTHS: tl.constexpr, PRECISION: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)  # 0: the prefix; s > 0: sequence keys [(s-1) * KEYS_PER_SPLIT, s * KEYS_PER_SPLIT)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = pid_bh % HKV
    row_ok, i, h = grouped_rows(0, hk, G, SQ, BLOCK_M)  # every query row of this KV head
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = load_rows(Q, b, h, i, s_qb, s_qh, s_qm, s_qd, d, row_ok[:, None] & d_ok[None, :])  # [BM, BD]
    m_i, l_i, acc = empty_softmax(BLOCK_M, BLOCK_D)
    if split == 0:
        pb = tl.load(PIDX + b) if HAS_INDEX else b
        p_len = tl.load(PLEN + b).to(tl.int32) if HAS_LENGTHS else P
        m_i, l_i, acc = attend_range(
            q, m_i, l_i, acc, PK + pb * s_pkb + hk * s_pkh, PV + pb * s_pvb + hk * s_pvh,
            s_pkn, s_pkd, s_pvn, s_pvd, 0, p_len, p_len, qk_scale, cap, d, d_ok, i, h, b, row_ok, SQ, SKV, MASK, PBIAS,
            s_mb, s_mh, s_mm, s_mn, s_bb, s_bh, s_bm, s_bn, False, CAUSAL, HAS_MASK, HAS_PREFIX_BIAS, PRECISION,
            HAS_SOFTCAP, BLOCK_N)
    else:
        lo = (split - 1) * KEYS_PER_SPLIT
        end = tl.minimum(lo + KEYS_PER_SPLIT, SKV)
        m_i, l_i, acc = attend_range(
            q, m_i, l_i, acc, K + b * s_kb + hk * s_kh, V + b * s_vb + hk * s_vh, s_kn, s_kd, s_vn, s_vd,
            lo, tl.minimum(end, causal_end(i, row_ok, SQ, SKV, CAUSAL)), end, qk_scale, cap, d, d_ok, i, h, b,
            row_ok, SQ, SKV, MASK, BIAS, s_mb, s_mh, s_mm, s_mn, s_bb, s_bh, s_bm, s_bn,
            True, CAUSAL, HAS_MASK, HAS_BIAS, PRECISION, HAS_SOFTCAP, BLOCK_N)
    o, lse = finish_rows(m_i, l_i, acc)
    part = (pid_bh * SPLITS + split) * BLOCK_M + rows  # O_PART [B * Hkv, SPLITS, BM, BD], LSE_PART [.., BM]
    tl.store(O_PART + part[:, None] * BLOCK_D + d[None, :], o)
    tl.store(LSE_PART + part, lse)


@triton.jit
def _combine_kernel(
    O_PART, LSE_PART, O, LSE, s_ob, s_oh, s_om, s_od, HKV, G, SQ, SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the splits of one (batch row, KV head) by their LSE; rows that saw nothing stay 0 / -inf."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // HKV).to(tl.int64)
    row_ok, i, h = grouped_rows(0, pid_bh % HKV, G, SQ, BLOCK_M)
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    top = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for split in range(0, SPLITS):
        top = tl.maximum(top, tl.load(LSE_PART + (pid_bh * SPLITS + split) * BLOCK_M + rows))
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for split in range(0, SPLITS):
        part = (pid_bh * SPLITS + split) * BLOCK_M + rows
        w = tl.math.exp2((tl.load(LSE_PART + part) - top_safe) * 1.4426950408889634)
        total += w
        acc += w[:, None] * tl.load(O_PART + part[:, None] * BLOCK_D + d[None, :])
    empty = total == 0.0
    o = acc / tl.where(empty, 1.0, total)[:, None]
    lse = tl.where(empty, float("-inf"), top_safe + tl.log(tl.where(empty, 1.0, total)))
    tl.store(O + b * s_ob + h[:, None] * s_oh + i[:, None] * s_om + d[None, :] * s_od, o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (d[None, :] < HEAD_DIM))
    tl.store(LSE + (b * (HKV * G) + h) * SQ + i, lse, mask=row_ok)


def _split_count(batch_heads: int, skv: int, device: torch.device) -> int:
    """Sequence splits: enough programs to cover the SMs about twice, none shorter than one key block."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(triton.cdiv(2 * sms, batch_heads), triton.cdiv(skv, BLOCK_N)))


def decode_forward(p: AttentionProblem):
    """(o `[B, Hq, Sq, D]`, lse `[B, Hq, Sq]` float32) for the problems `takes` accepts."""
    (b, hq, sq, d, hkv, skv, n_prefix), extras, strides, consts = launch_args(p)
    rows = (hq // hkv) * sq
    block_m = max(16, triton.next_power_of_2(rows))
    block_d = consts["BLOCK_D"]
    seq_splits = _split_count(b * hkv, skv, p.q.device)
    keys_per_split = triton.cdiv(triton.cdiv(max(skv, 1), seq_splits), BLOCK_N) * BLOCK_N
    splits = 1 + triton.cdiv(skv, keys_per_split)
    o_part = torch.empty(b * hkv, splits, block_m, block_d, dtype=torch.float32, device=p.q.device)
    lse_part = torch.empty(b * hkv, splits, block_m, dtype=torch.float32, device=p.q.device)
    _split_kernel[(splits, b * hkv)](
        p.q, p.k, p.v, *extras, o_part, lse_part,
        *p.q.stride(), *p.k.stride(), *p.v.stride(), *strides,
        hkv, hq // hkv, sq, skv, n_prefix, p.scale * LOG2E, softcap_arg(p), keys_per_split, splits,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, **consts,
    )
    o = torch.empty(b, sq, hq, d, dtype=p.q.dtype, device=p.q.device).transpose(1, 2)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=p.q.device)
    _combine_kernel[(b * hkv,)](o_part, lse_part, o, lse, *o.stride(), hkv, hq // hkv, sq, splits,
                                HEAD_DIM=d, BLOCK_M=block_m, BLOCK_D=block_d)
    return o, lse
