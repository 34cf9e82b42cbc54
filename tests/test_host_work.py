"""Host work per call, counted rather than timed so it cannot flake: the ATen calls and Python frames one
`prefix_attention` decode call makes, and the ATen calls a mixed-adapter decode step adds over the base model.

The bounds sit a little above today's counts; a change that adds host work to the per-layer path fails here. Time
per call is measured by `pytest bench` (group "op host overhead").
"""

import sys

import pytest
import torch
import torch.nn.functional as F
from tiny_models import VOCAB, tiny_decoder
from torch.utils._python_dispatch import TorchDispatchMode

from prefix_kernels import PrefixTuningConfig, get_prefix_model, prefix_attention

B, HQ, HKV, S, D = 8, 8, 2, 100, 32  # a decode step of a small model


class AtenCalls(TorchDispatchMode):
    """Counts the ATen calls made inside the block (views included)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def python_frames(call) -> int:
    """The Python functions entered while `call()` runs."""
    frames = 0

    def count(frame, event, arg):
        nonlocal frames
        frames += event == "call"

    sys.setprofile(count)
    try:
        call()
    finally:
        sys.setprofile(None)
    return frames


def decode_problem(kind: str):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(B, 1, HQ, D, generator=generator).transpose(1, 2)  # as transformers passes it
    k, v = (torch.randn(B, HKV, S, D, generator=generator) for _ in range(2))
    if kind == "shared":
        pk, pv = (torch.randn(HKV, 16, D, generator=generator) for _ in range(2))
        return (q, k, v, pk, pv), {}
    pk, pv = (torch.randn(4, HKV, 64, D, generator=generator) for _ in range(2))
    options = dict(prefix_index=torch.arange(B) % 4, prefix_lengths=torch.tensor([16, 32, 48, 64] * 2),
                   attention_mask=torch.arange(S).expand(B, S) >= torch.arange(B)[:, None])  # left padding
    return (q, k, v, pk, pv), options


# (ATen calls, Python frames) at most, per no-grad decode call, after the first call of a plan has checked its
# index, lengths and mask.
BOUNDS = {"shared": (36, 40), "bank": (28, 66)}


@pytest.mark.parametrize("kind", BOUNDS)
def test_decode_call_host_work_is_bounded(kind):
    tensors, options = decode_problem(kind)
    with torch.no_grad():
        expected = prefix_attention(*tensors, **options)  # the first layer of a call: checks, derived masks
        with AtenCalls() as aten:
            out = prefix_attention(*tensors, **options)
        frames = python_frames(lambda: prefix_attention(*tensors, **options))
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    max_aten, max_frames = BOUNDS[kind]
    assert len(aten.calls) <= max_aten, f"{len(aten.calls)} ATen calls: {' '.join(aten.calls)}"
    assert frames <= max_frames, f"{frames} Python frames"


def test_no_grad_call_equals_the_recorded_op():
    """The eager no-grad path (no custom-op layers) gives bit for bit what the op with autograd gives."""
    tensors, options = decode_problem("bank")
    with torch.no_grad():
        plain = prefix_attention(*tensors, **options)
    recorded = prefix_attention(*(t.clone().requires_grad_() for t in tensors), **options)
    assert recorded.requires_grad
    torch.testing.assert_close(plain, recorded.detach(), atol=0, rtol=0)


def test_checks_rerun_when_an_index_changes_in_place():
    """Value checks are kept per tensor version: an index edited in place after a good call is checked again."""
    tensors, options = decode_problem("bank")
    with torch.no_grad():
        prefix_attention(*tensors, **options)
        options["prefix_index"][0] = 9
        with pytest.raises(ValueError, match=r"^prefix_index: expected every batch row's entry in \[0, 4\)"):
            prefix_attention(*tensors, **options)


def aten_calls_per_decode_step(model, ids, mask, **kwargs) -> int:
    """ATen calls of the third forward of a 3-token greedy `generate` (a decode step)."""
    counts, forward = [], model.get_base_model().forward

    def counted(*args, **kw):
        with AtenCalls() as aten:
            out = forward(*args, **kw)
        counts.append(len(aten.calls))
        return out

    model.get_base_model().forward = counted
    try:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, **kwargs)
    finally:
        del model.get_base_model().forward
    return counts[2]


def test_mixed_adapter_decode_step_adds_few_aten_calls_per_layer():
    """A decode step of a left-padded batch whose rows read three adapters of different lengths, against the same
    step of the base model (SDPA): the difference per attention layer is bounded."""
    base = tiny_decoder("llama")
    ids = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    base_calls = aten_calls_per_decode_step(_Unwrapped(base), ids, mask)
    model = get_prefix_model(base, PrefixTuningConfig(num_virtual_tokens=3))
    for name, length in (("short", 2), ("long", 7)):
        model._add_adapter(name, PrefixTuningConfig(num_virtual_tokens=length).resolve(model.config))
    ours = aten_calls_per_decode_step(model, ids, mask, adapter_names=["default", "short", "long", "short"])
    layers = base.config.num_hidden_layers
    assert (ours - base_calls) / layers <= 25, f"ours {ours}, base {base_calls} ATen calls per step"


class _Unwrapped:
    """The base model with the two methods `aten_calls_per_decode_step` uses."""

    def __init__(self, model):
        self.model = model

    def get_base_model(self):
        return self.model

    def generate(self, **kwargs):
        return self.model.generate(**kwargs)


def test_sdpa_reference_is_one_call():
    """The reference the bounds are read against: SDPA is one ATen call per decode call."""
    q, k, v = decode_problem("shared")[0][:3]
    with torch.no_grad(), AtenCalls() as aten:
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert len(aten.calls) == 1
