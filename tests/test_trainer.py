"""transformers' `Trainer` trains a `PrefixModel` as it is, and the adapter it leaves reloads exactly."""

import inspect

import torch
from tiny_models import VOCAB, tiny_decoder
from transformers import Trainer, TrainingArguments

from prefix_kernels import PrefixModel, PrefixTuningConfig, get_prefix_model


def rows(n=8, length=12):
    """An in-memory dataset: a list of dicts, the columns a causal LM takes."""
    generator = torch.Generator().manual_seed(1)
    data = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (length,), generator=generator)
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return data


def test_forward_shows_the_base_model_arguments():
    """Trainer keeps only the dataset columns named in forward's signature."""
    model = get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(num_virtual_tokens=4))
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "adapter_names"} <= set(params)
    assert list(params)[:2] == ["input_ids", "attention_mask"]


def test_trainer_trains_the_prefix_and_the_adapter_reloads(tmp_path):
    torch.manual_seed(0)
    model = get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(num_virtual_tokens=4))
    before = model.get_prefix().detach().clone()
    args = TrainingArguments(output_dir=tmp_path / "out", per_device_train_batch_size=8, max_steps=4,
                             learning_rate=0.1, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert not torch.equal(model.get_prefix(), before)
    assert all(p.grad is None for p in model.get_base_model().parameters())  # the base stayed frozen

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PrefixModel.from_pretrained(tiny_decoder("llama"), tmp_path / "adapter")
    ids = torch.randint(3, VOCAB, (2, 9))
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
