"""Backend "triton", decode shapes (at most 16 queries and 128 grouped rows per KV head): split-KV forward
(flash-decoding) over the keys `[prefix ; sequence]`.

A decode step has few query rows and a long cache, so one program per (row, KV head) would leave most of the GPU
idle. The P + Skv keys are cut into equal splits instead, the prefix being the first P of them; a program attends
with every grouped query row of its KV head (so a K/V byte is read once for the group) to one split, and writes its
partial output and LSE for those rows only. One combine launch then merges the splits of each row in a single
pass, reading every partial LSE once.

The split count follows occupancy, as FlashInfer sizes its grid: as many programs as the GPU keeps resident at
once (from the compiled kernel's registers and shared memory), but no split shorter than `MIN_SPLIT_KEYS`.
Nothing is read from the device: packed sequences are planned from `max_seqlen_k` (capped by the total, see
`triton_common.longest`), and a program whose split lies past its sequence's keys returns at once.

Backward is the prefill kernels' (it needs only O and LSE), so decode shapes stay differentiable.
"""

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .problem import AttentionProblem
from .triton_common import (
    INTERPRETED,
    attend,
    causal_span,
    empty_softmax,
    finish_rows,
    grouped_rows,
    launch_args,
    load_tile,
    longest,
    row_offsets,
    sequence_bounds,
    strides,
)

MAX_DECODE_QUERIES = 16
MAX_DECODE_ROWS = 128  # one program holds every grouped query row of a KV head
# A split reads at least this many keys, so its partial output (rows x D floats) stays small beside its K/V.
MIN_SPLIT_KEYS = 16 if INTERPRETED else 256
INTERPRETED_PROGRAMS = 8  # a notional GPU for the interpreter, small enough that tests see several splits


@dataclasses.dataclass(frozen=True)
class DecodeTile:
    """The split kernel's launch shape: keys per tile, warps, software-pipeline stages."""

    block_n: int
    num_warps: int
    num_stages: int


def decode_tile(block_d: int, block_m: int) -> DecodeTile:
    """Keys per tile, warps and pipeline stages of the split kernel for BLOCK_D and BLOCK_M (= G * Sq rounded up),
    checked ahead of time (tests/compile_gate.py) for no register spills in fp16/bf16 and several programs resident
    per SM: K/V stages of about 16 KB (so three of them leave room for several programs), four warps, and eight
    (with two stages) once the [BLOCK_M, BLOCK_D] fp32 accumulator reaches 8192 values."""
    if INTERPRETED:
        return DecodeTile(16, 4, 1)
    wide = block_m * block_d >= 8192
    return DecodeTile(block_n=64 if block_d <= 64 else 32, num_warps=8 if wide else 4, num_stages=2 if wide else 3)


@dataclasses.dataclass(frozen=True)
class SMLimits:
    """What one streaming multiprocessor holds at once."""

    registers: int = 65536
    shared: int = 228 * 1024
    warps: int = 64
    programs: int = 32


def resident_programs(registers: int, shared: int, num_warps: int, sm: SMLimits) -> int:
    """How many programs of a kernel (registers per thread, bytes of shared memory, warps) one SM keeps resident:
    registers are allocated per warp in units of 256, and every program reserves 1 KB of shared memory more."""
    per_warp = triton.cdiv(max(registers, 1) * 32, 256) * 256
    by_registers = sm.registers // per_warp // num_warps
    by_shared = sm.shared // (shared + 1024)
    return max(0, min(by_registers, by_shared, sm.warps // num_warps, sm.programs))


def takes(p: AttentionProblem) -> bool:
    """Whether the split-KV kernels serve this problem: few queries, and a GQA group that fits one program."""
    sq = longest(p)[0]
    return sq <= MAX_DECODE_QUERIES and p.group * sq <= MAX_DECODE_ROWS


@triton.jit(do_not_specialize=["SQ", "SKV", "P", "SPLIT_KEYS"])
def _split_kernel(
    Q, K, V, PK, PV, PIDX, PLEN, CU_Q, CU_K, MASK, BIAS, PBIAS, O_PART, LSE_PART,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_pkb, s_pkh, s_pkn, s_pkd, s_pvb, s_pvh, s_pvn, s_pvd, s_mb, s_mh, s_mm, s_mn, s_bb, s_bh, s_bm, s_bn,
    R, HKV, G, SQ, SKV, P, qk_scale, cap, SPLIT_KEYS, SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PREFIX_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    PACKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split `split` covers keys [split * SPLIT_KEYS, (split + 1) * SPLIT_KEYS) of [prefix (P) ; sequence] for every
    grouped query row of one (row, KV head); it writes O_PART [R * Hkv, SPLITS, G * SQ, D] and the base-2 LSE_PART
    [R * Hkv, SPLITS, G * SQ] of the real rows."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    pid = tl.program_id(0)
    split = pid // (R * HKV)
    bh = pid % (R * HKV)
    r = bh // HKV
    hk = (bh % HKV).to(tl.int64)
    b, q0, sq, k0, skv = sequence_bounds(CU_Q, CU_K, r, SQ, SKV, PACKED)
    lo = split * SPLIT_KEYS
    if lo >= P + skv:  # a packed sequence with fewer splits than the longest
        return
    hi = lo + SPLIT_KEYS
    row_ok, i, g = grouped_rows(0, G, sq, BLOCK_M)  # every query row of this KV head
    h = hk * G + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    entry = tl.load(PIDX + r) if HAS_INDEX else r.to(tl.int64)
    p_len = tl.load(PLEN + r).to(tl.int32) if HAS_LENGTHS else P
    Q += b * s_qb + q0 * s_qm
    K += b * s_kb + hk * s_kh + k0 * s_kn
    V += b * s_vb + hk * s_vh + k0 * s_vn
    PK += entry * s_pkb + hk * s_pkh
    PV += entry * s_pvb + hk * s_pvh
    MASK += b * s_mb
    BIAS += b * s_bb
    PBIAS += b * s_bb

    q = load_tile(Q + row_offsets(i, h, s_qm, s_qh)[:, None] + d[None, :] * s_qd, row_ok, d_ok, True, not EVEN_D)
    m_i, l_i, acc = empty_softmax(BLOCK_M, BLOCK_D)
    mask_rows = row_offsets(i, h, s_mm, s_mh)
    bias_rows = row_offsets(i, h, s_bm, s_bh)
    m_i, l_i, acc = attend(
        q, m_i, l_i, acc, PK, PV, s_pkn, s_pkd, s_pvn, s_pvd, tl.minimum(lo, P), tl.minimum(hi, p_len), p_len, i,
        row_ok, d, d_ok, MASK, mask_rows, s_mn, PBIAS, bias_rows, s_bn, qk_scale, cap,
        False, False, HAS_PREFIX_BIAS, HAS_SOFTCAP, EVEN_D, PRECISION, BLOCK_N)
    full_end, end = causal_span(0, G, sq, skv, CAUSAL, BLOCK_M)
    m_i, l_i, acc = attend(
        q, m_i, l_i, acc, K, V, s_kn, s_kd, s_vn, s_vd, tl.maximum(lo - P, 0), tl.minimum(hi - P, end), full_end,
        skv - sq + i, row_ok, d, d_ok, MASK, mask_rows, s_mn, BIAS, bias_rows, s_bn, qk_scale, cap,
        CAUSAL, HAS_MASK, HAS_BIAS, HAS_SOFTCAP, EVEN_D, PRECISION, BLOCK_N)

    o, lse = finish_rows(m_i, l_i, acc)
    part = (bh.to(tl.int64) * SPLITS + split) * (G * SQ) + tl.arange(0, BLOCK_M)
    tl.store(O_PART + part[:, None] * HEAD_DIM + d[None, :], o, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE_PART + part, lse, mask=row_ok)


@triton.jit(do_not_specialize=["SQ", "SKV", "P", "SPLIT_KEYS"])
def _combine_kernel(
    O_PART, LSE_PART, CU_Q, CU_K, O, LSE, s_ob, s_oh, s_om, s_od, s_lb, s_lh,
    R, HKV, G, SQ, SKV, P, SPLIT_KEYS, SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PACKED: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Merge the splits of BLOCK_R grouped rows of one (row, KV head) in one pass, an online softmax over splits:
    each partial LSE and output is read once. Rows that saw nothing get o = 0, lse = -inf."""
    bh = tl.program_id(0)
    r = bh // HKV
    hk = (bh % HKV).to(tl.int64)
    b, q0, sq, k0, skv = sequence_bounds(CU_Q, CU_K, r, SQ, SKV, PACKED)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < G * sq
    i, h = rows // G, hk * G + rows % G
    d = tl.arange(0, BLOCK_D)
    tile_ok = row_ok[:, None] & (d < HEAD_DIM)[None, :]
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    part = bh.to(tl.int64) * SPLITS * (G * SQ) + rows
    for _ in range(0, tl.cdiv(P + skv, SPLIT_KEYS)):  # this row's splits; the rest were never written
        lse = tl.load(LSE_PART + part, mask=row_ok, other=float("-inf"))
        m_new = tl.maximum(m, lse)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_use)
        w = tl.math.exp2(lse - m_use)
        o = tl.load(O_PART + part[:, None] * HEAD_DIM + d[None, :], mask=tile_ok, other=0.0)
        acc = acc * alpha[:, None] + w[:, None] * o
        total = total * alpha + w
        m = m_new
        part += G * SQ
    o, lse = finish_rows(m, total, acc)
    O += b * s_ob + q0 * s_om
    LSE += b * s_lb + q0
    tl.store(O + row_offsets(i, h, s_om, s_oh)[:, None] + d[None, :] * s_od, o.to(O.dtype.element_ty), mask=tile_ok)
    tl.store(LSE + row_offsets(i, h, 1, s_lh), lse * 0.6931471805599453, mask=row_ok)


@functools.cache
def _sm_limits(device: torch.device) -> tuple[SMLimits, int]:
    """(what one SM of `device` holds, its SM count)."""
    props = torch.cuda.get_device_properties(device)
    limits = SMLimits(registers=getattr(props, "regs_per_multiprocessor", 65536),
                      shared=props.shared_memory_per_multiprocessor,
                      warps=props.max_threads_per_multi_processor // 32)
    return limits, props.multi_processor_count


_resident: dict = {}  # (device, dtype, tile, constexpr arguments) -> programs the GPU keeps resident


def _resident_programs(kwargs: dict, device: torch.device, tile: DecodeTile) -> int:
    """Programs of the split kernel the GPU keeps resident at once, from its compiled registers and shared memory
    (compiled once per specialisation, without launching)."""
    constexprs = tuple(kwargs[param.name] for param in _split_kernel.params if param.is_constexpr)
    key = (device, kwargs["Q"].dtype, tile, constexprs)
    if key not in _resident:
        kernel = _split_kernel.warmup(**kwargs, grid=(1,), num_warps=tile.num_warps, num_stages=tile.num_stages)
        kernel._init_handles()  # loads the binary: its register count (as Triton's fused-softmax tutorial reads it)
        sm, count = _sm_limits(device)
        _resident[key] = max(1, resident_programs(kernel.n_regs, kernel.metadata.shared, tile.num_warps, sm)) * count
    return _resident[key]


def decode_forward(p: AttentionProblem):
    """(o `[B, Hq, Sq, D]` view of a `[B, Sq, Hq, D]` tensor, lse `[B, Hq, Sq]`) for the problems `takes` accepts."""
    args = launch_args(p)
    b, hq, sq, d = p.q.shape
    rows = args["G"] * args["SQ"]
    block_m = max(16, triton.next_power_of_2(rows))
    tile = decode_tile(args["BLOCK_D"], block_m)
    programs = args["R"] * args["HKV"]
    keys = args["P"] + args["SKV"]
    split_args = dict(args, BLOCK_M=block_m, BLOCK_N=tile.block_n)
    dummy = args["PIDX"]
    if INTERPRETED:
        resident = INTERPRETED_PROGRAMS
    else:
        resident = _resident_programs(dict(split_args, O_PART=p.q.new_empty(1, dtype=torch.float32), LSE_PART=dummy,
                                           SPLIT_KEYS=keys, SPLITS=1), p.q.device, tile)
    # One wave of resident programs; with more (row, KV head) pairs than that, each takes all its keys.
    split_keys = max(MIN_SPLIT_KEYS, triton.cdiv(keys, max(1, resident // programs)))
    split_keys = triton.cdiv(split_keys, tile.block_n) * tile.block_n
    splits = max(1, triton.cdiv(keys, split_keys))
    o_part = torch.empty(programs, splits, rows, d, dtype=torch.float32, device=p.q.device)
    lse_part = torch.empty(programs, splits, rows, dtype=torch.float32, device=p.q.device)
    _split_kernel[(splits * programs,)](
        **split_args, O_PART=o_part, LSE_PART=lse_part, SPLIT_KEYS=split_keys, SPLITS=splits,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    o = torch.empty(b, sq, hq, d, dtype=p.q.dtype, device=p.q.device).transpose(1, 2)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=p.q.device)
    block_r = max(16, min(block_m, 4096 // args["BLOCK_D"]))  # [BLOCK_R, BLOCK_D] fp32: 32 registers a thread
    _combine_kernel[(programs, triton.cdiv(rows, block_r))](
        O_PART=o_part, LSE_PART=lse_part, CU_Q=args["CU_Q"], CU_K=args["CU_K"], O=o, LSE=lse,
        **strides("o", o, "bhmd"), s_lb=lse.stride(0), s_lh=lse.stride(1), R=args["R"], HKV=args["HKV"],
        G=args["G"], SQ=args["SQ"], SKV=args["SKV"], P=args["P"], SPLIT_KEYS=split_keys, SPLITS=splits,
        HEAD_DIM=d, BLOCK_D=args["BLOCK_D"], PACKED=args["PACKED"], BLOCK_R=block_r,
    )
    return o, lse
