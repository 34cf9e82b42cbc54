"""Op-level benchmarks: prefix_attention against the materialised path and SDPA on pre-concatenated K/V.

    pytest bench --benchmark-json bench/results/op.json
"""

import pytest
import torch
from conftest import DEVICE, sync
from providers import make_inputs, materialised, ours, preconcatenated, sdpa_preconcat

# (B, Hq, Hkv, Sq, Skv, P, D)
CASES = {
    "cpu": {"decode": (16, 16, 4, 1, 2048, 64, 64), "prefill": (4, 16, 4, 512, 512, 64, 64)},
    "cuda": {"decode": (16, 32, 8, 1, 8192, 64, 128), "prefill": (8, 32, 8, 2048, 2048, 64, 128)},
}[DEVICE]
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16
PROVIDERS = ["prefix_kernels", "materialised", "sdpa_preconcat"]


def attention_flops(b, hq, sq, skv, p, d, causal=True):
    """FlashAttention's convention: 4 * B * Hq * Sq * keys * D, keys halved over the causal part when Sq = Skv."""
    seq_keys = skv / 2 if causal and sq == skv else skv
    return 4 * b * hq * sq * (seq_keys + p) * d


def run(benchmark, case, provider, backward):
    b, hq, hkv, sq, skv, p, d = CASES[case]
    q, k, v, pk, pv = make_inputs(b, hq, hkv, sq, skv, p, d, DTYPE, DEVICE, requires_grad=backward)
    if provider == "sdpa_preconcat":
        keys, values = preconcatenated(q, k, v, pk, pv)
        fn = lambda: sdpa_preconcat(q, keys, values, p)  # noqa: E731
    elif provider == "materialised":
        fn = lambda: materialised(q, k, v, pk, pv)  # noqa: E731
    else:
        fn = lambda: ours(q, k, v, pk, pv)  # noqa: E731
    grad = torch.randn_like(q)

    def step():
        if backward:
            fn().backward(grad)
        else:
            with torch.no_grad():
                fn()
        sync()

    benchmark.group = f"{'fwd+bwd' if backward else 'fwd'} {case} {DEVICE} {CASES[case]}"
    benchmark.extra_info["provider"] = provider
    benchmark.pedantic(step, rounds=10 if DEVICE == "cpu" else 50, warmup_rounds=2)
    flops = attention_flops(b, hq, sq, skv, p, d) * (3.5 if backward else 1.0)
    benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.median / 1e12
    if sq == 1:
        kv_bytes = (2 * b * hkv * skv * d + 2 * hkv * p * d) * q.element_size()
        benchmark.extra_info["kv_gb_per_s"] = kv_bytes / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", ["decode", "prefill"])
def test_forward(benchmark, case, provider):
    run(benchmark, case, provider, backward=False)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_forward_backward(benchmark, provider):
    run(benchmark, "prefill", provider, backward=True)
