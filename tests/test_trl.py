"""TRL's `SFTTrainer` trains a `PrefixModel` on packed (padding-free) batches as on padded ones, in full and in mixed
precision, and the adapter it leaves reloads exactly, in ours and in PEFT.

SFTTrainer computes its loss with a fused LM head that it patches onto the model's forward, and which calls
`model.base_model` for transformers' backbone (hidden states). A `PrefixModel`'s `base_model` is, as in PEFT, the
whole wrapped model: called there, past the wrapper, it would run without the prefix and give logits, not hidden
states. So the trainer below takes the loss from the model's own forward, as transformers' `Trainer` does (TRL's
documented way: override `compute_loss`).
"""

import peft
import pytest
import torch
from tiny_models import VOCAB, tiny_decoder
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast, Trainer

from prefix_kernels import PrefixModel, PrefixTuningConfig, get_prefix_model

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


class PrefixSFTTrainer(trl.SFTTrainer):
    """SFTTrainer with the loss of the model's own forward (which reads the prefix)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' vocabulary, built in memory: SFTTrainer requires one, though the
    dataset below is already token ids."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab)),
                                   pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def examples(n=8):
    """Token ids of ragged lengths (4 to 12) over six words of the vocabulary: something a prefix can learn."""
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(4, 13, (n,), generator=generator).tolist()
    return datasets.Dataset.from_list([{"input_ids": torch.randint(3, 9, (length,), generator=generator).tolist()}
                                       for length in lengths])


def sft(output_dir, padding_free: bool, bf16: bool):
    """(trainer, the loss of every step) after 4 AdamW steps of 4 examples on a fresh prefix."""
    torch.manual_seed(0)
    model = get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    args = trl.SFTConfig(output_dir=output_dir, padding_free=padding_free, max_length=None, bf16=bf16,
                         per_device_train_batch_size=4, max_steps=4, learning_rate=0.5, lr_scheduler_type="constant",
                         logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True)
    trainer = PrefixSFTTrainer(model=model, args=args, train_dataset=examples(), processing_class=tokenizer())
    trainer.train()
    return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


RUNS = {"packed": dict(padding_free=True, bf16=False), "padded": dict(padding_free=False, bf16=False),
        "packed, bf16": dict(padding_free=True, bf16=True)}  # TRL's default: bf16 mixed precision


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{run: (trainer, losses)}: the same training on packed and on padded batches, and in mixed precision."""
    return {name: sft(tmp_path_factory.mktemp("sft"), **options) for name, options in RUNS.items()}


def test_padding_free_batches_are_packed_rows(trained):
    (trainer, _), (padded, _) = trained["packed"], trained["padded"]
    rows = [trainer.train_dataset[i] for i in range(4)]
    lengths = [len(row["input_ids"]) for row in rows]
    batch = trainer.data_collator(rows)
    assert batch["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in batch
    assert batch["cu_seq_lens_q"].diff().tolist() == lengths
    assert padded.data_collator(rows)["input_ids"].shape == (4, max(lengths))


def test_packed_training_equals_padded_training_and_the_loss_falls(trained):
    (packed, packed_losses), (padded, padded_losses) = trained["packed"], trained["padded"]
    assert len(packed_losses) == 4
    assert packed_losses == pytest.approx(padded_losses, abs=1e-5)
    assert packed_losses[-1] < packed_losses[0] - 0.2
    torch.testing.assert_close(packed.model.get_prefix(), padded.model.get_prefix(), atol=1e-5, rtol=0)
    assert all(p.grad is None for p in packed.model.get_base_model().parameters())  # the base stayed frozen


def test_mixed_precision_trains_as_full_precision(trained):
    losses, bf16_losses = trained["packed"][1], trained["packed, bf16"][1]
    assert bf16_losses == pytest.approx(losses, abs=5e-3)
    assert bf16_losses[-1] < bf16_losses[0] - 0.2


def test_the_trained_adapter_reloads_in_ours_and_in_peft(trained, tmp_path):
    model = trained["packed"][0].model
    model.save_pretrained(tmp_path)
    ours = PrefixModel.from_pretrained(tiny_decoder("llama"), tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_decoder("llama"), tmp_path)
    model.eval()
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert torch.equal(ours(input_ids=ids).logits, expected)
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=2e-5, rtol=1e-4)
