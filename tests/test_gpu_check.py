"""bench/gpu_check.sh refuses to pass on a machine without a GPU (it would otherwise skip every GPU test)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure without a GPU")
def test_gpu_check_fails_without_cuda():
    env = dict(os.environ, PYTHON=sys.executable)
    run = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode != 0
    assert "torch sees no CUDA device" in run.stderr
