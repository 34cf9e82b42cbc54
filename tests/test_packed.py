"""Packed sequences (FlashAttention's varlen convention) against the float64 oracle run one sequence at a time:
ragged lengths including 1 and 0, every prefix kind, forward, lse and all five gradients."""

import pytest
import torch
from oracle import make_packed, oracle_packed

from prefix_kernels import prefix_attention

BACKENDS = ["torch"]
# (query lengths, key lengths): training-style (equal), a cache behind each query, and empty / length-1 sequences.
LENGTHS = [
    ([5, 7], [5, 7]),
    ([1, 9, 3, 17], [1, 9, 3, 17]),
    ([0, 4, 1], [0, 4, 1]),
    ([2, 1, 3], [6, 1, 9]),
    ([3, 0, 5], [3, 2, 0]),
]


def assert_packed_matches_oracle(lengths_q, lengths_k, hq, hkv, p, kind, causal, backend, lengths=False, atol=1e-10):
    tensors, cu_q, cu_k, index = make_packed(lengths_q, lengths_k, hq, hkv, p, 16, kind)
    prefix_lengths = None
    if lengths and kind != "shared":
        prefix_lengths = torch.arange(len(lengths_q)) % (p + 1)
    kwargs = dict(prefix_index=index, prefix_lengths=prefix_lengths)
    o, lse = prefix_attention(*tensors, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                              max_seqlen_q=max(lengths_q), max_seqlen_k=max(lengths_k), return_lse=True,
                              backend=backend, **kwargs)
    ref_o, ref_lse = oracle_packed(*tensors, cu_q, cu_k, causal=causal, **kwargs)
    assert o.shape == tensors[0].shape and lse.shape == (hq, tensors[0].shape[0])
    torch.testing.assert_close(o, ref_o, atol=atol, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse.float().double(), atol=1e-5, rtol=1e-6)
    grad_out = torch.randn_like(ref_o)
    grads = torch.autograd.grad(o, tensors, grad_out)
    ref_grads = torch.autograd.grad(ref_o, tensors, grad_out)
    for name, g, ref in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, ref_grads):
        torch.testing.assert_close(g, ref, atol=atol * 10, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["shared", "row", "bank"])
@pytest.mark.parametrize("lengths_q, lengths_k", LENGTHS)
def test_packed_matches_oracle(lengths_q, lengths_k, kind, backend, packing_batches):
    for i, (hq, hkv, p, causal) in enumerate([(4, 2, 5, True), (3, 1, 1, False), (2, 2, 0, True)]):
        if p == 0 and kind == "bank":
            continue
        assert_packed_matches_oracle(lengths_q, lengths_k, hq, hkv, p, kind, causal, backend, lengths=i == 0)


@pytest.mark.parametrize("window", [1, 3])
def test_packed_sliding_window(window, packing_batches):
    """Each packed sequence's window ends at its own causal edge, queries and keys of different lengths."""
    tensors, cu_q, cu_k, index = make_packed([2, 1, 6, 4], [6, 1, 9, 4], 4, 2, 3, 16, "bank")
    o = prefix_attention(*tensors, window=window, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=6,
                         max_seqlen_k=9, prefix_index=index)
    ref, _ = oracle_packed(*tensors, cu_q, cu_k, prefix_index=index, window=window)
    torch.testing.assert_close(o, ref, atol=1e-10, rtol=0)
    grad = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(o, tensors, grad), torch.autograd.grad(ref, tensors, grad)):
        torch.testing.assert_close(g, r, atol=1e-9, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_each_sequence_in_its_own_batch(backend):
    """The packed call gives every sequence what the batched call gives it alone."""
    (q, k, v, pk, pv), cu_q, cu_k, _ = make_packed([6, 1, 11], [6, 1, 11], 4, 2, 3, 16, "shared")
    packed = prefix_attention(q, k, v, pk, pv, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=11,
                              max_seqlen_k=11, backend=backend)
    for start, end in zip(cu_q.tolist(), cu_q.tolist()[1:]):
        alone = prefix_attention(q[start:end].transpose(0, 1)[None], k[start:end].transpose(0, 1)[None],
                                 v[start:end].transpose(0, 1)[None], pk, pv, backend=backend)
        torch.testing.assert_close(packed[start:end], alone[0].transpose(0, 1), atol=1e-12, rtol=0)


PACKED_ERRORS = [
    ("cu_seqlens_q", TypeError, dict(cu_seqlens_q=[0, 3])),
    ("cu_seqlens_q", ValueError, dict(cu_seqlens_q=torch.tensor([0, 3, 8]))),  # int64
    ("cu_seqlens_k", ValueError, dict(cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32))),
    ("max_seqlen_q", ValueError, dict(max_seqlen_q=None)),
    ("attention_mask", ValueError, dict(attention_mask=torch.ones(1, 8, dtype=torch.bool))),
    ("q", ValueError, dict(q=torch.randn(1, 8, 4, 16))),
    ("prefix_index", ValueError, dict(prefix_k=torch.randn(3, 2, 4, 16), prefix_v=torch.randn(3, 2, 4, 16),
                                      prefix_index=torch.tensor([0, 1, 2]))),
    ("cu_seqlens_q", ValueError, dict(cu_seqlens_q=torch.tensor([0, 5, 9], dtype=torch.int32))),  # past the total
    ("cu_seqlens_q", ValueError, dict(max_seqlen_q=2)),  # a sequence longer than max_seqlen_q
    ("prefix_index", ValueError, dict(prefix_k=torch.randn(3, 2, 4, 16), prefix_v=torch.randn(3, 2, 4, 16),
                                      prefix_index=torch.tensor([0, 3]))),
]


@pytest.mark.parametrize("argument, error, change", PACKED_ERRORS, ids=[f"{a}-{i}" for i, (a, _, _) in
                                                                        enumerate(PACKED_ERRORS)])
def test_bad_packed_input_names_the_argument(argument, error, change):
    args = dict(q=torch.randn(8, 4, 16), k=torch.randn(8, 2, 16), v=torch.randn(8, 2, 16),
                prefix_k=torch.randn(2, 4, 16), prefix_v=torch.randn(2, 4, 16),
                cu_seqlens_q=torch.tensor([0, 3, 8], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 3, 8], dtype=torch.int32), max_seqlen_q=5, max_seqlen_k=5)
    args.update(change)
    with pytest.raises(error, match=rf"^{argument}\b"):
        prefix_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("prefix_k"), args.pop("prefix_v"),
                         **args)
