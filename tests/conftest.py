import os

import pytest
import torch

# The Triton kernels run on CPU through Triton's interpreter, which is chosen when a kernel is defined:
# set it before anything imports the kernel module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
