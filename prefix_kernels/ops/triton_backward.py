"""Backend "triton", backward: FlashAttention-2's three kernels, over the prefix and the sequence keys.

1. Preprocess, one pass over O and dO: delta = rowsum(dO * O), and the LSE in base 2.
2. dK/dV, one program per key tile (prefix tiles first, then sequence tiles from the first: heaviest first),
   in the transposed frame: S^T = K Q^T, so P^T and dS^T come out of the MMAs in the layout the dV and dK MMAs take,
   with no register transposes. One flat loop walks every query row that can see the tile — the G query heads
   sharing its KV head, position-major — first the causal band (masked), then the rest without masks. Prefix
   tiles write each row's share of dPK/dPV in fp32, summed afterwards in a fixed order (deterministic).
   Sequence tiles are skipped when k and v need no gradient, prefix tiles when the prefix needs none.
3. dQ, one program per tile of grouped query rows, walking the keys as the forward does.
"""

import torch
import triton
import triton.language as tl

from .problem import AttentionProblem
from .triton_common import (
    INTERPRETED,
    SIZES,
    TUNE_KEY,
    Tile,
    autotune_configs,
    capped,
    causal_span,
    grouped_rows,
    hide_invisible,
    key_offsets,
    launch_args,
    load_tile,
    mask_free_end,
    prune_tiles,
    row_offsets,
    sequence_bounds,
    strides,
    tune_bucket,
)

# dK/dV tiles of (BLOCK_N keys, BLOCK_M query rows), as the forward's: dK/dV holds two [BLOCK_N, BLOCK_D] fp32
# accumulators, so it wants a large key tile and a small query tile.
DKDV_TILES = [
    Tile((128, 32), 8, 2, max_d=(64, 128), max_d_heavy=(64, 64)),
    Tile((64, 32), 8, 2, max_d=(128, 128), max_d_heavy=(128, 128)),
    Tile((32, 32), 8, 2, max_d=(256, 256), max_d_heavy=(256, 256)),
    Tile((32, 16), 8, 2, max_d=(256, 256), max_d_heavy=(256, 256)),
]
DKDV_CONFIGS = autotune_configs(("BLOCK_N", "BLOCK_M"), DKDV_TILES)
# dQ tiles of (BLOCK_M query rows, BLOCK_N keys).
DQ_TILES = [
    Tile((128, 32), 8, 2, max_d=(0, 128), max_d_heavy=(0, 64)),
    Tile((64, 64), 8, 2, max_d=(0, 128), max_d_heavy=(0, 64)),
    Tile((64, 32), 8, 2, max_d=(128, 128), max_d_heavy=(128, 128)),
    Tile((32, 32), 8, 2, max_d=(256, 256), max_d_heavy=(256, 256)),
]
DQ_CONFIGS = autotune_configs(("BLOCK_M", "BLOCK_N"), DQ_TILES)
PREPROCESS_ROWS = 16 if INTERPRETED else 64


@triton.jit
def _preprocess_kernel(O, DO, LSE, DELTA, LSE2, s_ob, s_oh, s_om, s_od, s_dob, s_doh, s_dom, s_dod, HQ, SQ,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) [BLOCK_M] and the LSE in base 2 (-inf, a row that saw nothing, as 0) for positions
    of one (batch row, query head); LSE, DELTA and LSE2 are contiguous [B, Hq, Sq]."""
    bh = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    row_ok = i < SQ
    tile_ok = row_ok[:, None] & (d < HEAD_DIM)[None, :]
    b, h = bh // HQ, bh % HQ
    o = tl.load(O + b * s_ob + h * s_oh + i.to(tl.int64)[:, None] * s_om + d[None, :] * s_od, mask=tile_ok, other=0.0)
    do = tl.load(DO + b * s_dob + h * s_doh + i.to(tl.int64)[:, None] * s_dom + d[None, :] * s_dod, mask=tile_ok,
                 other=0.0)
    rows = bh * SQ + i
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    tl.store(DELTA + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=row_ok)
    tl.store(LSE2 + rows, tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634), mask=row_ok)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE2, DELTA, MASK, BIAS, n, n_end, lo, hi, G, sq, skv, hk,
                s_qh, s_qm, s_qd, s_doh, s_dom, s_dod, s_lh, s_mh, s_mm, mask_cols, s_bh, s_bm, bias_cols,
                qk_scale, cap, d, d_ok, MASKED: tl.constexpr, BAND: tl.constexpr, HAS_MASK: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """Add to dk, dv [BN, BD] the grouped query rows [lo, hi) of the key tile (k, v) [BN, BD] at keys n [BN].
    Unless MASKED, every row sees every key; MASKED hides keys >= n_end and, with BAND, keys past the causal edge
    (the row at position i sees key n iff n <= skv - sq + i). The mask and bias apply wherever they are given, read
    at the int64 offsets `mask_cols` / `bias_cols` [BN] of these keys. Rows past the last are loaded as zeros,
    which contribute nothing."""
    for first in range(lo, hi, BLOCK_M):
        row_ok, i, g = grouped_rows(first, G, sq, BLOCK_M)
        h = hk * G + g
        qt = load_tile(Q + d[:, None] * s_qd + row_offsets(i, h, s_qm, s_qh)[None, :], d_ok, row_ok,
                       not EVEN_D, True)  # [BD, BM]
        do = load_tile(DO + row_offsets(i, h, s_dom, s_doh)[:, None] + d[None, :] * s_dod, row_ok, d_ok,
                       True, not EVEN_D)  # [BM, BD]
        stats = row_offsets(i, h, 1, s_lh)
        lse = tl.load(LSE2 + stats, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + stats, mask=row_ok, other=0.0)
        st = tl.dot(k, qt, input_precision=PRECISION)  # [BN, BM]
        if HAS_SOFTCAP or HAS_BIAS:
            st = capped(st * qk_scale, cap, HAS_SOFTCAP)  # base-2 logits from here on
            if HAS_SOFTCAP:
                slope = 1.0 - (st / cap) * (st / cap)  # d capped / d logit = 1 - tanh^2
            if HAS_BIAS:
                bias_ptrs = BIAS + row_offsets(i, h, s_bm, s_bh)[None, :] + bias_cols[:, None]
                st += load_tile(bias_ptrs, n < n_end, row_ok, True, True).to(tl.float32) * 1.4426950408889634
            scale = 1.0
        else:
            scale = qk_scale
        st = hide_invisible(st, (n < n_end)[:, None], n[:, None] <= (skv - sq + i)[None, :],
                            MASK + row_offsets(i, h, s_mm, s_mh)[None, :] + mask_cols[:, None],
                            row_ok[None, :] & (n < n_end)[:, None], MASKED, BAND, HAS_MASK)
        pt = tl.math.exp2(tl.fma(st, scale, -lse[None, :]))  # [BN, BM], 0 where not visible
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BN, BM]
        dst = pt * (dpt - delta[None, :])
        if HAS_SOFTCAP:
            dst = dst * slope
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)
    return dk, dv


@triton.jit
def _key_tile_grads(k_ptrs, v_ptrs, n0, n_end, Q, DO, LSE2, DELTA, MASK, BIAS, G, sq, skv, hk,
                    s_qh, s_qm, s_qd, s_doh, s_dom, s_dod, s_lh, s_mh, s_mm, s_mn, s_bh, s_bm, s_bn, qk_scale, cap,
                    d, d_ok, BAND: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """(dk unscaled, dv) [BN, BD] of the keys n0 + [0, BN), of which those < n_end are real. A whole tile takes
    the rows of the causal band (BAND) with masks and every later row without; a ragged tile takes all its rows
    with masks. k_ptrs, v_ptrs [BN, BD] point at the tile."""
    n = n0 + tl.arange(0, BLOCK_N)
    k = load_tile(k_ptrs, n < n_end, d_ok, True, not EVEN_D)  # [BN, BD]
    v = load_tile(v_ptrs, n < n_end, d_ok, True, not EVEN_D)
    mask_cols = n.to(tl.int64) * s_mn
    bias_cols = n.to(tl.int64) * s_bn
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    band_end = 0
    if BAND:  # grouped rows before lo see none of these keys; rows from band_end on see all of them
        lo = tl.maximum(n0 - (skv - sq), 0) * G // BLOCK_M * BLOCK_M
        band_end = tl.minimum(tl.maximum(tl.minimum(n0 + BLOCK_N, skv) - 1 - (skv - sq), 0) * G, G * sq)
        band_end = lo + tl.cdiv(tl.maximum(band_end - lo, 0), BLOCK_M) * BLOCK_M
    if n0 + BLOCK_N > n_end:
        band_end = G * sq
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE2, DELTA, MASK, BIAS, n, n_end, lo, band_end, G, sq, skv, hk,
                         s_qh, s_qm, s_qd, s_doh, s_dom, s_dod, s_lh, s_mh, s_mm, mask_cols, s_bh, s_bm, bias_cols,
                         qk_scale, cap, d, d_ok, True, BAND, HAS_MASK, HAS_BIAS, HAS_SOFTCAP, EVEN_D, PRECISION,
                         BLOCK_M)
    return _dkdv_tiles(dk, dv, k, v, Q, DO, LSE2, DELTA, MASK, BIAS, n, n_end, band_end, G * sq, G, sq, skv, hk,
                       s_qh, s_qm, s_qd, s_doh, s_dom, s_dod, s_lh, s_mh, s_mm, mask_cols, s_bh, s_bm, bias_cols,
                       qk_scale, cap, d, d_ok, False, BAND, HAS_MASK, HAS_BIAS, HAS_SOFTCAP, EVEN_D, PRECISION,
                       BLOCK_M)


@triton.autotune(configs=DKDV_CONFIGS, key=TUNE_KEY + ["NEED_DKV", "NEED_DPREFIX"],
                 prune_configs_by={"early_config_prune": lambda configs, named_args, **kw: prune_tiles(
                     configs, DKDV_TILES, max(kw["SKV"], kw["P"]), kw["G"] * kw["SQ"], kw)})
@triton.jit(do_not_specialize=SIZES)
def _dkdv_kernel(
    Q, K, V, PK, PV, PIDX, PLEN, CU_Q, CU_K, MASK, BIAS, PBIAS, DO, LSE2, DELTA, DK, DV, DPK, DPV,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_pkb, s_pkh, s_pkn, s_pkd, s_pvb, s_pvh, s_pvn, s_pvd,
    s_mb, s_mh, s_mm, s_mn, s_bb, s_bh, s_bm, s_bn, s_dob, s_doh, s_dom, s_dod, s_lb, s_lh,
    s_dkb, s_dkh, s_dkn, s_dkd, R, HKV, G, SQ, SKV, P, qk_scale, cap, scale,
    TUNE_SQ, TUNE_SKV,  # the autotune key only: Sq and Skv rounded up to powers of two
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PREFIX_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    PACKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
    NEED_DKV: tl.constexpr, NEED_DPREFIX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Ranks [0, cdiv(P, BN)) own prefix key tiles (when NEED_DPREFIX) and write row r's share of dPK/dPV into fp32
    [R, Hkv, P, D]; the next ranks own sequence key tiles (when NEED_DKV) and write dK, dV."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    pid = tl.program_id(0)
    rank = pid // (R * HKV)
    r = (pid // HKV) % R
    hk = (pid % HKV).to(tl.int64)
    b, q0, sq, k0, skv = sequence_bounds(CU_Q, CU_K, r, SQ, SKV, PACKED)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    Q += b * s_qb + q0 * s_qm
    DO += b * s_dob + q0 * s_dom
    LSE2 += b * s_lb + q0
    DELTA += b * s_lb + q0
    MASK += b * s_mb
    prefix_tiles = tl.cdiv(P, BLOCK_N) if NEED_DPREFIX else 0
    if NEED_DPREFIX:
        is_prefix = rank < prefix_tiles
    else:
        is_prefix = False
    if is_prefix:
        n0 = rank * BLOCK_N
        entry = tl.load(PIDX + r) if HAS_INDEX else r.to(tl.int64)
        p_len = tl.load(PLEN + r).to(tl.int32) if HAS_LENGTHS else P  # keys past it are padding: zero gradient
        n = n0 + tl.arange(0, BLOCK_N)
        keys = n.to(tl.int64)[:, None]
        dk, dv = _key_tile_grads(
            PK + entry * s_pkb + hk * s_pkh + keys * s_pkn + d[None, :] * s_pkd,
            PV + entry * s_pvb + hk * s_pvh + keys * s_pvn + d[None, :] * s_pvd, n0, p_len,
            Q, DO, LSE2, DELTA, MASK, PBIAS + b * s_bb, G, sq, skv, hk,
            s_qh, s_qm, s_qd, s_doh, s_dom, s_dod, s_lh, s_mh, s_mm, s_mn, s_bh, s_bm, s_bn, qk_scale, cap, d, d_ok,
            False, False, HAS_PREFIX_BIAS, HAS_SOFTCAP, EVEN_D, PRECISION, BLOCK_N, BLOCK_D, BLOCK_M)
        out = ((r.to(tl.int64) * HKV + hk) * P + n[:, None]) * HEAD_DIM + d[None, :]  # DPK, DPV [R, Hkv, P, D]
        tl.store(DPK + out, dk * scale, mask=(n < P)[:, None] & d_ok[None, :])
        tl.store(DPV + out, dv, mask=(n < P)[:, None] & d_ok[None, :])
    elif NEED_DKV:
        n0 = (rank - prefix_tiles) * BLOCK_N
        if n0 >= skv:  # a packed sequence with fewer key tiles than the longest
            return
        n = n0 + tl.arange(0, BLOCK_N)
        keys = (k0 + n.to(tl.int64))[:, None]
        dk, dv = _key_tile_grads(
            K + b * s_kb + hk * s_kh + keys * s_kn + d[None, :] * s_kd,
            V + b * s_vb + hk * s_vh + keys * s_vn + d[None, :] * s_vd, n0, skv,
            Q, DO, LSE2, DELTA, MASK, BIAS + b * s_bb, G, sq, skv, hk,
            s_qh, s_qm, s_qd, s_doh, s_dom, s_dod, s_lh, s_mh, s_mm, s_mn, s_bh, s_bm, s_bn, qk_scale, cap, d, d_ok,
            CAUSAL, HAS_MASK, HAS_BIAS, HAS_SOFTCAP, EVEN_D, PRECISION, BLOCK_N, BLOCK_D, BLOCK_M)
        out = b * s_dkb + hk * s_dkh + keys * s_dkn + d[None, :] * s_dkd
        tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=(n < skv)[:, None] & d_ok[None, :])
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=(n < skv)[:, None] & d_ok[None, :])


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K, V, s_kn, s_kd, s_vn, s_vd, lo, hi, last_key, row_ok, d, d_ok,
              MASK, mask_rows, s_mn, BIAS, bias_rows, s_bn, qk_scale, cap,
              MASKED: tl.constexpr, BAND: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add to dq [BM, BD] (unscaled) the keys [lo, hi) of the rows q, dO [BM, BD]; arguments and MASKED / BAND as
    in `attend_tiles`."""
    keys = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + keys
        kt = load_tile(K + key_offsets(n0, s_kn) + keys[None, :] * s_kn + d[:, None] * s_kd, d_ok, n < hi,
                       not EVEN_D, MASKED)  # [BD, BN]
        vt = load_tile(V + key_offsets(n0, s_vn) + keys[None, :] * s_vn + d[:, None] * s_vd, d_ok, n < hi,
                       not EVEN_D, MASKED)
        s = tl.dot(q, kt, input_precision=PRECISION)  # [BM, BN]
        if HAS_SOFTCAP or HAS_BIAS:
            s = capped(s * qk_scale, cap, HAS_SOFTCAP)
            if HAS_SOFTCAP:
                slope = 1.0 - (s / cap) * (s / cap)  # d capped / d logit = 1 - tanh^2
            if HAS_BIAS:
                bias = load_tile(BIAS + key_offsets(n0, s_bn) + bias_rows[:, None] + keys[None, :] * s_bn, row_ok,
                                 n < hi, True, MASKED)
                s += bias.to(tl.float32) * 1.4426950408889634
            scale = 1.0
        else:
            scale = qk_scale
        s = hide_invisible(s, (n < hi)[None, :], n[None, :] <= last_key[:, None],
                           MASK + key_offsets(n0, s_mn) + mask_rows[:, None] + keys[None, :] * s_mn, row_ok[:, None],
                           MASKED, BAND, HAS_MASK)
        p = tl.math.exp2(tl.fma(s, scale, -lse[:, None]))
        ds = p * (tl.dot(do, vt, input_precision=PRECISION) - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * slope
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    return dq


@triton.jit
def _dq_keys(dq, q, do, lse, delta, K, V, s_kn, s_kd, s_vn, s_vd, lo, hi, full_end, last_key, row_ok, d, d_ok,
             MASK, mask_rows, s_mn, BIAS, bias_rows, s_bn, qk_scale, cap,
             BAND: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
             EVEN_D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [lo, hi), every row seeing those < full_end: whole tiles before full_end without masks, then the rest."""
    mid = mask_free_end(lo, hi, full_end, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, s_kn, s_kd, s_vn, s_vd, lo, mid, last_key, row_ok, d, d_ok,
                   MASK, mask_rows, s_mn, BIAS, bias_rows, s_bn, qk_scale, cap,
                   False, False, HAS_MASK, HAS_BIAS, HAS_SOFTCAP, EVEN_D, PRECISION, BLOCK_N)
    return _dq_tiles(dq, q, do, lse, delta, K, V, s_kn, s_kd, s_vn, s_vd, mid, hi, last_key, row_ok, d, d_ok,
                     MASK, mask_rows, s_mn, BIAS, bias_rows, s_bn, qk_scale, cap,
                     True, BAND, HAS_MASK, HAS_BIAS, HAS_SOFTCAP, EVEN_D, PRECISION, BLOCK_N)


@triton.autotune(configs=DQ_CONFIGS, key=TUNE_KEY,
                 prune_configs_by={"early_config_prune": lambda configs, named_args, **kw: prune_tiles(
                     configs, DQ_TILES, kw["G"] * kw["SQ"], max(kw["SKV"], kw["P"]), kw)})
@triton.jit(do_not_specialize=SIZES)
def _dq_kernel(
    Q, K, V, PK, PV, PIDX, PLEN, CU_Q, CU_K, MASK, BIAS, PBIAS, DO, LSE2, DELTA, DQ,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_pkb, s_pkh, s_pkn, s_pkd, s_pvb, s_pvh, s_pvn, s_pvd,
    s_mb, s_mh, s_mm, s_mn, s_bb, s_bh, s_bm, s_bn, s_dob, s_doh, s_dom, s_dod, s_lb, s_lh,
    s_dqb, s_dqh, s_dqm, s_dqd, R, HKV, G, SQ, SKV, P, qk_scale, cap, scale,
    TUNE_SQ, TUNE_SKV,  # the autotune key only: Sq and Skv rounded up to powers of two
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PREFIX_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    PACKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    pid = tl.program_id(0)
    rank = pid // (R * HKV)
    r = (pid // HKV) % R
    hk = (pid % HKV).to(tl.int64)
    b, q0, sq, k0, skv = sequence_bounds(CU_Q, CU_K, r, SQ, SKV, PACKED)
    first = (tl.cdiv(G * sq, BLOCK_M) - 1 - rank) * BLOCK_M  # heaviest tiles first, as in the forward
    if first < 0:
        return
    row_ok, i, g = grouped_rows(first, G, sq, BLOCK_M)
    h = hk * G + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    entry = tl.load(PIDX + r) if HAS_INDEX else r.to(tl.int64)
    p_len = tl.load(PLEN + r).to(tl.int32) if HAS_LENGTHS else P
    Q += b * s_qb + q0 * s_qm
    DO += b * s_dob + q0 * s_dom
    DQ += b * s_dqb + q0 * s_dqm
    K += b * s_kb + hk * s_kh + k0 * s_kn
    V += b * s_vb + hk * s_vh + k0 * s_vn
    PK += entry * s_pkb + hk * s_pkh
    PV += entry * s_pvb + hk * s_pvh
    MASK += b * s_mb
    BIAS += b * s_bb
    PBIAS += b * s_bb

    q = load_tile(Q + row_offsets(i, h, s_qm, s_qh)[:, None] + d[None, :] * s_qd, row_ok, d_ok, True, not EVEN_D)
    do = load_tile(DO + row_offsets(i, h, s_dom, s_doh)[:, None] + d[None, :] * s_dod, row_ok, d_ok, True,
                   not EVEN_D)
    stats = b * s_lb + q0 + row_offsets(i, h, 1, s_lh)
    lse = tl.load(LSE2 + stats, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + stats, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    mask_rows = row_offsets(i, h, s_mm, s_mh)
    bias_rows = row_offsets(i, h, s_bm, s_bh)

    dq = _dq_keys(dq, q, do, lse, delta, PK, PV, s_pkn, s_pkd, s_pvn, s_pvd, 0, p_len, p_len, i, row_ok, d, d_ok,
                  MASK, mask_rows, s_mn, PBIAS, bias_rows, s_bn, qk_scale, cap,
                  False, False, HAS_PREFIX_BIAS, HAS_SOFTCAP, EVEN_D, PRECISION, BLOCK_N)
    full_end, end = causal_span(first, G, sq, skv, CAUSAL, BLOCK_M)
    dq = _dq_keys(dq, q, do, lse, delta, K, V, s_kn, s_kd, s_vn, s_vd, 0, end, full_end, skv - sq + i, row_ok, d,
                  d_ok, MASK, mask_rows, s_mn, BIAS, bias_rows, s_bn, qk_scale, cap,
                  CAUSAL, HAS_MASK, HAS_BIAS, HAS_SOFTCAP, EVEN_D, PRECISION, BLOCK_N)
    tl.store(DQ + row_offsets(i, h, s_dqm, s_dqh)[:, None] + d[None, :] * s_dqd, (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


def _reduce_prefix_grad(rows: torch.Tensor, p: AttentionProblem) -> torch.Tensor:
    """Per-row prefix gradients [R, Hkv, P, D] (fp32) -> the prefix's own shape, summed in a fixed order."""
    if p.shared_prefix:
        return rows.sum(0).to(p.prefix_k.dtype)
    if p.prefix_index is None:
        return rows.to(p.prefix_k.dtype)
    one_hot = torch.nn.functional.one_hot(p.prefix_index, p.prefix_k.shape[0]).to(torch.float32).T  # [N, R]
    return (one_hot @ rows.flatten(1)).view(p.prefix_k.shape).to(p.prefix_k.dtype)


def _preprocess(o: torch.Tensor, d_o: torch.Tensor, lse: torch.Tensor):
    """(delta, LSE in base 2), both [B, Hq, Sq] fp32 like lse, from o and dO [B, Hq, Sq, D]."""
    b, hq, sq, d = o.shape
    lse = lse.contiguous()
    delta, lse2 = torch.empty_like(lse), torch.empty_like(lse)
    _preprocess_kernel[(b * hq, triton.cdiv(sq, PREPROCESS_ROWS))](
        O=o, DO=d_o, LSE=lse, DELTA=delta, LSE2=lse2, **strides("o", o, "bhmd"), **strides("do", d_o, "bhmd"),
        HQ=hq, SQ=sq, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=PREPROCESS_ROWS,
    )
    return delta, lse2


def backward(p: AttentionProblem, o, lse, d_o, need_dq: bool, need_dkv: bool, need_dprefix: bool):
    """(dq `[B, Sq, Hq, D]`, dk, dv `[B, Hkv, Skv, D]`, d prefix_k, d prefix_v), None where not asked for."""
    b, hq, sq, d = p.q.shape
    dq = dk = dv = dpk = dpv = None
    if need_dq:
        dq = torch.zeros(b, sq, hq, d, dtype=p.q.dtype, device=p.q.device)
    if need_dkv:
        dk, dv = torch.zeros_like(p.k, memory_format=torch.contiguous_format), torch.zeros_like(
            p.v, memory_format=torch.contiguous_format)
    n_prefix = p.prefix_k.shape[-2]
    if need_dprefix:
        dpk_rows = torch.zeros(p.rows, p.k.shape[1], n_prefix, d, dtype=torch.float32, device=p.q.device)
        dpv_rows = torch.zeros_like(dpk_rows)
    if p.q.numel() and p.rows:
        args = launch_args(p)
        tune = dict(TUNE_SQ=tune_bucket(args["SQ"]), TUNE_SKV=tune_bucket(args["SKV"]))
        delta, lse2 = _preprocess(o, d_o, lse)
        common = dict(args, DO=d_o, LSE2=lse2, DELTA=delta, **strides("do", d_o, "bhmd"),
                      s_lb=lse2.stride(0), s_lh=lse2.stride(1), scale=p.scale, **tune)
        programs = args["R"] * args["HKV"]
        if need_dkv or need_dprefix:
            seq_keys = args["SKV"] if need_dkv else 0
            prefix_keys = n_prefix if need_dprefix else 0
            dummy = args["PIDX"]

            def grid(meta):
                return ((triton.cdiv(prefix_keys, meta["BLOCK_N"]) + triton.cdiv(seq_keys, meta["BLOCK_N"]))
                        * programs,)

            _dkdv_kernel[grid](
                **common, DK=dk if need_dkv else dummy, DV=dv if need_dkv else dummy,
                DPK=dpk_rows if need_dprefix else dummy, DPV=dpv_rows if need_dprefix else dummy,
                **strides("dk", dk if need_dkv else p.k, "bhnd"), NEED_DKV=need_dkv, NEED_DPREFIX=need_dprefix,
            )
        if need_dq:
            rows = args["G"] * args["SQ"]

            def grid(meta):
                return (triton.cdiv(rows, meta["BLOCK_M"]) * programs,)

            dq_view = dq.transpose(1, 2)
            _dq_kernel[grid](**common, DQ=dq_view, **strides("dq", dq_view, "bhmd"))
    if need_dprefix:
        dpk, dpv = _reduce_prefix_grad(dpk_rows, p), _reduce_prefix_grad(dpv_rows, p)
    return dq, dk, dv, dpk, dpv
