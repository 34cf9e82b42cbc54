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

import os

import pytest
from measure import SIZE, interleaved, record_interleaved
from serving_workload import ADAPTERS, DTYPE, MAX_LEN, MODEL, NEW, PROMPT, REQUESTS, Workload, write_model

ROUNDS, WARMUP = {"smoke": (1, 0), "cpu": (5, 1), "cuda": (5, 1)}[SIZE]

pytest.importorskip("vllm", reason="vLLM is not installed here: it runs in its own environment (CONTRIBUTING.md, "
                                   "Serving with vLLM)")

from vllm import LLM, SamplingParams  # noqa: E402

from prefix_kernels.integrations.vllm import prefix_adapters_config  # noqa: E402


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
