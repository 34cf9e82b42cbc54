"""Backend "triton" on packed sequences (FlashAttention's varlen convention) against the float64 oracle run one
sequence at a time: ragged lengths including 1 and 0, every prefix kind, forward, lse and all five gradients, in
both the prefill kernels and the split-KV decode kernels (at most 16 queries per sequence)."""

import importlib.util

import pytest
import torch
from oracle import make_packed, oracle_packed

from prefix_kernels import prefix_attention

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (query lengths, key lengths). Up to 16 queries per sequence take the decode kernels, more the prefill kernels.
LENGTHS = [
    ([5, 7], [5, 7]),  # decode kernels, training-style (equal lengths)
    ([0, 4, 1], [0, 4, 1]),  # an empty sequence first
    ([2, 1, 3], [6, 1, 9]),  # a cache behind each query
    ([3, 0, 5], [3, 2, 0]),  # keys with no queries, queries with no keys
    ([17, 0, 20, 1], [17, 0, 20, 1]),  # prefill kernels from here on
    ([18, 2, 1], [40, 2, 0]),
]


def packed_inputs(lengths_q, lengths_k, hq, hkv, p, d, kind):
    tensors, cu_q, cu_k, index = make_packed(lengths_q, lengths_k, hq, hkv, p, d, kind, dtype=torch.float32)
    tensors = [t.detach().to(DEVICE).requires_grad_() for t in tensors]
    return tensors, cu_q.to(DEVICE), cu_k.to(DEVICE), None if index is None else index.to(DEVICE)


def assert_packed_matches_oracle(lengths_q, lengths_k, hq, hkv, p, kind, causal, prefix_lengths=None, d=16):
    tensors, cu_q, cu_k, index = packed_inputs(lengths_q, lengths_k, hq, hkv, p, d, kind)
    kwargs = dict(prefix_index=index, prefix_lengths=prefix_lengths)
    o, lse = prefix_attention(*tensors, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                              max_seqlen_q=max(lengths_q), max_seqlen_k=max(lengths_k), return_lse=True,
                              backend="triton", **kwargs)
    ref_o, ref_lse = oracle_packed(*tensors, cu_q, cu_k, causal=causal, **kwargs)
    assert o.shape == tensors[0].shape and lse.shape == (hq, tensors[0].shape[0])
    torch.testing.assert_close(o.double(), ref_o.double(), atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-5, rtol=1e-6)
    grad_out = torch.randn_like(ref_o)
    grads = torch.autograd.grad(o, tensors, grad_out)
    ref_grads = torch.autograd.grad(ref_o, tensors, grad_out)
    for name, g, ref in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, ref_grads):
        torch.testing.assert_close(g.double(), ref.double(), atol=2e-4, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("kind", ["shared", "row", "bank"])
@pytest.mark.parametrize("lengths_q, lengths_k", LENGTHS, ids=[f"q{q}-k{k}" for q, k in LENGTHS])
def test_packed_matches_oracle(lengths_q, lengths_k, kind):
    """GQA with a prefix (and per-sequence prefix lengths for the row and bank kinds), MQA with P = 1 not causal,
    MHA without a prefix."""
    n = len(lengths_q)
    lengths = None if kind == "shared" else (torch.arange(n) % 6).to(DEVICE)
    assert_packed_matches_oracle(lengths_q, lengths_k, 4, 2, 5, kind, True, prefix_lengths=lengths)
    assert_packed_matches_oracle(lengths_q, lengths_k, 3, 1, 1, kind, False)
    if kind != "bank":
        assert_packed_matches_oracle(lengths_q, lengths_k, 2, 2, 0, kind, True)


@pytest.mark.parametrize("lengths_q, lengths_k", [([1, 3], [70, 0]), ([20, 1], [20, 50])])
def test_packed_head_dim_80(lengths_q, lengths_k):
    assert_packed_matches_oracle(lengths_q, lengths_k, 4, 1, 3, "bank", True, d=80)


def test_packed_equals_each_sequence_in_its_own_batch():
    """The packed call gives every sequence what the batched call gives it alone."""
    (q, k, v, pk, pv), cu_q, cu_k, _ = packed_inputs([6, 1, 19], [6, 1, 19], 4, 2, 3, 16, "shared")
    packed = prefix_attention(q, k, v, pk, pv, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=19,
                              max_seqlen_k=19, backend="triton")
    starts = cu_q.tolist()
    for start, end in zip(starts, starts[1:]):
        alone = prefix_attention(q[start:end].transpose(0, 1)[None], k[start:end].transpose(0, 1)[None],
                                 v[start:end].transpose(0, 1)[None], pk, pv, backend="triton")
        torch.testing.assert_close(packed[start:end], alone[0].transpose(0, 1), atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lengths", [[1, 0, 7, 16], [300, 1, 0, 77]], ids=["decode", "prefill"])
def test_gpu_packed_equals_each_sequence_alone(lengths):
    """Compiled kernels, bf16: each packed sequence gets what it gets alone, forward and every gradient."""
    (q, k, v, pk, pv), cu_q, cu_k, index = packed_inputs(lengths, [n + 50 for n in lengths], 32, 8, 64, 128, "bank")
    q, k, v, pk, pv = (t.detach().to(torch.bfloat16).requires_grad_() for t in (q, k, v, pk, pv))
    packed = prefix_attention(q, k, v, pk, pv, prefix_index=index, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                              max_seqlen_q=max(lengths), max_seqlen_k=max(lengths) + 50, backend="triton")
    grad = torch.randn_like(packed)
    packed_grads = torch.autograd.grad(packed, (q, k, v, pk, pv), grad)
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    for n in range(len(lengths)):
        qs, ks = slice(starts_q[n], starts_q[n + 1]), slice(starts_k[n], starts_k[n + 1])
        alone = prefix_attention(q[qs].transpose(0, 1)[None], k[ks].transpose(0, 1)[None],
                                 v[ks].transpose(0, 1)[None], pk, pv, prefix_index=index[n:n + 1], backend="triton")
        torch.testing.assert_close(packed[qs], alone[0].transpose(0, 1), atol=2e-2, rtol=0)
        if lengths[n]:
            grads = torch.autograd.grad(alone, (q, k, v), grad[qs].transpose(0, 1)[None])
            for got, want, part in zip(packed_grads, grads, (qs, ks, ks)):
                torch.testing.assert_close(got[part], want[part], atol=5e-2, rtol=0)


class GridSpy:
    """Stands in for a kernel: records the programs each launch asks for (at BLOCK_M = 16), then launches."""

    def __init__(self, kernel):
        self.kernel, self.programs = kernel, []

    def __getitem__(self, grid):
        def launch(**kwargs):
            self.programs.append(grid({"BLOCK_M": 16})[0])
            return self.kernel[grid](**kwargs)
        return launch


@pytest.mark.parametrize("lengths", [[20], [20, 3]])
def test_an_overstated_max_seqlen_launches_no_more_than_the_tokens_need(monkeypatch, lengths):
    """max_seqlen sizes the grid (as in FlashAttention), capped for free by the packed total: 20 tokens called
    with max_seqlen 16384 launch what max_seqlen = the total launches, with the same result."""
    from prefix_kernels.ops import triton_prefix_attention

    spy = GridSpy(triton_prefix_attention._forward_kernel)
    monkeypatch.setattr(triton_prefix_attention, "_forward_kernel", spy)
    tensors, cu_q, cu_k, _ = packed_inputs(lengths, lengths, 4, 2, 3, 16, "shared")
    outs = [prefix_attention(*tensors, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=n, max_seqlen_k=n,
                             backend="triton") for n in (max(lengths), sum(lengths), 16384)]
    exact, total, overstated = spy.programs
    assert overstated == total <= 2 * exact
    assert torch.equal(outs[2], outs[0]) and torch.equal(outs[1], outs[0])
