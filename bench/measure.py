"""What every benchmark shares: the device, the size set, timing, peak memory, and recording a result.

`PREFIX_KERNELS_BENCH_SIZE` picks the sizes: `smoke` (tiny, for the harness test), `cpu` or `cuda`; by default
`cuda` when a GPU is present, else `cpu`.

Timing on CUDA has two figures. The end-to-end time of a call is taken over `CALLS` back-to-back calls with a
clock that waits for the GPU only when it is read (before the first call and after the last), so the host path
overlaps the GPU as it does in a real loop and no call pays a synchronisation of its own. The kernel time is the
GPU's own time per call: CUDA events around the replay of a CUDA graph of `CALLS` calls, which removes the host
path entirely, or, for a call that cannot be captured (one that waits for the GPU, like `generate()`), CUDA events
around `CALLS` back-to-back calls.
"""

import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = ("smoke", "cpu", "cuda")
SIZE = os.environ.get("PREFIX_KERNELS_BENCH_SIZE") or DEVICE
if SIZE not in SIZES:
    raise ValueError(f"PREFIX_KERNELS_BENCH_SIZE: expected one of {', '.join(SIZES)}, got {SIZE!r}")
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
ROUNDS = {"smoke": 1, "cpu": 10, "cuda": 10}[SIZE]
WARMUP = {"smoke": 0, "cpu": 2, "cuda": 3}[SIZE]
CALLS = {"smoke": 1, "cpu": 1, "cuda": 10}[SIZE]  # back-to-back calls per timed round


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def synchronized_clock() -> float:
    """`time.perf_counter()` once the GPU has finished everything queued: the end-to-end clock on CUDA."""
    torch.cuda.synchronize()
    return time.perf_counter()


def kernel_seconds(fn, calls: int = CALLS, repeats: int = 10) -> tuple[float, str]:
    """(GPU seconds per call of `fn`, how they were taken: "cuda_graph" or "events"), the median of `repeats`
    timings of `calls` calls. `fn` must have run before (compilation and autotuning are not timed)."""
    graph = torch.cuda.CUDAGraph()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # capture needs a warm-up on a side stream
            fn()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        run, method = graph.replay, "cuda_graph"
    except RuntimeError:  # the call waits for the GPU (or else cannot be captured): time it as it runs
        torch.cuda.synchronize()
        graph = None

        def run():
            for _ in range(calls):
                fn()

        method = "events"
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    return statistics.median(times), method


def interleaved_seconds(calls: dict, rounds: int, warmup: int) -> dict:
    """name -> median seconds per call, every call of `calls` (name -> fn) timed once per round, round-robin.

    A slow drift of the machine's speed (a shared host, its clock) then moves every contender of a round alike, so
    their ratios hold where timings taken one contender after another need not. End to end on CUDA, each call
    waited for."""
    times = {name: [] for name in calls}
    for round_ in range(warmup + rounds):
        for name, fn in calls.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def interleaved(request, calls: dict, rounds: int, warmup: int) -> dict:
    """`interleaved_seconds` of `calls`, or {} when benchmarks are disabled (`--benchmark-disable`)."""
    if request.config.getoption("benchmark_disable"):
        return {}
    return interleaved_seconds(calls, rounds, warmup)


def record_interleaved(benchmark, provider: str, together: dict) -> None:
    """Record `provider`'s median from interleaved rounds (`interleaved_s`) and every provider's over it
    (`interleaved_vs`) in `extra_info`, when the group was timed so (`together`: provider -> seconds)."""
    if together:
        mine = together[provider]
        benchmark.extra_info.update(interleaved_s=mine,
                                    interleaved_vs={other: seconds / mine for other, seconds in together.items()})


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
    """Time `fn` under pytest-benchmark (`warmup` untimed rounds, then `rounds` timed ones of `CALLS` back-to-back
    calls each), then measure its peak memory in one more call, and on CUDA its kernel time (`kernel_seconds`).

    Records `provider`, `baseline` (the provider this group's ratios are taken against), `peak_mb`, and on CUDA
    `call_s` (the end-to-end median per call, pytest-benchmark's own figure), `kernel_s` and `kernel_timing` in
    `extra_info`. Returns the seconds per call the caller's derived figures (TFLOP/s, GB/s, tokens/s) use: the
    kernel time on CUDA, the end-to-end median on CPU; None when benchmarks are disabled
    (`--benchmark-disable`), so nothing was timed.
    """
    benchmark.group = group
    benchmark.extra_info.update(provider=provider, baseline=baseline, size=SIZE)
    if DEVICE == "cuda":
        benchmark._timer = synchronized_clock  # pytest-benchmark reads its clock before and after each round
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=CALLS)
    if benchmark.disabled:
        return None

    def call():
        fn()
        sync()

    benchmark.extra_info["peak_mb"] = peak_memory_mb(call)
    median = benchmark.stats.stats.median
    if DEVICE != "cuda":
        return median
    kernel, method = kernel_seconds(fn)
    benchmark.extra_info.update(call_s=median, kernel_s=kernel, kernel_timing=method)
    return kernel
