"""The README's benchmark command at smoke sizes, on a copy of the tree as a fresh clone has it (no bench/results/),
so neither the benchmark harness nor the command can rot unnoticed."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark", reason="pytest bench needs the bench extra (pytest-benchmark)")

ROOT = Path(__file__).resolve().parents[1]
SUITES = {"test_prefill_forward", "test_prefill_forward_backward", "test_decode",  # bench/test_op.py
          "test_decode_adapter_bank",
          "test_prefill", "test_generate",  # bench/test_model.py
          "test_train_step", "test_train_throughput",  # bench/test_training.py
          "test_decode_busy_machine",  # bench/test_op_busy.py
          "test_op_host_overhead", "test_generate_host_overhead",  # bench/test_host_overhead.py
          "test_serving", "test_serving_vllm_workload"}  # bench/test_serving.py
PUBLISHED = ("bench/cpu_results.md", "bench/cpu_results.png")  # tracked: rendered only when named


def readme_command(marker: str) -> list[str]:
    """The README's command line containing `marker`, with its interpreter replaced by this one."""
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if marker in line]
    assert len(lines) == 1, f"README.md: expected one command line with {marker!r}, found {len(lines)}"
    interpreter, *arguments = shlex.split(lines[0], comments=True)
    assert interpreter.endswith("python"), f"README.md: expected a python command line, got {lines[0]!r}"
    return [sys.executable, *arguments]


def fresh_clone(destination: Path) -> Path:
    """The tree's sources copied to `destination`, without what a fresh clone lacks (results, caches, venvs)."""
    ignored = shutil.ignore_patterns(".git", ".venv*", "__pycache__", ".pytest_cache", ".benchmarks", ".hypothesis",
                                     "*.egg-info", "build", "dist", "results")
    shutil.copytree(ROOT, destination, ignore=ignored)
    assert not (destination / "bench" / "results").exists()
    return destination


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    return fresh_clone(tmp_path_factory.mktemp("clone") / "prefix_kernels")


@pytest.fixture(scope="module")
def bench_run(clone):
    """(the finished README command, the path of its JSON results) at smoke sizes, run in `clone`."""
    command = readme_command("-m pytest bench")
    results = clone / command[command.index("--benchmark-json") + 1]
    env = dict(os.environ, PREFIX_KERNELS_BENCH_SIZE="smoke",
               PYTHONPATH=os.pathsep.join(filter(None, [str(clone), os.environ.get("PYTHONPATH")])))
    return subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True, timeout=240), results


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
        assert info.get("reference") is None or info["reference"] in info["speedup_vs"], bench["name"]


def test_render_writes_next_to_the_results(bench_run, clone):
    pytest.importorskip("matplotlib", reason="bench/render.py needs the bench extra (matplotlib)")
    _, results = bench_run
    subprocess.run([sys.executable, "bench/render.py", str(results.relative_to(clone))], cwd=clone, check=True,
                   timeout=120)
    table = results.with_suffix(".md").read_text()
    for row in ("| materialised |", "| peft_cache |", "| 16 adapters |", "| prefix_kernels packed |",
                "| no_prefix packed |", "| prefix_kernels:torch busy |", "| prefix_bank |",
                "| prefix_kernels continuous |"):
        assert row in table, row
    assert results.with_suffix(".png").stat().st_size > 0
    for published in PUBLISHED:
        assert (clone / published).read_bytes() == (ROOT / published).read_bytes(), f"{published} was rewritten"
