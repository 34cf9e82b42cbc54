"""The one place that picks the backend of `prefix_attention`: "torch", "triton" or "cuda"."""

import os

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "PREFIX_KERNELS_BACKEND"


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


def _kernel(name: str):
    if name == "torch":
        from .reference import torch_prefix_attention

        return torch_prefix_attention
    from . import triton_prefix_attention

    return triton_prefix_attention.triton_prefix_attention


def _triton_takes(head_dim: int) -> bool:
    return head_dim % 8 == 0 and 16 <= head_dim <= 256


def select_backend(requested: str | None, device: torch.device, head_dim: int):
    """Return the backend function for `requested` (None = automatic) on `device`, or raise why it can't run.

    Automatic: triton for CUDA tensors when triton imports and takes the head dim, else torch.
    """
    name = requested if requested is not None else os.environ.get(ENV_VAR) or None
    source = "backend" if requested is not None else ENV_VAR
    if name is None:
        use_triton = device.type == "cuda" and _triton_runnable(device) is None and _triton_takes(head_dim)
        return _kernel("triton" if use_triton else "torch")
    if name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {', '.join(BACKENDS)} or None, got {name!r}")
    if name == "triton":
        why = _triton_runnable(device)
        if why:
            raise RuntimeError(f"{source}='triton' cannot run here: {why}")
        if not _triton_takes(head_dim):
            raise ValueError(
                f"q: backend 'triton' takes head dims that are multiples of 8 in [16, 256], got D={head_dim}")
    if name == "cuda":
        from . import cuda_prefix_attention

        why = cuda_prefix_attention.why_not_runnable(device)
        if why:
            raise RuntimeError(f"{source}='cuda' cannot run here: {why}")
        return cuda_prefix_attention.cuda_prefix_attention
    return _kernel(name)

