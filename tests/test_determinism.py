"""Bitwise determinism of a whole training step of a `PrefixModel`, per backend (the op-level checks are in
test_ops.py and test_triton.py)."""

import importlib.util

import pytest
import torch
from tiny_models import VOCAB, tiny_decoder

from prefix_kernels import PrefixTuningConfig, get_prefix_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernels are interpreted on CPU
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"))]


def training_step():
    """(loss, prefix gradient, prefix after one AdamW step) of a freshly built model on a fixed padded batch."""
    torch.manual_seed(0)
    base = tiny_decoder("qwen2").to(DEVICE)  # head dim 16, which the Triton kernels take
    model = get_prefix_model(base, PrefixTuningConfig(num_virtual_tokens=5))
    model.train()
    prefix = model.prefix_encoders["default"].embedding.weight
    optimizer = torch.optim.AdamW([prefix], lr=0.1)
    ids = torch.randint(3, VOCAB, (2, 17), device=DEVICE)  # Sq > 16: the prefill kernels, not decode
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    grad = prefix.grad.clone()
    optimizer.step()
    return loss.detach(), grad, prefix.detach().clone()


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_identical_training_steps_are_bitwise_equal(backend, monkeypatch):
    monkeypatch.setenv("PREFIX_KERNELS_BACKEND", backend)
    first, second = training_step(), training_step()
    assert first[1].abs().sum() > 0
    for a, b in zip(first, second):
        assert torch.equal(a, b)
