"""Backend "cuda" (csrc/): the sources compile and bad input is refused everywhere; on a GPU, the op's contract for
decode shapes against the float64 oracle. The backend is forward-only, so FlashAttention's rule is applied to o."""

import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch
from oracle import make_inputs, oracle_attention
from torch.utils import cpp_extension

from prefix_kernels import prefix_attention
from prefix_kernels.ops import cuda_prefix_attention as backend
from prefix_kernels.ops.validate import check_inputs

WHY_NOT = backend.why_not_runnable(torch.device("cuda"))
runnable = pytest.mark.skipif(WHY_NOT is not None, reason=f"backend 'cuda' cannot run here: {WHY_NOT}")


def test_kernel_source_compiles_with_nvcc(tmp_path):
    """The kernel file is torch-free, so CI without a GPU still proves it builds for A100 (sm_80) and H100 (sm_90),
    and that ptxas spills no register in any of its kernels."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    obj = tmp_path / "prefix_decode_kernel.o"
    cmd = [nvcc, "-c", "-O2", "-std=c++17", "-gencode", "arch=compute_80,code=sm_80", "-gencode",
           "arch=compute_90,code=sm_90", "-Xptxas", "-warn-spills,-warn-lmem-usage",
           str(backend.CSRC / "prefix_decode_kernel.cu"), "-o", str(obj)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert obj.stat().st_size > 0
    assert "spill" not in run.stderr and "Local memory" not in run.stderr, run.stderr


def test_launcher_compiles_against_torch_headers(tmp_path):
    """The launcher (TORCH_CHECKs, the split plan, the launch) type-checks against this torch's headers. A CPU build
    of torch ships the CUDA headers but not the one CMake writes, so an empty stand-in takes its place."""
    compiler, nvcc = shutil.which("c++") or shutil.which("g++"), shutil.which("nvcc")
    if compiler is None or nvcc is None:
        pytest.skip("needs a C++ compiler and the CUDA toolkit")
    (tmp_path / "c10/cuda/impl").mkdir(parents=True)
    (tmp_path / "c10/cuda/impl/cuda_cmake_macros.h").touch()
    dry_run = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True,
                             text=True, timeout=60).stderr
    cuda_includes = re.findall(r'-I"?([^" ]+)', re.search(r"INCLUDES=(.*)", dry_run).group(1))  # where nvcc looks
    includes = [tmp_path, *cpp_extension.include_paths(), *cuda_includes, sysconfig.get_paths()["include"]]
    cmd = [compiler, "-fsyntax-only", "-std=c++17", *(f"-I{path}" for path in includes),
           str(backend.CSRC / "prefix_decode_launcher.cpp")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def _problem(dtype=torch.float16, d=64, sq=1, mask=None, grad=False, **extra):
    (q, k, v, pk, pv), _, _ = make_inputs(2, 4, 2, sq, 9, 3, d, "row", None, dtype=dtype)
    tensors = [t.detach().requires_grad_(grad) for t in (q, k, v, pk, pv)]
    return check_inputs(*tensors, causal=True, scale=None, attention_mask=mask, prefix_index=None, **extra)


REFUSED = [
    ("q", TypeError, "takes float16 or bfloat16, got torch.float32", dict(dtype=torch.float32)),
    ("q", ValueError, "takes head dims 64, 128 or 256, got D=80", dict(d=80)),
    ("q", ValueError, "decode kernel for Sq <= 16, got Sq=17", dict(sq=17)),
    ("q", ValueError, "inference-only", dict(grad=True)),
    ("attention_mask", ValueError, r"key-padding mask .* got a mask of shape \[2, 1, 3, 9\]",
     dict(sq=3, mask=torch.ones(2, 1, 3, 9, dtype=torch.bool))),
    ("attention_bias", ValueError, "does not take it", dict(attention_bias=torch.zeros(1, 1, 1, 9))),
    ("softcap", ValueError, "does not take it", dict(softcap=30.0)),
]


@pytest.mark.parametrize("argument, error, message, kwargs", REFUSED, ids=[m for _, _, m, _ in REFUSED])
def test_refuses_what_the_kernel_cannot_take_before_building(argument, error, message, kwargs):
    with pytest.raises(error, match=rf"^{argument}: backend 'cuda' .*{message}"):
        backend.check(_problem(**kwargs))


def test_key_padding_in_4d_form_is_accepted():
    """[B, 1, 1, Skv] and a mask broadcast over heads and queries (stride 0) are key-padding masks."""
    padding = torch.rand(2, 1, 1, 9) > 0.5
    for mask in (padding, padding.expand(2, 4, 3, 9)):
        backend.check(_problem(sq=3, mask=mask))


def test_a_bank_of_adapters_of_different_lengths_is_taken():
    backend.check(_problem(prefix_lengths=torch.tensor([3, 1])))


def test_grad_inputs_are_fine_without_autograd():
    with torch.no_grad():
        backend.check(_problem(grad=True))


def test_missing_pieces_are_named(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    why = backend.why_not_runnable(torch.device("cpu"))
    assert "needs CUDA tensors" in why and "CUDA toolkit" in why and "ninja" in why


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_selecting_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    p = _problem()
    args = (p.q, p.k, p.v, p.prefix_k, p.prefix_v)
    with pytest.raises(RuntimeError, match=r"^backend='cuda' cannot run here: it needs CUDA tensors"):
        prefix_attention(*args, backend="cuda")
    monkeypatch.setenv("PREFIX_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"^PREFIX_KERNELS_BACKEND='cuda' cannot run here"):
        prefix_attention(*args)


def _on_gpu(tensors, mask, index, dtype):
    low = [t.detach().to("cuda", dtype) for t in tensors]
    return low, (None if mask is None else mask.cuda()), (None if index is None else index.cuda())


def assert_forward_within_twice_torch_error(low, mask, index, causal, scale=None, lengths=None):
    """FlashAttention's rule on the output: its error against float64 (on the same rounded inputs) is at most ~2x
    that of PyTorch doing the attention in q's dtype; lse to fp32 accuracy; a row that sees nothing is 0 / -inf."""
    kwargs = dict(causal=causal, scale=scale, attention_mask=mask, prefix_index=index, prefix_lengths=lengths)
    with torch.no_grad():
        o, lse = prefix_attention(*low, **kwargs, return_lse=True, backend="cuda")
    ref_o, ref_lse = oracle_attention(*(t.double() for t in low), **kwargs)
    theirs, _ = oracle_attention(*low, **kwargs, compute_dtype=low[0].dtype)
    assert o.dtype == low[0].dtype and o.shape == low[0].shape and lse.dtype == torch.float32
    ours_err = (o.double() - ref_o).abs().max().item()
    torch_err = (theirs.double() - ref_o).abs().max().item()
    assert ours_err <= 2 * torch_err + 1e-4, f"o: error {ours_err:.2e} > 2 x PyTorch's {torch_err:.2e}"
    empty = ref_lse.isinf()
    assert torch.equal(lse.isinf(), empty) and not o[empty].any()
    torch.testing.assert_close(lse.double().masked_fill(empty, 0), ref_lse.masked_fill(empty, 0), atol=1e-4, rtol=1e-5)


# (Hq, Hkv, Sq, Skv, P, D, prefix kind, mask kind, causal): MHA / GQA / MQA, Sq 1..16 (also > Skv, so some rows see
# nothing), odd Skv incl. 0 and long enough to split, P = 0 / 1 / 37, GQA groups of more than 16 query rows.
CASES = [
    (8, 8, 1, 1, 0, 64, "shared", None, True),
    (32, 8, 1, 4099, 37, 128, "shared", "padding", True),
    (8, 1, 1, 1000, 1, 128, "bank", "padding", True),
    (16, 2, 16, 113, 37, 64, "row", "padding", True),
    (4, 2, 7, 33, 0, 256, "bank", None, True),
    (6, 2, 3, 0, 5, 128, "shared", None, True),
    (4, 4, 2, 0, 0, 64, "row", None, True),
    (8, 2, 5, 3, 0, 128, "shared", "padding", True),
    (64, 1, 16, 257, 37, 256, "bank", "padding", False),
    (12, 4, 9, 513, 1, 64, "shared", None, False),
]


@pytest.mark.gpu
@runnable
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq, hkv, sq, skv, p, d, kind, mask, causal", CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_matches_float64_oracle(hq, hkv, sq, skv, p, d, kind, mask, causal, dtype):
    tensors, mask_t, index = make_inputs(3, hq, hkv, sq, skv, p, d, kind, mask)
    assert_forward_within_twice_torch_error(*_on_gpu(tensors, mask_t, index, dtype), causal)


@pytest.mark.gpu
@runnable
def test_strided_and_misaligned_inputs():
    """Views as transformers passes them are read in place; a misaligned or D-strided one is copied first."""
    b, hq, hkv, sq, skv, p, d = 2, 8, 2, 4, 300, 7, 128
    q = torch.randn(b, sq, hq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    kv = torch.randn(b, skv, hkv, 2, d, device="cuda", dtype=torch.bfloat16)  # a fused KV projection
    k, v = kv[..., 0, :].transpose(1, 2), kv[..., 1, :].transpose(1, 2)
    pk = torch.randn(hkv * p * d + 3, device="cuda", dtype=torch.bfloat16)[3:].view(hkv, p, d)  # 6-byte offset
    pv = torch.randn(hkv, p, 2 * d, device="cuda", dtype=torch.bfloat16)[..., ::2]
    assert backend._vector_ready(q) is q and backend._vector_ready(k) is k
    assert backend._vector_ready(pk) is not pk and backend._vector_ready(pv) is not pv
    mask = torch.rand(b, skv, device="cuda") > 0.3
    assert_forward_within_twice_torch_error([q, k, v, pk, pv], mask, None, causal=True, scale=0.3)


@pytest.mark.gpu
@runnable
def test_key_padding_masks_in_4d_form():
    tensors, _, _ = make_inputs(3, 8, 2, 3, 77, 5, 64, "shared", None)
    low, _, _ = _on_gpu(tensors, None, None, torch.float16)
    padding = torch.rand(3, 1, 1, 77, device="cuda") > 0.4
    for mask in (padding, padding[:1], padding.expand(3, 8, 3, 77)):
        assert_forward_within_twice_torch_error(low, mask, None, causal=True)


@pytest.mark.gpu
@runnable
def test_deterministic_and_inference_only():
    """Same inputs, same bits; parameters that require grad are fine under no_grad and the output has no graph."""
    tensors, mask, index = make_inputs(3, 16, 4, 2, 2000, 37, 128, "bank", "padding")
    low, mask, index = _on_gpu(tensors, mask, index, torch.bfloat16)
    low[3].requires_grad_()
    with torch.no_grad():
        runs = [prefix_attention(*low, attention_mask=mask, prefix_index=index, return_lse=True, backend="cuda")
                for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True)) and not runs[0][0].requires_grad
    with pytest.raises(ValueError, match="^prefix_k: backend 'cuda' is inference-only"):
        prefix_attention(*low, attention_mask=mask, prefix_index=index, backend="cuda")


@pytest.mark.gpu
@runnable
@pytest.mark.parametrize("d", [64, 256])
def test_bank_of_adapters_of_different_lengths(d):
    """Rows read bank entries of different lengths (one of them empty, with its sequence all padding)."""
    tensors, mask, index = make_inputs(3, 16, 4, 2, 700, 37, d, "bank", "padding")
    low, mask, index = _on_gpu(tensors, mask, index, torch.bfloat16)
    lengths = torch.tensor([37, 0, 5], device="cuda")
    assert_forward_within_twice_torch_error(low, mask, index, causal=True, lengths=lengths)


@pytest.mark.gpu
@runnable
def test_decode_step_never_waits_for_the_gpu():
    """After the first call (which builds the extension), a decode step makes no host-device synchronisation."""
    tensors, mask, index = make_inputs(4, 32, 8, 1, 3000, 64, 128, "bank", "padding")
    low, mask, index = _on_gpu(tensors, mask, index, torch.bfloat16)
    lengths = torch.tensor([64, 1, 0, 17], device="cuda")
    with torch.no_grad():
        prefix_attention(*low, attention_mask=mask, prefix_index=index, prefix_lengths=lengths, backend="cuda")
        torch.cuda.set_sync_debug_mode("error")
        try:
            prefix_attention(*low, attention_mask=mask, prefix_index=index, prefix_lengths=lengths, backend="cuda")
        finally:
            torch.cuda.set_sync_debug_mode("default")
