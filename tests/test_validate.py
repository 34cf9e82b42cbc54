"""Every documented input error of `prefix_attention`: raised before any work, naming the argument."""

import pytest
import torch

from prefix_kernels import prefix_attention


def inputs(b=2, hq=4, hkv=2, sq=3, skv=5, p=4, d=16):
    return dict(q=torch.randn(b, hq, sq, d), k=torch.randn(b, hkv, skv, d), v=torch.randn(b, hkv, skv, d),
                prefix_k=torch.randn(hkv, p, d), prefix_v=torch.randn(hkv, p, d))


def bank(n):
    return dict(prefix_k=torch.randn(n, 2, 4, 16), prefix_v=torch.randn(n, 2, 4, 16))


CASES = [
    ("q", TypeError, lambda a: a.update(q=[1.0])),
    ("q", ValueError, lambda a: a.update(q=a["q"][0])),
    ("q", TypeError, lambda a: a.update(q=a["q"].int())),
    ("k", ValueError, lambda a: a.update(k=a["k"][:1])),
    ("k", ValueError, lambda a: a.update(k=torch.randn(2, 3, 5, 16), v=torch.randn(2, 3, 5, 16))),
    ("v", ValueError, lambda a: a.update(v=a["v"][:, :, :4])),
    ("k", TypeError, lambda a: a.update(k=a["k"].double())),
    ("prefix_k", ValueError, lambda a: a.update(prefix_k=torch.randn(3, 4, 16), prefix_v=torch.randn(3, 4, 16))),
    ("prefix_v", ValueError, lambda a: a.update(prefix_v=torch.randn(2, 5, 16))),
    ("prefix_k", ValueError, lambda a: a.update(prefix_k=torch.randn(3, 2, 4, 16), prefix_v=torch.randn(3, 2, 4, 16))),
    ("prefix_k", ValueError, lambda a: a.update(prefix_k=torch.randn(16), prefix_v=torch.randn(16))),
    ("prefix_k", TypeError, lambda a: a.update(prefix_k=a["prefix_k"].half(), prefix_v=a["prefix_v"].half())),
    ("prefix_index", ValueError, lambda a: a.update(prefix_index=torch.tensor([0, 1]))),
    ("prefix_index", ValueError, lambda a: a.update(**bank(3),
                                                    prefix_index=torch.tensor([0, 1], dtype=torch.int32))),
    ("prefix_index", ValueError, lambda a: a.update(**bank(3),
                                                    prefix_index=torch.tensor([0, 3]))),
    ("prefix_index", ValueError, lambda a: a.update(**bank(3),
                                                    prefix_index=torch.tensor([0, 1, 2]))),
    ("prefix_lengths", ValueError, lambda a: a.update(prefix_lengths=torch.tensor([1, 2]))),
    ("prefix_lengths", ValueError, lambda a: a.update(**bank(2),
                                                      prefix_lengths=torch.tensor([1, 5]))),
    ("prefix_lengths", ValueError, lambda a: a.update(**bank(2),
                                                      prefix_lengths=torch.tensor([1]))),
    ("attention_mask", ValueError, lambda a: a.update(attention_mask=torch.ones(2, 4))),
    ("attention_mask", TypeError, lambda a: a.update(attention_mask=torch.zeros(2, 1, 3, 5))),
    ("attention_mask", ValueError, lambda a: a.update(attention_mask=torch.ones(2, 3, 3, 5, dtype=torch.bool))),
    ("attention_mask", ValueError, lambda a: a.update(attention_mask=torch.ones(2, 3, 5, dtype=torch.bool))),
    ("scale", ValueError, lambda a: a.update(scale=-1.0)),
    ("scale", ValueError, lambda a: a.update(scale=float("inf"))),
    ("scale", ValueError, lambda a: a.update(scale=float("nan"))),
    ("scale", ValueError, lambda a: a.update(scale=2.0**70)),
    ("softcap", ValueError, lambda a: a.update(softcap=float("inf"))),
    ("softcap", ValueError, lambda a: a.update(softcap=0.0)),
    ("causal", TypeError, lambda a: a.update(causal="yes")),
    ("window", ValueError, lambda a: a.update(window=0)),
    ("window", ValueError, lambda a: a.update(window=3, causal=False)),
    ("window", ValueError, lambda a: a.update(window=3, backend="triton")),
    ("backend", ValueError, lambda a: a.update(backend="cudnn")),
]


@pytest.mark.parametrize("argument, error, corrupt", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_names_the_argument(argument, error, corrupt):
    args = inputs()
    corrupt(args)
    q, k, v, pk, pv = (args.pop(n) for n in ("q", "k", "v", "prefix_k", "prefix_v"))
    with pytest.raises(error, match=rf"^{argument}\b"):
        prefix_attention(q, k, v, pk, pv, **args)


def test_env_var_backend_is_checked(monkeypatch):
    monkeypatch.setenv("PREFIX_KERNELS_BACKEND", "nope")
    a = inputs()
    with pytest.raises(ValueError, match="PREFIX_KERNELS_BACKEND"):
        prefix_attention(a["q"], a["k"], a["v"], a["prefix_k"], a["prefix_v"])


def test_env_var_selects_torch(monkeypatch):
    monkeypatch.setenv("PREFIX_KERNELS_BACKEND", "torch")
    a = inputs()
    assert prefix_attention(a["q"], a["k"], a["v"], a["prefix_k"], a["prefix_v"]).shape == a["q"].shape


def test_unrunnable_backend_is_a_clear_error():
    a = inputs()
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run here"):
        prefix_attention(a["q"], a["k"], a["v"], a["prefix_k"], a["prefix_v"], backend="cuda")


def test_failed_call_leaves_inputs_unchanged():
    a = inputs()
    before = {n: t.clone() for n, t in a.items()}
    with pytest.raises(ValueError):
        prefix_attention(a["q"], a["k"], a["v"], a["prefix_k"], a["prefix_v"], attention_mask=torch.ones(2, 9))
    for n, t in a.items():
        assert torch.equal(t, before[n])


def test_automatic_dispatch():
    from prefix_kernels.ops.dispatch import select_backend

    assert select_backend(None, torch.device("cpu"), 64, torch.float32) == "torch"
    assert select_backend(None, torch.device("cuda"), 64, torch.bfloat16) == "triton"
    assert select_backend(None, torch.device("cuda"), 12, torch.float16) == "torch"  # a head dim triton can't take
    assert select_backend(None, torch.device("cuda"), 64, torch.float64) == "torch"  # triton computes in fp32


def test_triton_refuses_float64():
    a = {name: t.double() for name, t in inputs().items()}
    with pytest.raises(ValueError, match=r"^q: backend 'triton' computes in float32 at most, got float64"):
        prefix_attention(a["q"], a["k"], a["v"], a["prefix_k"], a["prefix_v"], backend="triton")


def test_triton_without_cuda_or_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a = inputs()
    with pytest.raises(RuntimeError, match=r"^backend='triton' cannot run here: triton needs CUDA tensors \(got cpu\)"):
        prefix_attention(a["q"], a["k"], a["v"], a["prefix_k"], a["prefix_v"], backend="triton")
