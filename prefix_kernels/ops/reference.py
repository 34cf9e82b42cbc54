"""Prefix attention in pure PyTorch: the CPU fallback, and the backend any device can run.

Attention over `[prefix ; sequence]` is split into two attentions that share one softmax. Each part yields
an output and its log-sum-exp (LSE); the two are merged by their LSE weights. The prefix part is a small
matmul against `[Hkv, P, D]` (a shared prefix is read once for the whole batch by folding the batch into the
query rows, never expanded per row). The sequence part is, on CPU, PyTorch's fused flash kernel, or, for short
queries and other devices, plain matmuls. Keys and values are never concatenated.

Backward (CPU flash path) uses the FlashAttention identity: given the *merged* output O and LSE, the flash
kernel's backward yields exactly the sequence keys' share of dQ together with dK and dV; the prefix's share
is computed here with the same formula, `dS = P * (dP - rowsum(dO * O))`.
"""

import dataclasses

import torch

from .validate import AttentionProblem

_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_cpu_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

# Below this many query rows per KV head (Hq / Hkv * Sq), matmuls beat the flash kernel (decode steps).
_FLASH_MIN_ROWS = 32


def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sequence_mask(p: AttentionProblem) -> torch.Tensor | None:
    """bool `[B|1, 1|Hq, Sq, Skv]`: the user's mask with the bottom-right causal band, or None if all visible."""
    sq, skv = p.q.shape[2], p.k.shape[2]
    mask = p.mask
    if p.causal and sq > 1:
        rows = torch.arange(sq, device=p.q.device)[:, None] + (skv - sq)
        band = torch.arange(skv, device=p.q.device)[None, :] <= rows  # [Sq, Skv]
        mask = band if mask is None else mask & band
    return mask


def _grouped(t: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, Hq, Sq, X] -> [B, Hkv, G*Sq, X]: the query rows each KV head serves (repeat_kv order)."""
    b, hq, sq = t.shape[:3]
    return t.reshape(b, hkv, (hq // hkv) * sq, *t.shape[3:])


def _fold(t: torch.Tensor, shared: bool) -> torch.Tensor:
    """[B, Hkv, M, X] -> [Hkv, B*M, X] for a shared prefix, so one matmul reads it for every row."""
    if not shared:
        return t
    b, h, m = t.shape[:3]
    return t.transpose(0, 1).reshape(h, b * m, *t.shape[3:])


def _unfold(t: torch.Tensor, shared: bool, batch: int, rows: int) -> torch.Tensor:
    """[Hkv, B*M, X] -> [B, Hkv, M, X], undoing `_fold` (M is given: it cannot be inferred when B = 0)."""
    if not shared:
        return t
    return t.reshape(t.shape[0], batch, rows, *t.shape[2:]).transpose(0, 1)


def _rowwise_prefix(p: AttentionProblem, acc: torch.dtype):
    """The prefix as the matmuls read it: [Hkv, P, D] when shared, else one [B, Hkv, P, D] per row."""
    pk, pv = p.prefix_k.to(acc), p.prefix_v.to(acc)
    if p.prefix_index is not None:
        pk, pv = pk.index_select(0, p.prefix_index), pv.index_select(0, p.prefix_index)
    return pk, pv


def _prefix_visible(p: AttentionProblem) -> torch.Tensor | None:
    """bool `[B, 1, 1, P]`: the prefix keys each row sees (None: all of them)."""
    if p.prefix_lengths is None:
        return None
    positions = torch.arange(p.prefix_k.shape[-2], device=p.q.device)
    return (positions < p.prefix_lengths[:, None])[:, None, None, :]


def _prefix_bias_rows(p: AttentionProblem, acc: torch.dtype) -> torch.Tensor | None:
    """The prefix keys' bias laid out like the prefix scores: [B, Hkv, M, P], folded when the prefix is shared."""
    if p.prefix_bias is None:
        return None
    b, hq, sq = p.q.shape[:3]
    hkv, n = p.k.shape[1], p.prefix_k.shape[-2]
    bias = _grouped_like_scores(p.prefix_bias.to(acc), hkv).expand(b, hkv, hq // hkv, sq, n)
    return _fold(bias.reshape(b, hkv, (hq // hkv) * sq, n), p.shared_prefix)


def _prefix_part(p: AttentionProblem, qg: torch.Tensor):
    """Attention of grouped queries `[B, Hkv, M, D]` over the prefix alone: (o `[B, Hkv, M, D]`, lse `[B, Hkv, M]`)."""
    b, m = qg.shape[0], qg.shape[2]
    pk, pv = _rowwise_prefix(p, qg.dtype)
    shared = p.shared_prefix
    s = _capped(torch.matmul(_fold(qg, shared), (pk * p.scale).transpose(-1, -2)), p.softcap)  # [.., rows, P]
    if s.shape[-1] == 0:  # P = 0: zeros, kept in the graph so an empty prefix gets its (empty) gradient
        empty_lse = s.new_full(s.shape[:-1], float("-inf"))
        return _unfold(torch.matmul(s, pv), shared, b, m), _unfold(empty_lse, shared, b, m)
    bias = _prefix_bias_rows(p, s.dtype)
    if bias is not None:
        s = s + bias
    visible = _prefix_visible(p)
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    top = s.amax(dim=-1, keepdim=True)
    e = torch.exp(s - top.masked_fill(top.isinf(), 0.0))
    total = e.sum(dim=-1, keepdim=True)
    o = torch.matmul(e, pv) / total.clamp_min(1.0)  # total >= 1 whenever a key is seen (the max gives exp(0))
    lse = (top + total.log()).squeeze(-1)
    return _unfold(o, shared, b, m), _unfold(lse, shared, b, m)


def _merge(o_seq, lse_seq, o_pre, lse_pre):
    """Combine two partial attentions by their LSE; rows that see no key at all get o = 0, lse = -inf."""
    lse = torch.logaddexp(lse_seq, lse_pre)
    w_pre = torch.exp(lse_pre - lse).nan_to_num(0.0)[..., None]
    return torch.lerp(o_seq, o_pre, w_pre), lse


def _attend_matmul(p: AttentionProblem):
    """Both parts with plain matmuls under autograd; best for few query rows (decode) and on any device."""
    q, hkv = p.q, p.k.shape[1]
    acc = _acc_dtype(q.dtype)
    b, hq, sq, d = q.shape
    skv = p.k.shape[2]
    qg = _grouped(q, hkv).to(acc)  # [B, Hkv, M, D]
    s = _capped(torch.matmul(qg, p.k.to(acc).transpose(-1, -2)) * p.scale, p.softcap)  # [B, Hkv, M, Skv]
    if p.sequence_bias is not None:
        s = (s.view(b, hkv, hq // hkv, sq, skv) + _grouped_like_scores(p.sequence_bias.to(acc), hkv)).view_as(s)
    mask = sequence_mask(p)
    if mask is not None:
        mask = mask.expand(b, hq, sq, -1) if mask.shape[1] == hq else mask.expand(b, 1, sq, -1)
        s = s.view(b, hkv, hq // hkv, sq, skv).masked_fill(~_grouped_like_scores(mask, hkv), float("-inf")).view_as(s)
    lse_seq = torch.logsumexp(s, dim=-1)
    o_seq = torch.matmul(torch.exp(s - lse_seq.masked_fill(lse_seq.isinf(), 0.0)[..., None]), p.v.to(acc))
    o_pre, lse_pre = _prefix_part(p, qg)
    o, lse = _merge(o_seq, lse_seq, o_pre, lse_pre)
    return o.reshape(b, hq, sq, d).to(q.dtype), lse.reshape(b, hq, sq).float()


def _grouped_like_scores(t: torch.Tensor, hkv: int) -> torch.Tensor:
    """A mask or bias [B|1, 1|Hq, Sq|1, Skv] -> broadcastable against scores viewed as [B, Hkv, G, Sq, Skv]."""
    b, h, sq, skv = t.shape
    if h == 1:
        return t[:, :, None]
    return t.reshape(b, hkv, h // hkv, sq, skv)


def _flash_mask(p: AttentionProblem):
    """(is_causal, additive mask or None, bool `[B|1, 1|Hq, Sq]` of rows with no visible sequence key or None)."""
    sq, skv = p.q.shape[2], p.k.shape[2]
    bias = None if p.sequence_bias is None else p.sequence_bias.to(p.q.dtype)
    if p.mask is None and (not p.causal or sq == 1):
        return False, bias, None
    if p.mask is None and sq == skv and bias is None:
        return True, None, None  # top-left and bottom-right causal coincide
    mask = sequence_mask(p)
    additive = torch.zeros(mask.shape, dtype=p.q.dtype, device=p.q.device).masked_fill_(~mask, float("-inf"))
    return False, additive if bias is None else additive + bias, ~mask.any(dim=-1)


def _cpu_flash_prefix(p: AttentionProblem):
    """The prefix part through the CPU flash kernel: a shared prefix enters as a stride-0 view, never copied."""
    q = p.q
    acc = _acc_dtype(q.dtype)
    if p.prefix_k.shape[-2] == 0:
        return q.new_zeros(q.shape, dtype=acc), q.new_full(q.shape[:3], float("-inf"), dtype=acc)
    pk, pv = p.prefix_k, p.prefix_v
    if p.prefix_index is not None:
        pk, pv = pk.index_select(0, p.prefix_index), pv.index_select(0, p.prefix_index)
    elif pk.dim() == 3:
        pk, pv = pk.expand(q.shape[0], *pk.shape), pv.expand(q.shape[0], *pv.shape)
    visible = _prefix_visible(p)
    additive = None if p.prefix_bias is None else p.prefix_bias.to(q.dtype)
    if visible is not None:
        hidden = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
        additive = hidden if additive is None else additive + hidden
    o, lse = _cpu_flash(q, pk, pv, 0.0, False, attn_mask=additive, scale=p.scale)
    lse = lse.to(acc)
    if visible is not None:
        lse = lse.masked_fill(~visible.any(dim=-1), float("-inf"))
    return o.to(acc), lse


class _CpuFlashPrefixAttention(torch.autograd.Function):
    """Sequence keys through PyTorch's CPU flash kernel, the prefix through matmuls, merged by LSE."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, p: AttentionProblem):
        acc = _acc_dtype(q.dtype)
        is_causal, additive, empty_rows = _flash_mask(p)
        o_seq, lse_seq = _cpu_flash(q, k, v, 0.0, is_causal, attn_mask=additive, scale=p.scale)
        lse_seq = lse_seq.to(acc)
        if empty_rows is not None:
            lse_seq = lse_seq.masked_fill(empty_rows, float("-inf"))
        o_pre, lse_pre = _cpu_flash_prefix(p)
        o, lse = _merge(o_seq.to(acc), lse_seq, o_pre, lse_pre)
        o = o.to(q.dtype)
        ctx.problem = p
        ctx.flash_args = (is_causal, additive)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, o, lse)
        return o, lse.float()

    @staticmethod
    def backward(ctx, d_o, d_lse):
        q, k, v, prefix_k, prefix_v, o, lse = ctx.saved_tensors
        p = ctx.problem
        is_causal, additive = ctx.flash_args
        hkv, acc = k.shape[1], lse.dtype
        lse_rows = lse.masked_fill(lse.isinf(), 0.0)  # rows that saw nothing: every probability is 0
        d_o = d_o.contiguous()
        dq = dk = dv = None
        if any(ctx.needs_input_grad[:3]):
            dq, dk, dv = _cpu_flash_backward(
                d_o, q, k, v, o, lse_rows.to(torch.float64 if acc == torch.float64 else torch.float32),
                0.0, is_causal, attn_mask=additive, scale=p.scale,
            )
        dq_pre, dpk, dpv = _prefix_backward(p, q, o, d_o, lse_rows, hkv, acc, ctx.needs_input_grad[3:5])
        if dq is not None:
            dq = (dq.to(acc) + dq_pre).to(q.dtype)
        return dq, dk, dv, dpk, dpv, None


def _prefix_backward(p: AttentionProblem, q, o, d_o, lse_rows, hkv, acc, need_prefix_grads):
    """Gradients through the prefix keys/values: (dq share [B, Hq, Sq, D], d prefix_k, d prefix_v)."""
    b, hq, sq, d = q.shape
    shared = p.shared_prefix
    qg = _fold(_grouped(q, hkv).to(acc), shared)
    dog = _fold(_grouped(d_o, hkv).to(acc), shared)
    delta = _fold(_grouped((d_o.to(acc) * o.to(acc)).sum(-1), hkv), shared)
    lse_g = _fold(_grouped(lse_rows, hkv), shared)
    pk, pv = _rowwise_prefix(p, acc)
    logits = torch.matmul(qg, pk.transpose(-1, -2)) * p.scale  # [.., rows, P]
    bias = _prefix_bias_rows(p, acc)
    probs = torch.exp((logits if bias is None else logits + bias) - lse_g[..., None])
    visible = _prefix_visible(p)
    if visible is not None:
        probs = probs.masked_fill(~visible, 0.0)
    ds = probs * (torch.matmul(dog, pv.transpose(-1, -2)) - delta[..., None])
    dq = _unfold(torch.matmul(ds, pk) * p.scale, shared, b, (hq // hkv) * sq).reshape(b, hq, sq, d)
    dpk = dpv = None
    if any(need_prefix_grads):
        dpk = torch.matmul(ds.transpose(-1, -2), qg) * p.scale
        dpv = torch.matmul(probs.transpose(-1, -2), dog)
        if p.prefix_index is not None:
            bank = torch.zeros(p.prefix_k.shape, dtype=acc, device=q.device)
            dpk = bank.index_add(0, p.prefix_index, dpk)
            dpv = torch.zeros_like(bank).index_add(0, p.prefix_index, dpv)
        dpk, dpv = dpk.to(p.prefix_k.dtype), dpv.to(p.prefix_v.dtype)
    return dq, dpk, dpv


def _unit_stride_d(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def torch_prefix_attention(p: AttentionProblem):
    """Backend "torch": (o `[B, Hq, Sq, D]` in q's dtype, lse `[B, Hq, Sq]` float32)."""
    q, k = p.q, p.k
    rows = q.shape[1] // k.shape[1] * q.shape[2]
    flash = q.device.type == "cpu" and k.shape[2] > 0 and rows >= _FLASH_MIN_ROWS and q.numel() > 0
    if flash and p.softcap is None:  # PyTorch's flash kernel has no soft cap
        # The CPU flash kernel assumes a unit stride along D: a gapped view is copied (under autograd) first.
        p = dataclasses.replace(p, **{name: _unit_stride_d(getattr(p, name))
                                      for name in ("q", "k", "v", "prefix_k", "prefix_v")})
        return _CpuFlashPrefixAttention.apply(p.q, p.k, p.v, p.prefix_k, p.prefix_v, p)
    return _attend_matmul(p)
