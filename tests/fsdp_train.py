"""Three SGD steps on a tiny Llama's prefix with FSDP2, over ddp_train's global batch.

Run under `torchrun --nproc_per_node=N fsdp_train.py OUT_DIR`: every decoder layer of the base model and then the
root (the `PrefixModel`) are sharded with `fully_shard` (gloo, CPU), each rank trains on its 1/N slice of the batch,
and rank 0 writes to OUT_DIR:
- `adapter/`: the trained adapter in PEFT's format, gathered from the shards;
- `record.safetensors`: every step's loss (averaged over the ranks) and prefix gradient (gathered), the sharded
  model's logits on `probe()` and those of the adapter reloaded from `adapter/`;
- `refusal.txt`: what `save_pretrained` says when asked to save the shards as they are.
`train(rank=0, world_size=1)` is the same run in one process on the whole batch, without sharding.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from ddp_train import GLOBAL_BATCH, STEPS, global_batch
from safetensors.torch import save_file
from tiny_models import VOCAB, tiny_decoder
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from prefix_kernels import PrefixModel, PrefixTuningConfig, get_prefix_model


def probe() -> torch.Tensor:
    """Token ids `[2, 9]` to compare logits on."""
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))


def initial_model() -> PrefixModel:
    """A causal LM's adapter (PEFT loads one saved without a task type as a bare `PeftModel`, which drops the
    prefix)."""
    torch.manual_seed(0)
    return get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))


def shard(model: PrefixModel) -> None:
    """One FSDP group per decoder layer, then the root's: the embeddings, the head and the prefix encoder."""
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)


def train(rank: int, world_size: int) -> tuple[PrefixModel, torch.Tensor, torch.Tensor]:
    """(the trained model, the loss of every step `[STEPS]`, the prefix gradient of every step `[STEPS, P, L*2*C]`)."""
    model = initial_model()
    model.train()
    if world_size > 1:
        shard(model)
    weight = model.prefix_encoders["default"].embedding.weight  # after sharding: a DTensor parameter
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    ids, mask, labels = (t[rows] for t in global_batch())
    losses, grads = [], []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(weight.grad.full_tensor() if isinstance(weight.grad, DTensor) else weight.grad.clone())
        optimizer.step()
    losses = torch.stack(losses)
    if world_size > 1:
        dist.all_reduce(losses)  # each rank's loss is its half's mean; both halves hold as many label tokens
        losses /= world_size
    return model, losses, torch.stack(grads)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    out = Path(sys.argv[1])
    model, losses, grads = train(dist.get_rank(), dist.get_world_size())
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe()).logits  # on every rank: the forward gathers the shards
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        try:
            model.save_pretrained(out / "refused")
        except ValueError as e:
            (out / "refusal.txt").write_text(str(e))
        model.save_pretrained(out / "adapter", state_dict=state)
        reloaded = PrefixModel.from_pretrained(tiny_decoder("llama"), out / "adapter")
        with torch.no_grad():
            reloaded_logits = reloaded(input_ids=probe()).logits
        save_file({"losses": losses, "grads": grads, "logits": logits, "reloaded_logits": reloaded_logits},
                  out / "record.safetensors")
    dist.destroy_process_group()
