"""The compile gate: every Triton kernel of backend "triton" compiles ahead of time for A100 (sm_80) and H100/H200
(sm_90), and every config the autotuner may pick fits the GPU's shared memory, spills no register in fp16/bf16
up to head dim 128, and at least one config fits for every head dim. See tests/compile_gate.py.

The table of registers, spills and shared memory is printed (`pytest -s tests/test_compile_gate.py`), and written
as JSON where `PREFIX_KERNELS_COMPILE_TABLE` points.
"""

import importlib.util
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
ROOT = Path(__file__).resolve().parents[1]
SPILL_FREE_UP_TO = 128
HALF = ("float16", "bfloat16")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Every row of the gate, compiled in a subprocess: the kernels must be defined without the interpreter."""
    path = Path(os.environ.get("PREFIX_KERNELS_COMPILE_TABLE") or tmp_path_factory.mktemp("gate") / "gate.json")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "compile_gate.py"), "--json", str(path)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-4000:]
    print(run.stdout)
    return json.loads(path.read_text())


def _describe(row) -> str:
    return f"{row['kernel']} {row['variant']} {row['arch']} {row['dtype']} D={row['D']} {row['config']}"


def test_every_kernel_compiles(rows):
    errors = [f"{_describe(r)}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "\n".join(errors)
    assert {r["kernel"] for r in rows} == {"forward", "preprocess", "dkdv", "dq", "split", "combine"}


def test_configs_the_autotuner_may_pick_fit_shared_memory(rows):
    over = [f"{_describe(r)}: {r['shared_kb']} KB" for r in rows if r["tuned"] and not r["fits"]]
    assert not over, "\n".join(over)


def test_no_register_spills_in_half_precision_up_to_head_dim_128(rows):
    spills = [f"{_describe(r)}: {r['spill_stores']} B stored, {r['spill_loads']} B loaded" for r in rows
              if r["tuned"] and r["dtype"] in HALF and r["D"] <= SPILL_FREE_UP_TO
              and r["spill_stores"] + r["spill_loads"]]
    assert not spills, "\n".join(spills)


def test_every_head_dim_has_a_fitting_config(rows):
    fitting = defaultdict(int)
    for r in rows:
        fitting[r["kernel"], r["variant"], r["arch"], r["dtype"], r["D"]] += r["tuned"] and r["fits"]
    missing = [" ".join(map(str, key)) for key, count in fitting.items() if not count]
    assert not missing, "\n".join(missing)


def test_decode_keeps_eight_warps_resident_at_head_dim_128(rows):
    decode = [r for r in rows if r["kernel"] == "split" and r["D"] == 128 and r["dtype"] in HALF
              and r["variant"] == "decode G*Sq=4"]
    assert {r["arch"] for r in decode} == {"sm_80", "sm_90"}
    assert all(r["resident_warps"] >= 8 for r in decode), [(_describe(r), r["resident_warps"]) for r in decode]
