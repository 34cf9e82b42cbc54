#!/usr/bin/env bash
# The GPU check, from the repository root, with .venv/bin/python (or $PYTHON, or python) as the interpreter:
#   bash bench/gpu_check.sh
# 1. the GPU tests (`pytest tests -m gpu`: the Triton and CUDA backends on realistic shapes in fp16/bf16, and a
#    decode step under torch.cuda.set_sync_debug_mode("error"), which fails on any host-device synchronisation);
# 2. the op benchmarks at GPU sizes (bench/test_op.py: end-to-end and kernel time, TFLOP/s, K/V GB/s) and the
#    op's host overhead (bench/test_host_overhead.py, its op group: host µs to issue a decode call beside its
#    kernel µs).
# Each phase has a time limit, so the whole check ends within 8 minutes. It writes one JSON,
# bench/results/gpu/gpu_check.json (with the raw logs beside it), and fails when CUDA is absent, when every GPU
# test was skipped, when a test failed or a phase ran out of time, or when the benchmarks failed.
set -uo pipefail
out=bench/results/gpu
default=python
[ -x .venv/bin/python ] && default=.venv/bin/python  # the README's environment, when there is one
python=${PYTHON:-$default}

if ! "$python" -c 'import torch' 2>/dev/null; then
    echo "gpu_check: $python cannot import torch; set PYTHON to the interpreter of the package's environment" >&2
    exit 2
fi
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA device; this check runs only on a GPU" >&2
    exit 2
fi
mkdir -p "$out"
rm -f "$out/gpu_tests.xml" "$out/bench.json"

started=$SECONDS
timeout 300 "$python" -m pytest tests -m gpu -q -p no:cacheprovider --junitxml "$out/gpu_tests.xml" 2>&1 \
    | tee "$out/gpu_tests.log"
tests=${PIPESTATUS[0]}
tests_s=$((SECONDS - started))
started=$SECONDS
PREFIX_KERNELS_BENCH_SIZE=cuda timeout 180 "$python" -m pytest bench/test_op.py bench/test_host_overhead.py \
    -k "not generate_host" -q -p no:cacheprovider \
    --benchmark-json "$out/bench.json" --benchmark-columns=median,min,max 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
bench_s=$((SECONDS - started))

"$python" - "$out" "$tests" "$tests_s" "$bench" "$bench_s" <<'EOF'
"""Summarise the run into gpu_check.json; exit 1 unless the tests ran, passed, and the benchmarks ran."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

out, tests_exit, tests_s, bench_exit, bench_s = Path(sys.argv[1]), *map(int, sys.argv[2:])
tests = {"exit": tests_exit, "seconds": tests_s, "timed_out": tests_exit == 124}
junit = out / "gpu_tests.xml"
if junit.exists():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    tests.update(counts, ran=counts["tests"] - counts["skipped"])
keep = ("provider", "baseline", "call_s", "kernel_s", "kernel_timing", "tflops", "kv_gb_per_s", "peak_mb",
        "host_us", "kernel_us", "speedup_vs")
benchmarks = []
if (out / "bench.json").exists():
    for bench in json.loads((out / "bench.json").read_text())["benchmarks"]:
        info = bench["extra_info"]
        benchmarks.append({"name": bench["name"], "group": bench["group"], **{k: info[k] for k in keep if k in info}})
summary = {
    "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
    "tests": tests, "benchmarks": {"exit": bench_exit, "seconds": bench_s, "timed_out": bench_exit == 124,
                                   "results": benchmarks},
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
problems = []
if tests.get("ran", 0) == 0:
    problems.append("no GPU test ran (all skipped, or none collected)")
if tests_exit != 0:
    problems.append(f"the GPU tests exited {tests_exit}" + (" (out of time)" if tests_exit == 124 else ""))
if bench_exit != 0 or not benchmarks:
    problems.append(f"the benchmarks exited {bench_exit}" + (" (out of time)" if bench_exit == 124 else ""))
print(f"gpu_check: {tests.get('ran', 0)} GPU tests ran in {tests_s} s, {len(benchmarks)} benchmarks in {bench_s} s; "
      f"wrote {out / 'gpu_check.json'}")
for problem in problems:
    print(f"gpu_check: FAILED: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
