"""Backend "triton": fused prefix attention. This module holds the forward kernel and the backend's entry points;
the backward kernels are in `triton_backward.py`, the decode kernels in `triton_decode.py`.

Forward, FlashAttention-2 style: one program per tile of grouped query rows (`triton_common`: the G query heads of
one KV head, position-major) of one batch row (or packed sequence) and KV head. A program walks the P prefix keys
first (a shared prefix read with batch stride 0, a bank entry found through `prefix_index`; whole tiles without
masks), then the sequence keys: the tiles every row of the program sees in full run without masks, with the
scale and the max-subtract in one FMA; only the causal band and a ragged last tile are masked, and key tiles past
the causal edge of every row are never visited. One online softmax in base 2 (logits pre-scaled by
scale * log2(e), fp32 accumulators) covers both. It writes O and the natural-log LSE. Programs start with the
heaviest tiles (the last rows, which see the most causal keys).

Decode shapes (few query rows per KV head) take the split-KV kernel of `triton_decode.py` instead; both write O
and LSE, which is all the backward needs.

Each kernel autotunes over its own tile list, keyed on the head dim, causal, the mask, and Sq and Skv rounded up to
powers of two; the lists are pruned per GPU generation and head dim to the tiles that compile without register
spills (`tests/compile_gate.py`), and to the blocks the shape can fill. The first call at a new key benchmarks its
tiles (and so waits for the GPU): run one before capturing a CUDA graph. Nothing else reads the device on the
host.
"""

import contextlib

import torch
import triton
import triton.language as tl

from . import triton_backward, triton_decode
from .problem import AttentionProblem
from .triton_common import (
    SIZES,
    TUNE_KEY,
    Tile,
    attend,
    autotune_configs,
    causal_span,
    empty_softmax,
    finish_rows,
    grouped_rows,
    launch_args,
    load_tile,
    prune_tiles,
    row_offsets,
    sequence_bounds,
    strides,
    tune_bucket,
)

# Tiles of (BLOCK_M rows, BLOCK_N keys), largest first: Hopper gets the 128-row and 128-key ones; the last, the
# smallest, takes every head dim (float32 included).
FORWARD_TILES = [
    Tile((128, 128), 8, 2, max_d=(0, 64), max_d_heavy=(0, 0)),
    Tile((128, 64), 8, 2, max_d=(64, 128), max_d_heavy=(64, 64)),
    Tile((64, 128), 8, 2, max_d=(64, 64), max_d_heavy=(64, 64)),
    Tile((64, 64), 8, 2, max_d=(128, 128), max_d_heavy=(64, 128)),
    Tile((32, 64), 4, 2, max_d=(128, 128), max_d_heavy=(64, 64)),
    Tile((32, 64), 8, 2, max_d=(256, 256), max_d_heavy=(256, 256)),
    Tile((32, 32), 4, 1, max_d=(256, 256), max_d_heavy=(256, 256)),
]
FORWARD_CONFIGS = autotune_configs(("BLOCK_M", "BLOCK_N"), FORWARD_TILES)


@triton.autotune(configs=FORWARD_CONFIGS, key=TUNE_KEY,
                 prune_configs_by={"early_config_prune": lambda configs, named_args, **kw: prune_tiles(
                     configs, FORWARD_TILES, kw["G"] * kw["SQ"], max(kw["SKV"], kw["P"]), kw)})
@triton.jit(do_not_specialize=SIZES)
def _forward_kernel(
    Q, K, V, PK, PV, PIDX, PLEN, CU_Q, CU_K, MASK, BIAS, PBIAS, O, LSE,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_pkb, s_pkh, s_pkn, s_pkd, s_pvb, s_pvh, s_pvn, s_pvd,
    s_mb, s_mh, s_mm, s_mn, s_bb, s_bh, s_bm, s_bn, s_ob, s_oh, s_om, s_od, s_lb, s_lh,
    R, HKV, G, SQ, SKV, P, qk_scale, cap,
    TUNE_SQ, TUNE_SKV,  # the autotune key only: Sq and Skv rounded up to powers of two
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PREFIX_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    PACKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    # Program ids walk the row tiles of every (row, KV head) from each one's last tile, the heaviest, to its first.
    pid = tl.program_id(0)
    rank = pid // (R * HKV)
    r = (pid // HKV) % R
    hk = (pid % HKV).to(tl.int64)
    b, q0, sq, k0, skv = sequence_bounds(CU_Q, CU_K, r, SQ, SKV, PACKED)
    first = (tl.cdiv(G * sq, BLOCK_M) - 1 - rank) * BLOCK_M
    if first < 0:  # a packed sequence with fewer row tiles than the longest
        return
    row_ok, i, g = grouped_rows(first, G, sq, BLOCK_M)
    h = hk * G + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    entry = tl.load(PIDX + r) if HAS_INDEX else r  # a shared prefix has s_pkb = 0: every row reads the same bytes
    p_len = tl.load(PLEN + r).to(tl.int32) if HAS_LENGTHS else P  # this row's prefix keys; the rest is padding

    Q += b * s_qb + q0 * s_qm
    K += b * s_kb + hk * s_kh + k0 * s_kn
    V += b * s_vb + hk * s_vh + k0 * s_vn
    PK += entry * s_pkb + hk * s_pkh
    PV += entry * s_pvb + hk * s_pvh
    MASK += b * s_mb
    BIAS += b * s_bb
    PBIAS += b * s_bb
    O += b * s_ob + q0 * s_om
    LSE += b * s_lb + q0

    q = load_tile(Q + row_offsets(i, h, s_qm, s_qh)[:, None] + d[None, :] * s_qd, row_ok, d_ok,
                  True, not EVEN_D)  # [BM, BD]
    m_i, l_i, acc = empty_softmax(BLOCK_M, BLOCK_D)
    mask_rows = row_offsets(i, h, s_mm, s_mh)
    bias_rows = row_offsets(i, h, s_bm, s_bh)

    # The prefix: every key visible to every row.
    m_i, l_i, acc = attend(
        q, m_i, l_i, acc, PK, PV, s_pkn, s_pkd, s_pvn, s_pvd, 0, p_len, p_len, i, row_ok, d, d_ok,
        MASK, mask_rows, s_mn, PBIAS, bias_rows, s_bn, qk_scale, cap,
        False, False, HAS_PREFIX_BIAS, HAS_SOFTCAP, EVEN_D, PRECISION, BLOCK_N)
    # The sequence: keys every row sees without masks, then the causal band; nothing past the last row's edge.
    full_end, end = causal_span(first, G, sq, skv, CAUSAL, BLOCK_M)
    m_i, l_i, acc = attend(
        q, m_i, l_i, acc, K, V, s_kn, s_kd, s_vn, s_vd, 0, end, full_end, skv - sq + i, row_ok, d, d_ok,
        MASK, mask_rows, s_mn, BIAS, bias_rows, s_bn, qk_scale, cap,
        CAUSAL, HAS_MASK, HAS_BIAS, HAS_SOFTCAP, EVEN_D, PRECISION, BLOCK_N)

    o, lse = finish_rows(m_i, l_i, acc)
    tl.store(O + row_offsets(i, h, s_om, s_oh)[:, None] + d[None, :] * s_od, o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + row_offsets(i, h, 1, s_lh), lse * 0.6931471805599453, mask=row_ok)


def _forward(p: AttentionProblem):
    """(o `[B, Hq, Sq, D]` view of a `[B, Sq, Hq, D]` tensor, lse `[B, Hq, Sq]`)."""
    args = launch_args(p)
    b, hq, sq, d = p.q.shape
    o = torch.empty(b, sq, hq, d, dtype=p.q.dtype, device=p.q.device).transpose(1, 2)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=p.q.device)
    rows = args["G"] * args["SQ"]

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * args["R"] * args["HKV"],)

    _forward_kernel[grid](
        **args, O=o, LSE=lse, **strides("o", o, "bhmd"), s_lb=lse.stride(0), s_lh=lse.stride(1),
        TUNE_SQ=tune_bucket(args["SQ"]), TUNE_SKV=tune_bucket(args["SKV"]),
    )
    return o, lse


def forward(p: AttentionProblem, with_lse: bool = True):
    """Backend "triton": (o `[B, Sq, Hq, D]` contiguous in q's dtype, lse `[B, Hq, Sq]` float32)."""
    b, hq, sq, d = p.q.shape
    if p.q.numel() == 0 or p.rows == 0:
        return p.q.new_zeros(b, sq, hq, d), p.q.new_full((b, hq, sq), float("-inf"), dtype=torch.float32)
    with _on_device(p.q):
        o, lse = triton_decode.decode_forward(p) if triton_decode.takes(p) else _forward(p)
    return o.transpose(1, 2), lse


def backward(p: AttentionProblem, o, lse, d_o, need_dq: bool, need_dkv: bool, need_dprefix: bool):
    """Backend "triton": (dq `[B, Sq, Hq, D]`, dk, dv, d prefix_k, d prefix_v), None where not asked for."""
    with _on_device(p.q):
        return triton_backward.backward(p, o, lse, d_o, need_dq, need_dkv, need_dprefix)


def _on_device(t: torch.Tensor):
    """Make t's GPU the current one: Triton launches on the current device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
