"""Three SGD steps on a tiny Llama's prefix over a fixed global batch of 4 rows.

Run under `torchrun --nproc_per_node=N ddp_train.py OUT_DIR`, each rank trains on its 1/N slice of the batch with
DistributedDataParallel (gloo, CPU) and rank 0 saves the adapter to OUT_DIR. `train(rank=0, world_size=1)` is the
same run in one process on the whole batch.
"""

import sys

import torch
import torch.distributed as dist
from tiny_models import VOCAB, tiny_decoder
from torch.nn.parallel import DistributedDataParallel

from prefix_kernels import PrefixModel, PrefixTuningConfig, get_prefix_model

STEPS = 3
GLOBAL_BATCH = 4


def global_batch():
    """(input_ids, attention_mask, labels) `[4, 10]`. Rows 1 and 3 end in the same padding, so every half of the
    batch holds as many label tokens: the mean of the halves' mean losses is the whole batch's mean loss."""
    ids = torch.randint(3, VOCAB, (GLOBAL_BATCH, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = mask[3, 7:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def initial_model() -> PrefixModel:
    torch.manual_seed(0)
    return get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(num_virtual_tokens=4))


def train(rank: int, world_size: int) -> PrefixModel:
    model = initial_model()
    model.train()
    step_model = DistributedDataParallel(model) if world_size > 1 else model
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    ids, mask, labels = (t[rows] for t in global_batch())
    for _ in range(STEPS):
        optimizer.zero_grad()
        step_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
    return model


if __name__ == "__main__":
    dist.init_process_group("gloo")
    trained = train(dist.get_rank(), dist.get_world_size())
    if dist.get_rank() == 0:
        trained.save_pretrained(sys.argv[1])
    dist.destroy_process_group()
