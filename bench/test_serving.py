"""Serving benchmark: a ragged workload of requests, each with its own adapter and its own number of new tokens, on a
Llama-shaped model with random weights (`models.py`), greedy.

    pytest bench/test_serving.py --benchmark-json bench/results/serving.json

- `prefix_kernels continuous`: ours in transformers' continuous batching (`continuous_batching_context_manager`),
  every request added with its adapter; adapters mixed in every step, the paged cache holding only the sequence.
- `prefix_kernels static 8`: ours, `generate()` over static batches of 8 requests in arrival order (mixed adapters,
  `adapter_names`), left-padded, each batch running to its longest answer.
- `peft_cache per adapter`: PEFT's way: one adapter per batch (the requests grouped by adapter), its prefix copied
  into every row's cache (`models.generate_peft_cache`), left-padded, each batch running to its longest answer.
- `no_prefix continuous`: the base model in its own continuous batching (SDPA), no prefix: the floor, the reference
  for the prefix's own cost over the engine.

Both continuous contenders get the same engine configuration (page size, cache blocks, batch token budget). Only
real tokens count: tokens/s is the sum of the requests' own new tokens per second, whatever a static batch computes
past a row's answer. Each call checks that every request got its tokens, so a failed engine cannot pass for a fast
one. Timed in interleaved rounds too (`measure.interleaved_seconds`).

`extra_info`: `tokens_per_s`, `peak_mb` (`measure.peak_memory_mb`), `reference`, `interleaved_s`, `interleaved_vs`.
On CPU the profiler behind `peak_mb` sees the calling thread only: for the continuous contenders it counts the paged
cache the engine allocates up front (the same size for both) but not the activations of their steps, which the
engine's own thread allocates. On CUDA every allocation counts.
"""

import copy
import tempfile

import pytest
import serving_workload as vllm_workload
import torch
from measure import DEVICE, DTYPE, SIZE, interleaved, measure, record_interleaved
from models import SHAPES, generate_peft_cache, llama
from transformers import GenerationConfig, LlamaForCausalLM
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from prefix_kernels import PrefixModel, PrefixTuningConfig, get_prefix_model

# (requests, adapters' P, shortest and longest prompt, fewest and most new tokens)
WORKLOAD = {"smoke": (6, (2, 4), (4, 12), (2, 4)), "cpu": (32, (16, 32, 48, 64), (16, 192), (16, 48)),
            "cuda": (32, (16, 32, 48, 64), (16, 192), (16, 48))}[SIZE]
STATIC_BATCH = 8
ENGINE = {"smoke": dict(page_size=8, num_blocks=32, max_batch_tokens=64),  # room for every request at once
          "cpu": dict(page_size=32, num_blocks=320, max_batch_tokens=1024),
          "cuda": dict(page_size=64, num_blocks=256, max_batch_tokens=2048)}[SIZE]
ROUNDS, WARMUP = {"smoke": (1, 0), "cpu": (3, 1), "cuda": (5, 1)}[SIZE]
MODEL = "Llama L={num_hidden_layers} hidden={hidden_size} Hq={num_attention_heads} Hkv={num_key_value_heads}".format(
    **SHAPES[SIZE])
PROVIDERS = ("prefix_kernels continuous", "prefix_kernels static 8", "peft_cache per adapter", "no_prefix continuous")


def workload() -> list[tuple[list[int], str, int]]:
    """(prompt, adapter name, new tokens) per request, in arrival order: lengths drawn uniformly, adapters in turn."""
    count, lengths, (short, long), (few, most) = WORKLOAD
    generator = torch.Generator().manual_seed(0)
    requests = []
    for i in range(count):
        size = int(torch.randint(short, long + 1, (), generator=generator))
        new = int(torch.randint(few, most + 1, (), generator=generator))
        prompt = torch.randint(3, SHAPES[SIZE]["vocab_size"], (size,), generator=generator).tolist()
        requests.append((prompt, f"p{lengths[i % len(lengths)]}", new))
    return requests


def serving_models():
    """(the base model, ours over a copy of it holding an adapter of each length, each adapter's prefix
    `[L, 2, Hkv, P, D]`)."""
    base = llama(SIZE, DEVICE, DTYPE)
    _, lengths, _, _ = WORKLOAD
    with tempfile.TemporaryDirectory() as directory:
        for seed, length in enumerate(lengths):
            torch.manual_seed(seed)
            get_prefix_model(copy.deepcopy(base), PrefixTuningConfig(num_virtual_tokens=length)).save_pretrained(
                f"{directory}/p{length}")
        ours = PrefixModel.from_pretrained(copy.deepcopy(base), f"{directory}/p{lengths[0]}",
                                           adapter_name=f"p{lengths[0]}")
        for length in lengths[1:]:
            ours.load_adapter(f"{directory}/p{length}", adapter_name=f"p{length}")
    prefixes = {name: ours.get_prefix(name).detach() for name in ours.prefix_encoders}
    return base, ours.eval(), prefixes


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(prompt) for prompt in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
    return ids.to(DEVICE), mask.to(DEVICE)


def exactly(new: int) -> dict:
    return dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)


def continuous(model, requests, named: bool):
    """Serve `requests` in `model`'s continuous batching (ours when `named`: each with its adapter)."""
    config = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0)  # every request runs to its length
    with model.continuous_batching_context_manager(generation_config=config,
                                                   continuous_batching_config=ContinuousBatchingConfig(**ENGINE)) \
            as manager:
        expected = {}
        for prompt, name, new in requests:
            adapter = dict(adapter_name=name) if named else {}
            expected[manager.add_request(prompt, max_new_tokens=new, **adapter)] = new
        for _ in expected:
            result = manager.get_result(timeout=600)
            assert result is not None and result.error is None and \
                len(result.generated_tokens) == expected[result.request_id], result


def static(ours: PrefixModel, requests):
    for start in range(0, len(requests), STATIC_BATCH):
        batch = requests[start:start + STATIC_BATCH]
        ids, mask = left_padded([prompt for prompt, _, _ in batch])
        out = ours.generate(input_ids=ids, attention_mask=mask, adapter_names=[name for _, name, _ in batch],
                            **exactly(max(new for _, _, new in batch)))
        assert out.shape[0] == len(batch)


def peft_per_adapter(base, prefixes: dict, requests):
    for name, prefix in prefixes.items():
        mine = [(prompt, new) for prompt, adapter, new in requests if adapter == name]
        for start in range(0, len(mine), STATIC_BATCH):
            batch = mine[start:start + STATIC_BATCH]
            ids, mask = left_padded([prompt for prompt, _ in batch])
            generate_peft_cache(base, prefix, ids, mask, **exactly(max(new for _, new in batch)))


@pytest.fixture(scope="module")
def calls() -> dict:
    """provider -> serving the whole workload once."""
    base, ours, prefixes = serving_models()
    requests = workload()
    return {
        "prefix_kernels continuous": torch.no_grad()(lambda: continuous(ours, requests, named=True)),
        "prefix_kernels static 8": torch.no_grad()(lambda: static(ours, requests)),
        "peft_cache per adapter": torch.no_grad()(lambda: peft_per_adapter(base, prefixes, requests)),
        "no_prefix continuous": torch.no_grad()(lambda: continuous(base, requests, named=False)),
    }


@pytest.fixture(scope="module")
def together(request, calls):
    return interleaved(request, calls, ROUNDS, WARMUP)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_serving(benchmark, calls, together, provider):
    count, lengths, (short, long), (few, most) = WORKLOAD
    group = (f"model serving {MODEL} {count} requests, prompts {short}..{long}, new {few}..{most}, "
             f"{len(lengths)} adapters P={lengths[0]}..{lengths[-1]}")
    median = measure(benchmark, calls[provider], group=group, provider=provider, baseline="peft_cache per adapter",
                     rounds=ROUNDS, warmup=WARMUP)
    record_interleaved(benchmark, provider, together)
    if provider != "no_prefix continuous":
        benchmark.extra_info["reference"] = "no_prefix continuous"
    if median is not None:
        benchmark.extra_info["tokens_per_s"] = sum(new for _, _, new in workload()) / median


@pytest.fixture(scope="module")
def vllm_workload_calls(tmp_path_factory) -> dict:
    """provider -> serving the vLLM benchmark's workload once (`serving_workload`): the same model, adapters and
    requests as `test_vllm.py`, every request at once, `NEW` tokens each."""
    root = tmp_path_factory.mktemp("vllm_workload")
    vllm_workload.write_model(root)
    base = LlamaForCausalLM.from_pretrained(root / "model").to(DEVICE, DTYPE).eval()
    names = list(vllm_workload.ADAPTERS)
    ours = PrefixModel.from_pretrained(copy.deepcopy(base), root / names[0], adapter_name=names[0]).eval()
    for name in names[1:]:
        ours.load_adapter(root / name, adapter_name=name)
    mixed = vllm_workload.Workload.mixed()
    requests = [(prompt, name, vllm_workload.NEW) for prompt, name in zip(mixed.prompts, mixed.adapters)]
    return {"prefix_kernels continuous": torch.no_grad()(lambda: continuous(ours, requests, named=True)),
            "no_prefix continuous": torch.no_grad()(lambda: continuous(base, requests, named=False))}


@pytest.fixture(scope="module")
def vllm_workload_together(request, vllm_workload_calls):
    return interleaved(request, vllm_workload_calls, ROUNDS, WARMUP)


@pytest.mark.parametrize("provider", ["prefix_kernels continuous", "no_prefix continuous"])
def test_serving_vllm_workload(benchmark, vllm_workload_calls, vllm_workload_together, provider):
    """The requests `bench/test_vllm.py` serves in vLLM, served here by transformers' engine: tokens/s to set beside
    vLLM's (from its own run and environment)."""
    w = vllm_workload
    group = (f"model serving vLLM's workload {w.MODEL} {w.DTYPE} requests={w.REQUESTS} "
             f"prompt={w.PROMPT[0]}..{w.PROMPT[1]} new={w.NEW} adapters P={sorted(w.ADAPTERS.values())}")
    median = measure(benchmark, vllm_workload_calls[provider], group=group, provider=provider,
                     baseline="no_prefix continuous", rounds=ROUNDS, warmup=WARMUP)
    record_interleaved(benchmark, provider, vllm_workload_together)
    if median is not None:
        benchmark.extra_info["tokens_per_s"] = w.REQUESTS * w.NEW / median
