"""FSDP2 (`fully_shard` over the decoder layers and the root) on 2 CPU processes (gloo) trains the prefix as one
process does on the whole batch, and rank 0 checkpoints the adapter, gathered from the shards, in PEFT's format.

The prefix encoder is sharded with the root's group, like any trainable parameter: FSDP gathers it at each forward
(one collective with the root's embeddings and head), averages its gradient across ranks and keeps 1/N of it and of
its optimizer state per rank. Replicating it instead would need its own gradient all-reduce outside FSDP.
"""

import peft
import torch
from fsdp_train import probe, train
from safetensors.torch import load_file
from test_distributed import run_two_ranks
from tiny_models import tiny_decoder

from prefix_kernels import PrefixModel, PrefixTuningConfig, get_prefix_model


def test_fsdp2_on_two_ranks_equals_one_process(tmp_path):
    run_two_ranks("fsdp_train.py", tmp_path, timeout=180)
    record = load_file(tmp_path / "record.safetensors")

    single, losses, grads = train(rank=0, world_size=1)
    torch.testing.assert_close(record["losses"], losses, atol=1e-5, rtol=0)
    torch.testing.assert_close(record["grads"], grads, atol=1e-5, rtol=0)
    assert grads.abs().max() > 1e-3
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")["prompt_embeddings"]
    torch.testing.assert_close(saved, single.prefix_encoders["default"].flat_table().detach(), atol=1e-5, rtol=0)

    assert torch.equal(record["reloaded_logits"], record["logits"])  # in the worker: the same threads, bit for bit
    single.eval()
    ours = PrefixModel.from_pretrained(tiny_decoder("llama"), tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(tiny_decoder("llama"), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=probe()).logits, single(input_ids=probe()).logits,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs(input_ids=probe()).logits, record["logits"], atol=2e-5, rtol=1e-4)

    refusal = (tmp_path / "refusal.txt").read_text()
    assert refusal.startswith("state_dict: the adapter's parameters are sharded (DTensors, as under FSDP2)")
    assert not (tmp_path / "refused").exists()  # refused before anything was written


def test_save_pretrained_takes_a_state_dict(tmp_path):
    """The adapter saved from a full state dict is the one its parameters give, projected through the MLP."""
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True)
    torch.manual_seed(0)
    trained = get_prefix_model(tiny_decoder("llama"), config)
    other = get_prefix_model(tiny_decoder("llama"), config)
    trained.save_pretrained(tmp_path / "live")
    rng = torch.get_rng_state()
    other.save_pretrained(tmp_path / "given", state_dict={k: v.clone() for k, v in trained.state_dict().items()})
    assert torch.equal(torch.get_rng_state(), rng)
    live, given = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("live", "given"))
    assert torch.equal(given["prompt_embeddings"], live["prompt_embeddings"])
    assert not torch.equal(given["prompt_embeddings"], other.prefix_encoders["default"].flat_table())
