"""`prefix_attention`'s options beyond plain attention, on every backend that trains, against the float64 oracle:
per-row prefix lengths, an additive bias (over the sequence, or over [prefix ; sequence]) and a soft cap."""

import importlib.util

import pytest
import torch
from oracle import assert_matches_oracle, make_inputs, on_device

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [  # (backend, input dtype, tolerance): triton runs interpreted on CPU, in float32
    pytest.param("torch", torch.float64, 1e-10, id="torch"),
    pytest.param("torch-two-part", torch.float64, 1e-10, id="torch-two-part"),
    pytest.param("triton", torch.float32, 2e-5, id="triton", marks=pytest.mark.skipif(
        importlib.util.find_spec("triton") is None, reason="triton is not installed")),
]


def inputs(backend, dtype, *shape):
    tensors, mask, index = make_inputs(*shape, dtype=dtype)
    return on_device(tensors, mask, index, DEVICE if backend == "triton" else "cpu")


@pytest.mark.parametrize("backend, dtype, atol", BACKENDS, indirect=["backend"])
@pytest.mark.parametrize("kind, sq, skv", [("bank", 1, 9), ("bank", 33, 33), ("row", 7, 12)])
def test_prefix_lengths(backend, dtype, atol, kind, sq, skv):
    """Adapters of different lengths in one batch: row b sees only its first prefix_lengths[b] prefix keys."""
    tensors, mask, index = inputs(backend, dtype, 3, 4, 2, sq, skv, 7, 16, kind, "padding")
    lengths = torch.tensor([7, 0, 3], device=tensors[0].device)
    assert_matches_oracle(tensors, mask, index, True, backend=backend, atol=atol, lengths=lengths)


@pytest.mark.parametrize("backend, dtype, atol", BACKENDS, indirect=["backend"])
@pytest.mark.parametrize("sq, skv, heads", [(1, 9, 4), (6, 11, 1), (33, 33, 4)])
def test_attention_bias(backend, dtype, atol, sq, skv, heads):
    """An additive bias on the sequence keys only (T5's relative position bias), with masks and causality."""
    tensors, mask, index = inputs(backend, dtype, 2, 4, 2, sq, skv, 5, 16, "shared", "padding")
    bias = torch.randn(1, heads, sq, skv, dtype=dtype, device=tensors[0].device)
    assert_matches_oracle(tensors, mask, index, True, backend=backend, atol=atol, bias=bias)


@pytest.mark.parametrize("backend, dtype, atol", BACKENDS, indirect=["backend"])
@pytest.mark.parametrize("kind, sq, skv", [("shared", 1, 9), ("bank", 6, 11), ("shared", 33, 33), ("row", 40, 40)])
def test_attention_bias_over_prefix_and_sequence(backend, dtype, atol, kind, sq, skv):
    """A bias of width P + Skv covers the prefix keys too (T5's relative positions with the prefix first)."""
    tensors, mask, index = inputs(backend, dtype, 3, 4, 2, sq, skv, 5, 16, kind, "padding")
    bias = torch.randn(1, 4, sq, 5 + skv, dtype=dtype, device=tensors[0].device)
    lengths = torch.tensor([5, 2, 0], device=tensors[0].device) if kind != "shared" else None
    assert_matches_oracle(tensors, mask, index, True, backend=backend, atol=atol, bias=bias, lengths=lengths)


@pytest.mark.parametrize("backend, dtype, atol", BACKENDS, indirect=["backend"])
@pytest.mark.parametrize("kind, sq, skv", [("shared", 1, 9), ("bank", 6, 11), ("shared", 40, 40)])
def test_softcap(backend, dtype, atol, kind, sq, skv):
    """Gemma 2's soft cap on the logits of every key, prefix and sequence; gradients through the tanh."""
    tensors, mask, index = inputs(backend, dtype, 3, 4, 2, sq, skv, 5, 16, kind, "padding")
    with torch.no_grad():
        tensors[0].mul_(3.0)  # logits large enough for the cap to bend them
    assert_matches_oracle(tensors, mask, index, True, backend=backend, atol=atol, softcap=2.5)


@pytest.mark.parametrize("backend, dtype, atol", BACKENDS[:2], indirect=["backend"])
@pytest.mark.parametrize("kind, sq, skv, window", [("shared", 1, 9, 4), ("bank", 7, 12, 3), ("row", 33, 33, 1),
                                                   ("shared", 9, 4, 2), ("bank", 5, 20, 30)])
def test_sliding_window(backend, dtype, atol, kind, sq, skv, window):
    """A sliding window over the sequence keys, ending at each query's causal edge; the prefix stays visible."""
    tensors, mask, index = inputs(backend, dtype, 3, 4, 2, sq, skv, 5, 16, kind, "padding")
    lengths = torch.tensor([5, 2, 0]) if kind == "bank" else None
    assert_matches_oracle(tensors, mask, index, True, backend=backend, atol=atol, window=window, lengths=lengths)
