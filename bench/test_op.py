"""Op-level benchmarks: prefix_attention against the materialised path and SDPA on pre-concatenated K/V.

    pytest bench/test_op.py --benchmark-json bench/results/op.json

Derived figures in `extra_info`: `tflops` (FlashAttention's FLOP count), `kv_gb_per_s` for decode (the sequence
K/V and the prefix read once each: effective bandwidth, whatever extra copies a provider makes), `peak_mb`
(`measure.peak_memory_mb`).
"""

import pytest
import torch
from measure import DEVICE, DTYPE, SIZE, measure
from providers import attention_call, make_inputs, op_providers

from prefix_kernels import prefix_attention

# (B, Hq, Hkv, Sq, Skv, P, D), causal
PREFILL = {
    "smoke": (2, 4, 2, 16, 16, 4, 16),
    "cpu": (4, 16, 4, 512, 512, 64, 64),
    "cuda": (8, 32, 8, 2048, 2048, 64, 128),
}[SIZE]
# One new token per row against a K/V cache of length T: (B, Hq, Hkv, P, D), and the cache lengths swept.
DECODE, CACHE_LENGTHS = {
    "smoke": ((2, 4, 2, 4, 16), (32, 64)),
    "cpu": ((16, 16, 4, 64, 64), (512, 1024, 2048, 4096)),
    "cuda": ((16, 32, 8, 64, 128), (2048, 4096, 8192, 16384)),
}[SIZE]
BASELINE = "materialised"


def attention_flops(b, hq, sq, skv, p, d, causal=True):
    """FlashAttention's convention: 4 * B * Hq * Sq * keys * D, keys halved over the causal part when Sq = Skv."""
    seq_keys = skv / 2 if causal and sq == skv else skv
    return 4 * b * hq * sq * (seq_keys + p) * d


def describe(b, hq, hkv, sq, skv, p, d):
    return f"B={b} Hq={hq} Hkv={hkv} Sq={sq} Skv={skv} P={p} D={d}"


def run(benchmark, provider, shape, mode):
    backward = mode == "fwd+bwd"
    median = measure(benchmark, attention_call(provider, shape, backward, DTYPE, DEVICE),
                     group=f"op {mode} {describe(*shape)}", provider=provider, baseline=BASELINE)
    if median is None:
        return
    b, hq, hkv, sq, skv, p, d = shape
    benchmark.extra_info["tflops"] = attention_flops(b, hq, sq, skv, p, d) * (3.5 if backward else 1.0) / median / 1e12
    if mode == "decode":
        kv_bytes = (2 * b * hkv * skv * d + 2 * hkv * p * d) * DTYPE.itemsize
        benchmark.extra_info["kv_gb_per_s"] = kv_bytes / median / 1e9
        benchmark.extra_info.update(sweep=f"decode step, K/V cache length T (B={b} Hq={hq} Hkv={hkv} P={p} D={d})",
                                    x=skv)


@pytest.mark.parametrize("provider", op_providers(DEVICE, PREFILL[-1], decode=False))
def test_prefill_forward(benchmark, provider):
    run(benchmark, provider, PREFILL, "fwd")


@pytest.mark.parametrize("provider", op_providers(DEVICE, PREFILL[-1], decode=False))
def test_prefill_forward_backward(benchmark, provider):
    run(benchmark, provider, PREFILL, "fwd+bwd")


@pytest.mark.parametrize("provider", op_providers(DEVICE, DECODE[-1], decode=True))
@pytest.mark.parametrize("cache_length", CACHE_LENGTHS)
def test_decode(benchmark, cache_length, provider):
    b, hq, hkv, p, d = DECODE
    run(benchmark, provider, (b, hq, hkv, 1, cache_length, p, d), "decode")


@pytest.mark.parametrize("adapters", [1, 16])
def test_decode_adapter_bank(benchmark, adapters):
    """A decode step where the batch mixes `adapters` prefixes from one bank (read by index in the kernel),
    against the same step with one shared prefix: serving many adapters should cost about the same."""
    b, hq, hkv, p, d = DECODE
    skv = CACHE_LENGTHS[-2]
    q, k, v, _, _ = make_inputs(b, hq, hkv, 1, skv, p, d, DTYPE, DEVICE)
    bank_k = torch.randn(adapters, hkv, p, d, dtype=DTYPE, device=DEVICE)
    bank_v = torch.randn_like(bank_k)
    index = torch.arange(b, device=DEVICE) % adapters
    median = measure(benchmark, torch.no_grad()(lambda: prefix_attention(q, k, v, bank_k, bank_v, prefix_index=index)),
                     group=f"op decode adapter bank {describe(b, hq, hkv, 1, skv, p, d)}",
                     provider=f"{adapters} adapter{'s' if adapters > 1 else ''}", baseline="1 adapter")
    if median is not None:
        benchmark.extra_info["kv_gb_per_s"] = (2 * b * hkv * skv * d + 2 * adapters * hkv * p * d) * DTYPE.itemsize \
            / median / 1e9
