"""Model-level benchmarks on a Llama-shaped model with random weights (`models.py`): a prefill and batched greedy
generation; ours against PEFT on the same weights and the same prefix (training: `test_training.py`).

    pytest bench/test_model.py --benchmark-json bench/results/model.json

Each group is also timed in interleaved rounds (every provider once per round, round-robin:
`measure.interleaved_seconds`), whose ratios a drifting machine cannot skew.

`extra_info`: `tokens_per_s` (prefill: the B * S tokens processed; generation: the B * new tokens produced,
prefill included), `peak_mb` (`measure.peak_memory_mb`), `interleaved_s` and `interleaved_vs`
(`measure.record_interleaved`).
"""

import pytest
import torch
from measure import DEVICE, DTYPE, SIZE, interleaved, measure, record_interleaved
from models import SHAPES, contenders, generate_peft_cache

P = {"smoke": 4, "cpu": 128, "cuda": 128}[SIZE]
GENERATE = {"smoke": (2, 16, 4), "cpu": (32, 512, 32), "cuda": (32, 2048, 128)}[SIZE]  # (B, prompt, new tokens)
ROUNDS, WARMUP = {"smoke": (1, 0), "cpu": (5, 1), "cuda": (5, 1)}[SIZE]
MODEL = "Llama L={num_hidden_layers} hidden={hidden_size} Hq={num_attention_heads} Hkv={num_key_value_heads}".format(
    **SHAPES[SIZE])


@pytest.fixture(scope="module")
def models():
    return contenders(SIZE, P, DEVICE, DTYPE)


def tokens(b, s, vocab=SHAPES[SIZE]["vocab_size"]):
    ids = torch.randint(3, vocab, (b, s), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    return ids, torch.ones_like(ids)


def greedy(new_tokens):
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def prefill(models) -> dict:
    """provider -> one forward over the prompts, logits for every position."""
    ids, mask = tokens(*GENERATE[:2])
    return {provider: torch.no_grad()(lambda model=model: model(input_ids=ids, attention_mask=mask))
            for provider, model in (("prefix_kernels", models.ours), ("peft", models.peft),
                                    ("no_prefix", models.base))}


@pytest.fixture(scope="module")
def generate(models) -> dict:
    """provider -> batched greedy generation of exactly `new` tokens per row."""
    b, s, new = GENERATE
    ids, mask = tokens(b, s)
    return {
        "prefix_kernels": lambda: models.ours.generate(input_ids=ids, attention_mask=mask, **greedy(new)),
        "peft_cache": lambda: generate_peft_cache(models.base, models.prefix, ids, mask, **greedy(new)),
        "no_prefix": lambda: models.base.generate(input_ids=ids, attention_mask=mask, **greedy(new)),
    }


@pytest.fixture(scope="module")
def prefill_together(request, prefill):
    return interleaved(request, prefill, ROUNDS, WARMUP)


@pytest.fixture(scope="module")
def generate_together(request, generate):
    return interleaved(request, generate, ROUNDS, WARMUP)


@pytest.mark.parametrize("provider", ["prefix_kernels", "peft", "no_prefix"])
def test_prefill(benchmark, prefill, prefill_together, provider):
    b, s, _ = GENERATE
    median = measure(benchmark, prefill[provider], group=f"model prefill {MODEL} B={b} S={s} P={P}",
                     provider=provider, baseline="peft", rounds=ROUNDS, warmup=WARMUP)
    record_interleaved(benchmark, provider, prefill_together)
    if median is not None:
        benchmark.extra_info["tokens_per_s"] = b * s / median


@pytest.mark.parametrize("provider", ["prefix_kernels", "peft_cache", "no_prefix"])
def test_generate(benchmark, generate, generate_together, provider):
    b, s, new = GENERATE
    median = measure(benchmark, generate[provider],
                     group=f"model generate {MODEL} B={b} prompt={s} new={new} P={P}", provider=provider,
                     baseline="peft_cache", rounds=ROUNDS, warmup=WARMUP)
    record_interleaved(benchmark, provider, generate_together)
    if median is not None:
        benchmark.extra_info["tokens_per_s"] = b * new / median


def test_peft_cache_generates_what_ours_does():
    """The rebuilt PEFT path is a fair baseline: on a small float32 model it yields our tokens, not the base's."""
    small = contenders("smoke", 4, "cpu", torch.float32)
    ids = torch.randint(3, SHAPES["smoke"]["vocab_size"], (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ours = small.ours.generate(input_ids=ids, attention_mask=mask, **greedy(6))
    assert torch.equal(generate_peft_cache(small.base, small.prefix, ids, mask, **greedy(6)), ours)
    assert not torch.equal(small.base.generate(input_ids=ids, attention_mask=mask, **greedy(6)), ours)
