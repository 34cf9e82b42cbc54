"""Backend "triton" against the float64 oracle: under TRITON_INTERPRET=1 on CPU (CI), compiled on a GPU."""

import importlib.util

import pytest
import torch
from oracle import assert_matches_oracle, assert_within_twice_torch_error, make_inputs, on_device, oracle_attention

from prefix_kernels import prefix_attention

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (Hq, Hkv, Sq, Skv, P, D, prefix kind, mask kind, causal): odd sizes, P = 0 and 1, Sq != Skv both ways,
# MHA / GQA / MQA, every mask and prefix kind, head dims 16 and 80. Small: the interpreter is slow.
CASES = [
    (4, 4, 1, 1, 0, 16, "shared", None, True),
    (4, 2, 1, 37, 5, 16, "shared", "padding", True),
    (6, 1, 1, 19, 1, 80, "bank", None, True),
    (4, 2, 7, 7, 0, 16, "row", "padding", True),
    (4, 2, 7, 40, 37, 16, "shared", "4d", True),
    (3, 1, 33, 33, 5, 16, "bank", "padding", True),
    (2, 2, 33, 50, 1, 80, "row", None, True),
    (4, 2, 20, 13, 3, 16, "shared", None, True),
    (4, 1, 9, 4, 0, 16, "row", "4d", True),
    (4, 2, 17, 23, 5, 16, "shared", None, False),
    (4, 4, 7, 30, 37, 16, "bank", "4d", False),
    (2, 1, 13, 0, 4, 16, "shared", None, True),
]


@pytest.mark.parametrize("hq, hkv, sq, skv, p, d, kind, mask, causal", CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_matches_float64_oracle(hq, hkv, sq, skv, p, d, kind, mask, causal):
    tensors, mask_t, index = make_inputs(3, hq, hkv, sq, skv, p, d, kind, mask, dtype=torch.float32)
    assert_matches_oracle(*on_device(tensors, mask_t, index, DEVICE), causal, backend="triton", atol=2e-5)


def test_frozen_sequence_keys_get_no_gradient_and_the_rest_is_right():
    """The first layer of a frozen model: only q and the prefix need gradients."""
    (q, k, v, pk, pv), mask, _ = make_inputs(2, 4, 2, 9, 12, 5, 16, "shared", "padding", dtype=torch.float32)
    k, v = k.detach(), v.detach()
    o = prefix_attention(q, k, v, pk, pv, attention_mask=mask, backend="triton")
    ref, _ = oracle_attention(q, k, v, pk, pv, attention_mask=mask)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(o, (q, pk, pv), grad.float())
    want = torch.autograd.grad(ref, (q, pk, pv), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=2e-5, rtol=0)


def test_strided_inputs():
    q = torch.randn(2, 9, 12, 16)[:, :, ::3].transpose(1, 2)  # [B, Hq=4, Sq=9, D] with gaps
    kv = torch.randn(2, 11, 2, 2, 16)  # a fused KV projection, split by views
    k, v = kv[..., 0, :].transpose(1, 2), kv[..., 1, :].transpose(1, 2)
    pk = torch.randn(2, 3, 32)[..., ::2]
    pv = torch.randn(2, 3, 16)
    o = prefix_attention(q, k, v, pk, pv, backend="triton")
    torch.testing.assert_close(o.double(), oracle_attention(q, k, v, pk, pv)[0], atol=2e-5, rtol=0)


def test_half_precision_within_twice_torch_error():
    tensors, mask, _ = make_inputs(2, 4, 2, 17, 17, 5, 16, "shared", "padding", dtype=torch.float64)
    assert_within_twice_torch_error(tensors, mask, torch.float16, backend="triton")


def test_deterministic():
    tensors, mask, index = make_inputs(3, 4, 2, 9, 12, 5, 16, "bank", "padding", dtype=torch.float32)
    runs = []
    for _ in range(2):
        o = prefix_attention(*tensors, attention_mask=mask, prefix_index=index, backend="triton")
        runs.append((o, *torch.autograd.grad(o.square().sum(), tensors)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_head_dim_the_kernel_cannot_take():
    q, k, v = torch.randn(1, 2, 3, 12), torch.randn(1, 2, 3, 12), torch.randn(1, 2, 3, 12)
    pk = torch.randn(2, 1, 12)
    with pytest.raises(ValueError, match="^q: backend 'triton' takes head dims that are multiples of 8"):
        prefix_attention(q, k, v, pk, pk, backend="triton")


# (B, Hq, Hkv, Sq, Skv, P, D, dtype): decode with a long cache, prefill, a head dim below its block (80), D = 256,
# MQA; each head dim and dtype once, so the autotuner compiles few specialisations.
GPU_CASES = [
    (2, 32, 8, 1, 4099, 64, 128, torch.bfloat16), (2, 16, 4, 1023, 1023, 64, 64, torch.bfloat16),
    (1, 8, 1, 333, 1000, 37, 80, torch.float16), (2, 8, 8, 256, 512, 16, 256, torch.bfloat16),
    (4, 12, 4, 129, 129, 0, 128, torch.float16),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("b, hq, hkv, sq, skv, p, d, dtype", GPU_CASES, ids=["-".join(map(str, c)) for c in GPU_CASES])
def test_gpu_realistic_shapes(b, hq, hkv, sq, skv, p, d, dtype):
    """FlashAttention's rule on the GPU: error at most ~2x that of PyTorch in the same dtype, for o and grads."""
    tensors, mask, _ = make_inputs(b, hq, hkv, sq, skv, p, d, "shared", "padding", dtype=torch.float64)
    assert_within_twice_torch_error([t.cuda() for t in tensors], mask.cuda(), dtype, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sq", [1, 300], ids=["decode", "prefill"])
def test_forward_never_waits_for_the_gpu(sq):
    """After the first call (compilation, autotuning), a forward makes no host-device synchronisation: the decode
    step of a bank of adapters of different lengths, and a prefill."""
    tensors, mask, index = make_inputs(4, 32, 8, sq, 3000, 64, 128, "bank", "padding", dtype=torch.bfloat16)
    (q, k, v, pk, pv), mask, index = on_device(tensors, mask, index, "cuda")
    lengths = torch.tensor([64, 1, 0, 17], device="cuda")
    with torch.no_grad():
        for debug_mode in ("default", "error"):
            torch.cuda.set_sync_debug_mode(debug_mode)
            try:
                prefix_attention(q, k, v, pk, pv, attention_mask=mask, prefix_index=index, prefix_lengths=lengths,
                                 backend="triton")
            finally:
                torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("sq, mask", [(1, "padding"), (4, "4d"), (16, None)])
def test_decode_kernel_with_many_splits(sq, mask):
    """Decode shapes (Sq <= 16) take the split-KV kernel; a long cache is cut into several splits."""
    tensors, mask_t, index = make_inputs(1, 4, 1, sq, 70, 5, 16, "bank", mask, dtype=torch.float32)
    assert_matches_oracle(*on_device(tensors, mask_t, index, DEVICE), True, backend="triton", atol=2e-5,
                          lengths=torch.tensor([3], device=DEVICE))


def _huge_view(storage: torch.Tensor, offset: int, shape, stride) -> torch.Tensor:
    """A view of `storage` filled with random values (only the pages it touches become resident)."""
    view = storage.as_strided(shape, stride, offset)
    view.copy_(torch.randn(shape) if view.is_floating_point() else torch.rand(shape) > 0.3)
    return view


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter reads CPU views in place")
@pytest.mark.parametrize("sq", [1, 17], ids=["decode", "prefill"])
def test_offsets_past_2_31_elements(sq):
    """Strided views whose element offsets pass 2^31 through position x stride terms: queries 16 and later of q
    (position stride 2^27), keys 257 and later of k and v (position stride just under the largest one a tile walks
    in int32), rows 16 and later of a 4-D mask. Every such term must be computed in int64, forward and backward.
    The views live in storages of 2^31 + 2^29 elements that are never touched beyond them."""
    from prefix_kernels.ops.triton_common import MAX_TILE_STRIDE

    skv, d = 300, 16
    storage = torch.empty(2**31 + 2**29)  # virtual: only the touched pages are real
    key_stride = MAX_TILE_STRIDE - 32
    k = _huge_view(storage, 0, (1, 1, skv, d), (0, 0, key_stride, 1))
    v = _huge_view(storage, d, (1, 1, skv, d), (0, 0, key_stride, 1))
    q = _huge_view(storage, 4 * d, (1, 2, sq, d), (0, d, 2**27, 1))
    assert (sq - 1) * 2**27 + 4 * d >= 2**31 or sq == 1
    assert (skv - 1) * key_stride >= 2**31
    mask = None
    if sq > 1:
        mask = _huge_view(torch.empty(2**31 + 2**29, dtype=torch.bool), 0, (1, 1, sq, skv), (0, 0, 2**27, 1))
    pk, pv = torch.randn(1, 3, d), torch.randn(1, 3, d)
    tensors = [t.requires_grad_() for t in (q, k, v, pk, pv)]
    assert_matches_oracle(tensors, mask, None, True, backend="triton", atol=2e-5)


def test_views_a_tile_cannot_walk_in_int32_are_copied():
    from prefix_kernels.ops.triton_common import MAX_TILE_STRIDE, tileable

    t = torch.randn(4, 3)
    assert tileable(t, 2) is t
    wide = torch.empty(3 * MAX_TILE_STRIDE).as_strided((3, 4), (MAX_TILE_STRIDE, 1))
    assert tileable(wide, 1) is wide and tileable(wide, 2).is_contiguous()


@pytest.mark.parametrize("cap", [1.0, 50.0, 1e3, 1e6])
@pytest.mark.parametrize("sq", [1, 9], ids=["decode", "prefill"])
def test_softcap_keeps_the_precision_of_the_logits_at_every_cap(cap, sq):
    """`cap * tanh(s / cap)` must not lose bits as the cap grows (a tanh through a sigmoid loses cap * eps): the
    output and every gradient stay within twice the torch backend's float32 error against the float64 oracle."""
    tensors, mask, index = make_inputs(2, 4, 2, sq, 13, 3, 16, "shared", "padding", dtype=torch.float32)
    tensors, mask, index = on_device(tensors, mask, index, DEVICE)
    with torch.no_grad():
        tensors[0].mul_(3.0)  # logits of a few units up to ~50: small caps bend them, large ones leave them be
    ref, _ = oracle_attention(*[t.double() for t in tensors], attention_mask=mask, softcap=cap)
    grad = torch.randn_like(ref)
    want = (ref, *torch.autograd.grad(ref, tensors, grad))
    errors = {}
    for backend in ("triton", "torch"):
        o = prefix_attention(*tensors, attention_mask=mask, softcap=cap, backend=backend)
        got = (o, *torch.autograd.grad(o, tensors, grad.float()))
        errors[backend] = [(g.double() - w.double()).abs().max().item() for g, w in zip(got, want)]
    # a few float32 ulps of each result's largest value: the round-off any float32 computation of it carries
    ulps = [8 * torch.finfo(torch.float32).eps * w.abs().max().item() for w in want]
    for name, ours, torch_error, floor in zip(("o", "dq", "dk", "dv", "dprefix_k", "dprefix_v"), *errors.values(),
                                              ulps):
        assert ours <= 2 * torch_error + floor, \
            f"{name}: error {ours:.2e} > 2 x the torch backend's {torch_error:.2e} + {floor:.1e}"
