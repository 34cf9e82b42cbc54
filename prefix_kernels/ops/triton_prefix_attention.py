"""Backend "triton": fused prefix attention, forward and backward, in the order they run.

Forward: one program per (block of query rows, batch row x KV head). The query rows of a program are the
*grouped* rows of one KV head — the G = Hq / Hkv query heads that share it, times Sq — so the heads of a GQA
group read each K/V tile once. A program walks the P prefix keys first (no mask; a shared prefix read with
batch stride 0, a bank entry found through `prefix_index`), then the sequence keys with bottom-right causal
masking (key blocks past the causal edge are never visited) and the key-padding / 4-D mask, all under one
online softmax in base 2 (logits pre-scaled by scale * log2(e), fp32 accumulators). It writes O and the
natural-log LSE.

Decode shapes (Sq <= 16, at most 128 query rows per KV group) take the split-KV forward of `triton_decode.py`
instead; both write O and LSE, which is all the backward below needs.

Backward, FlashAttention-2 style: delta = rowsum(dO * O); one kernel per key block computes dK/dV for
sequence keys and each row's share of the prefix gradients (summed afterwards in fp32, deterministically);
one kernel per query block computes dQ. Sequence dK/dV are skipped when k and v need no gradient.
"""

import torch
import triton
import triton.language as tl

from . import triton_decode
from .problem import AttentionProblem
from .triton_common import (
    LOG2E,
    add_bias,
    attend_range,
    autotune_configs,
    causal_end,
    empty_softmax,
    finish_rows,
    grouped_rows,
    launch_args,
    load_rows,
    qk_logits,
    sequence_logits,
    softcap_arg,
    softcap_slope,
)


@triton.autotune(configs=autotune_configs(("BLOCK_M", "BLOCK_N")), key=["HEAD_DIM", "CAUSAL", "HAS_MASK"])
@triton.jit
def _forward_kernel(
    Q, K, V, PK, PV, PIDX, PLEN, MASK, BIAS, PBIAS, O, LSE,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_pkb, s_pkh, s_pkn, s_pkd, s_pvb, s_pvh, s_pvn, s_pvd,
    s_mb, s_mh, s_mm, s_mn, s_bb, s_bh, s_bm, s_bn, s_ob, s_oh, s_om, s_od,
    HKV, G, SQ, SKV, P, qk_scale, cap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_PREFIX_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_LENGTHS: tl.constexpr, PRECISION: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = pid_bh % HKV
    row_ok, i, h = grouped_rows(tl.program_id(0) * BLOCK_M, hk, G, SQ, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = load_rows(Q, b, h, i, s_qb, s_qh, s_qm, s_qd, d, row_ok[:, None] & d_ok[None, :])  # [BM, BD]
    m_i, l_i, acc = empty_softmax(BLOCK_M, BLOCK_D)

    # Prefix keys first. A shared prefix has s_pkb = 0: every batch row reads the same bytes.
    pb = tl.load(PIDX + b) if HAS_INDEX else b
    p_len = tl.load(PLEN + b).to(tl.int32) if HAS_LENGTHS else P  # this row's prefix keys; the rest is padding
    m_i, l_i, acc = attend_range(
        q, m_i, l_i, acc, PK + pb * s_pkb + hk * s_pkh, PV + pb * s_pvb + hk * s_pvh, s_pkn, s_pkd, s_pvn, s_pvd,
        0, p_len, p_len, qk_scale, cap, d, d_ok, i, h, b, row_ok, SQ, SKV, MASK, PBIAS,
        s_mb, s_mh, s_mm, s_mn, s_bb, s_bh, s_bm, s_bn,
        False, CAUSAL, HAS_MASK, HAS_PREFIX_BIAS, PRECISION, HAS_SOFTCAP, BLOCK_N)
    # Then the sequence; key blocks past the causal edge of every row here are never visited.
    m_i, l_i, acc = attend_range(
        q, m_i, l_i, acc, K + b * s_kb + hk * s_kh, V + b * s_vb + hk * s_vh, s_kn, s_kd, s_vn, s_vd,
        0, causal_end(i, row_ok, SQ, SKV, CAUSAL), SKV, qk_scale, cap, d, d_ok, i, h, b, row_ok, SQ, SKV, MASK, BIAS,
        s_mb, s_mh, s_mm, s_mn, s_bb, s_bh, s_bm, s_bn, True, CAUSAL, HAS_MASK, HAS_BIAS, PRECISION, HAS_SOFTCAP,
        BLOCK_N)

    o, lse = finish_rows(m_i, l_i, acc)
    tl.store(O + b * s_ob + h[:, None] * s_oh + i[:, None] * s_om + d[None, :] * s_od, o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + (b * (HKV * G) + h) * SQ + i, lse, mask=row_ok)


@triton.jit
def _key_block_grads(
    kt_ptrs, v_ptrs, n_start, n, n_ok, b, hk, Q, DO, LSE, DELTA, MASK, BIAS,
    s_qb, s_qh, s_qm, s_qd, s_dob, s_doh, s_dom, s_dod, s_mb, s_mh, s_mm, s_mn, s_bb, s_bh, s_bm, s_bn,
    HKV, G, SQ, SKV, qk_scale, cap, d, d_ok,
    IS_PREFIX: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV [BN, BD] (fp32, unscaled dK) of one block of keys, summed over every query row that sees it."""
    kt = tl.load(kt_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [BD, BN]
    v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BN, BD]
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    m_lo = 0
    if CAUSAL and not IS_PREFIX:
        m_lo = tl.maximum(n_start - (SKV - SQ), 0)  # queries before this one cannot see the block
    for g in range(0, G):
        h = (hk * G + g).to(tl.int64)
        for start in range(m_lo, SQ, BLOCK_M):
            i = start + tl.arange(0, BLOCK_M)
            row_ok = i < SQ
            hb = tl.zeros([BLOCK_M], tl.int64) + h  # the head of every row
            q = load_rows(Q, b, hb, i, s_qb, s_qh, s_qm, s_qd, d, row_ok[:, None] & d_ok[None, :])
            do = load_rows(DO, b, hb, i, s_dob, s_doh, s_dom, s_dod, d, row_ok[:, None] & d_ok[None, :])
            row = (b * (HKV * G) + h) * SQ + i
            lse = tl.load(LSE + row, mask=row_ok, other=0.0) * 1.4426950408889634
            lse = tl.where(lse == float("-inf"), 0.0, lse)  # rows that saw nothing have p = 0 everywhere
            delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
            capped = qk_logits(q, kt, qk_scale, cap, HAS_SOFTCAP, PRECISION)
            s = capped
            if IS_PREFIX:
                visible = n_ok[None, :] & row_ok[:, None]
                if HAS_BIAS:
                    s = add_bias(s, BIAS, b, hb, i, n, s_bb, s_bh, s_bm, s_bn, visible)
                s = tl.where(visible, s, float("-inf"))
            else:
                s = sequence_logits(s, n, n_ok, i, hb, b, SQ, SKV, MASK, BIAS, s_mb, s_mh, s_mm, s_mn,
                                    s_bb, s_bh, s_bm, s_bn, row_ok, CAUSAL, HAS_MASK, HAS_BIAS)
            p = tl.math.exp2(s - lse[:, None])  # [BM, BN], 0 where not visible
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None]) * softcap_slope(capped, cap, HAS_SOFTCAP)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=autotune_configs(("BLOCK_M", "BLOCK_N")), key=["HEAD_DIM", "CAUSAL", "HAS_MASK"])
@triton.jit
def _backward_dkdv_kernel(
    Q, K, V, PK, PV, PIDX, PLEN, MASK, BIAS, PBIAS, DO, LSE, DELTA, DK, DV, DPK, DPV,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_pkb, s_pkh, s_pkn, s_pkd, s_pvb, s_pvh, s_pvn, s_pvd,
    s_mb, s_mh, s_mm, s_mn, s_bb, s_bh, s_bm, s_bn, s_dob, s_doh, s_dom, s_dod,
    HKV, G, SQ, SKV, P, qk_scale, cap, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_PREFIX_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_LENGTHS: tl.constexpr, PRECISION: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    NEED_DKV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The first programs own sequence key blocks (dK, dV; none when NEED_DKV is off); the rest own prefix key
    blocks and write this batch row's share of dPK/dPV into fp32 buffers [B, Hkv, P, D]."""
    SEQ_BLOCKS = tl.cdiv(SKV, BLOCK_N) if NEED_DKV else 0
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = pid_bh % HKV
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    if pid_n < SEQ_BLOCKS:
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < SKV
        dk, dv = _key_block_grads(
            K + b * s_kb + hk * s_kh + n[None, :] * s_kn + d[:, None] * s_kd,
            V + b * s_vb + hk * s_vh + n[:, None] * s_vn + d[None, :] * s_vd,
            pid_n * BLOCK_N, n, n_ok, b, hk, Q, DO, LSE, DELTA, MASK, BIAS,
            s_qb, s_qh, s_qm, s_qd, s_dob, s_doh, s_dom, s_dod, s_mb, s_mh, s_mm, s_mn, s_bb, s_bh, s_bm, s_bn,
            HKV, G, SQ, SKV, qk_scale, cap, d, d_ok, False, CAUSAL, HAS_MASK, HAS_BIAS, PRECISION, HAS_SOFTCAP,
            BLOCK_M, BLOCK_N, BLOCK_D)
        out = ((b * HKV + hk) * SKV + n[:, None]) * HEAD_DIM + d[None, :]  # DK, DV: contiguous [B, Hkv, Skv, D]
        tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
    else:
        n = (pid_n - SEQ_BLOCKS) * BLOCK_N + tl.arange(0, BLOCK_N)
        p_len = tl.load(PLEN + b).to(tl.int32) if HAS_LENGTHS else P
        n_ok = n < p_len
        pb = tl.load(PIDX + b) if HAS_INDEX else b
        dk, dv = _key_block_grads(
            PK + pb * s_pkb + hk * s_pkh + n[None, :] * s_pkn + d[:, None] * s_pkd,
            PV + pb * s_pvb + hk * s_pvh + n[:, None] * s_pvn + d[None, :] * s_pvd,
            0, n, n_ok, b, hk, Q, DO, LSE, DELTA, MASK, PBIAS,
            s_qb, s_qh, s_qm, s_qd, s_dob, s_doh, s_dom, s_dod, s_mb, s_mh, s_mm, s_mn, s_bb, s_bh, s_bm, s_bn,
            HKV, G, SQ, SKV, qk_scale, cap, d, d_ok, True, CAUSAL, HAS_MASK, HAS_PREFIX_BIAS, PRECISION, HAS_SOFTCAP,
            BLOCK_M, BLOCK_N, BLOCK_D)
        out = ((b * HKV + hk) * P + n[:, None]) * HEAD_DIM + d[None, :]  # per-row partials, fp32
        write = (n < P)[:, None] & d_ok[None, :]  # padding past p_len gets its zeros written too
        tl.store(DPK + out, dk * scale, mask=write)
        tl.store(DPV + out, dv, mask=write)


@triton.autotune(configs=autotune_configs(("BLOCK_M", "BLOCK_N")), key=["HEAD_DIM", "CAUSAL", "HAS_MASK"])
@triton.jit
def _backward_dq_kernel(
    Q, K, V, PK, PV, PIDX, PLEN, MASK, BIAS, PBIAS, DO, LSE, DELTA, DQ,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_pkb, s_pkh, s_pkn, s_pkd, s_pvb, s_pvh, s_pvn, s_pvd,
    s_mb, s_mh, s_mm, s_mn, s_bb, s_bh, s_bm, s_bn, s_dob, s_doh, s_dom, s_dod,
    HKV, G, SQ, SKV, P, qk_scale, cap, scale, s_dqb, s_dqh, s_dqm, s_dqd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_PREFIX_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_LENGTHS: tl.constexpr, PRECISION: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = pid_bh % HKV
    row_ok, i, h = grouped_rows(tl.program_id(0) * BLOCK_M, hk, G, SQ, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    rd_ok = row_ok[:, None] & d_ok[None, :]
    q = load_rows(Q, b, h, i, s_qb, s_qh, s_qm, s_qd, d, rd_ok)
    do = load_rows(DO, b, h, i, s_dob, s_doh, s_dom, s_dod, d, rd_ok)
    row = (b * (HKV * G) + h) * SQ + i
    lse = tl.load(LSE + row, mask=row_ok, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    pb = tl.load(PIDX + b) if HAS_INDEX else b
    p_len = tl.load(PLEN + b).to(tl.int32) if HAS_LENGTHS else P  # this row's prefix keys; the rest is padding
    pk_base = PK + pb * s_pkb + hk * s_pkh
    pv_base = PV + pb * s_pvb + hk * s_pvh
    for start in range(0, p_len, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < p_len
        kt = tl.load(pk_base + n[None, :] * s_pkn + d[:, None] * s_pkd, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(pv_base + n[None, :] * s_pvn + d[:, None] * s_pvd, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        capped = qk_logits(q, kt, qk_scale, cap, HAS_SOFTCAP, PRECISION)
        visible = n_ok[None, :] & row_ok[:, None]
        s = capped
        if HAS_PREFIX_BIAS:
            s = add_bias(s, PBIAS, b, h, i, n, s_bb, s_bh, s_bm, s_bn, visible)
        p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, vt, input_precision=PRECISION) - delta[:, None]) * softcap_slope(capped, cap, HAS_SOFTCAP)
        dq += tl.dot(ds.to(q.dtype), tl.trans(kt), input_precision=PRECISION)

    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    for start in range(0, causal_end(i, row_ok, SQ, SKV, CAUSAL), BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < SKV
        kt = tl.load(k_base + n[None, :] * s_kn + d[:, None] * s_kd, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(v_base + n[None, :] * s_vn + d[:, None] * s_vd, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        capped = qk_logits(q, kt, qk_scale, cap, HAS_SOFTCAP, PRECISION)
        s = sequence_logits(capped, n, n_ok, i, h, b, SQ, SKV, MASK, BIAS, s_mb, s_mh, s_mm, s_mn,
                            s_bb, s_bh, s_bm, s_bn, row_ok, CAUSAL, HAS_MASK, HAS_BIAS)
        p = tl.math.exp2(s - lse[:, None])
        ds = p * (tl.dot(do, vt, input_precision=PRECISION) - delta[:, None]) * softcap_slope(capped, cap, HAS_SOFTCAP)
        dq += tl.dot(ds.to(q.dtype), tl.trans(kt), input_precision=PRECISION)

    tl.store(DQ + b * s_dqb + h[:, None] * s_dqh + i[:, None] * s_dqm + d[None, :] * s_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=rd_ok)


def _forward(p: AttentionProblem):
    (b, hq, sq, d, hkv, skv, n_prefix), extras, strides, consts = launch_args(p)
    q, k, v = p.q, p.k, p.v
    o = torch.empty(b, sq, hq, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # [B, Hq, Sq, D], as HF wants
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    rows = (hq // hkv) * sq

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]), b * hkv)

    _forward_kernel[grid](
        q, k, v, *extras, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *strides, *o.stride(),
        hkv, hq // hkv, sq, skv, n_prefix, p.scale * LOG2E, softcap_arg(p), **consts,
    )
    return o, lse


def _reduce_prefix_grad(rows: torch.Tensor, p: AttentionProblem) -> torch.Tensor:
    """Per-row prefix gradients [B, Hkv, P, D] (fp32) -> the prefix's own shape, summed deterministically."""
    if p.prefix_k.dim() == 3:
        return rows.sum(0).to(p.prefix_k.dtype)
    if p.prefix_index is None:
        return rows.to(p.prefix_k.dtype)
    one_hot = torch.nn.functional.one_hot(p.prefix_index, p.prefix_k.shape[0]).to(torch.float32).T  # [N, B]
    return (one_hot @ rows.flatten(1)).view(p.prefix_k.shape).to(p.prefix_k.dtype)


def _backward(p: AttentionProblem, o, lse, d_o, need_dq: bool, need_dkv: bool, need_prefix: bool):
    (b, hq, sq, d, hkv, skv, n_prefix), extras, strides, consts = launch_args(p)
    q, k, v = p.q, p.k, p.v
    delta = (d_o.float() * o.float()).sum(-1).contiguous()  # [B, Hq, Sq]
    lse = lse.contiguous()
    common = (*q.stride(), *k.stride(), *v.stride(), *strides, *d_o.stride())
    sizes = (hkv, hq // hkv, sq, skv, n_prefix, p.scale * LOG2E, softcap_arg(p), p.scale)
    dq = dk = dv = dpk = dpv = None
    if need_dkv or need_prefix:
        seq_shape = (b, hkv, skv, d) if need_dkv else (0,)
        dk = torch.empty(seq_shape, dtype=k.dtype, device=q.device)
        dv = torch.empty_like(dk)
        prefix_shape = (b, hkv, n_prefix, d) if need_prefix else (0,)
        dpk_rows = torch.empty(prefix_shape, dtype=torch.float32, device=q.device)
        dpv_rows = torch.empty_like(dpk_rows)

        def grid(meta):
            seq_blocks = triton.cdiv(skv, meta["BLOCK_N"]) if need_dkv else 0
            prefix_blocks = triton.cdiv(n_prefix, meta["BLOCK_N"]) if need_prefix else 0
            return (seq_blocks + prefix_blocks, b * hkv)

        _backward_dkdv_kernel[grid](
            q, k, v, *extras, d_o, lse, delta, dk, dv, dpk_rows, dpv_rows, *common, *sizes,
            NEED_DKV=need_dkv, **consts,
        )
        if need_prefix:
            dpk, dpv = _reduce_prefix_grad(dpk_rows, p), _reduce_prefix_grad(dpv_rows, p)
        if not need_dkv:
            dk = dv = None
    if need_dq:
        dq = torch.empty(b, sq, hq, d, dtype=q.dtype, device=q.device).transpose(1, 2)

        def grid(meta):
            return (triton.cdiv((hq // hkv) * sq, meta["BLOCK_M"]), b * hkv)

        _backward_dq_kernel[grid](q, k, v, *extras, d_o, lse, delta, dq, *common, *sizes,
                                  *dq.stride(), **consts)
    return dq, dk, dv, dpk, dpv


def forward(p: AttentionProblem):
    """Backend "triton": (o `[B, Sq, Hq, D]` contiguous in q's dtype, lse `[B, Hq, Sq]` float32)."""
    if p.packed:
        raise NotImplementedError("backend 'triton' does not take packed sequences yet")
    if p.q.numel() == 0:
        b, hq, sq, d = p.q.shape
        return p.q.new_zeros(b, sq, hq, d), p.q.new_full((b, hq, sq), float("-inf"), dtype=torch.float32)
    o, lse = triton_decode.decode_forward(p) if triton_decode.takes(p) else _forward(p)
    return o.transpose(1, 2), lse


def backward(p: AttentionProblem, o, lse, d_o, need_dq: bool, need_dkv: bool, need_dprefix: bool):
    """Backend "triton": (dq `[B, Sq, Hq, D]`, dk, dv, d prefix_k, d prefix_v), None where not asked for."""
    dq, dk, dv, dpk, dpv = _backward(p, o, lse, d_o, need_dq, need_dkv, need_dprefix)
    return (None if dq is None else dq.transpose(1, 2)), dk, dv, dpk, dpv
