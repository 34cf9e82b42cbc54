"""What the Triton kernels share: the grouped row layout, int64 offsets, the online-softmax key loop, autotune
config lists, and the launch arguments every kernel takes.

Row layout. A program serves query rows of one KV head: the G = Hq / Hkv query heads sharing it, grouped
position-major (row r is position r // G of the group's head r % G). A tile of BLOCK_M rows then holds BLOCK_M / G
consecutive positions of every head in the group, so each K/V tile is read once for the whole group and the
causal band of a tile is only BLOCK_M / G positions wide.

Offsets. Every batch, head and position term (position x stride) is computed in int64, once per program for the
query rows and once per tile for the keys; inside a tile the offsets are int32 (`arange(BLOCK) * stride`), which the
launcher guarantees cannot overflow (`tileable`).
"""

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .problem import AttentionProblem

LOG2E = 1.4426950408889634
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# In-tile offsets are int32 and reach at most 256 steps of one stride (the largest block is 256 wide).
MAX_TILE_STRIDE = 2**31 // 256


# ---- autotuning --------------------------------------------------------------------------------------------------

class Tile(NamedTuple):
    """One autotune entry and where it may run: the kernel's two block sizes (in the order its config names them),
    warps, pipeline stages, and the largest BLOCK_D at which it compiles without register spills in fp16/bf16 — on
    sm_8x and on sm_9x and later — for the plain kernel (`max_d`) and for one that also reads a mask or a bias,
    soft-caps its logits or runs packed sequences (`max_d_heavy`). 0: never. tests/compile_gate.py checks them."""

    blocks: tuple[int, int]
    num_warps: int
    num_stages: int
    max_d: tuple[int, int]
    max_d_heavy: tuple[int, int]


# Let ptxas give a thread every register it can have: left to itself it holds 8-warp programs to 128 registers
# (two programs per SM) and spills to get there.
MAX_REGISTERS = 255


def autotune_configs(names, tiles: list[Tile]):
    """One `triton.Config` per tile, its block sizes named by `names`. Under the interpreter, one small config: it
    runs every config it is given, and CI needs only one."""
    if INTERPRETED:
        return [triton.Config(dict.fromkeys(names, 16), num_warps=4, num_stages=1)]
    return [triton.Config(dict(zip(names, tile.blocks)), num_warps=tile.num_warps, num_stages=tile.num_stages,
                          maxnreg=MAX_REGISTERS) for tile in tiles]


def gpu_arch(t: torch.Tensor) -> int:
    """The compute capability of the GPU holding `t`, as 10 * major + minor (80 for A100, 90 for H100)."""
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


# The autotune key of the attention kernels, and their size arguments that are not specialised (they may be 1).
TUNE_KEY = ["HEAD_DIM", "CAUSAL", "HAS_MASK", "TUNE_SQ", "TUNE_SKV"]
SIZES = ["SQ", "SKV", "P", "TUNE_SQ", "TUNE_SKV"]


def tune_bucket(n: int) -> int:
    """A sequence length rounded up to a power of two: the autotune key, so a short warm-up prompt does not fix the
    block sizes of a long prefill."""
    return triton.next_power_of_2(max(n, 1))


def prune_tiles(configs, tiles: list[Tile], first: int, second: int, kwargs: dict):
    """The configs a launch can use, `configs` having been made from `tiles` in order: those whose head dim limit
    on this GPU (for this kernel's features) takes BLOCK_D, and whose blocks are no larger than the `first` /
    `second` extents they tile (rounded up to powers of two). float32, a correctness path on GPUs rather than a
    fast one, gets only the last tile. Never empty: the last tile of every list takes every head dim."""
    heavy = any(kwargs[flag] for flag in ("HAS_MASK", "HAS_BIAS", "HAS_PREFIX_BIAS", "HAS_SOFTCAP", "PACKED"))
    column = 1 if gpu_arch(kwargs["Q"]) >= 90 else 0
    allowed = [(c, t) for c, t in zip(configs, tiles)
               if kwargs["BLOCK_D"] <= (t.max_d_heavy if heavy else t.max_d)[column]]
    if kwargs["Q"].dtype == torch.float32:
        return [allowed[-1][0]]
    kept = [c for c, t in allowed if t.blocks[0] <= tune_bucket(first) and t.blocks[1] <= tune_bucket(second)]
    return kept or [allowed[-1][0]]


# ---- rows, offsets, bounds ---------------------------------------------------------------------------------------

@triton.jit
def sequence_bounds(CU_Q, CU_K, r, SQ, SKV, PACKED: tl.constexpr):
    """(batch index, first query, queries, first key, keys) of row r: batch row r of [B, ., S, D], or packed
    sequence r, a slice of the one packed row. Starts are int64."""
    if PACKED:
        b = 0
        q0 = tl.load(CU_Q + r).to(tl.int64)
        k0 = tl.load(CU_K + r).to(tl.int64)
        sq = (tl.load(CU_Q + r + 1) - q0).to(tl.int32)
        skv = (tl.load(CU_K + r + 1) - k0).to(tl.int32)
    else:
        b = r.to(tl.int64)
        q0 = 0
        k0 = 0
        sq = SQ
        skv = SKV
    return b, q0, sq, k0, skv


@triton.jit
def grouped_rows(first, G, sq, BLOCK_M: tl.constexpr):
    """Grouped rows [first, first + BLOCK_M) of a KV head: (row in range, position i, head within the group g)."""
    r = first + tl.arange(0, BLOCK_M)
    return r < G * sq, r // G, r % G


@triton.jit
def row_offsets(i, h, s_m, s_h):
    """int64 offsets [BM] of rows (position i, head h) in a tensor with position stride s_m and head stride s_h."""
    return i.to(tl.int64) * s_m + h.to(tl.int64) * s_h


@triton.jit
def key_offsets(n0, s_n):
    """int64 offset of key n0: where a key tile starts."""
    return tl.cast(n0, tl.int64) * s_n


@triton.jit
def causal_span(first, G, sq, skv, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """(every row of the tile sees keys < full_end, no row sees keys >= end) for the tile's grouped rows: bottom-right
    causal, row at position i sees keys <= skv - sq + i."""
    if CAUSAL:
        first_i = first // G
        last_i = tl.minimum((first + BLOCK_M - 1) // G, sq - 1)
        full_end = tl.minimum(tl.maximum(skv - sq + first_i + 1, 0), skv)
        end = tl.minimum(tl.maximum(skv - sq + last_i + 1, 0), skv)
    else:
        full_end = skv
        end = skv
    return full_end, end


@triton.jit
def mask_free_end(lo, hi, full_end, BLOCK: tl.constexpr):
    """The end of the whole tiles from lo that lie before full_end and hi: tiles past it need masks."""
    return lo + tl.maximum(tl.minimum(hi, full_end) - lo, 0) // BLOCK * BLOCK


@triton.jit
def tanh(x):
    """tanh(x) within a few ulps at every x, so that cap * tanh(s / cap) keeps s's precision however large the cap
    (the identity through a sigmoid, cap * (2 * sigmoid(2x) - 1), loses cap * eps to cancellation). Below
    |x| = 1/4 the odd Taylor polynomial to x^9 (the next term is under an ulp); beyond, (1 - e) / (1 + e) with
    e = exp(-2|x|) <= exp(-1/2), where 1 - e cancels nothing."""
    a = tl.abs(x)
    x2 = x * x
    series = x + x * x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0))))
    e = tl.math.exp2(a * (-2.0 * 1.4426950408889634))
    closed = (1.0 - e) / (1.0 + e)
    return tl.where(a < 0.25, series, tl.where(x < 0, -closed, closed))


@triton.jit
def capped(s, cap, HAS_SOFTCAP: tl.constexpr):
    """Base-2 logits s soft-capped as cap * tanh(s / cap) when HAS_SOFTCAP (cap in base-2 units too)."""
    if HAS_SOFTCAP:
        s = cap * tanh(s / cap)
    return s


@triton.jit
def hide_invisible(s, key_ok, before_edge, mask_ptrs, load_ok, MASKED: tl.constexpr, BAND: tl.constexpr,
                   HAS_MASK: tl.constexpr):
    """The logits s of a tile (either frame) with -inf where the key is not visible: under MASKED, where key_ok is
    False (past the keys) and, with BAND, where before_edge is False (past the causal edge); with HAS_MASK, where
    the mask at mask_ptrs (read where load_ok) is 0. Shapes broadcast to s's."""
    if MASKED or HAS_MASK:
        visible = tl.full(s.shape, 1, tl.int1)
        if MASKED:
            visible = visible & key_ok
            if BAND:
                visible = visible & before_edge
        if HAS_MASK:
            visible = visible & (tl.load(mask_ptrs, mask=visible & load_ok, other=0) != 0)
        s = tl.where(visible, s, float("-inf"))
    return s


# ---- the forward key loop ----------------------------------------------------------------------------------------

@triton.jit
def load_tile(ptrs, rows_ok, cols_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """A [R, C] tile, 0 where a checked bound fails; a bound that needs no check costs nothing."""
    if CHECK_ROWS and CHECK_COLS:
        tile = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def attend_tiles(q, m_i, l_i, acc, K, V, s_kn, s_kd, s_vn, s_vd, lo, hi, last_key, row_ok, d, d_ok,
                 MASK, mask_rows, s_mn, BIAS, bias_rows, s_bn, qk_scale, cap,
                 MASKED: tl.constexpr, BAND: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Fold keys [lo, hi) of K, V (pointers at key 0) into the running softmax (m_i, l_i, acc) of the query rows
    q [BM, BD]. The mask and bias are read at their rows' int64 offsets `mask_rows` / `bias_rows` [BM].

    Unless MASKED, every key of every tile is visible: no bounds, no causal test. MASKED hides keys >= hi and,
    with BAND, keys past each row's causal edge `last_key` [BM]. The mask and bias apply wherever they are given.
    Pointers are rebuilt from a scalar tile start each step (a loop-carried pointer tensor would hold a register
    per element).
    """
    keys = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + keys
        kt = load_tile(K + key_offsets(n0, s_kn) + keys[None, :] * s_kn + d[:, None] * s_kd, d_ok, n < hi,
                       not EVEN_D, MASKED)  # [BD, BN]
        v = load_tile(V + key_offsets(n0, s_vn) + keys[:, None] * s_vn + d[None, :] * s_vd, n < hi, d_ok,
                      MASKED, not EVEN_D)  # [BN, BD]
        s = tl.dot(q, kt, input_precision=PRECISION)  # [BM, BN]
        if HAS_SOFTCAP or HAS_BIAS:
            s = capped(s * qk_scale, cap, HAS_SOFTCAP)  # base-2 logits from here on
            if HAS_BIAS:
                bias = load_tile(BIAS + key_offsets(n0, s_bn) + bias_rows[:, None] + keys[None, :] * s_bn, row_ok,
                                 n < hi, True, MASKED)
                s += bias.to(tl.float32) * 1.4426950408889634
            scale = 1.0
        else:
            scale = qk_scale  # folded into the exponent's FMA below
        s = hide_invisible(s, (n < hi)[None, :], n[None, :] <= last_key[:, None],
                           MASK + key_offsets(n0, s_mn) + mask_rows[:, None] + keys[None, :] * s_mn, row_ok[:, None],
                           MASKED, BAND, HAS_MASK)
        if MASKED or HAS_MASK:
            m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
            m_use = m_new
        p = tl.math.exp2(tl.fma(s, scale, -m_use[:, None]))  # scale and max-subtract in one FMA
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def attend(q, m_i, l_i, acc, K, V, s_kn, s_kd, s_vn, s_vd, lo, hi, full_end, last_key, row_ok, d, d_ok,
           MASK, mask_rows, s_mn, BIAS, bias_rows, s_bn, qk_scale, cap,
           BAND: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
           EVEN_D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [lo, hi), of which every row sees those < full_end: whole tiles before full_end without masks, the rest
    (the causal band, a ragged last tile) with them."""
    mid = mask_free_end(lo, hi, full_end, BLOCK_N)
    m_i, l_i, acc = attend_tiles(q, m_i, l_i, acc, K, V, s_kn, s_kd, s_vn, s_vd, lo, mid, last_key, row_ok, d, d_ok,
                                 MASK, mask_rows, s_mn, BIAS, bias_rows, s_bn, qk_scale, cap,
                                 False, False, HAS_MASK, HAS_BIAS, HAS_SOFTCAP, EVEN_D, PRECISION, BLOCK_N)
    return attend_tiles(q, m_i, l_i, acc, K, V, s_kn, s_kd, s_vn, s_vd, mid, hi, last_key, row_ok, d, d_ok,
                        MASK, mask_rows, s_mn, BIAS, bias_rows, s_bn, qk_scale, cap,
                        True, BAND, HAS_MASK, HAS_BIAS, HAS_SOFTCAP, EVEN_D, PRECISION, BLOCK_N)


@triton.jit
def empty_softmax(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The running (max, sum, output accumulator) of an online softmax that has seen no key yet."""
    return (tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
            tl.zeros([BLOCK_M, BLOCK_D], tl.float32))


@triton.jit
def finish_rows(m_i, l_i, acc):
    """(o, base-2 lse) of the running softmax; rows that saw no key give o = 0, lse = -inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    return acc / l_safe[:, None], tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))


# ---- launch arguments --------------------------------------------------------------------------------------------

def strides(name: str, t: torch.Tensor, dims: str) -> dict:
    """{"s_<name><dim>": stride} for a kernel's keyword arguments; a 3-D shared prefix gets batch stride 0."""
    values = t.stride() if t.dim() == len(dims) else (0, *t.stride())
    return {f"s_{name}{dim}": stride for dim, stride in zip(dims, values)}


def tileable(t: torch.Tensor, tiled_dims: int) -> torch.Tensor:
    """`t`, or a contiguous copy if a stride of its last `tiled_dims` dims (the ones a tile walks with int32
    offsets) is too large for them. Only exotic views (a position stride of 8M elements and more) are copied."""
    if all(s < MAX_TILE_STRIDE for s in t.stride()[t.dim() - tiled_dims:]):
        return t
    return t.contiguous()


def broadcast_strides(name: str, t: torch.Tensor | None) -> dict:
    """The strides of a mask or bias `[B|1, H|1, Sq|1, N]`, 0 on its broadcast dims (all 0 when absent)."""
    if t is None:
        return dict.fromkeys((f"s_{name}{dim}" for dim in "bhmn"), 0)
    return {f"s_{name}{dim}": 0 if size == 1 else stride for dim, size, stride in zip("bhmn", t.shape, t.stride())}


def longest(p: AttentionProblem) -> tuple[int, int]:
    """(Sq, Skv) the grids are sized by: the shapes, or for packed sequences the longest query and key sequence.

    As in FlashAttention, a packed call's grid follows the caller's `max_seqlen_q` / `max_seqlen_k` (host ints:
    reading the offsets would make the host wait for the device), so a value larger than the real longest launches
    programs that return at once. Nothing that costs a read caps them, but a sequence is never longer than all the
    packed tokens together: that shape bounds them for free."""
    sq, skv = p.q.shape[2], p.k.shape[2]
    return (min(p.max_seqlen_q, sq), min(p.max_seqlen_k, skv)) if p.packed else (sq, skv)


def launch_args(p: AttentionProblem) -> dict:
    """The keyword arguments every attention kernel takes: inputs, their strides, sizes and constexpr flags.

    Packed problems are one row of `[1, H, total, D]` with sequence offsets CU_Q / CU_K; SQ and SKV are then the
    longest sequence (`longest`), so grids are sized without reading the device.
    """
    q = tileable(p.q, 1)
    k, v = tileable(p.k, 2), tileable(p.v, 2)
    pk, pv = tileable(p.prefix_k, 2), tileable(p.prefix_v, 2)
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    dummy = q.new_empty(1, dtype=torch.int64)
    mask = None if p.mask is None else tileable(p.mask.view(torch.uint8), 1)
    bias = None if p.bias is None else tileable(p.bias, 1)
    n_prefix = pk.shape[-2]
    grid_sq, grid_skv = longest(p)
    seq_bias = None if bias is None else bias[..., bias.shape[-1] - skv:]
    prefix_bias = None if bias is None or bias.shape[-1] == skv else bias[..., :n_prefix]
    # Row r reads entry r of the per-row tensors: a strided index or lengths tensor gets a contiguous copy.
    index = p.prefix_index.contiguous() if p.prefix_index is not None else dummy
    lengths = p.prefix_lengths.contiguous() if p.prefix_lengths is not None else dummy
    return dict(
        Q=q, K=k, V=v, PK=pk, PV=pv, PIDX=index, PLEN=lengths,
        CU_Q=p.cu_seqlens_q if p.packed else dummy, CU_K=p.cu_seqlens_k if p.packed else dummy,
        MASK=dummy if mask is None else mask, BIAS=dummy if seq_bias is None else seq_bias,
        PBIAS=dummy if prefix_bias is None else prefix_bias,
        **strides("q", q, "bhmd"), **strides("k", k, "bhnd"), **strides("v", v, "bhnd"),
        **strides("pk", pk, "bhnd"), **strides("pv", pv, "bhnd"),
        **broadcast_strides("m", mask), **broadcast_strides("b", bias),
        R=p.rows, HKV=hkv, G=hq // hkv, SQ=grid_sq, SKV=grid_skv, P=n_prefix,
        qk_scale=p.scale * LOG2E, cap=0.0 if p.softcap is None else p.softcap * LOG2E,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), CAUSAL=p.causal, HAS_MASK=mask is not None,
        HAS_BIAS=seq_bias is not None, HAS_PREFIX_BIAS=prefix_bias is not None,
        HAS_INDEX=p.prefix_index is not None, HAS_LENGTHS=p.prefix_lengths is not None, PACKED=p.packed,
        HAS_SOFTCAP=p.softcap is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
