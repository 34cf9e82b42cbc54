import os

import pytest
import torch

# The Triton kernels run on CPU through Triton's interpreter, which is chosen when a kernel is defined:
# set it before anything imports the kernel module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["joint", "two-part"])
def torch_path(request, monkeypatch):
    """Both forwards of backend "torch": one joint softmax (small problems) and two attentions merged (large)."""
    _force_torch_path(monkeypatch, request.param)
    return request.param


@pytest.fixture
def backend(request, monkeypatch):
    """A backend name for tests parametrized with `indirect=["backend"]`: "torch-two-part" runs backend "torch"
    with the forward of large problems whatever the size."""
    if request.param == "torch-two-part":
        _force_torch_path(monkeypatch, "two-part")
        return "torch"
    return request.param


def _force_torch_path(monkeypatch, path: str) -> None:
    from prefix_kernels.ops import torch_prefix_attention

    monkeypatch.setattr(torch_prefix_attention, "JOINT_MAX_LOGITS", 1 << 62 if path == "joint" else -1)


@pytest.fixture(params=["one-batch", "planned", "one-per-sequence"])
def packing_batches(request, monkeypatch):
    """How backend "torch" pads packed sequences into batches: all in one, as planned, or each alone."""
    from prefix_kernels.ops import torch_varlen

    cost = {"one-batch": 1 << 62, "planned": torch_varlen.CALL_LOGITS, "one-per-sequence": -1}[request.param]
    monkeypatch.setattr(torch_varlen, "CALL_LOGITS", cost)
    return request.param
