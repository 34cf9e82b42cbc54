"""Numerical edge cases of `prefix_attention` for backends "torch" and "triton": large fp16 logits, rows that see
no key, P = 0, prefixes longer than the sequence, more queries than keys, strided and empty inputs."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from oracle import assert_matches_oracle, assert_within_twice_torch_error, make_inputs, oracle_attention

from prefix_kernels import prefix_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernels are interpreted on CPU
BACKENDS = ["torch", "torch-two-part", pytest.param("triton", marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"))]
ATOL = 2e-5  # float32 against the float64 oracle


@pytest.fixture(autouse=True)
def _on_device():
    with torch.device(DEVICE):
        yield


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("sq", [1, 17])
def test_fp16_large_logits(backend, sq):
    """Logits in the thousands (q and keys scaled by 30): finite, and within FlashAttention's 2x rule."""
    (q, k, v, pk, pv), mask, _ = make_inputs(2, 4, 2, sq, 17, 5, 64, "shared", "padding")
    large = [q * 30, k * 30, v, pk * 30, pv]
    assert_within_twice_torch_error(large, mask, torch.float16, backend)
    half = [t.detach().half().requires_grad_() for t in large]
    o = prefix_attention(*half, attention_mask=mask, backend=backend)
    grads = torch.autograd.grad(o, half, torch.randn_like(o))
    assert all(torch.isfinite(t).all() for t in (o, *grads))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("sq", [3, 40])
def test_rows_that_see_no_key(backend, sq):
    """Row 1 has every sequence key masked and prefix length 0: o = 0, lse = -inf, and it sends no gradient
    anywhere; every gradient stays finite."""
    tensors, _, _ = make_inputs(2, 4, 2, sq, 5, 3, 16, "row", None, dtype=torch.float32)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 0, 0, 0, 0]])
    lengths = torch.tensor([3, 0])
    o, lse = prefix_attention(*tensors, causal=False, attention_mask=mask, prefix_lengths=lengths, return_lse=True,
                              backend=backend)
    assert torch.equal(o[1], torch.zeros_like(o[1])) and torch.isneginf(lse[1]).all() and lse[0].isfinite().all()
    grads = torch.autograd.grad(o, tensors, torch.randn_like(o))
    assert all(g.isfinite().all() for g in grads)
    assert all(torch.equal(g[1], torch.zeros_like(g[1])) for g in grads)  # dq, dk, dv, dprefix of row 1
    assert_matches_oracle(tensors, mask, None, False, backend=backend, atol=ATOL, lengths=lengths)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("s", [5, 20])
def test_empty_prefix_is_plain_attention(backend, s):
    q = torch.randn(2, 4, s, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, s, 16, requires_grad=True) for _ in range(2))
    empty_k, empty_v = (torch.empty(2, 0, 16, requires_grad=True) for _ in range(2))
    o = prefix_attention(q, k, v, empty_k, empty_v, backend=backend)
    expected = F.scaled_dot_product_attention(  # Sq = Skv: SDPA's top-left causal is ours
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), is_causal=True)
    grad = torch.randn_like(o)
    torch.testing.assert_close(o, expected, atol=ATOL, rtol=0)
    got = torch.autograd.grad(o, (q, k, v, empty_k, empty_v), grad)
    for g, e in zip(got, torch.autograd.grad(expected, (q, k, v), grad)):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=0)
    assert got[3].shape == got[4].shape == (2, 0, 16)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("sq, skv", [(1, 1), (3, 3), (20, 4)])
def test_prefix_longer_than_the_sequence(backend, sq, skv):
    tensors, mask, index = make_inputs(2, 4, 2, sq, skv, 70, 16, "bank", "padding", dtype=torch.float32)
    assert_matches_oracle(tensors, mask, index, True, backend=backend, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("sq, skv", [(9, 4), (20, 6)])
@pytest.mark.parametrize("p", [0, 4])
def test_more_queries_than_keys_is_bottom_right_causal(backend, sq, skv, p):
    """Query i sees sequence keys j <= Skv - Sq + i: the first Sq - Skv rows see only the prefix (zeros if P = 0)."""
    tensors, _, _ = make_inputs(2, 4, 2, sq, skv, p, 16, "shared", None, dtype=torch.float32)
    o = prefix_attention(*tensors, causal=True, backend=backend)
    early = sq - skv
    q, _, _, pk, pv = (t.detach().double() for t in tensors)
    pk, pv = pk.repeat_interleave(2, dim=0), pv.repeat_interleave(2, dim=0)  # [Hq, P, D]: 2 query heads per KV head
    prefix_only = torch.softmax(q[:, :, :early] @ pk.transpose(-1, -2) * 16**-0.5, dim=-1) @ pv
    torch.testing.assert_close(o[:, :, :early].double(), prefix_only, atol=ATOL, rtol=0)
    assert_matches_oracle(tensors, None, None, True, backend=backend, atol=ATOL)


def strided(t: torch.Tensor) -> torch.Tensor:
    """A leaf with t's values whose last dim has stride 2 (every other element of a wider buffer)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2].detach().requires_grad_()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("sq", [5, 20])
def test_non_contiguous_inputs(backend, sq):
    """Every input a strided view: q transposed, k/v/prefix with a gapped head dim, a broadcast (stride-0) mask,
    a sliced prefix_index and prefix_lengths."""
    q = torch.randn(2, sq, 4, 16).transpose(1, 2).detach().requires_grad_()
    k, v = (strided(torch.randn(2, 2, 11, 16)) for _ in range(2))
    pk, pv = (strided(torch.randn(3, 2, 5, 16)) for _ in range(2))
    index, lengths = torch.tensor([2, 1, 0, 1])[::2], torch.tensor([5, 4, 3, 0])[::2]
    mask = (torch.rand(2, 1, 1, 11) > 0.3).expand(2, 4, sq, 11)
    assert not any(t.is_contiguous() for t in (q, k, v, pk, pv, index, lengths, mask))
    assert_matches_oracle([q, k, v, pk, pv], mask, index, True, backend=backend, atol=ATOL, lengths=lengths)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("b, sq, skv, p", [(0, 4, 4, 2), (2, 0, 4, 2), (2, 0, 0, 0), (0, 0, 0, 0)])
@pytest.mark.parametrize("kind", ["shared", "bank"])
def test_empty_inputs_give_empty_outputs(backend, b, sq, skv, p, kind):
    q = torch.randn(b, 4, sq, 16)
    k, v = torch.randn(b, 2, skv, 16), torch.randn(b, 2, skv, 16)
    prefix = torch.randn(2, p, 16) if kind == "shared" else torch.randn(3, 2, p, 16)
    index = torch.zeros(b, dtype=torch.int64) if kind == "bank" else None
    o, lse = prefix_attention(q, k, v, prefix, prefix, attention_mask=torch.ones(b, skv), prefix_index=index,
                              return_lse=True, backend=backend)
    assert o.shape == (b, 4, sq, 16) and o.dtype == q.dtype
    assert lse.shape == (b, 4, sq) and lse.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("sq", [1, 17])
def test_prefix_padding_is_never_read(backend, sq):
    """Prefix keys past a row's length are padding (a bank of adapters of different lengths): whatever they hold,
    NaN and inf included, the output and every gradient equal those with zeros there."""
    tensors, mask, index = make_inputs(3, 4, 2, sq, 9, 6, 16, "bank", "padding", dtype=torch.float32)
    lengths = torch.tensor([6, 2, 0])
    poisoned = [t.detach().clone() for t in tensors]
    poisoned[3][0, :, 2:], poisoned[4][0, :, 3:] = float("nan"), float("inf")  # entry 0: row 1's, length 2
    poisoned = [t.requires_grad_() for t in poisoned]
    runs = []
    for inputs in (tensors, poisoned):
        o = prefix_attention(*inputs, attention_mask=mask, prefix_index=index, prefix_lengths=lengths,
                             backend=backend)
        grads = torch.autograd.grad(o, inputs, torch.ones_like(o))
        runs.append((o, grads[0], grads[1], grads[2]))
    for clean, dirty in zip(*runs):
        assert dirty.isfinite().all()
        torch.testing.assert_close(dirty, clean, atol=0, rtol=0)


def test_padding_poisoned_in_place_after_a_call_is_never_read():
    """A call learns once per version of a table that all its values are finite (then masking a row's logits is
    enough); NaN written into the padding in place afterwards, through the table the per-layer views come from,
    still changes nothing."""
    tensors, mask, index = make_inputs(3, 4, 2, 1, 9, 6, 16, "bank", "padding", dtype=torch.float32)
    q, k, v = tensors[:3]
    table = torch.stack([tensors[3].detach(), tensors[4].detach()])  # [2, N, Hkv, P, D], as a model's table
    lengths = torch.tensor([6, 2, 0])
    with torch.no_grad():
        def call():
            return prefix_attention(q, k, v, *table.unbind(0), attention_mask=mask, prefix_index=index,
                                    prefix_lengths=lengths, backend="torch")
        clean = call()
        table[:, 0, :, 2:] = float("nan")  # entry 0: row 1's, length 2
        dirty = call()
    assert dirty.isfinite().all()
    torch.testing.assert_close(dirty, clean, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_largest_scale_taken_stays_finite(backend):
    """At the largest `scale` the op takes, logits in the tens of thousands: the output (a near one-hot softmax)
    matches the float64 oracle and every gradient is finite."""
    (q, k, v, pk, pv), mask, _ = make_inputs(2, 4, 2, 3, 11, 4, 16, "shared", "padding", dtype=torch.float32)
    o = prefix_attention(q, k, v, pk, pv, attention_mask=mask, scale=2.0**16, backend=backend)
    ref, _ = oracle_attention(q, k, v, pk, pv, attention_mask=mask, scale=2.0**16)
    torch.testing.assert_close(o.double(), ref, atol=ATOL, rtol=0)
    assert all(g.isfinite().all() for g in torch.autograd.grad(o, (q, k, v, pk, pv), torch.ones_like(o)))
