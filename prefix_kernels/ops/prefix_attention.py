"""`prefix_attention`: attention over a per-layer prefix and the sequence's keys/values, never concatenated.

The computation is the PyTorch custom op `prefix_kernels::attention` (with `prefix_kernels::attention_backward`
as its registered autograd), so `torch.compile` and CUDA graphs see one opaque op per call, with fake (shape-only)
implementations for tracing. Eager calls on plain tensors skip the op's dispatch layers, which cost more host time
than a small decode step's arithmetic: without a gradient to record the backend runs directly, and with one
through `_EagerAttention`, an autograd Function over the same backend forward and backward. Nothing in this file
reads tensor values.
"""

import torch

from . import dispatch
from .problem import AttentionProblem
from .validate import check_inputs, check_values

_Tensor = torch.Tensor
_MaybeTensor = torch.Tensor | None
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _problem(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, mask, bias, cu_seqlens_q, cu_seqlens_k,
             max_seqlen_q, max_seqlen_k, causal, scale, softcap, window) -> AttentionProblem:
    return AttentionProblem(q, k, v, prefix_k, prefix_v, causal, scale, prefix_index=prefix_index,
                            prefix_lengths=prefix_lengths, mask=mask, bias=bias, softcap=softcap, window=window,
                            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                            max_seqlen_k=max_seqlen_k)


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _run_forward(p: AttentionProblem, backend: str, with_lse: bool = True):
    """The value checks, then the backend's forward: (o `[B, Sq, Hq, D]` contiguous, lse `[B, Hq, Sq]` contiguous
    in its dtype, or None when not `with_lse` and the backend did not compute it)."""
    check_values(p)
    o, lse = dispatch.backend(backend).forward(p, with_lse=with_lse)
    return o.contiguous(), None if lse is None else lse.to(_lse_dtype(p.q)).contiguous()


def _save(ctx, q, k, v, prefix_k, prefix_v, o, lse, others: tuple, options: tuple) -> None:
    """What the backward needs, kept alike by both autograd paths: every tensor through `save_for_backward` (so
    activation checkpointing's hooks see them all), `others` being the problem's optional tensors (bank index,
    lengths, mask, bias, packed offsets) and `options` its other fields and the backend's name."""
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, o, lse, *others)
    ctx.options = options
    ctx.mark_non_differentiable(lse)


def _backend_backward(d_o, saved: tuple, options: tuple, need_dq: bool, need_dkv: bool, need_dprefix: bool):
    """The backend's (dq `[B, Sq, Hq, D]`, dk, dv, d prefix_k, d prefix_v), None where not asked for, from what
    `_save` kept; `d_o` and the saved o are `[B, Sq, Hq, D]`."""
    q, k, v, prefix_k, prefix_v, o, lse, *others = saved
    *fields, backend = options
    p = _problem(q, k, v, prefix_k, prefix_v, *others, *fields)
    return dispatch.backend(backend).backward(p, o.transpose(1, 2), lse, d_o.transpose(1, 2), need_dq, need_dkv,
                                              need_dprefix)


def _needed(ctx) -> tuple[bool, bool, bool]:
    """(need dq, need dk or dv, need a prefix gradient) of a backward."""
    need = ctx.needs_input_grad
    return need[0], need[1] or need[2], need[3] or need[4]


def _asked(ctx, dq, dk, dv, dpk, dpv) -> tuple:
    """The gradients of q, k, v, prefix_k, prefix_v as autograd takes them: dq back to `[B, Hq, Sq, D]`, None for
    each input that needs none."""
    need = ctx.needs_input_grad
    return (dq.transpose(1, 2) if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            dpk if need[3] else None, dpv if need[4] else None)


@torch.library.custom_op("prefix_kernels::attention", mutates_args=())
def _attention(
    q: _Tensor, k: _Tensor, v: _Tensor, prefix_k: _Tensor, prefix_v: _Tensor, prefix_index: _MaybeTensor,
    prefix_lengths: _MaybeTensor, mask: _MaybeTensor, bias: _MaybeTensor, cu_seqlens_q: _MaybeTensor,
    cu_seqlens_k: _MaybeTensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float,
    softcap: float | None, window: int | None, backend: str,
) -> tuple[_Tensor, _Tensor]:
    """(o `[B, Sq, Hq, D]` contiguous, lse `[B, Hq, Sq]`) of the checked inputs (see `AttentionProblem`)."""
    p = _problem(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, mask, bias, cu_seqlens_q, cu_seqlens_k,
                 max_seqlen_q, max_seqlen_k, causal, scale, softcap, window)
    return _run_forward(p, backend)  # the layouts the fake implementation promises


@_attention.register_fake
def _attention_fake(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, mask, bias, cu_seqlens_q, cu_seqlens_k,
                    max_seqlen_q, max_seqlen_k, causal, scale, softcap, window, backend):
    b, hq, sq, d = q.shape
    return q.new_empty(b, sq, hq, d), q.new_empty(b, hq, sq, dtype=_lse_dtype(q))


@torch.library.custom_op("prefix_kernels::attention_backward", mutates_args=())
def _attention_backward(
    d_o: _Tensor, q: _Tensor, k: _Tensor, v: _Tensor, prefix_k: _Tensor, prefix_v: _Tensor, o: _Tensor,
    lse: _Tensor, prefix_index: _MaybeTensor, prefix_lengths: _MaybeTensor, mask: _MaybeTensor, bias: _MaybeTensor,
    cu_seqlens_q: _MaybeTensor, cu_seqlens_k: _MaybeTensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
    scale: float, softcap: float | None, window: int | None, backend: str, need_dq: bool, need_dkv: bool,
    need_dprefix: bool,
) -> tuple[_Tensor, _Tensor, _Tensor, _Tensor, _Tensor]:
    """(dq `[B, Sq, Hq, D]`, dk, dv, d prefix_k, d prefix_v), all contiguous; an empty tensor for each gradient
    not asked for. `d_o` and `o` are `[B, Sq, Hq, D]`, as the forward returns o."""
    grads = _backend_backward(d_o, (q, k, v, prefix_k, prefix_v, o, lse, prefix_index, prefix_lengths, mask, bias,
                                    cu_seqlens_q, cu_seqlens_k),
                              (max_seqlen_q, max_seqlen_k, causal, scale, softcap, window, backend), need_dq,
                              need_dkv, need_dprefix)
    return tuple(q.new_empty(0) if g is None else g.contiguous() for g in grads)


@_attention_backward.register_fake
def _attention_backward_fake(d_o, q, k, v, prefix_k, prefix_v, o, lse, prefix_index, prefix_lengths, mask, bias,
                             cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, softcap, window,
                             backend, need_dq, need_dkv, need_dprefix):
    def maybe(need, t, shape):
        return t.new_empty(shape) if need else q.new_empty(0)

    b, hq, sq, d = q.shape
    return (maybe(need_dq, q, (b, sq, hq, d)), maybe(need_dkv, k, k.shape), maybe(need_dkv, v, v.shape),
            maybe(need_dprefix, prefix_k, prefix_k.shape), maybe(need_dprefix, prefix_v, prefix_v.shape))


def _setup_context(ctx, inputs, output):
    (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, mask, bias, cu_seqlens_q, cu_seqlens_k,
     max_seqlen_q, max_seqlen_k, causal, scale, softcap, window, backend) = inputs
    o, lse = output
    _save(ctx, q, k, v, prefix_k, prefix_v, o, lse,
          (prefix_index, prefix_lengths, mask, bias, cu_seqlens_q, cu_seqlens_k),
          (max_seqlen_q, max_seqlen_k, causal, scale, softcap, window, backend))


def _backward(ctx, d_o, d_lse):
    grads = _attention_backward(d_o, *ctx.saved_tensors, *ctx.options, *_needed(ctx))
    return _asked(ctx, *grads) + (None,) * 13


_attention.register_autograd(_backward, setup_context=_setup_context)


def _eager_call(p: AttentionProblem) -> str | None:
    """How a call can skip the registered op, or None when it must take it (traced by torch.compile, or a tensor
    subclass: fake, functional, distributed): "plain" with no gradient to record, "autograd" with one."""
    if torch.compiler.is_compiling():
        return None
    recorded = False
    for t in (p.q, p.k, p.v, p.prefix_k, p.prefix_v):
        if type(t) not in _PLAIN:
            return None
        recorded = recorded or t.requires_grad
    return "autograd" if recorded and torch.is_grad_enabled() else "plain"


class _EagerAttention(torch.autograd.Function):
    """The op for eager calls that record a gradient: the same backend forward and backward the registered op runs,
    without the custom-op dispatch around them. Every tensor is saved with `save_for_backward`, so activation
    checkpointing's hooks see them all."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, p: AttentionProblem, backend: str):
        o, lse = _run_forward(p, backend)
        _save(ctx, q, k, v, prefix_k, prefix_v, o, lse,
              (p.prefix_index, p.prefix_lengths, p.mask, p.bias, p.cu_seqlens_q, p.cu_seqlens_k),
              (p.max_seqlen_q, p.max_seqlen_k, p.causal, p.scale, p.softcap, p.window, backend))
        return o, lse

    @staticmethod
    def backward(ctx, d_o, d_lse):
        grads = _backend_backward(d_o.contiguous(), ctx.saved_tensors, ctx.options, *_needed(ctx))
        return _asked(ctx, *grads) + (None, None)


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
    window: int | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
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
        attention_mask: sequence keys only. None; a key-padding mask `[B, Skv]` (1/True = real token), which
            keeps causal's block skipping; or a boolean `[B, 1 or Hq, Sq, Skv]` (True = attend), combined with
            `causal`.
        prefix_index: int64 `[B]`, row b reads bank entry `prefix_index[b]`.
        prefix_lengths: int64 `[B]` (with a per-row or bank prefix): row b sees only its first
            `prefix_lengths[b]` prefix keys, the rest being padding — adapters of different lengths in one batch.
        attention_bias: float `[B or 1, Hq or 1, Sq or 1, Skv]` added to the logits of the sequence keys, or
            `[.., P + Skv]` added over `[prefix ; sequence]` (T5's relative position bias with the prefix as the
            first P positions). It receives no gradient.
        softcap: cap the logits as `softcap * tanh(logits / softcap)` before bias and mask (Gemma 2), or None.
        window: with `causal`, a sliding window over the sequence keys (Mistral, Gemma 2/3): query i sees at most
            the last `window` sequence keys up to its causal edge, `edge - window < j <= edge` with
            `edge = Skv - Sq + i` (per packed sequence when packed; FlashAttention's `window_size=(window - 1, 0)`).
            Prefix keys stay visible to every query. None: no window.
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k: packed sequences, FlashAttention's varlen
            convention. q is then `[total_q, Hq, D]` and k, v `[total_k, Hkv, D]`, the N sequences back to back;
            `cu_seqlens_*` (int32 `[N + 1]`) are their offsets (0 first, the total last), `max_seqlen_*` (ints)
            the longest. Each sequence sees the whole prefix and, causally (bottom-right within the sequence), only
            its own keys. `prefix_index`, `prefix_lengths` and a per-row prefix then have one entry per sequence;
            `attention_mask` and `attention_bias` are not taken. As in FlashAttention, `max_seqlen_*` size the
            Triton grid (capped by the totals): pass the real longest.
        return_lse: also return the natural-log log-sum-exp of each query row.
        backend: "torch", "triton", "cuda" or None (triton on CUDA when importable, else torch; float64 and
            `window` always torch; the environment variable `PREFIX_KERNELS_BACKEND` overrides None).

    Mask contract for Sq = 3, Skv = 4, P = 2, causal (■ attends, ⬚ masked)::

                   prefix | sequence
        query 0     ■ ■   | ■ ■ ⬚ ⬚
        query 1     ■ ■   | ■ ■ ■ ⬚
        query 2     ■ ■   | ■ ■ ■ ■

    A query row that sees no key at all (P = 0, every sequence key masked) returns zeros and lse = -inf. Prefix
    keys past a row's `prefix_lengths` are never read (NaN there changes nothing); sequence keys and values must be
    finite (a masked one may still make rows NaN, as in SDPA). `scale` and `softcap` must be finite and positive,
    `scale` at most 2**16.

    Returns:
        o `[B, Hq, Sq, D]` (packed: `[total_q, Hq, D]`) in q's dtype, and with `return_lse` also lse `[B, Hq, Sq]`
        (packed: `[Hq, total_q]`) float32, without gradient. Differentiable in q, k, v, prefix_k and prefix_v; a
        prefix shared by several rows (or a bank entry) receives the sum of their gradients, accumulated in
        float32.

    Errors in shapes, dtypes and devices are raised before any work, naming the argument. Values are checked
    inside the op: out-of-range `prefix_index` / `prefix_lengths` or inconsistent `cu_seqlens_*` raise on CPU and
    fail a device-side assert on CUDA (the host never waits for the GPU).

    >>> q = torch.randn(2, 8, 5, 64)
    >>> k = v = torch.randn(2, 2, 5, 64)
    >>> pk = pv = torch.randn(2, 16, 64)
    >>> prefix_attention(q, k, v, pk, pv).shape
    torch.Size([2, 8, 5, 64])
    """
    p = check_inputs(
        q, k, v, prefix_k, prefix_v,
        causal=causal, scale=scale, attention_mask=attention_mask, prefix_index=prefix_index,
        prefix_lengths=prefix_lengths, attention_bias=attention_bias, softcap=softcap, window=window,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
    )
    name = dispatch.select_backend(backend, q.device, q.shape[-1], q.dtype, window=p.window)
    if name == "cuda":
        dispatch.backend("cuda").check(p)
    eager = _eager_call(p)
    if eager == "plain":  # nothing to trace, no gradient to record: run the backend without the op's layers
        o, lse = _run_forward(p, name, with_lse=return_lse)
    elif eager == "autograd":
        o, lse = _EagerAttention.apply(p.q, p.k, p.v, p.prefix_k, p.prefix_v, p, name)
    else:
        o, lse = _attention(
            p.q, p.k, p.v, p.prefix_k, p.prefix_v, p.prefix_index, p.prefix_lengths, p.mask, p.bias,
            p.cu_seqlens_q, p.cu_seqlens_k, p.max_seqlen_q, p.max_seqlen_k, p.causal, p.scale, p.softcap, p.window,
            name,
        )
    o, lse = (o[0], None if lse is None else lse[0]) if p.packed else (o.transpose(1, 2), lse)
    return (o, lse.detach().float()) if return_lse else o
