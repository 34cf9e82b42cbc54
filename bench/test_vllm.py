"""Serving throughput: vLLM serving a workload whose requests each name one of several prefix adapters, against vLLM
serving the same requests with no adapter (the prefix's cost), on one engine with the same weights.

    .venv-vllm/bin/python -m pytest bench/test_vllm.py --benchmark-json bench/results/vllm.json

Runs where vLLM is installed (its own environment, see CONTRIBUTING.md); skipped elsewhere. A provider is one entry
of `providers`: a function serving the whole workload once and returning the tokens it generated; another engine
(this library's own continuous batching, for one) joins the comparison as one more entry.

Every call serves the same requests (random token prompts of mixed lengths, a fixed number of new tokens: EOS is
ignored) from an emptied prefix cache, so no call reuses another's blocks; within a call an adapter's full blocks
are written once and shared by its requests, as in serving. The engine runs in its own processes: peak memory is
not recorded. `extra_info`: `tokens_per_s` (generated tokens per second, prefill included), `requests`,
`interleaved_s` / `interleaved_vs` (`measure.record_interleaved`).
"""

import copy
import os
from dataclasses import dataclass

import pytest
import torch
from measure import SIZE, interleaved, record_interleaved

pytest.importorskip("vllm", reason="vLLM is not installed here: it runs in its own environment (CONTRIBUTING.md, "
                                   "Serving with vLLM)")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

from prefix_kernels import PrefixTuningConfig, get_prefix_model  # noqa: E402
from prefix_kernels.integrations.vllm import prefix_adapters_config  # noqa: E402

SHAPES = {  # Llama-shaped, random weights; head dims vLLM's CPU attention takes
    "smoke": dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "cpu": dict(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2),
    "cuda": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=4),
}
ADAPTERS = {"smoke": {"a": 5, "b": 40}, "cpu": {"a": 16, "b": 48, "c": 100, "d": 128},
            "cuda": {"a": 16, "b": 48, "c": 100, "d": 128}}[SIZE]  # name -> P
REQUESTS, PROMPT, NEW = {"smoke": (4, (8, 24), 4), "cpu": (32, (64, 256), 32), "cuda": (256, (128, 1024), 128)}[SIZE]
ROUNDS, WARMUP = {"smoke": (1, 0), "cpu": (5, 1), "cuda": (5, 1)}[SIZE]
DTYPE = "bfloat16" if SIZE == "cuda" else "float32"
MAX_LEN = PROMPT[1] + max(ADAPTERS.values()) + NEW
MODEL = "Llama L={num_hidden_layers} hidden={hidden_size} Hq={num_attention_heads} Hkv={num_key_value_heads}".format(
    **SHAPES[SIZE])


@dataclass(frozen=True)
class Workload:
    """The requests every provider serves: prompts (token ids) and the adapter each names."""

    prompts: list[list[int]]
    adapters: list[str]

    @classmethod
    def mixed(cls) -> "Workload":
        generator = torch.Generator().manual_seed(0)
        lengths = torch.randint(PROMPT[0], PROMPT[1] + 1, (REQUESTS,), generator=generator).tolist()
        prompts = [torch.randint(3, SHAPES[SIZE]["vocab_size"], (n,), generator=generator).tolist() for n in lengths]
        names = list(ADAPTERS)
        return cls(prompts, [names[i % len(names)] for i in range(REQUESTS)])


def write_model(root) -> None:
    """The model in `root/model` and one adapter of each length in `root/<name>`, random weights."""
    config = LlamaConfig(**SHAPES[SIZE], max_position_embeddings=MAX_LEN, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(copy.deepcopy(config)).save_pretrained(root / "model")
        for name, length in ADAPTERS.items():
            get_prefix_model(LlamaForCausalLM(copy.deepcopy(config)),
                             PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length)).save_pretrained(
                                 root / name)


def serve(llm: LLM, workload: Workload, with_adapters: bool) -> int:
    """Serve every request of `workload` at once from an emptied prefix cache; the tokens generated."""
    llm.reset_prefix_cache()
    params = [SamplingParams(max_tokens=NEW, min_tokens=NEW, ignore_eos=True, temperature=0.0, detokenize=False,
                             extra_args={"prefix_adapter": name} if with_adapters else None)
              for name in workload.adapters]
    outputs = llm.generate([{"prompt_token_ids": p} for p in workload.prompts], params, use_tqdm=False)
    return sum(len(out.outputs[0].token_ids) for out in outputs)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_bench")
    write_model(root)
    engine = LLM(model=str(root / "model"), skip_tokenizer_init=True, dtype=DTYPE, max_model_len=MAX_LEN,
                 enable_prefix_caching=True, seed=0, disable_log_stats=True,
                 **({"enforce_eager": True, "kv_cache_memory_bytes": 1 << 30, "block_size": 32} if SIZE != "cuda"
                    else {}),
                 **prefix_adapters_config({name: os.path.join(root, name) for name in ADAPTERS}))
    yield engine
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def providers(llm) -> dict:
    """provider -> one call serving the whole workload, returning the tokens it generated."""
    workload = Workload.mixed()
    return {"vllm_prefix": lambda: serve(llm, workload, with_adapters=True),
            "vllm_no_adapter": lambda: serve(llm, workload, with_adapters=False)}


@pytest.fixture(scope="module")
def together(request, providers) -> dict:
    return interleaved(request, providers, ROUNDS, WARMUP)


@pytest.mark.parametrize("provider", ["vllm_prefix", "vllm_no_adapter"])
def test_serve(benchmark, providers, together, provider):
    benchmark.group = (f"vLLM serving {MODEL} {DTYPE} requests={REQUESTS} prompt={PROMPT[0]}..{PROMPT[1]} "
                       f"new={NEW} adapters P={sorted(ADAPTERS.values())}")
    benchmark.extra_info.update(provider=provider, baseline="vllm_no_adapter", size=SIZE, requests=REQUESTS)
    generated = benchmark.pedantic(providers[provider], rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    assert generated == REQUESTS * NEW
    record_interleaved(benchmark, provider, together)
    if not benchmark.disabled:
        benchmark.extra_info["tokens_per_s"] = generated / benchmark.stats.stats.median
