"""Input checks for `prefix_attention`, run once at the entry point before any backend sees the tensors.

Every error names the argument, what was given and what was expected. Nothing here copies a tensor: the
checked inputs come back as views (a key-padding mask becomes a `[B, 1, 1, Skv]` boolean view).
"""

from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttentionProblem:
    """The checked inputs of one `prefix_attention` call, in the layout every backend reads."""

    q: torch.Tensor  # [B, Hq, Sq, D]
    k: torch.Tensor  # [B, Hkv, Skv, D]
    v: torch.Tensor  # [B, Hkv, Skv, D]
    prefix_k: torch.Tensor  # [Hkv, P, D] shared, or [N, Hkv, P, D] per row (N = B) / bank
    prefix_v: torch.Tensor  # same shape as prefix_k
    prefix_index: torch.Tensor | None  # [B] int64 into a bank, or None
    mask: torch.Tensor | None  # bool [B or 1, 1 or Hq, Sq or 1, Skv], True = attend
    causal: bool
    scale: float
    prefix_lengths: torch.Tensor | None = None  # [B] int64: row b sees prefix keys [0, prefix_lengths[b])
    bias: torch.Tensor | None = None  # float [B|1, Hq|1, Sq|1, Skv or P + Skv] added to logits, no gradient
    softcap: float | None = None  # logits (before bias and mask) become softcap * tanh(logits / softcap)

    @property
    def shared_prefix(self) -> bool:
        return self.prefix_k.dim() == 3

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


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_tensor(name: str, t, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name}: expected a {rank}-D tensor {layout}, got shape {_shape(t)}")


def _check_prefix(q, prefix_k, prefix_v, prefix_index, hkv: int, d: int):
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor [Hkv, P, D] or [N, Hkv, P, D], got {type(t).__name__}")
        if t.dim() not in (3, 4):
            raise ValueError(f"{name}: expected shape [Hkv, P, D] or [N, Hkv, P, D], got {_shape(t)}")
    if prefix_k.shape != prefix_v.shape:
        raise ValueError(
            f"prefix_v: expected the shape of prefix_k {_shape(prefix_k)}, got {_shape(prefix_v)}"
        )
    if prefix_k.shape[-3] != hkv or prefix_k.shape[-1] != d:
        raise ValueError(
            f"prefix_k: expected [..., Hkv={hkv}, P, D={d}] to match k, got {_shape(prefix_k)}"
        )
    batch = q.shape[0]
    if prefix_index is None:
        if prefix_k.dim() == 4 and prefix_k.shape[0] != batch:
            raise ValueError(
                f"prefix_k: a 4-D prefix without prefix_index is one per row, expected first dim B={batch}, "
                f"got {_shape(prefix_k)} (pass prefix_index to read it as a bank)"
            )
        return
    if not isinstance(prefix_index, torch.Tensor):
        raise TypeError(f"prefix_index: expected an int64 tensor [B], got {type(prefix_index).__name__}")
    if prefix_k.dim() != 4:
        raise ValueError(
            f"prefix_index: needs a bank prefix_k [N, Hkv, P, D], got prefix_k of shape {_shape(prefix_k)}"
        )
    if prefix_index.dtype != torch.int64 or prefix_index.shape != (batch,):
        raise ValueError(
            f"prefix_index: expected int64 of shape [{batch}], got {prefix_index.dtype} of shape {_shape(prefix_index)}"
        )
    if prefix_index.device != q.device:
        raise ValueError(f"prefix_index: expected device {q.device}, got {prefix_index.device}")
    if batch:
        lo, hi = int(prefix_index.min()), int(prefix_index.max())
        if lo < 0 or hi >= prefix_k.shape[0]:
            raise ValueError(
                f"prefix_index: expected values in [0, {prefix_k.shape[0]}) (the bank size), got min {lo} max {hi}"
            )


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
                f"attention_mask: a key-padding mask must be [B={batch}, Skv={skv}], got {_shape(attention_mask)}"
            )
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask != 0
        return attention_mask[:, None, None, :]
    if attention_mask.dim() == 4:
        if attention_mask.dtype != torch.bool:
            raise TypeError(
                f"attention_mask: a 4-D mask must be boolean (True = attend), got {attention_mask.dtype}"
            )
        b, h, s, t = attention_mask.shape
        if b not in (1, batch) or h not in (1, hq) or s not in (1, sq) or t != skv:
            raise ValueError(
                f"attention_mask: expected [B={batch} or 1, 1 or Hq={hq}, Sq={sq} or 1, Skv={skv}], "
                f"got {_shape(attention_mask)}"
            )
        return attention_mask
    raise ValueError(
        f"attention_mask: expected a key-padding mask [B, Skv] or a boolean [B, 1 or Hq, Sq, Skv], "
        f"got shape {_shape(attention_mask)}"
    )


def _check_prefix_lengths(prefix_lengths, prefix_k, q):
    if prefix_lengths is None:
        return None
    batch, n_prefix = q.shape[0], prefix_k.shape[-2]
    if not isinstance(prefix_lengths, torch.Tensor):
        raise TypeError(f"prefix_lengths: expected an int64 tensor [B], got {type(prefix_lengths).__name__}")
    if prefix_k.dim() != 4:
        raise ValueError(
            f"prefix_lengths: needs a per-row or bank prefix_k [N, Hkv, P, D], got prefix_k of shape {_shape(prefix_k)}"
        )
    if prefix_lengths.dtype != torch.int64 or prefix_lengths.shape != (batch,):
        raise ValueError(f"prefix_lengths: expected int64 of shape [{batch}], got {prefix_lengths.dtype} of shape "
                         f"{_shape(prefix_lengths)}")
    if prefix_lengths.device != q.device:
        raise ValueError(f"prefix_lengths: expected device {q.device}, got {prefix_lengths.device}")
    if batch:
        lo, hi = int(prefix_lengths.min()), int(prefix_lengths.max())
        if lo < 0 or hi > n_prefix:
            raise ValueError(f"prefix_lengths: expected values in [0, P={n_prefix}], got min {lo} max {hi}")
    return prefix_lengths


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


def check_inputs(q, k, v, prefix_k, prefix_v, *, causal, scale, attention_mask, prefix_index,
                 prefix_lengths=None, attention_bias=None, softcap=None) -> AttentionProblem:
    """Validate `prefix_attention`'s arguments; return them as an `AttentionProblem`."""
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
    _check_prefix(q, prefix_k, prefix_v, prefix_index, hkv, d)
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected q's device {q.device}, got {t.device}")
    mask = _check_mask(attention_mask, q, k.shape[2])
    prefix_lengths = _check_prefix_lengths(prefix_lengths, prefix_k, q)
    bias = _check_bias(attention_bias, q, k.shape[2], prefix_k.shape[-2])
    if scale is None:
        scale = d**-0.5
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
        raise ValueError(f"scale: expected a positive float or None, got {scale!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not softcap > 0):
        raise ValueError(f"softcap: expected a positive float or None, got {softcap!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    return AttentionProblem(q, k, v, prefix_k, prefix_v, prefix_index, mask, causal, float(scale), prefix_lengths,
                            bias, None if softcap is None else float(softcap))
