#!/usr/bin/env bash
# The GPU check: the GPU tests, then the op and model benchmarks at GPU sizes. Results land in bench/results/gpu/.
#   bash bench/gpu_check.sh            (from the repository root, with the package importable)
set -uo pipefail
out=bench/results/gpu
mkdir -p "$out"
python -m pytest tests -m gpu -q -p no:cacheprovider --junitxml "$out/gpu_tests.xml" 2>&1 | tee "$out/gpu_tests.log"
tests=${PIPESTATUS[0]}
python -m pytest bench -q -p no:cacheprovider --benchmark-json "$out/bench.json" \
    --benchmark-columns=median,min,max 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
echo "gpu tests exit $tests, benchmarks exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
