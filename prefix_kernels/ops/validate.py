"""Input checks for `prefix_attention`, run once at the entry point before any backend sees the tensors.

Every error names the argument, what was given and what was expected. `check_inputs` reads only shapes,
dtypes and devices, never tensor values, so it costs nothing on a GPU and traces under `torch.compile`.
The checks that need values (bank indices, prefix lengths, sequence offsets) are in `check_values`, which the
op runs inside its kernel call: on CPU it raises the same clear errors, on CUDA it queues device-side asserts
instead of waiting for the device. Nothing here copies a tensor: the inputs come back as views.
"""

import math

import torch

from .memo import derived
from .problem import AttentionProblem

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_tensor(name: str, t, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name}: expected a {rank}-D tensor {layout}, got shape {_shape(t)}")


def _check_row_tensor(name: str, t, rows: int, what: str, device: torch.device) -> None:
    """An int64 `[R]` tensor with one entry per row (or packed sequence)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected an int64 tensor [{what}], got {type(t).__name__}")
    if t.dtype != torch.int64 or t.shape != (rows,):
        raise ValueError(f"{name}: expected int64 of shape [{rows}] (one per {what}), got {t.dtype} of shape "
                         f"{_shape(t)}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")


def _check_prefix(q, prefix_k, prefix_v, prefix_index, hkv: int, d: int, rows: int, what: str):
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor [Hkv, P, D] or [N, Hkv, P, D], got {type(t).__name__}")
        if t.dim() not in (3, 4):
            raise ValueError(f"{name}: expected shape [Hkv, P, D] or [N, Hkv, P, D], got {_shape(t)}")
    if prefix_k.shape != prefix_v.shape:
        raise ValueError(f"prefix_v: expected the shape of prefix_k {_shape(prefix_k)}, got {_shape(prefix_v)}")
    if prefix_k.shape[-3] != hkv or prefix_k.shape[-1] != d:
        raise ValueError(f"prefix_k: expected [..., Hkv={hkv}, P, D={d}] to match k, got {_shape(prefix_k)}")
    if prefix_index is None:
        if prefix_k.dim() == 4 and prefix_k.shape[0] != rows:
            raise ValueError(f"prefix_k: a 4-D prefix without prefix_index is one per {what}, expected first dim "
                             f"{rows}, got {_shape(prefix_k)} (pass prefix_index to read it as a bank)")
        return
    if prefix_k.dim() != 4:
        raise ValueError(f"prefix_index: needs a bank prefix_k [N, Hkv, P, D], got prefix_k of shape "
                         f"{_shape(prefix_k)}")
    _check_row_tensor("prefix_index", prefix_index, rows, what, q.device)


def _check_mask(attention_mask, q, skv: int):
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a tensor or None, got {type(attention_mask).__name__}")
    batch, hq, sq = q.shape[0], q.shape[1], q.shape[2]
    if attention_mask.device != q.device:
        raise ValueError(f"attention_mask: expected device {q.device}, got {attention_mask.device}")
    if attention_mask.dim() == 2:
        if tuple(attention_mask.shape) != (batch, skv):
            raise ValueError(
                f"attention_mask: a key-padding mask must be [B={batch}, Skv={skv}], got {_shape(attention_mask)}")
        return derived(attention_mask, ("key padding",), lambda: (attention_mask != 0)[:, None, None, :])
    if attention_mask.dim() == 4:
        if attention_mask.dtype != torch.bool:
            raise TypeError(f"attention_mask: a 4-D mask must be boolean (True = attend), got {attention_mask.dtype}")
        b, h, s, t = attention_mask.shape
        if b not in (1, batch) or h not in (1, hq) or s not in (1, sq) or t != skv:
            raise ValueError(f"attention_mask: expected [B={batch} or 1, 1 or Hq={hq}, Sq={sq} or 1, Skv={skv}], "
                             f"got {_shape(attention_mask)}")
        return attention_mask
    raise ValueError(f"attention_mask: expected a key-padding mask [B, Skv] or a boolean [B, 1 or Hq, Sq, Skv], "
                     f"got shape {_shape(attention_mask)}")


def _check_bias(attention_bias, q, skv: int, n_prefix: int):
    if attention_bias is None:
        return None
    if not isinstance(attention_bias, torch.Tensor):
        raise TypeError(f"attention_bias: expected a float tensor or None, got {type(attention_bias).__name__}")
    batch, hq, sq = q.shape[:3]
    if not attention_bias.is_floating_point():
        raise TypeError(f"attention_bias: expected a floating-point tensor, got {attention_bias.dtype}")
    if attention_bias.device != q.device:
        raise ValueError(f"attention_bias: expected device {q.device}, got {attention_bias.device}")
    shape = tuple(attention_bias.shape)
    if len(shape) != 4 or shape[0] not in (1, batch) or shape[1] not in (1, hq) or shape[2] not in (1, sq) \
            or shape[3] not in (skv, n_prefix + skv):
        raise ValueError(f"attention_bias: expected [B={batch} or 1, Hq={hq} or 1, Sq={sq} or 1, Skv={skv} or "
                         f"P + Skv={n_prefix + skv}], got {_shape(attention_bias)}")
    return attention_bias.detach()


# The largest `scale` taken. The fused kernels compute exp2 of logits * scale * log2(e) in float32 with one
# multiply-subtract (FlashAttention's trick), exact while those stay well below 2**24; past this bound a logit of
# modest size would not, and the backends would disagree.
MAX_SCALE = 2.0**16


def _positive(name: str, value, allow_none: bool, most: float = math.inf) -> float | None:
    """A finite positive float no larger than `most` (or None, where allowed)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= most \
            or not math.isfinite(value):
        bound = f" at most {most:g}" if math.isfinite(most) else ""
        raise ValueError(f"{name}: expected a finite positive float{bound}{' or None' if allow_none else ''}, got "
                         f"{value!r}")
    return float(value)


def _check_packing(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attention_mask,
                   attention_bias) -> int:
    """Check the varlen arguments; return N, the number of packed sequences."""
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected an int32 tensor [N + 1], got {type(t).__name__}")
        if t.dtype != torch.int32 or t.dim() != 1 or t.shape[0] < 1:
            raise ValueError(f"{name}: expected int32 of shape [N + 1], got {t.dtype} of shape {_shape(t)}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device}, got {t.device}")
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_k: expected the shape of cu_seqlens_q {_shape(cu_seqlens_q)}, got "
                         f"{_shape(cu_seqlens_k)}")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}: expected a non-negative int (the longest packed sequence), got {value!r}")
    for name, given in (("attention_mask", attention_mask), ("attention_bias", attention_bias)):
        if given is not None:
            raise ValueError(f"{name}: packed sequences (cu_seqlens_q) take no {name}, got one; expected None")
    _check_tensor("q", q, 3, "[total_q, Hq, D] (packed)")
    _check_tensor("k", k, 3, "[total_k, Hkv, D] (packed)")
    _check_tensor("v", v, 3, "[total_k, Hkv, D] (packed)")
    return cu_seqlens_q.shape[0] - 1


def check_inputs(q, k, v, prefix_k, prefix_v, *, causal, scale, attention_mask, prefix_index,
                 prefix_lengths=None, attention_bias=None, softcap=None, window=None, cu_seqlens_q=None,
                 cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None) -> AttentionProblem:
    """Validate `prefix_attention`'s arguments (shapes, dtypes, devices); return them as an `AttentionProblem`.

    Packed inputs (`cu_seqlens_q` given) `[total, H, D]` become a batch of one row, `[1, H, total, D]` views.
    """
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    if packed:
        sequences = _check_packing(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   attention_mask, attention_bias)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
    else:
        for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if value is not None:
                raise ValueError(f"{name}: only packed calls (with cu_seqlens_q, cu_seqlens_k) take it, got {value!r}")
        _check_tensor("q", q, 4, "[B, Hq, Sq, D]")
        _check_tensor("k", k, 4, "[B, Hkv, Skv, D]")
        _check_tensor("v", v, 4, "[B, Hkv, Skv, D]")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q: expected one of float16, bfloat16, float32, float64, got {q.dtype}")
    batch, hq, _, d = q.shape
    if k.shape[0] != batch or k.shape[-1] != d:
        raise ValueError(f"k: expected [B={batch}, Hkv, Skv, D={d}] to match q, got {_shape(k)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {_shape(k)}, got {_shape(v)}")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"k: the query heads Hq={hq} must be a multiple of the key/value heads, got Hkv={hkv}")
    rows, what = (sequences, "packed sequence") if packed else (batch, "batch row")
    _check_prefix(q, prefix_k, prefix_v, prefix_index, hkv, d, rows, what)
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected q's device {q.device}, got {t.device}")
    mask = _check_mask(attention_mask, q, k.shape[2])
    if prefix_lengths is not None:
        if prefix_k.dim() != 4:
            raise ValueError(f"prefix_lengths: needs a per-row or bank prefix_k [N, Hkv, P, D], got prefix_k of "
                             f"shape {_shape(prefix_k)}")
        _check_row_tensor("prefix_lengths", prefix_lengths, rows, what, q.device)
    bias = _check_bias(attention_bias, q, k.shape[2], prefix_k.shape[-2])
    scale = d**-0.5 if scale is None else _positive("scale", scale, allow_none=False, most=MAX_SCALE)
    softcap = _positive("softcap", softcap, allow_none=True)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if window is not None:
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window: expected a positive int (sequence keys a query sees) or None, got {window!r}")
        if not causal:
            raise ValueError("window: a sliding window needs causal=True (it ends at each query's causal edge), got "
                             "causal=False")
    return AttentionProblem(
        q, k, v, prefix_k, prefix_v, causal, scale, prefix_index=prefix_index, prefix_lengths=prefix_lengths,
        mask=mask, bias=bias, softcap=softcap, window=window, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q or 0, max_seqlen_k=max_seqlen_k or 0,
    )


def _check_once(t: torch.Tensor, bounds: tuple, check, *args) -> None:
    """Run `check(t, *args)` (which raises, or on CUDA queues an assert) once per version of a CPU tensor and
    `bounds`: the plan of a model call hands the same index, lengths and offsets to every layer."""
    if t.device.type != "cpu":
        check(t, *args)
    else:
        derived(t, bounds, lambda: check(t, *args))


def _value_error(condition: torch.Tensor, message: str) -> None:
    """Raise `message` if `condition` (a 0-D bool tensor) is False: on CPU at once; on CUDA as a device-side
    assert, so the host never waits for the device."""
    if condition.device.type == "cpu":
        if not bool(condition):
            raise ValueError(message)
    else:
        torch._assert_async(condition, message)


def _in_range(t: torch.Tensor, name: str, low: int, high: int, expected: str) -> None:
    if t.numel():
        lowest, highest = torch.aminmax(t)
        _value_error((lowest >= low) & (highest <= high), f"{name}: {expected}")


def _offsets(cu: torch.Tensor, name: str, total: int, longest: int) -> None:
    lengths = cu.diff()
    ok = (cu[0] == 0) & (cu[-1] == total) & (lengths >= 0).all() & (lengths <= longest).all()
    _value_error(ok, f"{name}: expected offsets from 0 to the total {total}, never decreasing, with no sequence "
                     f"longer than its max_seqlen ({longest})")


def check_values(p: AttentionProblem) -> None:
    """The checks that read tensor values: bank indices in range, prefix lengths within P, sequence offsets that
    start at 0, never decrease, end at the totals and respect the max_seqlen bounds. A CPU tensor is checked once
    per version and bounds."""
    what = "packed sequence" if p.packed else "batch row"
    if p.prefix_index is not None:
        n = p.prefix_k.shape[0]
        _check_once(p.prefix_index, ("index checked", n, what), _in_range, "prefix_index", 0, n - 1,
                    f"expected every {what}'s entry in [0, {n}) (the bank size)")
    if p.prefix_lengths is not None:
        n = p.prefix_k.shape[-2]
        _check_once(p.prefix_lengths, ("lengths checked", n, what), _in_range, "prefix_lengths", 0, n,
                    f"expected every {what}'s length in [0, P={n}]")
    if p.packed:
        for name, cu, total, longest in (("cu_seqlens_q", p.cu_seqlens_q, p.q.shape[2], p.max_seqlen_q),
                                         ("cu_seqlens_k", p.cu_seqlens_k, p.k.shape[2], p.max_seqlen_k)):
            _check_once(cu, (name, total, longest), _offsets, name, total, longest)
