"""Backend "torch": prefix attention in pure PyTorch — the CPU path, and the backend any device can run.

Attention over `[prefix ; sequence]` is two attentions that share one softmax. Each part (the prefix keys, the
sequence keys) yields an output and its log-sum-exp (LSE); the outputs are merged by their LSE weights, in place in
the sequence part's output. The keys and values are never concatenated, and a shared prefix is never copied per row.

On CPU each part is one call of PyTorch's fused flash kernel: causal with a key-padding mask stays the kernel's
own causal mode (key blocks past the diagonal are skipped), a shared prefix enters as a batch-stride-0 view, and
a decode step folds the G query heads of a KV head into one row block so each key is read once. Elsewhere, and
with a soft cap (which the flash kernel lacks), both parts are grouped matmuls. Few, large calls per layer: on a
machine whose cores are shared with other work, every extra multi-threaded call is one more wait for a
descheduled thread.

Backward uses the FlashAttention identity: given the *merged* output O and LSE, each part's backward (the flash
kernel's, or the same formula in matmuls, `dS = P * (dP - rowsum(dO * O))`) yields exactly that part's share of
dQ and its own dK, dV.

Small problems (a decode step of a small model: few query rows, a short cache) are bound by host work, not
arithmetic: there the forward is one joint softmax over the logits of both parts (`_joint_forward`, ten compute
ATen calls for a decode step), with no second attention call and no merge. Masks enter as -inf added by the logits'
own `baddbmm`, made once per mask for the call's other layers. Packed sequences are gathered into left-padded
batches (`torch_varlen`), so a call costs a few batched computations whatever the number of sequences.
"""

import dataclasses
import functools
from dataclasses import dataclass

import torch

from . import torch_varlen
from .memo import derived
from .problem import AttentionProblem

_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_cpu_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass(frozen=True)
class _Part:
    """One key set the queries attend to (the prefix, or the sequence), with who may see which key."""

    k: torch.Tensor  # [B, Hkv, N, D]; a shared prefix [Hkv, N, D]; a bank [N_bank, Hkv, N, D] read through index
    v: torch.Tensor
    index: torch.Tensor | None  # int64 [B]: bank entry of each row
    top_left_causal: bool  # the flash kernel's causal mode (exact for the sequence keys when Sq == Skv)
    visible: torch.Tensor | None  # bool [B|1, Hq|1, Sq|1, N], True = attend
    bias: torch.Tensor | None  # float [B|1, Hq|1, Sq|1, N], added to the logits
    empty: torch.Tensor | None  # bool [B|1, Hq|1, Sq|1]: rows that see none of these keys
    hidden: torch.Tensor | None = None  # bool [B, 1, N, 1]: keys a row never reads (prefix past its length)

    @property
    def shared(self) -> bool:
        return self.k.dim() == 3

    def rowwise(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """k or v as `[B, Hkv, N, D]`: a shared prefix as a stride-0 view, a bank's entries gathered; zeros where
        `hidden`, so keys a row never reads cannot reach it, whatever they hold."""
        if self.shared:
            return t.expand(batch, *t.shape)
        rows = t if self.index is None else t.index_select(0, self.index)
        return rows if self.hidden is None else rows.masked_fill(self.hidden, 0.0)

    def reduce(self, grad: torch.Tensor) -> torch.Tensor:
        """A per-row gradient `[B, Hkv, N, D]` -> the keys' own shape, summed over the rows that share them."""
        if self.shared:
            return grad.sum(0)
        if self.index is None:
            return grad
        return grad.new_zeros(self.k.shape).index_add_(0, self.index, grad)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _band(sq: int, skv: int, device, window: int | None = None) -> torch.Tensor:
    """bool `[Sq, Skv]`: bottom-right causal, query i sees key j iff j <= edge = Skv - Sq + i, and with a window
    only the last `window` keys up to its edge."""
    offset = torch.arange(skv, device=device) - torch.arange(sq, device=device)[:, None] - (skv - sq)  # j - edge
    return offset <= 0 if window is None else (offset <= 0) & (offset > -window)


def _sequence_part(p: AttentionProblem, flash: bool) -> _Part:
    sq, skv = p.q.shape[2], p.k.shape[2]
    visible, top_left, empty = p.mask, False, None
    key_padding = visible is None or (visible.shape[1] == 1 and visible.shape[2] == 1)
    if p.window is not None:
        band = _band(sq, skv, p.q.device, p.window)[None, None]
        visible = band if visible is None else visible & band
    elif p.causal and sq > 1:
        if flash and sq == skv and key_padding:
            top_left = True  # top-left and bottom-right causal coincide
            if visible is not None:  # row i is empty iff no real key at or before i
                first = visible[:, 0, 0].int().argmax(-1, keepdim=True)  # [B, 1]
                none = ~visible[:, 0, 0].any(-1, keepdim=True)
                empty = ((torch.arange(sq, device=p.q.device) < first) | none)[:, None, :]
        else:
            band = _band(sq, skv, p.q.device)[None, None]
            visible = band if visible is None else visible & band
    if visible is not None and empty is None:
        empty = ~visible.any(-1)
    return _Part(p.k, p.v, None, top_left, visible, p.sequence_bias, empty)


def _prefix_part(p: AttentionProblem) -> _Part:
    visible = empty = hidden = None
    if p.prefix_lengths is not None:
        hidden = _hidden_prefix(p.prefix_lengths, p.prefix_k.shape[-2])  # [B, 1, 1, P]
        visible = ~hidden
        empty = (p.prefix_lengths == 0)[:, None, None]
        hidden = hidden.transpose(-1, -2)
    return _Part(p.prefix_k, p.prefix_v, p.prefix_index, False, visible, p.prefix_bias, empty, hidden)


def _merge(o_seq, lse_seq, o_pre, lse_pre, dtype: torch.dtype):
    """(o `[B, Sq, Hq, D]` contiguous in `dtype`, lse): two partial attentions `[B, Hq, Sq, D]` (fresh tensors)
    combined by their LSE; rows that see no key at all get o = 0, lse = -inf. Combined in place in `o_seq`, which
    is returned as it is when its memory is already laid out `[B, Sq, Hq, D]` (the flash kernel's output), saving
    a pass over the output and its allocation."""
    lse = torch.logaddexp(lse_seq, lse_pre)
    w_pre = torch.exp(lse_pre - lse).nan_to_num_(0.0)
    merged = o_seq.lerp_(o_pre, w_pre[..., None]).transpose(1, 2)
    return merged.to(dtype).contiguous(), lse  # itself when already in `dtype` and laid out so


class _Rows:
    """How the query rows are laid out for the kernels: `[B, Hq, Sq, .]` as given, or grouped `[B, Hkv, G*Sq, .]`
    (the G query heads of a KV head stacked, so each key is read once for all of them)."""

    def __init__(self, p: AttentionProblem, grouped: bool):
        self.b, self.hq, self.sq, self.d = p.q.shape
        self.hkv = p.k.shape[1]
        self.grouped = grouped

    def __call__(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """A `[B|1, Hq|1, Sq|1, *X]` tensor (q, dO, O, or a mask / bias / empty-rows tensor) in the kernels' rows."""
        if t is None or not self.grouped:
            return t
        if t.shape[1] == 1 and t.shape[2] == 1:
            return t
        if t.shape[1] != self.hq or t.shape[2] != self.sq:
            t = t.expand(t.shape[0], self.hq, self.sq, *t.shape[3:])
        return t.reshape(t.shape[0], self.hkv, (self.hq // self.hkv) * self.sq, *t.shape[3:])

    def back(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of `__call__` for a full `[B, Hkv, G*Sq, *X]` tensor."""
        return t.reshape(self.b, self.hq, self.sq, *t.shape[3:]) if self.grouped else t


# ---- CPU flash kernel -------------------------------------------------------------------------------------------

def _additive(part: _Part, rows: _Rows, dtype) -> torch.Tensor | None:
    """The part's visibility and bias as the flash kernel's additive mask, in the kernels' row layout."""
    if part.visible is None and part.bias is None:
        return None
    mask = None
    if part.visible is not None:
        visible = rows(part.visible)
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
    if part.bias is not None:
        bias = rows(part.bias).to(dtype)
        mask = bias if mask is None else mask + bias
    return mask


def _flash_part(q, part: _Part, rows: _Rows, scale: float):
    """(o, lse) of rows `q` over one part, in the kernels' row layout; empty rows give 0 / -inf."""
    b = q.shape[0]
    k, v = part.rowwise(part.k, b), part.rowwise(part.v, b)
    if k.shape[2] == 0:
        return q.new_zeros(q.shape), q.new_full(q.shape[:3], float("-inf"), dtype=_acc_dtype(q.dtype))
    o, lse = _cpu_flash(q, k, v, 0.0, part.top_left_causal, attn_mask=_additive(part, rows, q.dtype), scale=scale)
    lse = lse.to(_acc_dtype(q.dtype))
    if part.empty is not None:
        empty = rows(part.empty)
        lse = lse.masked_fill(empty, float("-inf"))
        o = o.masked_fill(empty[..., None], 0.0)
    return o, lse


def _flash_part_backward(d_o, q, o, lse_rows, part: _Part, rows: _Rows, scale: float):
    """(dq share, dk, dv) of one part, given the merged o and LSE (rows that saw nothing: lse 0)."""
    b = q.shape[0]
    k, v = part.rowwise(part.k, b), part.rowwise(part.v, b)
    if k.shape[2] == 0:
        return torch.zeros_like(q), part.k.new_zeros(part.k.shape), part.v.new_zeros(part.v.shape)
    dq, dk, dv = _cpu_flash_backward(d_o, q, k, v, o, lse_rows, 0.0, part.top_left_causal,
                                     attn_mask=_additive(part, rows, q.dtype), scale=scale)
    return dq, part.reduce(dk), part.reduce(dv)


# ---- matmuls (any device, soft cap) -----------------------------------------------------------------------------

def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def _fold(t: torch.Tensor | None, part: _Part) -> torch.Tensor | None:
    """[B, Hkv, M, X] -> [Hkv, B*M, X] for a shared prefix, so one matmul reads it for every row."""
    if t is None or not part.shared:
        return t
    t = t.expand(t.shape[0], -1, -1, -1) if t.dim() == 4 else t
    b, h, m = t.shape[:3]
    return t.transpose(0, 1).reshape(h, b * m, *t.shape[3:])


def _unfold(t: torch.Tensor, part: _Part, b: int, m: int) -> torch.Tensor:
    if not part.shared:
        return t
    return t.reshape(t.shape[0], b, m, *t.shape[2:]).transpose(0, 1)


def _matmul_scores(qg, part: _Part, rows: _Rows, p: AttentionProblem):
    """(logits after cap, bias and mask `[.., M, N]`, the capped logits before bias and mask) of grouped rows."""
    b, m = qg.shape[0], qg.shape[2]
    k = part.rowwise(part.k, b) if not part.shared else part.k
    capped = _capped(torch.matmul(_fold(qg, part), k.to(qg.dtype).transpose(-1, -2)) * p.scale, p.softcap)
    s = capped
    if part.bias is not None:
        s = s + _fold(rows(part.bias).to(s.dtype).expand(b, rows.hkv, m, -1), part)
    if part.visible is not None:
        s = s.masked_fill(~_fold(rows(part.visible).expand(b, rows.hkv, m, -1), part), float("-inf"))
    return s, capped


def _matmul_part(qg, part: _Part, rows: _Rows, p: AttentionProblem):
    """(o `[B, Hkv, M, D]`, lse `[B, Hkv, M]`) of grouped rows over one part."""
    b, m = qg.shape[0], qg.shape[2]
    s, _ = _matmul_scores(qg, part, rows, p)
    lse = torch.logsumexp(s, dim=-1)
    v = part.v if part.shared else part.rowwise(part.v, b)
    o = torch.matmul(torch.exp(s - lse.masked_fill(lse.isinf(), 0.0)[..., None]), v.to(qg.dtype))
    return _unfold(o, part, b, m), _unfold(lse, part, b, m)


def _matmul_part_backward(qg, dog, lse_rows, delta, part: _Part, rows: _Rows, p: AttentionProblem):
    """(dq share `[B, Hkv, M, D]`, dk, dv in the part's own shape) of grouped rows, given the merged LSE."""
    b, m = qg.shape[0], qg.shape[2]
    s, capped = _matmul_scores(qg, part, rows, p)
    probs = torch.exp(s - _fold(lse_rows, part)[..., None])  # 0 where not visible
    k = part.k if part.shared else part.rowwise(part.k, b)
    v = part.v if part.shared else part.rowwise(part.v, b)
    dog_f = _fold(dog, part)
    ds = probs * (torch.matmul(dog_f, v.to(qg.dtype).transpose(-1, -2)) - _fold(delta, part)[..., None])
    if p.softcap is not None:
        ds = ds * (1.0 - (capped / p.softcap) ** 2)
    dq = _unfold(torch.matmul(ds, k.to(qg.dtype)) * p.scale, part, b, m)
    dk = torch.matmul(ds.transpose(-1, -2), _fold(qg, part)) * p.scale
    dv = torch.matmul(probs.transpose(-1, -2), dog_f)
    if not part.shared:
        dk, dv = part.reduce(dk), part.reduce(dv)
    return dq, dk, dv


# ---- small problems: one joint softmax ---------------------------------------------------------------------------

# Up to this many logits (B * Hq * Sq * (P + Skv)) a forward takes `_joint_forward`: below it, host work per ATen call
# dominates and one softmax over both parts costs the fewest calls; above it, the fused kernels' blocking wins.
JOINT_MAX_LOGITS = 1 << 19


def _takes_joint(p: AttentionProblem) -> bool:
    b, hq, sq, _ = p.q.shape
    n_keys = p.prefix_k.shape[-2] + p.k.shape[2]
    return 0 < n_keys and b * hq * sq * n_keys <= JOINT_MAX_LOGITS


def _hidden_prefix(lengths: torch.Tensor, n_pre: int) -> torch.Tensor:
    """bool `[B, 1, 1, P]`: the prefix keys past each row's length."""
    return derived(lengths, ("hidden", n_pre),
                   lambda: (torch.arange(n_pre, device=lengths.device) >= lengths[:, None])[:, None, None, :])


def _minus_inf(t: torch.Tensor, hidden, rows: _Rows, dtype: torch.dtype) -> torch.Tensor:
    """`hidden()`, a bool `[B|1, 1|Hkv, 1|M, N]` (True: the key is not seen), as the additive `[B * Hkv, 1|M, N]`
    (-inf where hidden, else 0) that `baddbmm` adds to grouped logits; kept on `t`, the tensor it is made from."""
    def build():
        hide = hidden()
        bias = torch.zeros(hide.shape, dtype=dtype, device=hide.device).masked_fill_(hide, float("-inf"))
        bias = bias.expand(rows.b, rows.hkv, -1, -1)
        return bias.reshape(rows.b * rows.hkv, *bias.shape[2:])
    return derived(t, ("minus inf", rows.b, rows.hq, rows.sq, dtype), build)


def _all_positive(lengths: torch.Tensor) -> bool:
    """Whether every row sees a prefix key (read on the host only for CPU tensors; elsewhere assume not)."""
    return lengths.device.type == "cpu" and derived(lengths, ("all positive",), lambda: bool((lengths > 0).all()))


def _finite(t: torch.Tensor) -> bool:
    """Whether every value of `t` is finite, read once per version for CPU tensors (elsewhere assume not: the host
    does not wait for a device). Kept on the tensor `t` is a view of, when it is one: a model call splits its
    tables into per-layer views afresh."""
    if t.device.type != "cpu":
        return False
    table = t if t._base is None else t._base
    view = (t.storage_offset(), tuple(t.shape), tuple(t.stride()))
    return derived(table, ("finite",) + view, lambda: bool(torch.isfinite(t).all()))


def _joint_forward(p: AttentionProblem, with_lse: bool = True):
    """(o `[B, Sq, Hq, D]` in q's dtype, lse `[B, Hq, Sq]` or None unless `with_lse`): the logits of both parts in
    one tensor, one softmax.

    Rows are grouped (the G query heads of a KV head stacked, M = G * Sq), so each key is read once per group, and
    every product is one `bmm` over 3-D views of the scaled queries. A shared prefix is read as `[Hkv, P, D]` against
    all B * M rows of a head at once, never expanded per row; a bank's rows are gathered. Keys a row does not see
    get -inf logits: without a causal band or soft cap, added by the logits' own `baddbmm` (a mask kept for the
    call's other layers); prefix keys past a row's length that are not finite are masked after, and their values
    zeroed, so padding is never read, whatever it holds.
    """
    b, hq, sq, d = p.q.shape
    hkv, skv, n_pre = p.k.shape[1], p.k.shape[2], p.prefix_k.shape[-2]
    m, acc = hq // hkv * sq, _acc_dtype(p.q.dtype)
    rows = _Rows(p, grouped=True)
    k, v, pk, pv = p.k, p.v, p.prefix_k, p.prefix_v
    if p.q.dtype != acc:
        k, v, pk, pv = k.to(acc), v.to(acc), pk.to(acc), pv.to(acc)
    q = rows(p.q) if p.q.dtype == acc else rows(p.q).to(acc)  # [B, Hkv, M, D]
    q3 = q.reshape(b * hkv, m, d)
    scale = p.scale if p.softcap is None else p.scale / p.softcap
    hidden_prefix = None if p.prefix_lengths is None else _hidden_prefix(p.prefix_lengths, n_pre)  # [B, 1, 1, P]
    banded = p.window is not None or (p.causal and sq > 1)
    additive = p.softcap is None and not banded  # masks go into the logits' baddbmm (finite keys: -inf + x = -inf)
    seq_mask = pre_mask = None
    if additive and p.mask is not None:
        seq_mask = _minus_inf(p.mask, lambda: ~rows(p.mask), rows, acc)
    if additive and hidden_prefix is not None and _finite(p.prefix_k):
        pre_mask = _minus_inf(hidden_prefix, lambda: hidden_prefix, rows, acc)
    unused = q.new_empty(())  # baddbmm's input, ignored with beta=0: the product is only scaled
    s_seq = torch.baddbmm(unused if seq_mask is None else seq_mask, q3, k.reshape(b * hkv, skv, d).transpose(1, 2),
                          beta=0 if seq_mask is None else 1, alpha=scale)
    if p.shared_prefix:  # [Hkv, B * M, D] @ [Hkv, D, P]
        folded_q = q.transpose(0, 1).reshape(hkv, b * m, d)
        s_pre = torch.baddbmm(unused, folded_q, pk.transpose(1, 2), beta=0, alpha=scale)
        s_pre = s_pre.view(hkv, b, m, n_pre).transpose(0, 1)
    else:
        if p.prefix_index is not None:
            pk, pv = pk.index_select(0, p.prefix_index), pv.index_select(0, p.prefix_index)
        if hidden_prefix is not None and not _finite(p.prefix_v):
            pv = pv.masked_fill(hidden_prefix.transpose(-1, -2), 0.0)
        s_pre = torch.baddbmm(unused if pre_mask is None else pre_mask, q3,
                              pk.reshape(b * hkv, n_pre, d).transpose(1, 2), beta=0 if pre_mask is None else 1,
                              alpha=scale)
        s_pre = s_pre.view(b, hkv, m, n_pre)
    s = torch.cat([s_pre, s_seq.view(b, hkv, m, skv)], dim=-1)  # [B, Hkv, M, P + Skv], the scaled logits
    if p.softcap is not None:
        s.tanh_().mul_(p.softcap)
    if p.bias is not None:
        s[..., n_pre + skv - p.bias.shape[-1]:] += rows(p.bias).to(acc)
    if hidden_prefix is not None and pre_mask is None:
        s[..., :n_pre].masked_fill_(hidden_prefix, float("-inf"))
    if banded:
        band = _band(sq, skv, q.device, p.window)[None, None]
        s[..., n_pre:].masked_fill_(~rows(band if p.mask is None else p.mask & band), float("-inf"))
    elif p.mask is not None and seq_mask is None:
        s[..., n_pre:].masked_fill_(~rows(p.mask), float("-inf"))
    maybe_empty = not n_pre or (p.prefix_lengths is not None and not _all_positive(p.prefix_lengths))
    top = s.amax(-1) if with_lse or maybe_empty else None  # [B, Hkv, M]
    empty = None if not maybe_empty else top == float("-inf")
    probs = torch.softmax(s, dim=-1)
    lse = None
    if with_lse:  # the largest probability is exp(top - lse): cheaper than a second pass of logsumexp
        lse = top - probs.amax(-1).log_()
        if empty is not None:
            lse.masked_fill_(empty, float("-inf"))
    probs = probs.view(b * hkv, m, n_pre + skv)
    o = torch.bmm(probs[..., n_pre:], v.reshape(b * hkv, skv, d))  # [B * Hkv, M, D]
    if p.shared_prefix:
        folded_probs = probs[..., :n_pre].view(b, hkv, m, n_pre).transpose(0, 1).reshape(hkv, b * m, n_pre)
        o.view(b, hkv, m, d).add_(torch.bmm(folded_probs, pv).view(hkv, b, m, d).transpose(0, 1))
    else:
        o += torch.bmm(probs[..., :n_pre], pv.reshape(b * hkv, n_pre, d))
    if empty is not None:
        o.masked_fill_(empty.view(b * hkv, m, 1), 0.0)  # rows that see no key: 0, not softmax's NaN
    o = o.view(b, hq, sq, d).transpose(1, 2) if sq > 1 else o.view(b, 1, hq, d)
    return o.to(p.q.dtype).contiguous(), None if lse is None else lse.view(b, hq, sq)


# ---- one batch (or one packed sequence) ---------------------------------------------------------------------------

def _uses_flash(p: AttentionProblem) -> bool:
    return p.q.device.type == "cpu" and p.softcap is None


def _layout(p: AttentionProblem, flash: bool) -> _Rows:
    # Matmuls always group; the flash kernel groups decode steps (one query per head), where reading each key
    # once for the G heads matters and no causal band separates the stacked rows.
    return _Rows(p, grouped=not flash or (p.q.shape[2] == 1 and p.group > 1))


def _unit_stride_d(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()  # the flash kernel assumes unit stride along D


def _contiguous_d(part: _Part) -> _Part:
    k, v = _unit_stride_d(part.k), _unit_stride_d(part.v)
    return part if k is part.k and v is part.v else dataclasses.replace(part, k=k, v=v)


def _part_forward(p: AttentionProblem, part: _Part, flash: bool):
    """(o `[B, Hq, Sq, D]`, lse `[B, Hq, Sq]`), in the accumulation dtype, of the queries over one part."""
    rows = _layout(p, flash)
    if flash:
        o, lse = _flash_part(rows(_unit_stride_d(p.q)), _contiguous_d(part), rows, p.scale)
        o = o.to(lse.dtype)
    else:
        o, lse = _matmul_part(rows(p.q).to(_acc_dtype(p.q.dtype)), part, rows, p)
    return rows.back(o), rows.back(lse)


def _part_backward(p: AttentionProblem, part: _Part, flash: bool, o, lse_rows, d_o):
    """(dq share `[B, Hq, Sq, D]`, dk, dv in the part's own shape) given the merged o and LSE (`lse_rows`: rows
    that saw nothing hold 0, so every probability there is 0)."""
    rows = _layout(p, flash)
    if flash:
        q, o_r = rows(_unit_stride_d(p.q)), rows(_unit_stride_d(o))
        dq, dk, dv = _flash_part_backward(rows(d_o).contiguous(), q, o_r, rows(lse_rows).contiguous(),
                                          _contiguous_d(part), rows, p.scale)
    else:
        acc = _acc_dtype(p.q.dtype)
        qg, dog = rows(p.q).to(acc), rows(d_o).to(acc)
        delta = (dog * rows(o).to(acc)).sum(-1)
        dq, dk, dv = _matmul_part_backward(qg, dog, rows(lse_rows), delta, part, rows, p)
    return rows.back(dq), dk, dv


# ---- the backend ------------------------------------------------------------------------------------------------

def _batched_forward(p: AttentionProblem, with_lse: bool = True):
    """(o `[B, Sq, Hq, D]` contiguous in q's dtype, lse `[B, Hq, Sq]`, or None when not `with_lse` and not computed
    anyway) of a batched (not packed) problem."""
    if _takes_joint(p):
        return _joint_forward(p, with_lse)
    flash = _uses_flash(p)
    o_seq, lse_seq = _part_forward(p, _sequence_part(p, flash), flash)
    o_pre, lse_pre = _part_forward(p, _prefix_part(p), flash)
    return _merge(o_seq, lse_seq, o_pre, lse_pre, p.q.dtype)


def _own_precision(fn):
    """Run `fn` with autocast off: the backend computes in its accumulation dtype, whatever the caller's autocast
    (the attention function has already cast q, k, v and the prefix to autocast's dtype, as SDPA does)."""
    @functools.wraps(fn)
    def run(p: AttentionProblem, *args, **kwargs):
        device = p.q.device.type
        if not torch.is_autocast_enabled(device):
            return fn(p, *args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(p, *args, **kwargs)
    return run


@_own_precision
def forward(p: AttentionProblem, with_lse: bool = True):
    """Backend "torch": (o `[B, Sq, Hq, D]` contiguous in q's dtype, lse `[B, Hq, Sq]` float32, or float64 for
    float64 inputs; lse may be None when not `with_lse`)."""
    b, hq, sq, d = p.q.shape
    acc = _acc_dtype(p.q.dtype)
    if not p.packed:
        if p.q.numel() == 0:
            return p.q.new_zeros(b, sq, hq, d), p.q.new_full((b, hq, sq), float("-inf"), dtype=acc)
        return _batched_forward(p, with_lse)
    o = p.q.new_zeros(sq, hq, d)  # packed: token-major
    lse = p.q.new_full((sq, hq), float("-inf"), dtype=acc) if with_lse else None
    for batch in torch_varlen.batches(p):
        o_b, lse_b = _batched_forward(batch.problem(p), with_lse)
        batch.unpad(o_b, batch.src_q, batch.dest_q, o)
        if with_lse:
            batch.unpad(lse_b.transpose(1, 2), batch.src_q, batch.dest_q, lse)
    return o[None], None if lse is None else lse.t()[None]


def _batched_backward(p: AttentionProblem, o, lse, d_o, need_dq: bool, need_dkv: bool, need_dprefix: bool):
    """The gradients of a batched problem, in the accumulation dtype; None where not asked for."""
    acc = _acc_dtype(p.q.dtype)

    def zeros(like: torch.Tensor, needed: bool) -> torch.Tensor | None:
        return torch.zeros(like.shape, dtype=acc, device=p.q.device) if needed else None

    dq, dk, dv, dpk, dpv = (zeros(t, needed) for t, needed in ((p.q, need_dq), (p.k, need_dkv), (p.v, need_dkv),
                                                                (p.prefix_k, need_dprefix), (p.prefix_v, need_dprefix)))
    if p.q.numel():
        flash = _uses_flash(p)
        lse_rows = lse.to(acc).masked_fill(lse.isinf(), 0.0)
        _accumulate((dq, dk, dv), _part_backward(p, _sequence_part(p, flash), flash, o, lse_rows, d_o))
        _accumulate((dq, dpk, dpv), _part_backward(p, _prefix_part(p), flash, o, lse_rows, d_o))
    return dq, dk, dv, dpk, dpv


def _accumulate(totals, grads) -> None:
    """Add each gradient into its running total; totals not asked for are None."""
    for total, grad in zip(totals, grads):
        if total is not None:
            total += grad


def _packed_backward(p: AttentionProblem, o, lse, d_o, need_dq: bool, need_dkv: bool, need_dprefix: bool):
    """The gradients of a packed problem, batch by padded batch, in the accumulation dtype (dq and dk, dv
    token-major `[T, H, D]`)."""
    acc = _acc_dtype(p.q.dtype)
    o, d_o, lse = o[0].transpose(0, 1), d_o[0].transpose(0, 1), lse[0].t()  # token-major
    dq = torch.zeros(p.q.shape[2], p.q.shape[1], p.q.shape[3], dtype=acc, device=p.q.device) if need_dq else None
    dk, dv = ((torch.zeros(p.k.shape[2], p.k.shape[1], p.k.shape[3], dtype=acc, device=p.q.device)
               for _ in range(2)) if need_dkv else (None, None))
    dpk, dpv = ((torch.zeros(p.prefix_k.shape, dtype=acc, device=p.q.device) for _ in range(2)) if need_dprefix
                else (None, None))
    for batch in torch_varlen.batches(p):
        o_b, d_o_b, lse_b = (batch.pad(t, batch.src_q, batch.dest_q, batch.mq).transpose(1, 2) for t in (o, d_o, lse))
        g_q, g_k, g_v, g_pk, g_pv = _batched_backward(batch.problem(p), o_b, lse_b, d_o_b, need_dq, need_dkv,
                                                      need_dprefix)
        if need_dq:
            batch.unpad(g_q.transpose(1, 2), batch.src_q, batch.dest_q, dq)
        if need_dkv:
            batch.unpad(g_k.transpose(1, 2), batch.src_k, batch.dest_k, dk)
            batch.unpad(g_v.transpose(1, 2), batch.src_k, batch.dest_k, dv)
        if need_dprefix:
            if p.shared_prefix or p.prefix_index is not None:
                dpk += g_pk
                dpv += g_pv
            else:
                dpk.index_add_(0, batch.rows, g_pk)
                dpv.index_add_(0, batch.rows, g_pv)
    dk, dv = (None if t is None else t.transpose(0, 1)[None] for t in (dk, dv))
    return None if dq is None else dq[None].transpose(1, 2), dk, dv, dpk, dpv


@_own_precision
def backward(p: AttentionProblem, o, lse, d_o, need_dq: bool, need_dkv: bool, need_dprefix: bool):
    """Backend "torch": (dq `[B, Sq, Hq, D]`, dk, dv, d prefix_k, d prefix_v), None where not asked for."""
    run = _packed_backward if p.packed else _batched_backward
    dq, dk, dv, dpk, dpv = run(p, o, lse, d_o, need_dq, need_dkv, need_dprefix)
    return (dq.transpose(1, 2).to(p.q.dtype) if need_dq else None,
            dk.to(p.k.dtype) if need_dkv else None, dv.to(p.v.dtype) if need_dkv else None,
            dpk.to(p.prefix_k.dtype) if need_dprefix else None, dpv.to(p.prefix_v.dtype) if need_dprefix else None)
