"""Backend "cuda": the hand-written CUDA C++ decode kernel of `csrc/`, forward only.

Split-KV attention (flash-decoding) for decode shapes, Sq <= 16: the sequence keys are cut into ranges that run
in parallel blocks, the prefix is one more such range, and a second small kernel merges the partial results by
their log-sum-exp. Each block serves one GQA group, so a K/V byte is read once for all the query heads sharing
it. The extension is compiled with `torch.utils.cpp_extension.load` (ninja) on first use and cached; nothing
compiles at install.

It takes float16/bfloat16, head dims 64, 128 and 256, every prefix kind (a bank of adapters of different lengths
through `prefix_lengths` included), the causal flag and key-padding masks. It is inference-only: with autograd
recording, inputs that require grad are refused up front. Automatic dispatch never picks it: choosing between it
and the Triton decode kernel needs a measured rule, and no GPU has measured them yet.
"""

import functools
import os
import pathlib

import torch

from .problem import AttentionProblem

CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("binding.cpp", "prefix_decode_launcher.cpp", "prefix_decode_kernel.cu")
HEAD_DIMS = (64, 128, 256)
MAX_SEQ_Q = 16


def why_not_runnable(device: torch.device) -> str | None:
    """None if the CUDA extension can be built and run for tensors on `device`, else everything that is missing."""
    from torch.utils import cpp_extension

    missing = []
    if device.type != "cuda":
        missing.append(f"it needs CUDA tensors (got {device.type} tensors)")
    elif not torch.cuda.is_available():
        missing.append("torch sees no CUDA device")
    home = cpp_extension.CUDA_HOME
    if torch.version.cuda is None:
        missing.append("this torch is built without CUDA (torch.version.cuda is None)")
    elif home is None or not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        missing.append("torch finds no CUDA toolkit with nvcc (install one or set CUDA_HOME)")
    if not cpp_extension.is_ninja_available():
        missing.append("ninja is not installed (pip install ninja)")
    if not all((CSRC / name).is_file() for name in SOURCES):
        missing.append(f"the CUDA C++ sources are not in {CSRC.name}/ next to the package (use a source checkout)")
    return "; ".join(missing) or None


@functools.cache
def _extension():
    from torch.utils.cpp_extension import load

    return load(
        name="prefix_kernels_cuda",
        sources=[str(CSRC / name) for name in SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
    )


def check(p: AttentionProblem) -> None:
    """What this kernel cannot take, on top of `check_inputs`: raised before anything is built or launched."""
    tensors = {"q": p.q, "k": p.k, "v": p.v, "prefix_k": p.prefix_k, "prefix_v": p.prefix_v}
    if p.packed:
        raise ValueError("cu_seqlens_q: backend 'cuda' does not take packed sequences, got them; expected None "
                         "(backends 'triton' and 'torch' do)")
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if t.requires_grad:
                raise ValueError(
                    f"{name}: backend 'cuda' is inference-only (no backward), got a tensor that requires grad; "
                    "run it under torch.no_grad() or train with backend 'triton' or 'torch'"
                )
    if p.q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"q: backend 'cuda' takes float16 or bfloat16, got {p.q.dtype}")
    d, sq = p.q.shape[-1], p.q.shape[2]
    if d not in HEAD_DIMS:
        raise ValueError(f"q: backend 'cuda' takes head dims 64, 128 or 256, got D={d}")
    if sq > MAX_SEQ_Q:
        raise ValueError(f"q: backend 'cuda' is a decode kernel for Sq <= {MAX_SEQ_Q}, got Sq={sq} "
                         "(use backend 'triton' for prefill)")
    for name, given in (("attention_bias", p.bias), ("softcap", p.softcap), ("window", p.window)):
        if given is not None:
            raise ValueError(f"{name}: backend 'cuda' does not take it, got one; expected None "
                             "(backends 'triton' and 'torch' do)")
    mask = p.mask
    # A key-padding mask: one value per key, the same for every head and query (size-1 or broadcast dims).
    if mask is not None and any(mask.shape[dim] != 1 and mask.stride(dim) != 0 for dim in (1, 2)):
        raise ValueError(
            f"attention_mask: backend 'cuda' takes a key-padding mask [B, Skv] (or [B, 1, 1, Skv]), "
            f"got a mask of shape [{', '.join(map(str, mask.shape))}]"
        )


def _vector_ready(t: torch.Tensor) -> torch.Tensor:
    """`t` itself if the kernel can read it with 128-bit loads (unit stride along D, 16-byte aligned rows), else a
    contiguous copy. A shared prefix stays [Hkv, P, D] either way."""
    if t.numel() == 0:
        return t
    aligned = t.data_ptr() % 16 == 0 and all(
        stride % 8 == 0 for stride, size in zip(t.stride()[:-1], t.shape[:-1], strict=True) if size > 1
    )
    if t.stride(-1) == 1 and aligned:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def forward(p: AttentionProblem):
    """Backend "cuda": (o `[B, Sq, Hq, D]` contiguous in q's dtype, lse `[B, Hq, Sq]` float32), Sq <= 16.

    `check(p)` has passed (the op's entry point runs it)."""
    key_mask = None if p.mask is None else p.mask[:, 0, 0, :]  # [B or 1, Skv]
    q, k, v, prefix_k, prefix_v = (_vector_ready(t) for t in (p.q, p.k, p.v, p.prefix_k, p.prefix_v))
    index = None if p.prefix_index is None else p.prefix_index.contiguous()
    lengths = None if p.prefix_lengths is None else p.prefix_lengths.contiguous()
    o, lse = _extension().forward(q, k, v, prefix_k, prefix_v, index, lengths, key_mask, p.causal, p.scale)
    return o.transpose(1, 2).contiguous(), lse


def backward(p: AttentionProblem, o, lse, d_o, need_dq: bool, need_dkv: bool, need_dprefix: bool):
    """Never reached: `check` refuses inputs that require grad."""
    raise RuntimeError("backend 'cuda' is inference-only (no backward)")
