"""Training benchmarks on a Llama-shaped model with random weights (`models.py`). A step is forward with labels,
backward and an AdamW step on what trains: ours and PEFT train the same prefix from the same weights; the model
with no prefix trains its input embeddings, so its backward too runs through every layer.

    pytest bench/test_training.py --benchmark-json bench/results/training.json

- Padded train step: B rows right-padded to S, the rows' lengths spread evenly from S/3 to S.
- Training throughput: a batch of ragged examples, packed into one row (`DataCollatorWithFlattening`: the model
  sees `position_ids` restart, and recognises the packing itself) or padded. The model with no prefix, packed,
  runs transformers' SDPA once per packed sequence (`models.sdpa_per_sequence`), what a varlen kernel computes.

Besides pytest-benchmark's rounds, one provider after another, each group is also timed in interleaved rounds (every
provider once per round, round-robin: `measure.interleaved_seconds`), whose ratios a drifting machine cannot skew.

`extra_info`: `tokens_per_s` (real, non-padding tokens per second), `peak_mb` (`measure.peak_memory_mb`),
`reference`: the provider this one's time is compared to for the prefix's own cost (the model with no prefix),
`interleaved_s` (median seconds per step in the interleaved rounds) and `interleaved_vs` (every provider's
interleaved median over this one's).
"""

import pytest
import torch
from measure import DEVICE, DTYPE, SIZE, interleaved, measure, record_interleaved
from models import (
    PER_SEQUENCE_SDPA,
    SHAPES,
    contenders,
    embeddings_trained,
    examples,
    llama,
    packed,
    right_padded,
    train_step,
    trainable,
)

P = {"smoke": 4, "cpu": 64, "cuda": 64}[SIZE]
PADDED = {"smoke": (2, 12), "cpu": (8, 384), "cuda": (8, 2048)}[SIZE]  # (B, S)
RAGGED = {"smoke": (4, 4, 16), "cpu": (16, 32, 512), "cuda": (16, 128, 2048)}[SIZE]  # (examples, shortest, longest)
ROUNDS, WARMUP = {"smoke": (1, 0), "cpu": (3, 1), "cuda": (5, 1)}[SIZE]
INTERLEAVED_ROUNDS, INTERLEAVED_WARMUP = {"smoke": (1, 0), "cpu": (5, 1), "cuda": (5, 1)}[SIZE]
MODEL = "Llama L={num_hidden_layers} hidden={hidden_size} Hq={num_attention_heads} Hkv={num_key_value_heads}".format(
    **SHAPES[SIZE])


def spread(count: int, shortest: int, longest: int) -> list[int]:
    """`count` lengths spread evenly from `shortest` to `longest`."""
    return torch.linspace(shortest, longest, count).round().int().tolist()


@pytest.fixture(scope="module")
def models():
    """name -> model, all from one base model's weights: ours, PEFT's, the model with no prefix (SDPA), and the
    same with SDPA once per packed sequence."""
    made = contenders(SIZE, P, DEVICE, DTYPE)
    return {"prefix_kernels": made.ours.train(), "peft": made.peft.train(),
            "no_prefix": embeddings_trained(made.base).train(),
            "no_prefix packed": embeddings_trained(made.base, PER_SEQUENCE_SDPA).train()}


def steps(models, batches: dict) -> dict:
    """provider -> one training step of its model on its batch (batches: provider -> (model name, batch)), each
    with its own AdamW."""
    def step(model, batch):
        optimizer = torch.optim.AdamW(trainable(model), lr=1e-4)
        return lambda: train_step(model, optimizer, batch)

    return {provider: step(models[model], batch) for provider, (model, batch) in batches.items()}


def run(benchmark, step, *, real_tokens, group, provider, baseline, together, reference=None):
    median = measure(benchmark, step, group=group, provider=provider, baseline=baseline, rounds=ROUNDS,
                     warmup=WARMUP)
    if reference is not None:
        benchmark.extra_info["reference"] = reference
    if median is not None:
        benchmark.extra_info["tokens_per_s"] = real_tokens / median
    record_interleaved(benchmark, provider, together)


PADDED_PROVIDERS = ("prefix_kernels", "peft", "no_prefix")
THROUGHPUT_PROVIDERS = ("prefix_kernels packed", "prefix_kernels padded", "peft padded", "no_prefix packed")


@pytest.fixture(scope="module")
def padded_steps(models) -> dict:
    """provider -> its padded training step (B rows right-padded to S, lengths spread from S/3 to S)."""
    b, s = PADDED
    batch = right_padded(examples(spread(b, s // 3, s), SHAPES[SIZE]["vocab_size"]), DEVICE)
    return steps(models, {provider: (provider, batch) for provider in PADDED_PROVIDERS})


@pytest.fixture(scope="module")
def throughput_steps(models) -> dict:
    """provider -> its training step over the ragged examples, packed or padded."""
    sequences = examples(spread(*RAGGED), SHAPES[SIZE]["vocab_size"])
    return steps(models, {"prefix_kernels packed": ("prefix_kernels", packed(sequences, DEVICE)),
                          "prefix_kernels padded": ("prefix_kernels", right_padded(sequences, DEVICE)),
                          "peft padded": ("peft", right_padded(sequences, DEVICE)),
                          "no_prefix packed": ("no_prefix packed", packed(sequences, DEVICE))})


@pytest.fixture(scope="module")
def padded_together(request, padded_steps):
    return interleaved(request, padded_steps, INTERLEAVED_ROUNDS, INTERLEAVED_WARMUP)


@pytest.fixture(scope="module")
def throughput_together(request, throughput_steps):
    return interleaved(request, throughput_steps, INTERLEAVED_ROUNDS, INTERLEAVED_WARMUP)


@pytest.mark.parametrize("provider", PADDED_PROVIDERS)
def test_train_step(benchmark, padded_steps, padded_together, provider):
    """The padded training step: ours at most 1.05x the no-prefix step, and no slower than PEFT's."""
    b, s = PADDED
    lengths = spread(b, s // 3, s)
    run(benchmark, padded_steps[provider], real_tokens=sum(lengths), provider=provider, baseline="peft",
        together=padded_together, reference="no_prefix" if provider == "prefix_kernels" else None,
        group=f"model train step {MODEL} B={b} S={s} right padding, lengths {lengths[0]}..{s}, P={P}")


@pytest.mark.parametrize("provider", THROUGHPUT_PROVIDERS)
def test_train_throughput(benchmark, throughput_steps, throughput_together, provider):
    """Real tokens per second over ragged examples: ours packed at least 1.5x PEFT padded, and within 1.10x of the
    model with no prefix packed."""
    count, shortest, longest = RAGGED
    run(benchmark, throughput_steps[provider], real_tokens=sum(spread(*RAGGED)), provider=provider,
        baseline="peft padded", together=throughput_together,
        reference="no_prefix packed" if provider == "prefix_kernels packed" else None,
        group=f"model training throughput {MODEL} {count} examples of {shortest}..{longest} tokens, P={P}")


def test_sdpa_per_sequence_computes_each_sequence_alone():
    """The packed no-prefix model is a fair floor: each packed sequence gets the logits it gets alone."""
    base = llama("smoke", "cpu", torch.float32)
    sequences = examples([3, 7, 1, 5], SHAPES["smoke"]["vocab_size"])
    with torch.no_grad():
        together = embeddings_trained(base, PER_SEQUENCE_SDPA)(**packed(sequences, "cpu")).logits[0]
        alone = torch.cat([base(input_ids=s[None]).logits[0] for s in sequences])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
