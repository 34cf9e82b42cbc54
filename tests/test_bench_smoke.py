"""`pytest bench` at its smoke sizes, in a subprocess, so the benchmark harness cannot rot unnoticed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark", reason="pytest bench needs the bench extra (pytest-benchmark)")

ROOT = Path(__file__).resolve().parents[1]
SUITES = {"test_prefill_forward", "test_prefill_forward_backward", "test_decode",  # bench/test_op.py
          "test_decode_adapter_bank",
          "test_train_step", "test_prefill", "test_generate"}  # bench/test_model.py


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """(the finished `pytest bench` process, the path of its JSON results)."""
    results = tmp_path_factory.mktemp("bench") / "smoke.json"
    env = dict(os.environ, PREFIX_KERNELS_BENCH_SIZE="smoke",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", f"--benchmark-json={results}"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240), results


def test_bench_runs_every_suite(bench_run):
    process, results = bench_run
    output = process.stdout[-4000:] + process.stderr[-2000:]
    assert process.returncode == 0, f"pytest bench exited {process.returncode}:\n{output}"
    benchmarks = json.loads(results.read_text())["benchmarks"]
    assert {bench["name"].split("[")[0] for bench in benchmarks} == SUITES
    for bench in benchmarks:
        info = bench["extra_info"]
        assert info["peak_mb"] >= 0, bench["name"]
        assert info["provider"] == info["baseline"] or info["baseline"] in info["speedup_vs"], bench["name"]


def test_render_writes_table_and_plot(bench_run, tmp_path):
    pytest.importorskip("matplotlib", reason="bench/render.py needs the bench extra (matplotlib)")
    _, results = bench_run
    table, plot = tmp_path / "results.md", tmp_path / "results.png"
    subprocess.run([sys.executable, "bench/render.py", str(results), "--markdown", str(table), "--plot", str(plot)],
                   cwd=ROOT, check=True, timeout=120)
    assert "| materialised |" in table.read_text() and "| peft_cache |" in table.read_text()
    assert plot.stat().st_size > 0
