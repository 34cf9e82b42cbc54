"""The one place that picks the backend of `prefix_attention`: "torch", "triton" or "cuda".

Each backend is a module with two functions over an `AttentionProblem`:

    forward(p) -> (o [B, Sq, Hq, D] contiguous in q's dtype, lse [B, Hq, Sq] float32 contiguous)
    backward(p, o, lse, d_o, need_dq, need_dkv, need_dprefix)
        -> (dq [B, Sq, Hq, D] contiguous, dk, dv [B, Hkv, Skv, D] contiguous, d prefix_k, d prefix_v in the
            prefix's own shape, contiguous); None for each gradient not asked for

where `o` and `d_o` are given as `[B, Hq, Sq, D]` views.
"""

import importlib
import os

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "PREFIX_KERNELS_BACKEND"
_MODULES = {"torch": "torch_prefix_attention", "triton": "triton_prefix_attention", "cuda": "cuda_prefix_attention"}
_LOADED = {}


def _triton_runnable(device: torch.device) -> str | None:
    """None if the Triton kernels can run on `device`, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'prefix_kernels[triton]')"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"triton needs CUDA tensors (got {device.type}) or TRITON_INTERPRET=1 set before import"


def _triton_takes(head_dim: int, dtype: torch.dtype) -> str | None:
    """None if the Triton kernels take this head dim and dtype, else why not."""
    if dtype == torch.float64:
        return "backend 'triton' computes in float32 at most, got float64 (backend 'torch' takes it)"
    if head_dim % 8 or not 16 <= head_dim <= 256:
        return f"backend 'triton' takes head dims that are multiples of 8 in [16, 256], got D={head_dim}"
    return None


def backend(name: str):
    """The backend module called `name` (one of BACKENDS), imported on first use."""
    module = _LOADED.get(name)
    if module is None:
        module = _LOADED[name] = importlib.import_module(f".{_MODULES[name]}", __package__)
    return module


def select_backend(requested: str | None, device: torch.device, head_dim: int, dtype: torch.dtype,
                   window: int | None = None) -> str:
    """The name of the backend for `requested` (None = automatic) on `device`, or raise why it can't run.

    Automatic: triton for CUDA tensors when triton imports and takes the head dim and dtype, else torch
    (float64 always goes to torch: the Triton kernels would compute it at float32 precision).
    """
    name = requested if requested is not None else os.environ.get(ENV_VAR) or None
    source = "backend" if requested is not None else ENV_VAR
    if name is None:
        if device.type != "cuda" or window is not None:
            return "torch"
        return "triton" if _triton_runnable(device) is None and _triton_takes(head_dim, dtype) is None else "torch"
    if name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {', '.join(BACKENDS)} or None, got {name!r}")
    if name == "triton":
        why = _triton_runnable(device)
        if why:
            raise RuntimeError(f"{source}='triton' cannot run here: {why}")
        why = _triton_takes(head_dim, dtype)
        if why:
            raise ValueError(f"q: {why}")
        if window is not None:
            raise ValueError("window: backend 'triton' takes no sliding window yet; backend 'torch' (chosen "
                             "automatically) does")
    if name == "cuda":
        why = backend("cuda").why_not_runnable(device)
        if why:
            raise RuntimeError(f"{source}='cuda' cannot run here: {why}")
    return name
