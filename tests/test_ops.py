"""`prefix_attention` (backend "torch") against the float64 oracle: forward, lse and all five gradients."""

import itertools

import pytest
import torch
from oracle import assert_matches_oracle, assert_within_twice_torch_error, make_inputs

from prefix_kernels import prefix_attention

HEADS = [(4, 4), (8, 2), (6, 1)]  # (Hq, Hkv): MHA, GQA, MQA
HEAD_DIMS = [16, 64, 80]
LENGTHS = [(1, 1), (1, 19), (7, 7), (7, 40), (33, 33), (33, 50), (9, 4)]  # (Sq, Skv), Sq > Skv last
PREFIX_LENGTHS = [0, 1, 5, 37]
PREFIX_KINDS = ["shared", "row", "bank"]
MASKS = [None, "padding", "4d"]


def grid():
    cases = list(itertools.product(LENGTHS, PREFIX_LENGTHS, PREFIX_KINDS, MASKS))
    params = []
    for i, ((sq, skv), p, kind, mask) in enumerate(cases):
        hq, hkv = HEADS[i % len(HEADS)]
        d = HEAD_DIMS[(i // len(HEADS)) % len(HEAD_DIMS)]
        case_id = f"{hq}-{hkv}-{sq}-{skv}-{p}-{d}-{kind}-{mask}"
        params.append(pytest.param(hq, hkv, sq, skv, p, d, kind, mask, i % 2 == 0, id=case_id))
    return params


@pytest.mark.parametrize("hq, hkv, sq, skv, p, d, kind, mask, causal", grid())
def test_matches_float64_oracle(hq, hkv, sq, skv, p, d, kind, mask, causal, torch_path):
    tensors, mask_t, index = make_inputs(3, hq, hkv, sq, skv, p, d, kind, mask)
    assert_matches_oracle(tensors, mask_t, index, causal)


@pytest.mark.parametrize("sq, skv", [(1, 64), (48, 48), (40, 70)])
def test_float32_close_to_oracle(sq, skv):
    tensors, mask, index = make_inputs(2, 8, 2, sq, skv, 16, 64, "shared", "padding", dtype=torch.float32)
    assert_matches_oracle(tensors, mask, index, causal=True, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sq, skv", [(1, 64), (48, 48)])
def test_half_precision_error_within_twice_torch(dtype, sq, skv, torch_path):
    """FlashAttention's rule: our error at most ~2x that of the same computation done by PyTorch in `dtype`."""
    tensors, mask, _ = make_inputs(2, 8, 2, sq, skv, 16, 64, "shared", "padding", dtype=torch.float64)
    assert_within_twice_torch_error(tensors, mask, dtype, backend="torch")


def test_zero_prefix_equals_sdpa():
    q, k, v = torch.randn(2, 4, 9, 32), torch.randn(2, 4, 12, 32), torch.randn(2, 4, 12, 32)
    empty = torch.empty(4, 0, 32)
    out = prefix_attention(q, k, v, empty, empty, causal=False)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_rows_without_visible_keys_are_zero_not_nan():
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    empty = torch.empty(2, 0, 16)
    mask = torch.zeros(1, 5, dtype=torch.bool)
    for query_rows in (3, 40):  # the matmul path and the flash path
        qq = q.repeat(1, 1, query_rows, 1)[:, :, :query_rows]
        o, lse = prefix_attention(qq, k, v, empty, empty, attention_mask=mask, return_lse=True, causal=False)
        assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(lse).all()


def test_shared_prefix_gradient_sums_rows():
    """A prefix shared by B rows gets the sum of the B per-row gradients."""
    q, k, v = torch.randn(3, 4, 40, 16), torch.randn(3, 2, 40, 16), torch.randn(3, 2, 40, 16)
    pk, pv = torch.randn(2, 6, 16, requires_grad=True), torch.randn(2, 6, 16, requires_grad=True)
    prefix_attention(q, k, v, pk, pv).sum().backward()
    total = torch.zeros_like(pk)
    for b in range(3):
        pk_b = pk.detach().clone().requires_grad_()
        prefix_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], pk_b, pv).sum().backward()
        total += pk_b.grad
    torch.testing.assert_close(pk.grad, total, atol=1e-5, rtol=1e-5)


def test_deterministic():
    tensors, mask, index = make_inputs(2, 8, 2, 33, 40, 5, 64, "bank", "padding", dtype=torch.float32)
    runs = []
    for _ in range(2):
        o = prefix_attention(*tensors, attention_mask=mask, prefix_index=index)
        runs.append((o, *torch.autograd.grad(o.square().sum(), tensors)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
