"""The float64 oracle: attention over the materialised concatenation `[prefix ; sequence]`, written plainly,
and the helpers that hold a backend to it."""

import itertools

import torch

from prefix_kernels import prefix_attention


def oracle_attention(q, k, v, prefix_k, prefix_v, *, causal=True, scale=None, attention_mask=None, prefix_index=None,
                     prefix_lengths=None, attention_bias=None, softcap=None, window=None, compute_dtype=torch.float64):
    """(o, lse), computed the slow, obvious way: in float64, or with `compute_dtype` for the matmuls (softmax in
    float32), the way PyTorch would do it in that precision."""
    q, k, v, pk, pv = (t.to(compute_dtype) for t in (q, k, v, prefix_k, prefix_v))
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    if prefix_index is not None:
        pk, pv = pk[prefix_index], pv[prefix_index]
    elif pk.dim() == 3:
        pk, pv = pk.expand(b, *pk.shape), pv.expand(b, *pv.shape)
    n_pre = pk.shape[2]
    keys = torch.cat([pk, k], dim=2).repeat_interleave(hq // hkv, dim=1)
    values = torch.cat([pv, v], dim=2).repeat_interleave(hq // hkv, dim=1)
    scores = q @ keys.transpose(-1, -2) * (d**-0.5 if scale is None else scale)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_bias is not None:  # the sequence keys, or [prefix ; sequence] when it covers both
        scores[..., scores.shape[-1] - attention_bias.shape[-1]:] += attention_bias.to(compute_dtype)
    visible = torch.ones(b, hq, sq, skv, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(skv, device=q.device)[None, :]
        visible &= j <= skv - sq + i
        if window is not None:
            visible &= j > skv - sq + i - window
    if attention_mask is not None:
        m = attention_mask.bool()
        visible &= m[:, None, None, :] if m.dim() == 2 else m
    prefix_visible = torch.ones(b, hq, sq, n_pre, dtype=torch.bool, device=q.device)
    if prefix_lengths is not None:
        prefix_visible &= (torch.arange(n_pre, device=q.device) < prefix_lengths[:, None])[:, None, None, :]
    visible = torch.cat([prefix_visible, visible], dim=-1)
    scores = scores.masked_fill(~visible, float("-inf"))
    if compute_dtype != torch.float64:
        scores = scores.float()
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.nan_to_num(0.0, neginf=0.0)[..., None])
    return probs.to(compute_dtype) @ values, lse


def make_inputs(b, hq, hkv, sq, skv, p, d, prefix_kind, mask_kind, dtype=torch.float64):
    q = torch.randn(b, sq, hq, d, dtype=dtype).transpose(1, 2)  # strided, as transformers passes it
    k = torch.randn(b, hkv, skv, d, dtype=dtype)
    v = torch.randn(b, hkv, skv, d, dtype=dtype)
    index = None
    shape = {"shared": (hkv, p, d), "row": (b, hkv, p, d), "bank": (3, hkv, p, d)}[prefix_kind]
    if prefix_kind == "bank":
        index = torch.tensor([2, 0, 2][:b])
    pk, pv = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    mask = None
    if mask_kind == "padding":
        mask = torch.ones(b, skv, dtype=torch.long)
        mask[0, : skv // 2] = 0  # left padding in row 0
        mask[-1, skv - skv // 3 :] = 0  # right padding in the last row
    elif mask_kind == "4d":
        mask = torch.rand(b, 1, sq, skv) > 0.3
        mask[0, 0, 0] = False  # one query row with no visible sequence key
    return [t.requires_grad_() for t in (q, k, v, pk, pv)], mask, index


def on_device(tensors, mask, index, device):
    """The inputs of `make_inputs` moved to `device`, the tensors again leaves that require grad."""
    moved = [t.detach().to(device).requires_grad_() for t in tensors]
    return moved, (mask.to(device) if mask is not None else None), (index.to(device) if index is not None else None)


def assert_matches_oracle(tensors, mask, index, causal, backend="torch", atol=1e-10, scale=None, lengths=None,
                          bias=None, softcap=None, window=None):
    q, k, v, pk, pv = tensors
    o, lse = prefix_attention(q, k, v, pk, pv, causal=causal, scale=scale, attention_mask=mask,
                              prefix_index=index, prefix_lengths=lengths, attention_bias=bias, softcap=softcap,
                              window=window, return_lse=True, backend=backend)
    ref_o, ref_lse = oracle_attention(q, k, v, pk, pv, causal=causal, scale=scale, attention_mask=mask,
                                      prefix_index=index, prefix_lengths=lengths, attention_bias=bias,
                                      softcap=softcap, window=window)
    assert o.dtype == q.dtype and o.shape == q.shape and lse.dtype == torch.float32
    torch.testing.assert_close(o.double(), ref_o, atol=atol, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse.float().double(), atol=1e-5, rtol=1e-6)
    grad_out = torch.randn_like(ref_o)
    grads = torch.autograd.grad(o, tensors, grad_out.to(o.dtype))
    ref_grads = torch.autograd.grad(ref_o, tensors, grad_out)
    for name, g, ref in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, ref_grads):
        torch.testing.assert_close(g.double(), ref.double(), atol=atol * 10, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def assert_within_twice_torch_error(tensors, mask, dtype, backend, slack=1e-4):
    """FlashAttention's rule for low precision: the backend's error against float64, on the output and every
    gradient, is at most ~2x the error of PyTorch doing the same attention in `dtype`."""
    tensors = [t.detach().requires_grad_() for t in tensors]
    low = [t.detach().to(dtype).requires_grad_() for t in tensors]
    ref, _ = oracle_attention(*tensors, attention_mask=mask)
    ours = prefix_attention(*low, attention_mask=mask, backend=backend)
    theirs, _ = oracle_attention(*low, attention_mask=mask, compute_dtype=dtype)
    assert ours.dtype == dtype
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, tensors, grad)
    our_grads = torch.autograd.grad(ours, low, grad.to(dtype))
    their_grads = torch.autograd.grad(theirs, low, grad.to(dtype))
    names = ("o", "dq", "dk", "dv", "dprefix_k", "dprefix_v")
    for name, a, b, r in zip(names, (ours, *our_grads), (theirs, *their_grads), (ref, *ref_grads)):
        ours_err = (a.double() - r).abs().max().item()
        torch_err = (b.double() - r).abs().max().item()
        assert ours_err <= 2 * torch_err + slack, f"{name}: error {ours_err:.2e} > 2 x PyTorch's {torch_err:.2e}"


def oracle_packed(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, *, causal=True, prefix_index=None,
                  prefix_lengths=None, softcap=None, window=None):
    """(o `[total_q, Hq, D]`, lse `[Hq, total_q]`) of packed sequences: each sequence run alone through
    `oracle_attention` with its own prefix entry."""
    outs, lses = [], []
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for n in range(len(starts_q) - 1):
        one = slice(n, n + 1)
        qs, ks = slice(starts_q[n], starts_q[n + 1]), slice(starts_k[n], starts_k[n + 1])
        pk, pv, index = prefix_k, prefix_v, None
        if prefix_index is not None:
            pk, pv = prefix_k[prefix_index[one]], prefix_v[prefix_index[one]]
        elif prefix_k.dim() == 4:
            pk, pv = prefix_k[one], prefix_v[one]
        o, lse = oracle_attention(q[qs].transpose(0, 1)[None], k[ks].transpose(0, 1)[None],
                                  v[ks].transpose(0, 1)[None], pk, pv, causal=causal, prefix_index=index,
                                  prefix_lengths=None if prefix_lengths is None else prefix_lengths[one],
                                  softcap=softcap, window=window)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=-1)


def make_packed(lengths_q, lengths_k, hq, hkv, p, d, prefix_kind, dtype=torch.float64):
    """Packed inputs: ([q, k, v, prefix_k, prefix_v] requiring grad, cu_seqlens_q, cu_seqlens_k, prefix_index)."""
    n = len(lengths_q)
    cu_q = torch.tensor([0, *itertools.accumulate(lengths_q)], dtype=torch.int32)
    cu_k = torch.tensor([0, *itertools.accumulate(lengths_k)], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), hq, d, dtype=dtype)
    k = torch.randn(int(cu_k[-1]), hkv, d, dtype=dtype)
    v = torch.randn(int(cu_k[-1]), hkv, d, dtype=dtype)
    shape = {"shared": (hkv, p, d), "row": (n, hkv, p, d), "bank": (3, hkv, p, d)}[prefix_kind]
    pk, pv = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    index = torch.arange(n) % 3 if prefix_kind == "bank" else None
    return [t.requires_grad_() for t in (q, k, v, pk, pv)], cu_q, cu_k, index
