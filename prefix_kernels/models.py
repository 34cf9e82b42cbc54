"""`PrefixModel`: a transformers model whose attention reads a trained prefix; wrap, forward, generate,
disable_adapter, unload.

Per-call state never lives on the model. Each `forward` / `generate` call builds a `PrefixPlan` (which adapters,
their tables in the model's dtype, bank index, lengths) once, and hands it to the base model as the keyword
argument `prefix_plan`, which transformers passes down to every attention layer. `generate` runs on a per-call
view of the base model (the same modules, its own forward) whose every decoding step gets the call's plan.
"""

import contextlib
import contextvars
import copy
import dataclasses
import functools
import inspect
import threading
import warnings

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.integrations.peft import PeftAdapterMixin

from . import quirks
from .adapters import adapter_dir, check_adapter_name, read_adapter, write_adapter
from .config import TASK_HEADS, ModelMismatchError, PrefixTuningConfig
from .encoder import PrefixEncoder
from .integrations.attention_interface import ATTENTION_NAME, EAGER_NAME, register
from .plan import Packing, Positions, PrefixPlan, ServedBank, bank_plan, find_packing, single_plan
from .quirks import PrefixLayout

# `disable_adapter()`: the wrappers disabled in this thread / context, and how many blocks are open anywhere. The
# count is what a compiled forward checks (a plain int, which torch.compile guards on); only while some block is
# open does a call read the context variable, which compiled code cannot.
_DISABLED: contextvars.ContextVar[tuple] = contextvars.ContextVar("prefix_kernels_disabled", default=())
_disabled_blocks = 0
_disabled_lock = threading.Lock()


def _as_config(config) -> PrefixTuningConfig:
    """Ours, or PEFT's `PrefixTuningConfig` (converted field for field)."""
    if isinstance(config, PrefixTuningConfig):
        return config
    peft_type = getattr(config, "peft_type", None)
    if getattr(peft_type, "value", peft_type) == "PREFIX_TUNING" and hasattr(config, "to_dict"):
        return PrefixTuningConfig.from_dict(config.to_dict())
    raise TypeError(f"config: expected prefix_kernels.PrefixTuningConfig or peft.PrefixTuningConfig, got "
                    f"{type(config).__module__}.{type(config).__name__}")


def _check_model(model) -> None:
    """Refuse what is not a loaded transformers model whose attention prefix_kernels can reach."""
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        raise TypeError(f"model: expected a loaded transformers model (for example "
                        f"AutoModelForCausalLM.from_pretrained({model!r})), got the name {model!r}")
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    if not model._can_set_attn_implementation():
        raise ValueError(f"model: {model.config.model_type} is not supported: its attention does not go through "
                         "transformers' AttentionInterface, where prefix_kernels reads the prefix")
    if model.config._attn_implementation in (ATTENTION_NAME, EAGER_NAME):
        raise ValueError("model: already wrapped by a PrefixModel; call unload() on that wrapper first, or wrap a "
                         "fresh copy of the model")


def _model_task_type(model: PreTrainedModel) -> str | None:
    """The task type `model`'s class is built for, from transformers' auto-class tables (None if not listed)."""
    from transformers.models.auto import modeling_auto

    tables = {"SEQ_CLS": "SEQUENCE_CLASSIFICATION", "TOKEN_CLS": "TOKEN_CLASSIFICATION",
              "QUESTION_ANS": "QUESTION_ANSWERING", "CAUSAL_LM": "CAUSAL_LM", "SEQ_2_SEQ_LM": "SEQ_TO_SEQ_CAUSAL_LM",
              "FEATURE_EXTRACTION": ""}
    name = type(model).__name__
    for task_type, table in tables.items():
        classes = getattr(modeling_auto, f"MODEL_FOR_{table}_MAPPING_NAMES" if table else "MODEL_MAPPING_NAMES")
        if any(name == c or (isinstance(c, tuple) and name in c) for c in classes.values()):
            return task_type
    return None


def _check_task_type(model: PreTrainedModel, config: PrefixTuningConfig) -> None:
    """Refuse a task type that does not fit the model: its head would stay frozen (a classifier wrapped as a
    language model trains the prefix against a random head) or the prefix would be laid out for another kind of
    model (SEQ_2_SEQ_LM on a decoder)."""
    built_for = _model_task_type(model)
    if built_for is None or config.task_type == built_for:
        return
    name = type(model).__name__
    if config.task_type is None:
        if built_for in TASK_HEADS:
            raise ValueError(f"task_type: None would leave {name}'s task head frozen (untrained); expected "
                             f"{built_for!r}, which trains the head with the prefix")
        return
    raise ValueError(f"task_type: {config.task_type!r} does not fit {name}, a {built_for} model; expected "
                     f"{built_for!r}")


def _check_layout(model: PreTrainedModel, config: PrefixTuningConfig,
                  wrapper: tuple[PrefixTuningConfig, PrefixLayout] | None = None) -> PrefixLayout:
    """The one check of an adapter's layout, made when a wrapper is built and whenever an adapter is added, before
    anything changes: its task type fits `model`, and beside a wrapper's adapters (`wrapper`: the config the wrapper
    was built with, and its layout) it places its table as they do: the same placement, and every attention
    reading the same table layer (PEFT's `num_transformer_submodules`, which task type None sets to 1 and
    SEQ_2_SEQ_LM to 2, decides an encoder-decoder's). Returns the layout."""
    _check_task_type(model, config)
    layout = quirks.layout(model, config)
    if wrapper is None:
        return layout
    built, built_layout = wrapper
    if config.encoder_decoder_placement != built.encoder_decoder_placement:
        raise ValueError(f"encoder_decoder_placement: the adapter's is {config.encoder_decoder_placement!r}, this "
                         f"model's adapters use {built.encoder_decoder_placement!r}; load it into a wrapper of its own")
    if layout.slots != built_layout.slots:  # which table layer each attention reads (heads are the model's)
        raise ValueError(f"num_transformer_submodules: the adapter's is {config.num_transformer_submodules} (task_type "
                         f"{config.task_type!r}), this model's adapters use {built.num_transformer_submodules} "
                         f"(task_type {built.task_type!r}): other attentions would read its table layers; load it "
                         "into a wrapper of its own")
    return layout


def _forward_signature(model: PreTrainedModel) -> inspect.Signature:
    """The base model's forward signature with the keyword-only `adapter_names` added (before any **kwargs)."""
    signature = inspect.signature(model.forward)
    params = list(signature.parameters.values())
    var_keyword = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    adapter_names = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
    return signature.replace(parameters=[p for p in params if p not in var_keyword] + [adapter_names] + var_keyword)


def _keywords(signature: inspect.Signature, args, kwargs) -> dict:
    """Positional arguments of the base model's forward, by name."""
    bound = signature.bind_partial(*args, **kwargs).arguments
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            bound.update(bound.pop(name, {}))
    return bound


def _batch_rows(kwargs) -> int:
    for name in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
        if kwargs.get(name) is not None:
            return kwargs[name].shape[0]
    if kwargs.get("encoder_outputs") is not None:
        return kwargs["encoder_outputs"][0].shape[0]
    raise ValueError("input_ids: expected input_ids or inputs_embeds (or an encoder-decoder's decoder inputs or "
                     "encoder_outputs), got none")


def _generation_inputs(args, kwargs) -> torch.Tensor | None:
    """The prompt of a `generate` call (`input_ids`, `inputs` or `inputs_embeds`, by keyword or first positional);
    None when there is none (the model starts from its BOS token or from `encoder_outputs`)."""
    for name in ("input_ids", "inputs", "inputs_embeds"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return args[0] if args else None


def _generation_rows(prompt: torch.Tensor | None, kwargs) -> int:
    """The input rows of a `generate` call, found as transformers finds them: the prompt's, else the encoder
    outputs', else those of the first tensor argument; one row when there is none."""
    if prompt is not None:
        return prompt.shape[0]
    if kwargs.get("encoder_outputs") is not None:
        return kwargs["encoder_outputs"][0].shape[0]
    return next((value.shape[0] for value in kwargs.values() if isinstance(value, torch.Tensor)), 1)


# The adapter methods of transformers' own PEFT integration (and PEFT's merging) that prefix tuning has no use for.
_NOT_PROVIDED = frozenset(name for name in dir(PeftAdapterMixin) if not name.startswith("_")) | {
    "merge_and_unload", "merge_adapter", "unmerge_adapter"}


class PrefixModel(nn.Module):
    """A transformers model with prefix tuning: base weights frozen, one `PrefixEncoder` per adapter.

    Attention runs through `prefix_attention` (registered with transformers' `AttentionInterface`), so the
    model's KV cache holds only the sequence, never the prefix, and `generate()` uses the prefix. Real tokens
    are numbered from P, as in PEFT, so PEFT-trained adapters give the same numbers. Attributes it does not
    define fall through to the base model (`config`, `device`, ...).

    Each call carries its own state: concurrent calls from several threads (each with its own `adapter_names`)
    and nested calls see only their own adapters. Outside a call of this wrapper the base model computes what it
    computed before wrapping; `unload()` gives it back as it was.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    >>> model = get_prefix_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    >>> model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape
    torch.Size([1, 3, 64])
    """

    def __init__(self, model: PreTrainedModel, config, adapter_name: str = "default", *,
                 table: torch.Tensor | None = None):
        """Wrap `model` with an adapter built from `config`: a new one, or one holding a saved `prompt_embeddings`
        `table` `[P, L * 2 * token_dim]` (no projection MLP is then built)."""
        super().__init__()
        _check_model(model)
        config = _as_config(config).resolve(model.config)
        check_adapter_name(adapter_name)
        layout = _check_layout(model, config)  # every check passes before the model is touched
        self.base_model = model
        self.peft_config: dict[str, PrefixTuningConfig] = {}
        self.prefix_encoders = nn.ModuleDict()
        self.active_adapter = adapter_name
        self._layout = layout
        self._built_with = config  # the layout every adapter added later must share
        self._unloaded = False
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self._previous_attention = model.config._attn_implementation
        self._signature = inspect.signature(model.forward)
        self._takes_position_ids = "position_ids" in self._signature.parameters
        self._t5_bias = quirks.T5PrefixBias.of(model, config)
        self._decoder_positions = quirks.LearnedDecoderPositions.of(model)
        self._positions = Positions(model)
        model.requires_grad_(False)
        self.heads = [name for name, _ in model.named_modules()
                      if name.rsplit(".", 1)[-1] in (config.modules_to_save or ())]
        for name in self.heads:
            model.get_submodule(name).requires_grad_(True)  # the task head trains with the prefix, as in PEFT
        self._add_adapter(adapter_name, config, table)
        # Tools that read forward's signature to choose inputs (Trainer drops the dataset columns it doesn't name)
        # see the base model's arguments and adapter_names.
        self.forward = functools.partial(type(self).forward, self)
        self.forward.__signature__ = _forward_signature(model)
        model.set_attn_implementation(register(self._previous_attention))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            if name in _NOT_PROVIDED:  # not transformers' PEFT integration, which would ask for PEFT's LoRA
                raise AttributeError(f"PrefixModel has no {name}(): its adapters are managed by load_adapter, "
                                     "add_adapter, set_adapter, delete_adapter, disable_adapter() and unload(); "
                                     "a prefix cannot be merged into the weights") from None
            return getattr(self.base_model, name)

    # ---- calls --------------------------------------------------------------------------------------------------

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The base model's forward (same arguments, same outputs) with the active adapter's prefix, or with
        `adapter_names` one adapter per batch row (a mixed batch; each row gives what it gives alone).

        Packed batches (one row holding several sequences, as `DataCollatorWithFlattening` makes them) are
        recognised as transformers' flash path does, from `cu_seq_lens_q`/`cu_seq_lens_k` or from `position_ids`
        that restart at 0: every packed sequence sees the whole prefix and only its own tokens, its positions
        restarting at P. `adapter_names` then has one name per batch row or one per packed sequence.
        """
        self._check_usable()
        if args:
            kwargs = _keywords(self._signature, args, kwargs)
        if self._adapter_disabled():
            return self.base_model(**kwargs)
        prepare = self._prepare if adapter_names is None else self._prepare_mixed
        plan, kwargs = prepare(kwargs, adapter_names)
        return self._run(self.base_model, plan, kwargs)

    def _prepare(self, kwargs: dict, adapter_names) -> tuple[PrefixPlan, dict]:
        """A forward's plan and the base model's keyword arguments (positions shifted, the plan in `prefix_plan`)."""
        packing = find_packing(kwargs, self.base_model.config.is_encoder_decoder)
        rows = _batch_rows(kwargs)
        names = self._names(adapter_names)
        if packing is not None and names is not None and len(names) == rows:
            names = [name for name in names for _ in range(packing.sequences)]  # the row's sequences
            rows = len(names)
        elif packing is not None:
            rows = packing.sequences
        plan = self._plan(names, rows, "one name per batch row" if packing is None else
                          "one name per batch row or per packed sequence")
        return self._arguments(plan, kwargs, packing)

    # A mixed batch's names are Python strings, which torch.compile would bake into its graph (one graph per
    # composition): its plan is built outside compiled code, so the composition reaches it as tensors (bank index,
    # lengths, positions) and the model's layers compile once for every composition.
    _prepare_mixed = torch.compiler.disable(_prepare)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The base model's `generate()`, with the prefix read at every step (per input row with `adapter_names`,
        which follow each row into its beams and returned sequences); the model's cache never holds the prefix.
        The adapters' tables are computed once per call."""
        self._check_usable()
        if self._adapter_disabled():
            return self.base_model.generate(*args, **kwargs)
        prompt = _generation_inputs(args, kwargs)
        with torch.no_grad():
            plan = self._plan(self._names(adapter_names), _generation_rows(prompt, kwargs), "one name per input row")
            if prompt is not None and prompt.dim() >= 2:
                self._positions.check_length(prompt.shape[1], 0, max(plan.row_lengths))
            if self._built_with.encoder_decoder_placement == "full" and kwargs.get("encoder_outputs") is None:
                # generate() calls the encoder on its own: run it here, with the prefix, and hand over its outputs
                kwargs["encoder_outputs"] = self._call(self.base_model.get_encoder(), plan,
                                                       self._encoder_inputs(prompt, kwargs), None)
        view = forward_view(self.base_model, functools.partial(self._generation_step, plan), self._signature)
        return view.generate(*args, **kwargs)

    @staticmethod
    def _encoder_inputs(prompt: torch.Tensor | None, kwargs: dict) -> dict:
        """The encoder's inputs in a `generate` call: the prompt (token ids or embeddings) and its mask."""
        if prompt is None:
            raise ValueError("input_ids: generate() of a prefix in the encoder (encoder_decoder_placement='full') "
                             "needs input_ids, inputs_embeds or encoder_outputs, got none")
        inputs = {"inputs_embeds" if prompt.is_floating_point() else "input_ids": prompt}
        if kwargs.get("attention_mask") is not None:
            inputs["attention_mask"] = kwargs["attention_mask"]
        return inputs

    def generate_batch(self, inputs: list[list[int]], generation_config=None, continuous_batching_config=None, *,
                       adapter_names: list[str] | None = None, **kwargs):
        """transformers' `generate_batch` (continuous batching: same arguments, same `{request id: GenerationOutput}`),
        input i reading adapter `adapter_names[i]` (None: the active adapter for every input). Each request gives
        what it gives alone through `generate()`; the paged cache never holds the prefix."""
        from .integrations import continuous_batching

        return continuous_batching.generate_batch(self, inputs, generation_config, continuous_batching_config,
                                                  adapter_names=adapter_names, **kwargs)

    def init_continuous_batching(self, generation_config=None, continuous_batching_config=None, workload_hints=None):
        """transformers' `init_continuous_batching`: a manager (not started) whose `add_request(...,
        adapter_name=...)` and `add_requests(..., adapter_names=[...])` give each request its adapter."""
        from .integrations import continuous_batching

        return continuous_batching.PrefixBatchingManager(self, generation_config, continuous_batching_config,
                                                         workload_hints)

    def continuous_batching_context_manager(self, generation_config=None, **kwargs):
        """transformers' `continuous_batching_context_manager`: `with model.continuous_batching_context_manager() as
        manager:` gives a started manager (as `init_continuous_batching`'s), stopped on exit."""
        from .integrations import continuous_batching

        return continuous_batching.context_manager(self, generation_config, **kwargs)

    def _generation_step(self, plan: PrefixPlan, **kwargs):
        """One forward of `generate` (hooks already run by the view): the call's plan, for this step's rows."""
        return self._call(self.base_model.forward, plan, kwargs, None)

    def _call(self, call, plan: PrefixPlan, kwargs: dict, packing: Packing | None):
        """Run `call` (the base model, its forward, or its encoder) with `plan` for this forward's rows."""
        return self._run(call, *self._arguments(plan, kwargs, packing))

    def _arguments(self, plan: PrefixPlan, kwargs: dict, packing: Packing | None) -> tuple[PrefixPlan, dict]:
        """`plan` for this forward's rows, and the keyword arguments with positions shifted by P, packed sequences
        marked and the plan in `prefix_plan`."""
        kwargs = dict(kwargs)
        if packing is None:
            plan = plan.for_rows(_batch_rows(kwargs))
        else:
            plan = dataclasses.replace(plan, cu_seqlens=packing.cu_seqlens, max_seqlen=packing.longest)
            # A full-ones mask keeps transformers from building a dense mask over all the packed tokens.
            tokens = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
            kwargs["attention_mask"] = torch.ones(1, tokens.shape[1], dtype=torch.bool, device=tokens.device)
        if self._takes_position_ids:
            kwargs["position_ids"] = self._positions(kwargs, plan, packing)
        if self._t5_bias is not None:
            plan = dataclasses.replace(plan, prefix_position_bias=self._t5_bias.for_rows(plan.row_lengths))
        kwargs["prefix_plan"] = plan
        return plan, kwargs

    def _run(self, call, plan: PrefixPlan, kwargs: dict):
        """`call(**kwargs)` (the plan among them), with what must hold while it runs."""
        if self._decoder_positions is None:
            out = call(**kwargs)
        elif not plan.uniform:
            raise ValueError(f"adapter_names: {self.base_model.config.model_type}'s learned decoder positions need "
                             "every row's adapter to have the same num_virtual_tokens")
        else:
            with self._decoder_positions.during(plan.row_lengths[0]):
                out = call(**kwargs)
        if self._unloaded:  # unload() ran meanwhile: some layers may have run without the prefix
            raise RuntimeError("PrefixModel: unload() gave the base model back while this call ran, so part of it "
                               "ran without the prefix; its result is discarded (unload only after calls finish)")
        return out

    # ---- the plan -----------------------------------------------------------------------------------------------

    def _names(self, adapter_names) -> list[str] | None:
        if adapter_names is None:
            return None
        if isinstance(adapter_names, str) or not hasattr(adapter_names, "__iter__"):
            raise TypeError(f"adapter_names: expected a list of adapter names, got {adapter_names!r}")
        names = list(adapter_names)
        if not names or not all(isinstance(n, str) for n in names):
            raise TypeError(f"adapter_names: expected a non-empty list of adapter names, got {names!r}")
        unknown = sorted(set(names) - set(self.prefix_encoders))
        if unknown:
            raise ValueError(f"adapter_names: unknown adapter(s) {unknown}; loaded: {sorted(self.prefix_encoders)}")
        return names

    def _plan(self, names: list[str] | None, rows: int, expected: str) -> PrefixPlan:
        """The call's plan: the tables of its adapters, computed once, in the model's dtype."""
        dtype = self.base_model.dtype
        if names is None:
            encoder = self.prefix_encoders[self.active_adapter]
            return single_plan(self._layout.whole_gradient(encoder()).to(dtype), self._layout,
                               encoder.num_virtual_tokens)
        if len(names) != rows:
            raise ValueError(f"adapter_names: expected {expected} ({rows}), got {len(names)} names")
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.prefix_encoders.parameters()):
            # training: a bank of the call's adapters only, so no other adapter is handed a gradient
            tables = {name: self._layout.whole_gradient(self.prefix_encoders[name]()).to(dtype)
                      for name in dict.fromkeys(names)}
            return bank_plan(tables, names, self._layout)
        return self._served_bank(dtype).plan(names, self._layout)

    def _served_bank(self, dtype: torch.dtype) -> ServedBank:
        """Every loaded adapter's table in one bank, in `dtype`, kept until an adapter is added, deleted, moved or
        changed: inference calls then build no bank, and a bank's shape depends only on the adapters loaded, never
        on a call's composition. It holds what the adapters hold; nothing of a call.

        A change is seen through PyTorch's version counter (optimizer steps, `load_state_dict`, in-place edits under
        `torch.no_grad()`) and the parameters' storage; an in-place write through `.data` bypasses the counter and
        is not seen."""
        key = (dtype, tuple((name, weights_key(encoder)) for name, encoder in self.prefix_encoders.items()))
        bank = self.__dict__.get("_bank")
        if bank is None or bank.key != key:
            with torch.no_grad():
                tables = {name: encoder().to(dtype) for name, encoder in self.prefix_encoders.items()}
            bank = ServedBank.of(tables, key)
            self.__dict__["_bank"] = bank
        return bank

    # ---- adapters -----------------------------------------------------------------------------------------------

    def _add_adapter(self, adapter_name: str, config: PrefixTuningConfig,
                     table: torch.Tensor | None = None) -> PrefixEncoder:
        """Add an adapter (its layout already checked): a new encoder, or one holding a saved `table`."""
        encoder = PrefixEncoder(config) if table is None else PrefixEncoder.from_table(config, table)
        encoder.to(self.base_model.device)
        if table is None and self._layout.heads is not None:  # tensor-parallel ranks start from the same parameters
            self._layout.heads.broadcast(encoder)
        if config.inference_mode:
            encoder.requires_grad_(False)
        self.peft_config[adapter_name] = config
        self.prefix_encoders[adapter_name] = encoder
        return encoder

    def _new_name(self, adapter_name) -> str:
        check_adapter_name(adapter_name)
        if adapter_name in self.prefix_encoders:
            raise ValueError(f"adapter_name: {adapter_name!r} is already loaded")
        return adapter_name

    def _known(self, adapter_name) -> str:
        if not isinstance(adapter_name, str):
            raise TypeError(f"adapter_name: expected the name of one loaded adapter, got {type(adapter_name).__name__}"
                            " (give each batch row its own adapter with adapter_names=[...] in the call)")
        if adapter_name not in self.prefix_encoders:
            raise ValueError(f"adapter_name: unknown adapter {adapter_name!r}; loaded: {sorted(self.prefix_encoders)}")
        return adapter_name

    @property
    def active_adapters(self) -> list[str]:
        """PEFT's name: `[active_adapter]`."""
        return [self.active_adapter]

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the adapter of calls that name none (`adapter_names=None`)."""
        self.active_adapter = self._known(adapter_name)

    def add_adapter(self, adapter_name: str, peft_config) -> None:
        """PEFT's `add_adapter`: a new, untrained adapter under `adapter_name` (not made active). `peft_config` is a
        `PrefixTuningConfig`, ours or PEFT's, whose layout must match this model's adapters."""
        self._new_name(adapter_name)
        try:
            config = _as_config(peft_config).resolve(self.base_model.config)
        except ModelMismatchError as e:
            raise ValueError(f"peft_config: does not fit this model ({e})") from None
        _check_layout(self.base_model, config, (self._built_with, self._layout))
        self._add_adapter(adapter_name, config)

    def delete_adapter(self, adapter_name: str) -> None:
        """PEFT's `delete_adapter`: remove an adapter. Deleting the active one makes the first remaining adapter
        active, with a warning, as PEFT does; the last adapter stays (`unload()` gives the base model back)."""
        self._known(adapter_name)
        if len(self.prefix_encoders) == 1:
            raise ValueError(f"adapter_name: {adapter_name!r} is the only adapter, and a PrefixModel runs with one; "
                             "unload() gives the base model back")
        del self.prefix_encoders[adapter_name]
        del self.peft_config[adapter_name]
        if adapter_name == self.active_adapter:
            self.active_adapter = next(iter(self.prefix_encoders))
            warnings.warn(f"adapter {adapter_name!r} was active and is deleted; the active adapter is now "
                          f"{self.active_adapter!r}", stacklevel=2)

    def get_prefix(self, adapter_name: str | None = None) -> torch.Tensor:
        """`[L, 2, Hkv, P, D]`: every layer's prefix keys/values of an adapter (default: the active one)."""
        return self.prefix_encoders[self._known(adapter_name or self.active_adapter)]()

    def load_adapter(self, directory, adapter_name: str, is_trainable: bool = False) -> None:
        """Load a saved adapter (ours or PEFT's) under `adapter_name`. Its layout (task type, placement, PEFT's
        `num_transformer_submodules`) is checked as when the wrapper was built, and must match this model's
        adapters; on any error the model is unchanged."""
        self._new_name(adapter_name)
        saved = read_adapter(directory, self.base_model, is_trainable)
        if saved.heads:
            raise ValueError(f"directory: this adapter carries task-head weights ({', '.join(sorted(saved.heads))}); "
                             "a model holds one head, so load it with PrefixModel.from_pretrained")
        _check_layout(self.base_model, saved.config, (self._built_with, self._layout))
        self._add_adapter(adapter_name, saved.config, saved.table)

    @classmethod
    def from_pretrained(cls, model: PreTrainedModel, directory, adapter_name: str = "default",
                        is_trainable: bool = False) -> "PrefixModel":
        """Wrap `model` (a loaded transformers model) with the adapter saved in `directory` (by `save_pretrained`
        here or by PEFT). With `is_trainable=True` training resumes on the saved table (with `prefix_projection`
        the MLP is not rebuilt: the table is what it projected to); otherwise nothing trains."""
        _check_model(model)
        check_adapter_name(adapter_name)
        saved = read_adapter(directory, model, is_trainable)  # fail before wrapping the model
        wrapped = cls(model, saved.config, adapter_name, table=saved.table)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in saved.heads.items():
                params[name].copy_(tensor)
        if not is_trainable:
            model.requires_grad_(False)
        return wrapped

    def save_pretrained(self, directory, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """PEFT's format: `adapter_config.json` and `adapter_model.safetensors` (`prompt_embeddings`) per adapter,
        the "default" adapter at the top of `directory` and each other one in a sub-directory of its name.

        `state_dict`, this wrapper's full state dict (PEFT's and transformers' keyword), is saved instead of the live
        parameters. Sharded parameters (DTensors, as FSDP2 leaves them) are gathered on every rank, then saved from
        one:

            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if torch.distributed.get_rank() == 0:
                model.save_pretrained(directory, state_dict=state)
        """
        heads = [f"base_model.{head}.{name}" for head in self.heads
                 for name, _ in self.base_model.get_submodule(head).named_parameters()]
        adapter = [f"prefix_encoders.{key}" for key in self.prefix_encoders.state_dict()] + heads
        if state_dict is None:
            state_dict = self.state_dict(keep_vars=True)
            if _distributed(state_dict[key] for key in adapter):
                raise ValueError("state_dict: the adapter's parameters are sharded (DTensors, as under FSDP2); gather "
                                 "them on every rank with get_model_state_dict(model, options=StateDictOptions("
                                 "full_state_dict=True, cpu_offload=True)) and pass the result as state_dict on the "
                                 "rank that saves")
        missing = [key for key in adapter if key not in state_dict]
        if missing:
            raise ValueError(f"state_dict: expected this model's full state dict, missing {missing}")
        for name in self.prefix_encoders:
            write_adapter(adapter_dir(directory, name), self.peft_config[name], self._table(name, state_dict),
                          {key.removeprefix("base_model."): state_dict[key] for key in heads})

    def _table(self, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        """An adapter's `prompt_embeddings` `[P, L * 2 * token_dim]`, computed from its parameters in `state_dict`."""
        encoder = self.prefix_encoders[adapter_name]
        prefix = f"prefix_encoders.{adapter_name}."
        # The encoder's structure (its MLP folded or not) on the meta device: no memory, no random draws
        config = dataclasses.replace(self.peft_config[adapter_name], prefix_projection=encoder.prefix_projection)
        with torch.device("meta"):
            saved = PrefixEncoder(config)
        saved.load_state_dict({key: state_dict[prefix + key] for key in encoder.state_dict()}, assign=True)
        return saved.flat_table()

    # ---- the base model -----------------------------------------------------------------------------------------

    def get_base_model(self) -> PreTrainedModel:
        """The wrapped transformers model; called directly, it computes what it computed before wrapping."""
        return self.base_model

    @contextlib.contextmanager
    def disable_adapter(self):
        """Calls of this wrapper inside the block (in this thread) run the base model without any prefix, as PEFT's
        `disable_adapter()` does (TRL's DPO uses it for reference logits)."""
        global _disabled_blocks
        token = _DISABLED.set((*_DISABLED.get(), self))
        with _disabled_lock:
            _disabled_blocks += 1
        try:
            yield
        finally:
            with _disabled_lock:
                _disabled_blocks -= 1
            _DISABLED.reset(token)

    def _adapter_disabled(self) -> bool:
        return _disabled_blocks > 0 and any(m is self for m in _DISABLED.get())

    def unload(self) -> PreTrainedModel:
        """Give the base model back as it was (attention implementation, which parameters require grad, no hooks);
        this wrapper refuses calls afterwards. A call in flight in another thread meanwhile raises RuntimeError
        when it finishes its step, rather than return a result computed partly without the prefix."""
        self._check_usable()
        self._unloaded = True  # first: a call that meets the restored attention sees the flag when it ends
        if self._decoder_positions is not None:
            self._decoder_positions.remove()
        self.base_model.set_attn_implementation(self._previous_attention)
        for name, param in self.base_model.named_parameters():
            param.requires_grad_(self._requires_grad.get(name, param.requires_grad))
        return self.base_model

    def _check_usable(self) -> None:
        if self._unloaded:
            raise RuntimeError("PrefixModel: unload() has given the base model back; this wrapper no longer runs "
                               "(wrap the model again with get_prefix_model or PrefixModel.from_pretrained)")

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """PEFT's (trainable parameters, all parameters)."""
        return (sum(p.numel() for p in self.parameters() if p.requires_grad),
                sum(p.numel() for p in self.parameters()))

    def print_trainable_parameters(self) -> None:
        """Print the trainable and total parameter counts, as PEFT does."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} "
              f"|| trainable%: {100 * trainable / total:.4f}")

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """The base model's activation (gradient) checkpointing, non-reentrant (a reentrant checkpoint would drop
        the prefix's gradient, since the prefix is not an input of the checkpointed layer)."""
        options = _non_reentrant("activation_checkpointing_kwargs", activation_checkpointing_kwargs)
        self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=options, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """PEFT's and older transformers' name for `activation_checkpointing_enable`."""
        options = _non_reentrant("gradient_checkpointing_kwargs", gradient_checkpointing_kwargs)
        self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=options, **kwargs)


def weights_key(encoder: torch.nn.Module) -> tuple:
    """What tells one state of an adapter's weights from another: the encoder, and each parameter's storage and
    version counter (bumped by optimizer steps, `load_state_dict` and in-place edits; not by writes through
    `.data`)."""
    return (id(encoder), *((p.data_ptr(), p._version) for p in encoder.parameters()))


def forward_view(model: PreTrainedModel, forward, signature: inspect.Signature) -> PreTrainedModel:
    """A shallow copy of `model` (the same modules, hooks and config) whose calls run `forward`, for one call or one
    engine: neither transformers' compiled forward nor a `Module.compile` of the original is carried over (both
    would run the original's forward, without the plan)."""
    view = copy.copy(model)
    view.__dict__.pop("_compiled_call", None)
    view._compiled_call_impl = None
    view.forward = forward
    view.forward.__signature__ = signature
    return view


def _distributed(tensors) -> bool:
    """Whether any of `tensors` is a DTensor (a shard or replica of a distributed parameter)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(t, DTensor) for t in tensors)


def _non_reentrant(name: str, options: dict | None) -> dict:
    options = dict(options or {})
    if options.setdefault("use_reentrant", False):
        raise ValueError(f"{name}: use_reentrant=True would drop the prefix's gradient; expected use_reentrant=False "
                         "(the default)")
    return options


def get_prefix_model(model: PreTrainedModel, config, adapter_name: str = "default") -> PrefixModel:
    """PEFT's `get_peft_model` for prefix tuning: freeze `model` and give it a trainable prefix. `config` is a
    `PrefixTuningConfig`, ours or PEFT's."""
    return PrefixModel(model, config, adapter_name)


def from_peft(peft_model) -> PrefixModel:
    """A `PrefixModel` over a PEFT prefix-tuning `PeftModel`, sharing its base model and prefix parameters. The
    PEFT model keeps computing what it computed (its own calls do not go through this wrapper)."""
    adapter = getattr(peft_model, "active_adapter", None)
    peft_config = getattr(peft_model, "peft_config", {}).get(adapter)
    peft_type = getattr(getattr(peft_config, "peft_type", None), "value", getattr(peft_config, "peft_type", None))
    if peft_type != "PREFIX_TUNING":
        raise ValueError(f"peft_model: expected a PEFT prefix-tuning model, got peft_type {peft_type!r}")
    config = PrefixTuningConfig.from_dict(peft_config.to_dict())
    peft_encoder = peft_model.prompt_encoder[adapter]
    wrapped = PrefixModel(peft_model.base_model, config, adapter)
    encoder = wrapped.prefix_encoders[adapter]
    encoder.embedding = peft_encoder.embedding
    if encoder.prefix_projection:
        encoder.transform = peft_encoder.transform
    return wrapped

