"""DistributedDataParallel over 2 CPU processes (gloo) trains the prefix exactly as one process on the whole batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from ddp_train import initial_model, train
from safetensors.torch import load_file

TESTS = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(script: str, directory, timeout: int) -> None:
    """Run `tests/<script> <directory>` on 2 gloo ranks (torchrun, CPU, one thread each); fail with its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(TESTS / script), str(directory)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


def test_ddp_on_two_ranks_equals_one_process(tmp_path):
    run_two_ranks("ddp_train.py", tmp_path, timeout=120)
    ddp = load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"]

    single = train(rank=0, world_size=1).prefix_encoders["default"].flat_table().detach()
    torch.testing.assert_close(ddp, single, atol=1e-6, rtol=0)
    initial = initial_model().prefix_encoders["default"].flat_table().detach()
    assert (ddp - initial).abs().max() > 1e-3  # training moved the prefix
