"""The attention paths compared by the op benchmarks, all taking the same inputs.

- `prefix_kernels:<backend>`: `prefix_attention` with each backend that runs here (`backends`).
- `materialised`: what PEFT does: the prefix expanded per row, `torch.cat` with the sequence, GQA repeated,
  SDPA with an explicit mask.
- `sdpa_preconcat`: SDPA on keys/values concatenated beforehand (not timed): the cost of attention alone.
"""

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from prefix_kernels import prefix_attention
from prefix_kernels.ops.dispatch import select_backend


def make_inputs(b, hq, hkv, sq, skv, p, d, dtype=torch.float32, device="cpu", requires_grad=False):
    def t(*shape):
        return torch.randn(*shape, dtype=dtype, device=device, requires_grad=requires_grad)

    return t(b, hq, sq, d), t(b, hkv, skv, d), t(b, hkv, skv, d), t(hkv, p, d), t(hkv, p, d)


def causal_visibility(sq, skv, p, device):
    """bool [Sq, P + Skv]: every prefix key, then the bottom-right causal band over the sequence."""
    visible = torch.ones(sq, p + skv, dtype=torch.bool, device=device)
    visible[:, p:] = torch.arange(skv, device=device)[None, :] <= torch.arange(sq, device=device)[:, None] + skv - sq
    return visible


def materialised(q, k, v, prefix_k, prefix_v, causal=True):
    b, hq, sq, _ = q.shape
    hkv, skv, p = k.shape[1], k.shape[2], prefix_k.shape[1]
    keys = torch.cat([prefix_k.expand(b, -1, -1, -1), k], dim=2).repeat_interleave(hq // hkv, dim=1)
    values = torch.cat([prefix_v.expand(b, -1, -1, -1), v], dim=2).repeat_interleave(hq // hkv, dim=1)
    mask = causal_visibility(sq, skv, p, q.device) if causal else None
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def preconcatenated(q, k, v, prefix_k, prefix_v):
    """Keys/values with the prefix already in them, GQA heads repeated: SDPA's input, built outside the timing."""
    b, hq = q.shape[:2]
    hkv = k.shape[1]
    keys = torch.cat([prefix_k.expand(b, -1, -1, -1), k], dim=2).repeat_interleave(hq // hkv, dim=1)
    values = torch.cat([prefix_v.expand(b, -1, -1, -1), v], dim=2).repeat_interleave(hq // hkv, dim=1)
    return keys.detach().requires_grad_(k.requires_grad), values.detach().requires_grad_(v.requires_grad)


def sdpa_preconcat(q, keys, values, p, causal=True):
    """Bottom-right causal over `[prefix ; sequence]` equals "every prefix key + causal sequence"; as a
    `causal_lower_right` bias SDPA can take its fused kernels."""
    bias = causal_lower_right(q.shape[2], keys.shape[2]) if causal else None
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias)


def ours(q, k, v, prefix_k, prefix_v, causal=True, backend=None):
    return prefix_attention(q, k, v, prefix_k, prefix_v, causal=causal, backend=backend)


def op_providers(device: str, head_dim: int, decode: bool) -> list[str]:
    """The providers of an op benchmark: ours with each backend that runs (`backends`), then the materialised path
    and SDPA on pre-concatenated K/V."""
    fused = [f"prefix_kernels:{name}" for name in backends(device, head_dim, decode)]
    return [*fused, "materialised", "sdpa_preconcat"]


def attention_call(provider: str, shape: tuple, backward: bool, dtype: torch.dtype, device: str):
    """A no-argument call of `provider` ("prefix_kernels:<backend>", "materialised" or "sdpa_preconcat") on fresh
    random inputs of `shape` (B, Hq, Hkv, Sq, Skv, P, D), causal: a forward, or a forward and backward."""
    b, hq, hkv, sq, skv, p, d = shape
    q, k, v, pk, pv = make_inputs(b, hq, hkv, sq, skv, p, d, dtype, device, requires_grad=backward)
    if provider == "sdpa_preconcat":
        keys, values = preconcatenated(q, k, v, pk, pv)
        fn = lambda: sdpa_preconcat(q, keys, values, p)  # noqa: E731
    elif provider == "materialised":
        fn = lambda: materialised(q, k, v, pk, pv)  # noqa: E731
    else:
        backend = provider.split(":")[1]
        fn = lambda: ours(q, k, v, pk, pv, backend=backend)  # noqa: E731
    if not backward:
        return torch.no_grad()(fn)
    grad = torch.randn_like(q)
    return lambda: fn().backward(grad)


def backends(device: str, head_dim: int, decode: bool, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """The backends of `prefix_attention` worth timing on `device`: "torch" always; on CUDA also every compiled
    backend that can run: "triton", and for decode "cuda" (a forward-only decode kernel). On CPU Triton runs only
    through its interpreter, a testing aid, not a contender."""
    if device != "cuda":
        return ["torch"]
    runnable = ["torch"]
    for name in ("triton", "cuda") if decode else ("triton",):
        try:
            select_backend(name, torch.device(device), head_dim, dtype)
        except (RuntimeError, ValueError):
            continue
        runnable.append(name)
    return runnable
