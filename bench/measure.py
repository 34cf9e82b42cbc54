"""What every benchmark shares: the device, the size set, peak memory, and recording a result.

`PREFIX_KERNELS_BENCH_SIZE` picks the sizes: `smoke` (tiny, for the harness test), `cpu` or `cuda`; by default
`cuda` when a GPU is present, else `cpu`.
"""

import os

import torch
from torch.profiler import ProfilerActivity, profile

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = ("smoke", "cpu", "cuda")
SIZE = os.environ.get("PREFIX_KERNELS_BENCH_SIZE") or DEVICE
if SIZE not in SIZES:
    raise ValueError(f"PREFIX_KERNELS_BENCH_SIZE: expected one of {', '.join(SIZES)}, got {SIZE!r}")
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
ROUNDS = {"smoke": 1, "cpu": 10, "cuda": 30}[SIZE]
WARMUP = {"smoke": 0, "cpu": 2, "cuda": 5}[SIZE]


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(fn) -> float:
    """MB: the most memory PyTorch held at once during one call of `fn`, above what it held when the call began.

    Whatever exists before the call (weights, inputs, K/V built beforehand) is not counted; everything the call
    allocates is (outputs, per-row prefix copies, concatenated K/V, masks, saved activations, gradients, the KV
    cache a `generate()` builds and grows). On CUDA: `torch.cuda.max_memory_allocated` after a reset. On CPU, where
    PyTorch keeps no such counter: the allocation and free events of PyTorch's CPU allocator as recorded by
    `torch.profiler` (`profile_memory=True`), summed in time order; memory that libraries allocate past
    PyTorch's allocator (oneDNN or MKL scratch space) is not seen.
    """
    if DEVICE == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        sync()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak / 2**20


def measure(benchmark, fn, *, group: str, provider: str, baseline: str, rounds: int = ROUNDS,
            warmup: int = WARMUP) -> float | None:
    """Time `fn` (synchronised; `warmup` untimed calls, then `rounds` timed ones) under pytest-benchmark, then
    measure its peak memory in one more call.

    Records `provider`, `baseline` (the provider this group's ratios are taken against) and `peak_mb` in
    `extra_info`; returns the median in seconds for the caller's derived figures (None when benchmarks are
    disabled, `--benchmark-disable`, so nothing was timed).
    """

    def call():
        fn()
        sync()

    benchmark.group = group
    benchmark.extra_info.update(provider=provider, baseline=baseline, size=SIZE)
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup)
    if benchmark.disabled:
        return None
    benchmark.extra_info["peak_mb"] = peak_memory_mb(call)
    return benchmark.stats.stats.median
