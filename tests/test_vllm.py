"""Prefix adapters served by vLLM (`prefix_kernels.integrations.vllm`), against `PrefixModel.generate` of each request
alone. Runs where vLLM is installed (its own environment: see .ci/run); skipped elsewhere.

One engine per purpose, started once: float32 offline (equality, cache counters, refusals), bfloat16 with a KV cache
small enough to force preemption, and the OpenAI server (float32).
"""

import concurrent.futures
import copy
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here: it runs in its own environment (CONTRIBUTING.md, "
                                   "Serving with vLLM; .ci/run sets one up)")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

from prefix_kernels import PrefixModel, PrefixTuningConfig, get_prefix_model  # noqa: E402
from prefix_kernels.integrations import vllm as integration  # noqa: E402

BLOCK = 32  # vLLM's CPU attention takes multiples of 32
ADAPTERS = {"short": 5, "mid": 40, "long": 70}  # shorter than a block, one block and a bit, two blocks and a bit
MAX_LEN = 256
NEW = 8
PROMPTS = ["hello world", "the quick brown fox", "abc", "prefix tuning in vllm, one adapter per request"]
BF16_LOGIT_TOL = 0.25  # bfloat16 moves these logits by up to ~0.05 (PyTorch's own bfloat16 forward, measured)
ENGINE = dict(max_model_len=MAX_LEN, block_size=BLOCK, enable_prefix_caching=True, enforce_eager=True, seed=0)


def _tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (printable ASCII), so text prompts go through the model's own tokenizer."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{chr(c): 4 + c - 32 for c in range(32, 127)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("vllm")
    write_files(root)
    return str(root)


def write_files(root) -> None:
    """A tiny random Llama (head dim 32, GQA) with its tokenizer in `root/model`, three adapters of different lengths
    in `root/<name>`."""
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                         initializer_range=0.1)  # logits far enough apart that float32 kernels agree on argmax
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(copy.deepcopy(config)).save_pretrained(root / "model")
        for name, length in ADAPTERS.items():
            model = get_prefix_model(LlamaForCausalLM(copy.deepcopy(config)),
                                     PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length))
            model.save_pretrained(root / name)
    _tokenizer().save_pretrained(root / "model")


def _adapters(files: str) -> dict[str, str]:
    return {name: os.path.join(files, name) for name in ADAPTERS}


class Reference:
    """`PrefixModel` with the three adapters, float32: greedy tokens of a request alone (the base model for adapter
    None), and the logits of each step of a given continuation."""

    def __init__(self, files: str):
        self.model = PrefixModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(os.path.join(files, "model"), dtype=torch.float32),
            os.path.join(files, "short"), adapter_name="short")
        for name in ("mid", "long"):
            self.model.load_adapter(os.path.join(files, name), name)

    def tokens(self, prompt: str, adapter: str | None, new: int = NEW) -> list[int]:
        ids = torch.tensor([_tokenizer()(prompt).input_ids])
        if adapter is None:
            out = self.model.get_base_model().generate(input_ids=ids, max_new_tokens=new, do_sample=False)
        else:
            out = self.model.generate(input_ids=ids, max_new_tokens=new, do_sample=False, adapter_names=[adapter])
        return out[0, ids.shape[1]:].tolist()

    @torch.no_grad()
    def logits(self, prompt: str, adapter: str | None, tokens: list[int]) -> torch.Tensor:
        """`[len(tokens), V]`: the logits from which each of `tokens` was chosen, `tokens` fed back (teacher forced)."""
        prompt_ids = _tokenizer()(prompt).input_ids
        ids = torch.tensor([prompt_ids + tokens])
        out = self.model.get_base_model()(input_ids=ids) if adapter is None else self.model(
            input_ids=ids, adapter_names=[adapter])
        return out.logits[0, len(prompt_ids) - 1:-1]


@pytest.fixture(scope="module")
def reference(files) -> Reference:
    return Reference(files)


def _shutdown(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def llm(files):
    engine = LLM(model=os.path.join(files, "model"), dtype="float32", kv_cache_memory_bytes=64 << 20,
                 disable_log_stats=False, **ENGINE, **integration.prefix_adapters_config(_adapters(files)))
    yield engine
    _shutdown(engine)


def _params(adapter: str | None, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=NEW, temperature=0.0,
                          extra_args=None if adapter is None else {"prefix_adapter": adapter}, **kwargs)


def _counters(llm: LLM) -> dict[str, int]:
    return {m.name.removeprefix("vllm:"): m.value for m in llm.get_metrics() if "prefix_cache" in m.name}


def test_requests_equal_prefix_model_alone(llm, reference, files):
    """Concurrent requests over three adapters and none, text and token-id prompts, every prompt twice (prefix
    caching on): each request's greedy tokens are those of PrefixModel.generate of that request alone."""
    cases = [(p, a) for _ in range(2) for p in PROMPTS for a in (None, *ADAPTERS)]
    tokenizer = _tokenizer()
    prompts = [p if i % 2 else {"prompt_token_ids": tokenizer(p).input_ids} for i, (p, _) in enumerate(cases)]
    outputs = llm.generate(prompts, [_params(a) for _, a in cases], use_tqdm=False)
    got = {case: [] for case in cases}
    for case, out in zip(cases, outputs):
        got[case].append(list(out.outputs[0].token_ids))
        assert out.prompt_token_ids == tokenizer(case[0]).input_ids  # the client sees its plain prompt
    for (prompt, adapter), tokens in got.items():
        assert tokens == [reference.tokens(prompt, adapter)] * 2, (prompt, adapter)


def test_adapter_full_blocks_written_once(llm):
    """After one request has cached an adapter's full blocks, every further request of that adapter reads them from
    vLLM's prefix cache (local hits) and gets only its last, partial block written by the connector (external)."""
    for adapter in ADAPTERS:
        llm.generate("warm " + adapter, _params(adapter), use_tqdm=False)
    before = _counters(llm)
    prompts = [f"request {i}" for i in range(3)]  # distinct: no full block of prompt tokens is shared
    for adapter in ADAPTERS:
        llm.generate([f"{p} {adapter}" for p in prompts], _params(adapter), use_tqdm=False)
    after = _counters(llm)
    delta = {name: after[name] - before[name] for name in after}
    print("prefix cache counters:", after, "this wave:", delta)
    full = sum(length // BLOCK * BLOCK for length in ADAPTERS.values())
    assert delta["prefix_cache_hits"] == len(prompts) * full
    assert delta["external_prefix_cache_hits"] == len(prompts) * sum(n % BLOCK for n in ADAPTERS.values())


def _refused(llm, prompt, params, field: str) -> None:
    with pytest.raises(VLLMValidationError, match=f"^{field}: ") as error:
        llm.generate(prompt, params, use_tqdm=False)
    assert error.value.parameter == field


def test_refusals_before_the_engine(llm, reference):
    """Requests that would poison the shared cache or stop the engine are refused by name in the frontend; the
    engine keeps serving."""
    _refused(llm, "abc", _params("nope"), "extra_args.prefix_adapter")
    _refused(llm, "abc", _params("long", prompt_logprobs=1), "prompt_logprobs")
    _refused(llm, "abc", _params("long", skip_reading_prefix_cache=True), "skip_reading_prefix_cache")
    _refused(llm, "abc", _params("long", repetition_penalty=1.2), "repetition_penalty")
    fits_alone = "x" * (MAX_LEN - ADAPTERS["long"] + 1)
    _refused(llm, fits_alone, _params("long"), "prompt")
    salted = {"prompt": "abc", "cache_salt": integration.SALT_PREFIX + "0" * 32}
    _refused(llm, salted, _params(None), "cache_salt")  # placeholders' salt without an adapter
    assert [list(o.outputs[0].token_ids) for o in llm.generate(["abc", fits_alone], [_params("long"), _params(None)],
                                                                use_tqdm=False)][0] == reference.tokens("abc", "long")


def test_engine_aborts_what_gets_past_the_frontend(llm, reference, monkeypatch):
    """Requests sent past the frontend's check are aborted by the engine core (no output reaches their client), which
    keeps serving the others."""
    from vllm.v1.engine.input_processor import InputProcessor

    monkeypatch.setattr(InputProcessor, "process_inputs", InputProcessor.process_inputs.__wrapped__)
    engine = llm.llm_engine
    too_long = "x" * (MAX_LEN - ADAPTERS["long"] + 1)
    for request_id, prompt, params in [("too long", too_long, _params("long")),
                                       ("prompt logprobs", "abc", _params("long", prompt_logprobs=1)),
                                       ("served", "abc", _params("mid"))]:
        engine.add_request(request_id, prompt, params)
    finished = {}
    for _ in range(100):
        finished.update({out.request_id: out for out in engine.step() if out.finished})
        if "served" in finished:
            break
    engine.abort_request(["too long", "prompt logprobs"])
    assert set(finished) == {"served"}
    assert list(finished["served"].outputs[0].token_ids) == reference.tokens("abc", "mid")


def test_engine_needs_the_plugin(llm, monkeypatch):
    """An engine whose frontend would not check requests (the plugin left out of VLLM_PLUGINS) does not start."""
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")
    with pytest.raises(ValueError, match="^VLLM_PLUGINS: "):
        integration._check_engine(llm.llm_engine.vllm_config, None)


def test_refusal_of_unsupported_inputs(llm):
    """Inputs the placeholders cannot go in front of: prompt embeddings, multimodal inputs, streaming input."""
    adapters = integration.load_adapters(llm.llm_engine.vllm_config)
    base = dict(sampling_params=_params("short"), cache_salt=None, prompt_token_ids=[5, 6], prompt_embeds=None,
                mm_features=None, resumable=False)
    for field, change in [("prompt_embeds", dict(prompt_embeds=torch.zeros(2, 128), prompt_token_ids=None)),
                          ("multi_modal_data", dict(mm_features=[object()])), ("resumable", dict(resumable=True))]:
        refused = integration.refusal(adapters, types.SimpleNamespace(**{**base, **change}), MAX_LEN)
        assert refused is not None and refused[0] == field
    assert integration.refusal(adapters, types.SimpleNamespace(**base), MAX_LEN) is None


def test_scheduler_hooks_never_raise(llm):
    """Scheduler side, one request at a time: placeholders and salt put in front, the placeholders not in the cache
    reported as computed, a refused or malformed request aborted instead of an exception (which would stop the
    engine)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    connector = integration.PrefixAdapterConnector(llm.llm_engine.vllm_config, KVConnectorRole.SCHEDULER, None)

    def request(rid, adapter, prompt=(7, 8, 9), cache_salt=None, **kwargs):
        return Request(rid, list(prompt), _params(adapter, **kwargs), None, cache_salt=cache_salt,
                       block_hasher=get_request_block_hasher(BLOCK, sha256))

    served = request("a", "mid", prompt=range(4, 4 + 30))
    connector.on_new_request(served)
    adapter = connector._adapters["mid"]
    assert served.prompt_token_ids[:40] == [integration.PLACEHOLDER_ID] * 40 and served.num_prompt_tokens == 70
    assert list(served.all_token_ids) == served.prompt_token_ids and served.cache_salt == adapter.salt
    assert len(served.block_hashes) == 2 and not served.abort_immediately
    assert connector.get_num_new_matched_tokens(served, 0) == (40, False)
    assert connector.get_num_new_matched_tokens(served, 32) == (8, False)
    assert connector.get_num_new_matched_tokens(served, 64) == (0, False)
    salted = request("s", "short", cache_salt="tenant-7")
    connector.on_new_request(salted)
    assert salted.cache_salt == connector._adapters["short"].salt + "/tenant-7"  # the client's own isolation kept
    plain = request("b", None)
    connector.on_new_request(plain)
    assert plain.prompt_token_ids == [7, 8, 9] and connector.get_num_new_matched_tokens(plain, 0) == (0, False)
    for bad in (request("c", "nope"), request("d", "long", prompt_logprobs=0), types.SimpleNamespace(request_id="e")):
        connector.on_new_request(bad)
        assert bad.abort_immediately
    connector.request_finished(served, [])
    assert connector.get_num_new_matched_tokens(served, 0) == (0, False)


def test_preempted_requests_get_their_prefix_again_bf16(files, reference, monkeypatch):
    """bfloat16, and a KV cache of 10 blocks for 8 concurrent requests of ~4 blocks each: requests are preempted and
    come back with their prefix written again (the engine runs in this process, so the scheduler's connector can be
    watched). bfloat16 greedy paths may part from float32's at near-ties, so each chosen token is held to the float32
    reference fed the same tokens: within BF16_LOGIT_TOL of its best logit (a request served without its prefix fails
    that check, shown against the base model)."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    engine = LLM(model=os.path.join(files, "model"), dtype="bfloat16", num_gpu_blocks_override=10,
                 kv_cache_memory_bytes=4 << 20, distributed_executor_backend="uni", disable_log_stats=False,
                 **{**ENGINE, "enable_prefix_caching": False}, **integration.prefix_adapters_config(_adapters(files)))
    connector = engine.llm_engine.engine_core.engine_core.scheduler.connector
    writes = []  # (times the request was preempted, prefix positions written)
    allocated = connector.update_state_after_alloc
    monkeypatch.setattr(connector, "update_state_after_alloc", lambda request, blocks, n: (
        writes.append((request.num_preemptions, n)), allocated(request, blocks, n)))
    try:
        cases = [(p, a) for p in PROMPTS for a in ("long", "mid")]
        params = [SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.0, extra_args={"prefix_adapter": a})
                  for _, a in cases]
        outputs = engine.generate([p for p, _ in cases], params, use_tqdm=False)
        preemptions = next(m.value for m in engine.get_metrics() if m.name == "vllm:num_preemptions")
    finally:
        _shutdown(engine)
    rewritten = [n for preempted, n in writes if preempted]
    print("preemptions:", preemptions, "prefix positions written again after preemption:", rewritten)
    assert preemptions > 0 and rewritten and all(n > 0 for n in rewritten)
    without_prefix = 0
    for (prompt, adapter), out in zip(cases, outputs):
        tokens = list(out.outputs[0].token_ids)
        assert len(tokens) == 40
        assert _deficit(reference.logits(prompt, adapter, tokens), tokens).max() <= BF16_LOGIT_TOL, (prompt, adapter)
        without_prefix += int((_deficit(reference.logits(prompt, None, tokens), tokens) > BF16_LOGIT_TOL).sum())
    assert without_prefix > len(cases)


def _deficit(logits: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """How far below each step's best logit the chosen token's logit is (0 where it is the argmax)."""
    return logits.max(dim=-1).values - logits[torch.arange(len(tokens)), tokens]


def test_salt_follows_the_adapter_content(llm, files, tmp_path):
    """An adapter's salt is a digest of its table: the same content under another name or directory shares it (and
    its cached blocks), one changed value gives another (a changed adapter never meets its old blocks)."""
    from safetensors.torch import load_file, save_file

    config = llm.llm_engine.vllm_config.model_config

    def salt(directory, dtype=config.dtype, name="mid"):
        return integration.read_served_adapter(name, str(directory), config.hf_config, dtype, MAX_LEN).salt

    changed = tmp_path / "mid"
    shutil.copytree(os.path.join(files, "mid"), changed)
    assert salt(changed, name="other") == salt(os.path.join(files, "mid"))
    tensors = load_file(changed / "adapter_model.safetensors")
    tensors["prompt_embeddings"][3, 5] += 1e-3
    save_file(tensors, changed / "adapter_model.safetensors")
    assert salt(changed) != salt(os.path.join(files, "mid"))
    assert salt(os.path.join(files, "mid"), torch.bfloat16) != salt(os.path.join(files, "mid"))


def test_flags_command(files):
    """The command prints the server's flags, shell-quoted."""
    printed = subprocess.run([sys.executable, "-m", "prefix_kernels.integrations.vllm", "flags",
                              *(f"{n}={p}" for n, p in _adapters(files).items())],
                             capture_output=True, text=True, check=True, timeout=120).stdout
    assert shlex.split(printed) == integration.prefix_adapters_flags(_adapters(files))


def test_kv_cache_dtype_and_config_refused():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        integration.prefix_adapters_config({"a": "."}, kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="kv_transfer_config"):
        integration.prefix_adapters_config({"a": "."}, kv_transfer_config={})
    with pytest.raises(ValueError, match="adapter_name"):
        integration.prefix_adapters_config({"../a": "."})
    with pytest.raises(ValueError, match=r"adapters\['a'\]"):
        integration.prefix_adapters_config({"a": "/nonexistent"})


def test_engine_configurations_refused_at_start(llm):
    """What the prefix cannot be served in is refused when the engine starts, naming the setting."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    config = llm.llm_engine.vllm_config
    spec = dict(block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.float32)

    def groups(*specs):
        return types.SimpleNamespace(kv_cache_groups=[types.SimpleNamespace(kv_cache_spec=s) for s in specs])

    integration._check_engine(config, groups(FullAttentionSpec(**spec)))
    for kv_cache_config in (groups(SlidingWindowSpec(**spec, sliding_window=64)),
                            groups(FullAttentionSpec(**spec, sliding_window=64)),
                            groups(FullAttentionSpec(**spec), FullAttentionSpec(**spec))):
        with pytest.raises(ValueError, match="^model: .*full attention"):
            integration._check_engine(config, kv_cache_config)
    for name, value, field in [("cache_config", types.SimpleNamespace(cache_dtype="fp8"), "kv_cache_dtype"),
                               ("speculative_config", object(), "speculative_config")]:
        with pytest.raises(ValueError, match=f"^{field}: "):
            integration._check_engine(types.SimpleNamespace(**{**vars(config), name: value}),
                                      groups(FullAttentionSpec(**spec)))


@pytest.mark.parametrize("tp_size, expected", [(1, [(0, 4)]), (2, [(0, 2), (2, 4)]), (4, [(0, 1), (1, 2), (2, 3),
                                                                                          (3, 4)]),
                                               (8, [(0, 1), (0, 1), (1, 2), (1, 2), (2, 3), (2, 3), (3, 4), (3, 4)])])
def test_rank_kv_heads(tp_size, expected):
    """Each tensor-parallel rank's KV heads of 4, as vLLM's QKVParallelLinear shards them (replicated past 4 ranks).
    Multi-rank serving itself is not run here."""
    heads = [integration.rank_kv_heads(4, tp_size, rank) for rank in range(tp_size)]
    assert [(h.start, h.stop) for h in heads] == expected


# ---- the OpenAI server, bfloat16 -----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    """`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 with the library's flags; always stopped."""
    port = _free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", os.path.join(files, "model"),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", str(MAX_LEN),
               "--block-size", str(BLOCK), "--enable-prefix-caching", "--enforce-eager", "--seed", "0",
               "--kv-cache-memory-bytes", str(64 << 20), "--enable-prompt-tokens-details",
               *integration.prefix_adapters_flags(_adapters(files))]
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w+")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"the server did not start:\n{log.read()[-4000:]}")
                time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log.close()


def _completion(url: str, prompt, adapter: str | None, **kwargs) -> tuple[int, dict]:
    body = {"model": "m", "prompt": prompt, "max_tokens": NEW, "temperature": 0.0, "return_token_ids": True,
            **kwargs}
    if adapter is not None:
        body["vllm_xargs"] = {"prefix_adapter": adapter}
    return _post(url + "/v1/completions", body)


def test_server(server, files, reference):
    """Concurrent mixed requests through the OpenAI API, the adapter in vllm_xargs: each gives PrefixModel.generate's
    tokens of that request alone; usage counts the plain prompt (its cached tokens count the placeholders); refusals
    are HTTP 400 naming the field; the server keeps serving."""
    model = json.load(urllib.request.urlopen(server + "/v1/models", timeout=30))["data"][0]["id"]
    cases = [(p, a) for p in PROMPTS for a in (None, *ADAPTERS)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda c: _completion(server, c[0], c[1], model=model), cases))
    tokenizer = _tokenizer()
    for (prompt, adapter), (status, reply) in zip(cases, replies):
        assert status == 200, reply
        choice = reply["choices"][0]
        assert choice["token_ids"] == reference.tokens(prompt, adapter), (prompt, adapter)
        assert reply["usage"]["prompt_tokens"] == len(tokenizer(prompt).input_ids)
        if adapter is not None:  # the placeholders count as cached
            assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] >= ADAPTERS[adapter]
    for kwargs, field in [({}, "prefix_adapter"), ({"prompt_logprobs": 1}, "prompt_logprobs")]:
        status, reply = _completion(server, "abc", "nope" if not kwargs else "long", model=model, **kwargs)
        assert status == 400 and field in json.dumps(reply), reply
    status, reply = _completion(server, "abc", "long", model=model)
    assert status == 200 and reply["choices"][0]["token_ids"] == reference.tokens("abc", "long")
    metrics = urllib.request.urlopen(server + "/metrics", timeout=30).read().decode()
    print("\n".join(line for line in metrics.splitlines() if "prefix_cache_hits_total" in line))
