"""A decode step on a machine whose cores are shared with other work: `prefix_attention` against the materialised
path and SDPA on pre-built K/V, idle and while one CPU-bound competitor process spins (started and stopped here).

    pytest bench/test_op_busy.py --benchmark-json bench/results/busy.json

Both conditions are one group, so every ratio comes from one run: in the JSON each benchmark's `speedup_vs` holds
its speed against every provider under both conditions, its `baseline` is the materialised path under the same
condition, and under load its `reference` is its own idle time. `extra_info` also holds `condition` and
`kv_gb_per_s` (the sequence K/V and the prefix read once, over the time).
"""

import subprocess
import sys

import pytest
from measure import DEVICE, DTYPE, SIZE, measure
from providers import attention_call, op_providers

# One new token per row against a K/V cache of length T: (B, Hq, Hkv, T, P, D).
SHAPE = {"smoke": (2, 4, 2, 32, 4, 16), "cpu": (16, 16, 4, 2048, 64, 64), "cuda": (16, 32, 8, 4096, 64, 128)}[SIZE]
ROUNDS, WARMUP = {"smoke": (1, 0), "cpu": (20, 3), "cuda": (30, 5)}[SIZE]
# A CPU-bound Python loop that stops by itself once its parent (this benchmark process) is gone.
SPIN = """
import os
parent = os.getppid()
print("spinning", flush=True)
while os.getppid() == parent:
    for _ in range(100_000):
        pass
"""


@pytest.fixture(scope="module", params=["idle", "busy"])
def competitor(request):
    """None when idle; busy: one running competitor process, for every benchmark of that condition, always
    stopped afterwards."""
    if request.param == "idle":
        yield None
        return
    process = subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "spinning\n", "the competitor process did not start"
        yield process
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("provider", op_providers(DEVICE, SHAPE[-1], decode=True))
def test_decode_busy_machine(benchmark, competitor, provider):
    """Targets on 2 CPU cores: ours at least 10x the materialised path idle; with one busy competitor at least 5x,
    and within 2x of its own idle time."""
    b, hq, hkv, t, p, d = SHAPE
    condition = "idle" if competitor is None else "busy"
    call = attention_call(provider, (b, hq, hkv, 1, t, p, d), False, DTYPE, DEVICE)
    median = measure(benchmark, call, provider=f"{provider} {condition}", baseline=f"materialised {condition}",
                     group=f"op decode, idle and with 1 busy process, B={b} Hq={hq} Hkv={hkv} T={t} P={p} D={d}",
                     rounds=ROUNDS, warmup=WARMUP)
    if competitor is not None:
        assert competitor.poll() is None, "the competitor process stopped during the measurement"
        benchmark.extra_info["reference"] = f"{provider} idle"
    benchmark.extra_info["condition"] = condition
    if median is not None:
        benchmark.extra_info["kv_gb_per_s"] = (2 * b * hkv * t * d + 2 * hkv * p * d) * DTYPE.itemsize / median / 1e9
