"""transformers' continuous batching, an adapter per request: `PrefixModel.generate_batch`,
`init_continuous_batching` and `continuous_batching_context_manager` run transformers' own engine.

The engine (`ContinuousBatchingManager`) schedules requests into steps. A step packs the new tokens of its requests
into one row; every layer writes their keys/values into a paged cache, gathers each request's cached and new keys,
and calls attention with both offsets (`cu_seq_lens_q`, `cu_seq_lens_k`). `PrefixBatchingManager` drives it with a
view of the base model (the same modules) whose forward, once per step, adds the step's `PrefixPlan`: the tables of
the step's requests read from one bank by index, with each request's length, and positions that start at each
request's own P. The paged cache holds only the sequence.

A request reads the adapter named when it was added, with the weights it had then: a manager takes an adapter's
table when a request first names it, and again (as a new version) after the adapter's parameters changed in place.
Requests already running finish on the weights they started with, as a `generate()` call does.

Prefix caching: the engine shares cache blocks between requests whose prompts start alike, matched by a hash chained
over the blocks' tokens. A block's keys depend on the adapter (every layer above the first sees the prefix), so the
manager salts each request's chain with its adapter version: the first token of the hashed tokens is moved into a
range of token ids of that version's own (`token + code * vocab`), so two versions never share a chain and one
version's requests still share theirs. (Hashes read token ids as int32: a version whose range would pass 2^31
shares no block; codes count the adapter versions a manager served.)

The engine's internals this relies on (transformers `SUPPORTED`, tested there; any other version is refused):
- `ContinuousBatchingManager.switch_to_cb_friendly_attn` (overridden: it takes only its own attention names);
- `ContinuousBatchingManager._create_batch_processor` (extended: the new processor's `cache` gets salted matching);
- `PagedAttentionCache.search_prefix_match(request_id, prompt_ids)` and `mark_complete_blocks(state,
  complete_blocks)`, which hash the tokens they are given (`state.initial_tokens + state.generated_tokens`), chained
  from a request's first block (wrapped on the manager's own cache object);
- `batch_processor.inputs_and_outputs.requests_in_batch`, the step's `FutureRequestState`s in the order of
  `cu_seq_lens_q` (`state.request_id`, `query_length`), read in the step;
- the manager's `output_router`, whose `deliver(output)` and `deliver_batch(outputs)` every output passes through
  (wrapped on the manager's own router: a request is forgotten when its last output is delivered);
- forked requests (`num_return_sequences > 1`) named `f"{parent}__child#{i}"`; a request queued again when the
  cache is full keeps its id;
- `ContinuousMixin.generate_batch`, run on a stand-in for the model, reads only its `generation_config` and
  `continuous_batching_context_manager(...)`, and calls the manager's `add_requests(inputs=..., ...)`;
- with any other attention name than flash's, sdpa's or `paged|eager`, the engine builds no mask, no CUDA graph and
  no decode fast path. Configurations that pad the step (CUDA graphs, compiled steps, async batching) are refused.
"""

import contextlib
import copy
import functools
import itertools
import threading
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import transformers
from packaging.specifiers import SpecifierSet
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import ContinuousBatchingManager, ContinuousMixin

from ..models import forward_view, weights_key
from ..plan import PrefixPlan, stack_bank
from .attention_interface import ATTENTION_NAME, EAGER_NAME

SUPPORTED = SpecifierSet(">=5.24,<5.26")
_FORK = "__child#"  # the engine names the forks of request r f"{r}__child#{i}"
_INT32 = 2**31  # block hashes read token ids as int32


def check_transformers() -> None:
    if transformers.__version__ not in SUPPORTED:
        raise RuntimeError(f"transformers {transformers.__version__}: continuous batching with prefix adapters relies "
                           f"on the engine's internals, tested with transformers{SUPPORTED}; install "
                           f"'prefix_kernels[serving]' for a version it was tested with")


@dataclass(frozen=True)
class _Version:
    """An adapter's weights as a manager serves them."""

    code: int  # unique for the manager's life: salts block hashes, so never reused
    table: torch.Tensor  # [L, 2, Hkv, P, D] in the model's dtype, taken once
    length: int  # P


@dataclass(eq=False)
class _Request:
    """A live request: the version it reads, and for a request with forks, how many the engine has yet to show."""

    version: _Version
    forks: int = 0
    finished: bool = False  # finished, kept until its forks are seen


class _Adapters:
    """What a manager serves: each adapter version asked for, and the version each live request reads.

    Written by the threads that add requests, read by the engine's thread (one lock). A version stays while it is
    its adapter's current one or a live request reads it; the bank of all of them is rebuilt when that set changes.
    A request is forgotten once it has finished or been cancelled, unless its id was added again meanwhile.
    """

    def __init__(self, model, forks: int):
        self.model = model
        self.forks = forks  # forks per request (num_return_sequences - 1)
        self.vocab = model.base_model.get_input_embeddings().num_embeddings
        self.lock = threading.Lock()
        self.codes = itertools.count()
        self.current: dict[str, tuple[tuple, _Version]] = {}  # name -> (weights fingerprint, version)
        self.versions: dict[int, _Version] = {}  # code -> version
        self.requests: dict[str, _Request] = {}  # request id -> request
        self.cancelled: list[tuple[str, _Request]] = []  # to forget once out of the engine's steps
        self.bank_codes: tuple[int, ...] = ()
        self.bank: torch.Tensor | None = None

    def version(self, name: str) -> _Version:
        """The version of adapter `name` a request added now reads: its current weights."""
        encoder = self.model.prefix_encoders[name]
        fingerprint = weights_key(encoder)
        with self.lock:
            known = self.current.get(name)
        if known is not None and known[0] == fingerprint:
            return known[1]
        with torch.no_grad():
            table = encoder().to(dtype=self.model.base_model.dtype, copy=True)
        version = _Version(next(self.codes), table, table.shape[3])
        with self.lock:
            self.current[name] = (fingerprint, version)
            self.versions[version.code] = version
        return version

    def add(self, request_id: str, version: _Version) -> None:
        with self.lock:
            self.requests[request_id] = _Request(version, self.forks)

    def discard(self, request_id: str) -> None:
        """Forget a request the engine refused."""
        with self.lock:
            self.requests.pop(request_id, None)

    def cancel(self, request_id: str) -> None:
        with self.lock:
            if request_id in self.requests:
                self.cancelled.append((request_id, self.requests[request_id]))

    def salted(self, request_id: str, tokens: list[int]) -> list[int] | None:
        """`tokens` as the request's block hashes read them: the first one moved into its version's own id range;
        None when that range is past int32 (the request then shares no block)."""
        with self.lock:
            first = tokens[0] + self._request(request_id).version.code * self.vocab
        return [first, *tokens[1:]] if first < _INT32 else None

    def finished(self, request_ids: list[str]) -> None:
        """Forget requests whose last output the engine is delivering."""
        with self.lock:
            for request_id in request_ids:
                self._forget(request_id, self.requests.get(request_id))

    def step(self, request_ids: list[str]) -> list[_Version]:
        """The versions the step's requests read; cancelled requests out of the engine's steps are forgotten."""
        with self.lock:
            versions = [self._request(request_id).version for request_id in request_ids]
            running = set(request_ids)
            for request_id, request in self.cancelled:
                if request_id not in running:
                    self._forget(request_id, request)
            self.cancelled = [item for item in self.cancelled if item[0] in running]
            return versions

    def bank_rows(self) -> tuple[torch.Tensor, dict[int, int]]:
        """(`[L, 2, N, Hkv, P, D]` every version's table zero-padded to the longest P, code -> entry)."""
        with self.lock:
            codes = tuple(self.versions)
            if codes != self.bank_codes:
                self.bank = stack_bank([self.versions[code].table for code in codes])
                self.bank_codes = codes
            return self.bank, {code: row for row, code in enumerate(codes)}

    def clear(self) -> None:
        """Forget every request (the engine has stopped); the versions stay, their codes never reused."""
        with self.lock:
            self.requests.clear()
            self.cancelled.clear()
            self._drop_unread()

    def _request(self, request_id: str) -> _Request:
        request = self.requests.get(request_id)
        if request is not None:
            return request
        parent_id = request_id.rpartition(_FORK)[0]
        parent = self.requests.get(parent_id)
        if parent is None:
            raise RuntimeError(f"continuous batching: request {request_id!r} was not added through this manager")
        request = self.requests[request_id] = _Request(parent.version)
        parent.forks -= 1
        if parent.finished:
            self._forget(parent_id, parent)
        return request

    def _forget(self, request_id: str, request: _Request | None) -> None:
        if request is None or self.requests.get(request_id) is not request:
            return  # gone already, or the id was added again
        if request.forks:
            request.finished = True  # its forks have yet to be seen
            return
        del self.requests[request_id]
        self._drop_unread()

    def _drop_unread(self) -> None:
        read = {request.version.code for request in self.requests.values()}
        read |= {version.code for _, version in self.current.values()}
        for code in [code for code in self.versions if code not in read]:
            del self.versions[code]


def _forget_when_delivered(router, adapters: _Adapters) -> None:
    """Forget each request as the engine delivers its last output (finished or failed), before the caller can see it
    (and add its id again). `router` is the engine's `OutputRouter`, this manager's own: every output passes through
    its `deliver` or `deliver_batch`."""
    deliver, deliver_batch = router.deliver, router.deliver_batch

    def deliver_one(output) -> None:
        adapters.finished([output.request_id] if output.is_finished() else [])
        deliver(output)

    def deliver_many(outputs) -> None:
        adapters.finished([output.request_id for output in outputs if output.is_finished()])
        deliver_batch(outputs)

    router.deliver, router.deliver_batch = deliver_one, deliver_many


def _share_per_adapter(cache, adapters: _Adapters) -> None:
    """Salt the block hashes of `cache` (the engine's `PagedAttentionCache`, this manager's own) per adapter version,
    so blocks are shared within a version and never across."""
    search, mark = cache.search_prefix_match, cache.mark_complete_blocks

    def search_prefix_match(request_id: str, prompt_ids: list[int]) -> int:
        salted = adapters.salted(request_id, prompt_ids)
        return 0 if salted is None else search(request_id, salted)

    def mark_complete_blocks(state, complete_blocks: dict[str, int]) -> None:
        salted = adapters.salted(state.request_id, state.initial_tokens) if complete_blocks else None
        if salted is not None:
            mark(SimpleNamespace(request_id=state.request_id, status=state.status, initial_tokens=salted,
                                 generated_tokens=state.generated_tokens), complete_blocks)

    cache.search_prefix_match = search_prefix_match
    cache.mark_complete_blocks = mark_complete_blocks


class _Modes:
    """The train/eval flag of every module of a model, kept to be put back (the engine runs the model in eval)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.saved: list | None = None

    def eval(self) -> None:
        if self.saved is None:
            self.saved = [(module, module.training) for module in self.model.modules()]
        self.model.eval()

    def restore(self) -> None:
        for module, training in self.saved or ():
            module.training = training
        self.saved = None


class PrefixBatchingManager(ContinuousBatchingManager):
    """transformers' `ContinuousBatchingManager` over a `PrefixModel`: `add_request(..., adapter_name=...)` and
    `add_requests(..., adapter_names=[...])` give each request its adapter (None: the active one); everything else
    (`start`, `stop`, `get_result`, `request_id_iter`, streaming, `cancel_request`) is transformers'.

    Requests are checked before anything is queued: an unknown adapter, token ids outside the vocabulary or a length
    the model cannot number is refused by argument name, and the engine keeps serving the others. Adapters loaded
    while it serves are served to requests added afterwards. Built by `PrefixModel.init_continuous_batching`.
    """

    def __init__(self, model, generation_config: GenerationConfig | None = None,
                 continuous_batching_config: ContinuousBatchingConfig | None = None, workload_hints=None):
        check_transformers()
        model._check_usable()
        _check_model(model)
        generation_config, continuous_batching_config = _configs(model, generation_config,
                                                                 continuous_batching_config)
        base = model.base_model
        self._prefix_model = model
        forks = (generation_config.num_return_sequences or 1) - 1
        self._adapters = _Adapters(model, forks)
        self._modes = _Modes(base)
        self._salted_cache = None
        self._ids = itertools.count()
        view = forward_view(base, functools.partial(self._step, base.forward), model._signature)  # adds each plan
        self._modes.eval()
        try:
            super().__init__(view, generation_config, continuous_batching_config, workload_hints)
            _check_engine_config(self.continuous_batching_config)
            if self.distributed_helper.tp_size > 1:  # other ranks receive requests the driver added, not ours
                raise ValueError("model: tensor-parallel continuous batching with prefix adapters is not supported")
            _forget_when_delivered(self.output_router, self._adapters)
        finally:
            self._modes.restore()

    # ---- the engine's hooks -------------------------------------------------------------------------------------

    def switch_to_cb_friendly_attn(self, model, auto_switch_to_flash: bool = True) -> None:
        """Keep prefix_kernels' attention, which runs the engine's packed steps (transformers' own version accepts only
        flash, sdpa and paged|eager); nothing is switched, so nothing is switched back."""
        if model.config._attn_implementation not in (ATTENTION_NAME, EAGER_NAME):
            raise ValueError(f"model: its attention implementation is {model.config._attn_implementation!r}, not "
                             "prefix_kernels'; was the PrefixModel unloaded?")

    def _create_batch_processor(self):
        processor = super()._create_batch_processor()
        if processor.cache is not self._salted_cache:  # a kept processor's cache is salted already
            _share_per_adapter(processor.cache, self._adapters)
            self._salted_cache = processor.cache
        return processor

    def _step(self, forward, **kwargs):
        """One engine step: the base model's forward with the step's plan and positions shifted by each P."""
        self._prefix_model._check_usable()
        batch = self.batch_processor.inputs_and_outputs.requests_in_batch
        versions = self._adapters.step([future.state.request_id for future in batch])
        plan, offsets = self._plan(versions, [future.query_length for future in batch], kwargs["input_ids"].device)
        kwargs["position_ids"] = kwargs["position_ids"] + offsets
        return forward(**kwargs, prefix_plan=plan)

    def _plan(self, versions: list[_Version], query_lengths: list[int], device: torch.device):
        """(the step's plan, its position offsets: P, or `[T]` one per query token), built from host values and one
        host-to-device copy."""
        layout = self._prefix_model._layout
        lengths = [version.length for version in versions]
        if all(version is versions[0] for version in versions):  # one adapter version: a shared prefix
            return PrefixPlan(kv=versions[0].table, layout=layout, row_lengths=(lengths[0],), paged=True), lengths[0]
        bank, rows = self._adapters.bank_rows()
        ragged = any(length != bank.shape[4] for length in lengths)  # some read fewer keys than the bank holds
        uniform = len(set(lengths)) == 1
        host = [rows[version.code] for version in versions] + (lengths if ragged else [])
        if not uniform:
            host += [length for length, q in zip(lengths, query_lengths) for _ in range(q)]
        values = torch.tensor(host, device=device)
        r = len(versions)
        plan = PrefixPlan(kv=bank, layout=layout, row_lengths=tuple(lengths[:1] if uniform else lengths),
                          index=values[:r], lengths=values[r:2 * r] if ragged else None, paged=True)
        return plan, lengths[0] if uniform else values[r * (2 if ragged else 1):]

    # ---- requests -----------------------------------------------------------------------------------------------

    def add_request(self, input_ids: list[int], request_id: str | None = None, max_new_tokens: int | None = None,
                    streaming: bool = False, record_timestamps: bool = False,
                    eos_token_id: int | list[int] | None = None, *, adapter_name: str | None = None,
                    **logit_processor_kwargs) -> str | None:
        """transformers' `add_request`, the request reading adapter `adapter_name` (None: the active adapter)."""
        version = self._check_request(input_ids, adapter_name, max_new_tokens)
        if request_id is None:
            request_id = f"req_{next(self._ids)}"
        self._adapters.add(request_id, version)  # before the engine can see the request
        added = super().add_request(input_ids, request_id, max_new_tokens, streaming, record_timestamps,
                                    eos_token_id, **logit_processor_kwargs)
        if added is None:
            self._adapters.discard(request_id)
        return added

    def add_requests(self, inputs: list[list[int]], max_new_tokens: int | None = None, streaming: bool = False,
                     record_timestamps: bool = False, *, adapter_names: list[str] | None = None,
                     **logit_processor_kwargs) -> list[str]:
        """transformers' `add_requests`, input i reading adapter `adapter_names[i]` (None: the active adapter for
        all). Every request is checked before any is queued; ids follow the inputs' order."""
        names = check_names(self._prefix_model, adapter_names, len(inputs), "one per input") or [None] * len(inputs)
        for input_ids, name in zip(inputs, names):
            self._check_request(input_ids, name, max_new_tokens)
        request_ids = [f"req_{next(self._ids)}" for _ in inputs]
        order = range(len(inputs))
        if self.continuous_batching_config.allow_block_sharing:  # alike prompts of one adapter one after another
            order = sorted(order, key=lambda i: (names[i] or "", list(inputs[i])), reverse=True)
        eos = self.generation_config.eos_token_id
        eos = self.model.config.eos_token_id if eos is None else eos
        for i in order:
            self.add_request(inputs[i], request_ids[i], max_new_tokens, streaming, record_timestamps,
                             -1 if eos is None else eos, adapter_name=names[i], **logit_processor_kwargs)
        return request_ids

    def cancel_request(self, request_id: str) -> None:
        super().cancel_request(request_id)
        self._adapters.cancel(request_id)

    def _check_request(self, input_ids, adapter_name: str | None, max_new_tokens: int | None) -> _Version:
        model = self._prefix_model
        name = model.active_adapter if adapter_name is None else adapter_name
        if not isinstance(name, str) or name not in model.prefix_encoders:
            raise ValueError(f"adapter_name: unknown adapter {name!r}; loaded: {sorted(model.prefix_encoders)}")
        ids = list(input_ids)
        vocab = self._adapters.vocab
        if not ids or min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"input_ids: expected a non-empty list of token ids in [0, {vocab}), got "
                             f"{len(ids)} ids" + (f" from {min(ids)} to {max(ids)}" if ids else ""))
        version = self._adapters.version(name)
        new = self.generation_config.max_new_tokens if max_new_tokens is None else max_new_tokens
        limit, what = _length_limit(model, version.length)
        if limit is not None and (new is None or len(ids) + new > limit):
            raise ValueError(f"input_ids: {len(ids)} tokens and max_new_tokens={new} exceed {what} ({limit} tokens "
                             "in all); give a shorter prompt or fewer new tokens")
        return version

    # ---- life cycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._modes.eval()
        super().start()

    def stop(self, block: bool = True, timeout: float | None = None, keep_for_next_session: bool = False,
             hard_stop: bool = False) -> None:
        """transformers' `stop`; once the engine's thread has ended, the model's train/eval flags are put back."""
        super().stop(block=block, timeout=timeout, keep_for_next_session=keep_for_next_session, hard_stop=hard_stop)
        if not self.is_running():
            self._modes.restore()
            self._adapters.clear()


def _check_model(model) -> None:
    """Refuse a wrapper whose positions or prefix layout a packed step cannot carry."""
    config = model.base_model.config
    if config.is_encoder_decoder or not model._takes_position_ids or model._decoder_positions is not None:
        raise ValueError(f"model: continuous batching with prefix adapters serves decoder-only models numbered by "
                         f"position_ids; {config.model_type} is not one")


def _check_engine_config(config: ContinuousBatchingConfig) -> None:
    """Refuse what would pad the engine's steps (CUDA graphs, compiled steps, async batching): a padded step has
    sequences no request holds, and its inputs are captured once."""
    if any(config.cuda_graph_booleans) or config.use_async_batching or config.varlen_compile_config is not None \
            or config.decode_compile_config is not None:
        raise ValueError("continuous_batching_config: CUDA graphs, compiled steps and async batching are not supported "
                         "with prefix adapters; expected use_cuda_graph=False, no compile config and "
                         "use_async_batching=False (the defaults here)")


def _length_limit(model, prefix_length: int) -> tuple[int | None, str]:
    """(the most tokens a request may hold, in words why), or (None, "") for no limit: a table of learned positions,
    whose first P the prefix takes. (A sliding window is applied per request inside the step.)"""
    config = model.base_model.config.get_text_config()
    if model._positions.limit is not None:
        return model._positions.limit - prefix_length, f"{config.model_type}'s learned positions after a prefix of " \
                                                       f"{prefix_length}"
    return None, ""


def _configs(model, generation_config, continuous_batching_config):
    """The generation and continuous-batching configs, resolved as transformers' `init_continuous_batching` does (a
    copy of the generation config: the model's own is not touched)."""
    generation_config = copy.deepcopy(generation_config if generation_config is not None
                                      else model.base_model.generation_config)
    if generation_config is None:
        raise ValueError("generation_config: the model has none; pass one")
    if generation_config.eos_token_id is None:
        generation_config.eos_token_id = -1
    if continuous_batching_config is None:
        continuous_batching_config = getattr(generation_config, "continuous_batching_config", None)
    return generation_config, continuous_batching_config or ContinuousBatchingConfig()


def check_names(model, adapter_names, count: int, expected: str) -> list[str] | None:
    """`adapter_names` as a list of `count` loaded adapter names, or None (every request reads the active adapter)."""
    if adapter_names is None:
        return None
    if isinstance(adapter_names, str) or not hasattr(adapter_names, "__iter__"):
        raise TypeError(f"adapter_names: expected a list of adapter names, got {adapter_names!r}")
    names = list(adapter_names)
    if len(names) != count:
        raise ValueError(f"adapter_names: expected {expected} ({count}), got {len(names)} names")
    unknown = sorted({repr(name) for name in names if not isinstance(name, str) or name not in model.prefix_encoders})
    if unknown:
        raise ValueError(f"adapter_names: unknown adapter(s) {', '.join(unknown)}; loaded: "
                         f"{sorted(model.prefix_encoders)}")
    return names


def _refuse_persistence(persistent_manager: bool) -> None:
    if persistent_manager:
        raise ValueError("persistent_manager: a PrefixModel keeps no manager; hold the one init_continuous_batching "
                         "returns instead (it starts again after stop)")


@contextlib.contextmanager
def context_manager(model, generation_config=None, block: bool = True, timeout: float | None = None,
                    continuous_batching_config=None, persistent_manager: bool = False, warmup: bool = True,
                    workload_hints=None):
    """transformers' `continuous_batching_context_manager` for a `PrefixModel`: a started manager, stopped on exit."""
    _refuse_persistence(persistent_manager)
    manager = PrefixBatchingManager(model, generation_config, continuous_batching_config, workload_hints)
    if warmup and not manager.warmed_up:
        manager.warmup()
    manager.start()
    try:
        yield manager
    finally:
        manager.stop(block=block, timeout=timeout)
        manager.destroy()


class _Inputs:
    """What transformers' `generate_batch` reads of a model, the adapters of its inputs bound."""

    def __init__(self, model, names: list[str] | None):
        self.model = model
        self.names = names

    @property
    def generation_config(self):
        return self.model.base_model.generation_config

    @contextlib.contextmanager
    def continuous_batching_context_manager(self, **kwargs):
        with context_manager(self.model, **kwargs) as manager:
            manager.add_requests = functools.partial(manager.add_requests, adapter_names=self.names)
            yield manager


def generate_batch(model, inputs, generation_config=None, continuous_batching_config=None, *,
                   adapter_names=None, persistent_manager: bool = False, **kwargs):
    """transformers' `generate_batch` on a `PrefixModel`, input i reading adapter `adapter_names[i]`; the names are
    checked before anything is queued (transformers' loop only logs what adding a request raises)."""
    check_transformers()
    model._check_usable()
    _refuse_persistence(persistent_manager)
    names = check_names(model, adapter_names, len(inputs), "one per input")
    return ContinuousMixin.generate_batch(_Inputs(model, names), inputs, generation_config,
                                          continuous_batching_config, **kwargs)
