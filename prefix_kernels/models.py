"""`PrefixModel`: a transformers model whose attention reads a trained prefix, PEFT's adapter format on disk."""

import contextlib
import functools
import inspect
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from .config import PrefixTuningConfig
from .encoder import PrefixEncoder
from .integrations.transformers import PrefixStates, register

WEIGHTS_NAME = "adapter_model.safetensors"
TABLE_KEY = "prompt_embeddings"
HEAD_PREFIX = "base_model."  # PEFT's key prefix for the task head saved with the prefix


def _adapter_dir(directory, adapter_name: str) -> str:
    """PEFT's layout: the "default" adapter at the top, every other one in a sub-directory of its name."""
    return os.fspath(directory) if adapter_name == "default" else os.path.join(directory, adapter_name)


def _read_adapter(directory) -> tuple[PrefixTuningConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of a saved adapter: `prompt_embeddings` and any task-head weights (`base_model.*`);
    safetensors and JSON only, never pickle."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"directory: {directory!r} is not a directory")
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):  # checked first: a pickle-only directory is told why it is refused
        found = ", ".join(sorted(os.listdir(directory))) or "nothing"
        raise ValueError(f"directory: expected {WEIGHTS_NAME} (safetensors is required; pickle files are refused), "
                         f"found: {found}")
    config = PrefixTuningConfig.from_pretrained(directory)
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"{WEIGHTS_NAME}: cannot be read as safetensors ({e})") from None
    if TABLE_KEY not in tensors:
        raise ValueError(f"{WEIGHTS_NAME}: expected a tensor named {TABLE_KEY!r}, found {sorted(tensors)}")
    return config, tensors


def _check_loadable(model: PreTrainedModel, config: PrefixTuningConfig, tensors: dict[str, torch.Tensor]):
    """Raise before anything is changed if the saved table or head weights don't fit `model`."""
    PrefixEncoder(config.resolve(model.config)).load_table(tensors[TABLE_KEY])
    params = dict(model.named_parameters())
    for key, tensor in tensors.items():
        if key == TABLE_KEY:
            continue
        name = key.removeprefix(HEAD_PREFIX)
        if not key.startswith(HEAD_PREFIX) or name not in params:
            raise ValueError(f"{WEIGHTS_NAME}: {key!r} is neither {TABLE_KEY!r} nor a parameter of the model")
        if params[name].shape != tensor.shape:
            raise ValueError(f"{WEIGHTS_NAME}: {key!r} has shape {list(tensor.shape)}, the model's is "
                             f"{list(params[name].shape)}")


def _check_supported(model: PreTrainedModel) -> None:
    """Refuse models whose attention prefix_kernels cannot reach."""
    if not model._can_set_attn_implementation():
        raise ValueError(f"model: {model.config.model_type} does not route its attention through transformers' "
                         "AttentionInterface, so prefix_kernels cannot reach it")


def _forward_signature(model: PreTrainedModel) -> inspect.Signature:
    """The base model's forward signature with the keyword-only `adapter_names` added (before any **kwargs)."""
    signature = inspect.signature(model.forward)
    params = list(signature.parameters.values())
    var_keyword = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    adapter_names = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
    return signature.replace(parameters=[p for p in params if p not in var_keyword] + [adapter_names] + var_keyword)


class PrefixModel(nn.Module):
    """A transformers model with prefix tuning: base weights frozen, one `PrefixEncoder` per adapter.

    Attention runs through `prefix_attention` (registered with transformers' `AttentionInterface`), so the
    model's KV cache holds only the sequence, never the prefix, and `generate()` uses the prefix. Real tokens
    are numbered from P, as in PEFT, so PEFT-trained adapters give the same numbers. Attributes it does not
    define fall through to the base model (`config`, `gradient_checkpointing_enable`, ...).

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    >>> model = get_prefix_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    >>> model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape
    torch.Size([1, 3, 64])
    """

    def __init__(self, model: PreTrainedModel, config: PrefixTuningConfig, adapter_name: str = "default"):
        super().__init__()
        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
        if not isinstance(config, PrefixTuningConfig):
            raise TypeError(f"config: expected a PrefixTuningConfig, got {type(config).__name__}")
        config = config.resolve(model.config)
        _check_supported(model)
        slots = _prefix_slots(model, config)  # every check passes before the model is touched
        self.base_model = model
        self.peft_config: dict[str, PrefixTuningConfig] = {}
        self.prefix_encoders = nn.ModuleDict()
        self.active_adapter = adapter_name
        self._call_adapter_names: list[str] | None = None
        self._call_offsets: int | torch.Tensor = 0
        self._slots = slots
        model.requires_grad_(False)
        self.heads = [name for name, _ in model.named_modules()
                      if name.rsplit(".", 1)[-1] in (config.modules_to_save or ())]
        for name in self.heads:
            model.get_submodule(name).requires_grad_(True)  # the task head trains with the prefix, as in PEFT
        self._add_adapter(adapter_name, config)
        self._forward_params = set(inspect.signature(model.forward).parameters)
        # Tools that read forward's signature to choose inputs (Trainer drops the dataset columns it doesn't name)
        # see the base model's arguments and adapter_names.
        self.forward = functools.partial(type(self).forward, self)
        self.forward.__signature__ = _forward_signature(model)
        self._padding_positions = next(
            ((m.create_position_ids_from_input_ids, m.padding_idx) for m in model.modules()
             if hasattr(m, "create_position_ids_from_input_ids") and hasattr(m, "padding_idx")), None)
        self._relative_bias, self._position_hook = self._encoder_decoder_positions(model, config)
        self._encoder_hook = None
        if config.encoder_decoder_placement == "full":
            self._encoder_hook = model.get_encoder().register_forward_pre_hook(self._inject_encoder_prefix,
                                                                               with_kwargs=True)
        self._previous_attention = model.config._attn_implementation
        model.set_attn_implementation(register())
        self._hook = model.register_forward_pre_hook(self._inject_prefix, with_kwargs=True)

    def _encoder_decoder_positions(self, model: PreTrainedModel, config: PrefixTuningConfig):
        """(T5's relative-bias attention, the hook on BART's learned decoder positions): how an encoder-decoder's
        decoder learns that the prefix comes first. (None, None) for other models. In the full placement the
        prefix keys get no relative bias: they also serve the encoder and cross-attention, where PEFT has none."""
        if not getattr(model.config, "is_encoder_decoder", False):
            return None, None
        relative_bias = None
        if config.encoder_decoder_placement == "peft":
            relative_bias = _in_decoder(model, lambda name, m: hasattr(m, "relative_attention_bias"))
        positions = _in_decoder(model, lambda name, m: name.endswith("embed_positions")
                                and "position_ids" in inspect.signature(m.forward).parameters)
        hook = None
        if positions is not None:
            hook = positions.register_forward_pre_hook(self._shift_decoder_positions, with_kwargs=True)
        return relative_bias, hook

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def _add_adapter(self, adapter_name: str, config: PrefixTuningConfig) -> PrefixEncoder:
        encoder = PrefixEncoder(config).to(self.base_model.device)
        if config.inference_mode:
            encoder.requires_grad_(False)
        self.peft_config[adapter_name] = config
        self.prefix_encoders[adapter_name] = encoder
        return encoder

    def _inject_prefix(self, module, args, kwargs):
        """Forward pre-hook on the base model: adds `prefix_states` and shifts positions by P, every call
        (including each step of `generate()`)."""
        if args:
            kwargs = self._as_keywords(module, args, kwargs)
        kwargs["prefix_states"], offsets = self._prefix_states(kwargs)
        self._call_offsets = offsets
        if "position_ids" in self._forward_params:
            kwargs["position_ids"] = self._positions(kwargs, offsets)
        return (), kwargs

    def _inject_encoder_prefix(self, module, args, kwargs):
        """Forward pre-hook on an encoder-decoder's encoder (full placement): `generate()` calls the encoder on
        its own, so its self-attention gets `prefix_states` here."""
        if args:
            kwargs = self._as_keywords(module, args, kwargs)
        kwargs["prefix_states"] = self._prefix_states(kwargs)[0]
        return (), kwargs

    def _prefix_states(self, kwargs) -> tuple[PrefixStates, int | torch.Tensor]:
        """(this call's prefix for every layer, the position offset: P, or each row's P as [B, 1])."""
        if self._call_adapter_names is None:
            encoder = self.prefix_encoders[self.active_adapter]
            states, offsets = PrefixStates(kv=encoder(), slots=self._slots), encoder.num_virtual_tokens
        else:
            states = self._bank_states(self._call_adapter_names, self._batch_size(kwargs))
            offsets = states.lengths[:, None]
        if self._relative_bias is not None:
            states.prefix_position_bias = functools.partial(_prefix_relative_bias, self._relative_bias, offsets)
        return states, offsets

    def _bank_states(self, adapter_names: list[str], batch: int) -> PrefixStates:
        """One bank holding each adapter the batch names, read by index; prefixes of different lengths are
        zero-padded to the longest and masked by `lengths`."""
        if batch % len(adapter_names):
            raise ValueError(f"adapter_names: expected one name per batch row ({batch}), got {len(adapter_names)}")
        names = [name for name in adapter_names for _ in range(batch // len(adapter_names))]  # generate's expansion
        distinct = list(dict.fromkeys(names))
        prefixes = [self.prefix_encoders[name]() for name in distinct]  # [L, 2, Hkv, P_a, D] each
        longest = max(p.shape[3] for p in prefixes)
        bank = torch.stack([torch.nn.functional.pad(p, (0, 0, 0, longest - p.shape[3])) for p in prefixes], dim=2)
        device = bank.device
        index = torch.tensor([distinct.index(name) for name in names], device=device)
        lengths = torch.tensor([self.prefix_encoders[name].num_virtual_tokens for name in names], device=device)
        return PrefixStates(kv=bank, index=index, lengths=lengths, slots=self._slots)

    @staticmethod
    def _batch_size(kwargs) -> int:
        for name in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
            if kwargs.get(name) is not None:
                return kwargs[name].shape[0]
        return kwargs["encoder_outputs"][0].shape[0]

    @contextlib.contextmanager
    def _adapters_for_call(self, adapter_names):
        """Route each batch row to its named adapter for the duration of one forward / generate call."""
        if adapter_names is not None:
            if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
                raise TypeError(f"adapter_names: expected a list of adapter names, got {adapter_names!r}")
            unknown = sorted(set(adapter_names) - set(self.prefix_encoders))
            if unknown or not adapter_names:
                raise ValueError(f"adapter_names: unknown adapter(s) {unknown or '(empty list)'}; "
                                 f"loaded: {sorted(self.prefix_encoders)}")
            adapter_names = list(adapter_names)
        self._call_adapter_names = adapter_names
        try:
            yield
        finally:
            self._call_adapter_names = None

    @staticmethod
    def _as_keywords(module, args, kwargs) -> dict:
        signature = inspect.signature(module.forward)
        bound = signature.bind_partial(*args, **kwargs).arguments
        for name, param in signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                bound.update(bound.pop(name, {}))
        return bound

    def _positions(self, kwargs, offsets) -> torch.Tensor:
        """Positions of the real tokens, shifted by the prefix length (an int, or [B, 1] per row): the given
        `position_ids`, else the model's own numbering as if P tokens came before the cache."""
        if kwargs.get("position_ids") is not None:
            return kwargs["position_ids"] + offsets
        tokens = kwargs.get("input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        if tokens is not None and self._padding_positions is not None:
            numbering, padding_idx = self._padding_positions  # RoBERTa's family: numbered after padding_idx
            return numbering(tokens, padding_idx, past + offsets)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        return torch.arange(past, past + tokens.shape[1], device=tokens.device)[None] + offsets

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The base model's forward (same arguments, same outputs) with the active adapter's prefix, or with
        `adapter_names` one adapter per batch row (a mixed batch; each row gives what it gives alone)."""
        with self._adapters_for_call(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The base model's `generate()`, with the prefix read at every step (per row with `adapter_names`);
        the model's cache never holds the prefix."""
        with self._adapters_for_call(adapter_names):
            return self.base_model.generate(*args, **kwargs)

    def get_base_model(self) -> PreTrainedModel:
        return self.base_model

    def get_prefix(self, adapter_name: str | None = None) -> torch.Tensor:
        """`[L, 2, Hkv, P, D]`: every layer's prefix keys/values of an adapter (default: the active one)."""
        return self.prefix_encoders[self._known(adapter_name or self.active_adapter)]()

    def _known(self, adapter_name: str) -> str:
        if adapter_name not in self.prefix_encoders:
            raise ValueError(f"adapter_name: unknown adapter {adapter_name!r}; loaded: {sorted(self.prefix_encoders)}")
        return adapter_name

    def set_adapter(self, adapter_name: str) -> None:
        self.active_adapter = self._known(adapter_name)

    def load_adapter(self, directory, adapter_name: str, is_trainable: bool = False) -> None:
        """Load a saved adapter (ours or PEFT's) under `adapter_name`; on any error the model is unchanged."""
        if adapter_name in self.prefix_encoders:
            raise ValueError(f"adapter_name: {adapter_name!r} is already loaded")
        config, tensors = _read_adapter(directory)
        config.inference_mode = not is_trainable
        _check_loadable(self.base_model, config, tensors)
        heads = sorted(k for k in tensors if k != TABLE_KEY)
        if heads:
            raise ValueError(f"directory: this adapter carries task-head weights ({', '.join(heads)}); a model holds "
                             "one head, so load it with PrefixModel.from_pretrained")
        self._add_adapter(adapter_name, config.resolve(self.base_model.config)).load_table(tensors[TABLE_KEY])

    @classmethod
    def from_pretrained(cls, model: PreTrainedModel, directory, adapter_name: str = "default",
                        is_trainable: bool = False) -> "PrefixModel":
        """Wrap `model` with the adapter saved in `directory` (by `save_pretrained` here or by PEFT).

        With `is_trainable=True` training resumes on the saved table (an MLP projection, if any, is folded).
        """
        config, tensors = _read_adapter(directory)
        config.inference_mode = not is_trainable
        _check_loadable(model, config, tensors)  # fail before wrapping the model
        wrapped = cls(model, config, adapter_name)
        wrapped.prefix_encoders[adapter_name].load_table(tensors[TABLE_KEY])
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, tensor in tensors.items():
                if key != TABLE_KEY:
                    params[key.removeprefix(HEAD_PREFIX)].copy_(tensor)
        if not is_trainable:
            model.requires_grad_(False)
        return wrapped

    def save_pretrained(self, directory) -> None:
        """PEFT's format: `adapter_config.json` and `adapter_model.safetensors` (`prompt_embeddings`) per adapter."""
        heads = {f"{HEAD_PREFIX}{head}.{name}": param.detach().to("cpu").contiguous()
                 for head in self.heads for name, param in self.base_model.get_submodule(head).named_parameters()}
        for name, encoder in self.prefix_encoders.items():
            target = _adapter_dir(directory, name)
            self.peft_config[name].save_pretrained(target)
            table = encoder.flat_table().detach().to("cpu").contiguous()
            save_file({TABLE_KEY: table, **heads}, os.path.join(target, WEIGHTS_NAME), metadata={"format": "pt"})

    def print_trainable_parameters(self) -> None:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        print(f"trainable params: {trainable:,d} || all params: {total:,d} "
              f"|| trainable%: {100 * trainable / total:.4f}")

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """The base model's gradient checkpointing, non-reentrant (a reentrant checkpoint would drop the
        prefix's gradient, since the prefix is not an input of the checkpointed layer)."""
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.setdefault("use_reentrant", False):
            raise ValueError("gradient_checkpointing_kwargs: use_reentrant=True would drop the prefix's gradient; "
                             "expected use_reentrant=False (the default)")
        self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def _shift_decoder_positions(self, module, args, kwargs):
        """Pre-hook on an encoder-decoder's learned decoder positions: real tokens start at P, as in PEFT."""
        offsets = self._call_offsets
        if isinstance(offsets, torch.Tensor):
            if not bool((offsets == offsets[0]).all()):
                raise ValueError(f"adapter_names: {self.base_model.config.model_type}'s learned decoder positions "
                                 "need every row's adapter to have the same num_virtual_tokens")
            offsets = int(offsets[0])
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + offsets
        return args, kwargs

    def unload(self) -> PreTrainedModel:
        """Detach the prefix machinery and return the base model with its previous attention implementation."""
        for hook in (self._hook, self._position_hook, self._encoder_hook):
            if hook is not None:
                hook.remove()
        self.base_model.set_attn_implementation(self._previous_attention)
        return self.base_model


def _prefix_slots(model: PreTrainedModel, config: PrefixTuningConfig) -> dict | None:
    """Which layer of the prefix each attention reads; None when every attention reads its own layer_idx.

    Encoder-decoders, "peft" placement: decoder self-attention only, as in PEFT. With PEFT's
    `num_transformer_submodules=2`, decoder layer i reads PEFT's layer (2 * i) mod L, the slot PEFT's own cache
    construction gives it, so PEFT-trained tables keep their meaning. "full" placement: encoder self-attention
    reads layers [0, L), decoder self-attention [L, 2L), cross-attention [2L, 3L)."""
    if not getattr(model.config, "is_encoder_decoder", False):
        return _kv_sharing_slots(model)
    full, n = config.encoder_decoder_placement == "full", config.num_layers
    slots = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        numbers = [int(part) for part in parts if part.isdigit()]
        if not numbers or parts[-1] not in ("SelfAttention", "self_attn", "EncDecAttention", "encoder_attn"):
            continue
        layer, is_self = numbers[0], parts[-1] in ("SelfAttention", "self_attn")
        if "decoder" in parts and is_self:
            slots[module] = n + layer if full else (2 * layer) % n if config.num_transformer_submodules == 2 else layer
        elif full and "encoder" in parts and is_self:
            slots[module] = layer
        elif full and "decoder" in parts:
            slots[module] = 2 * n + layer
    if not slots:
        raise ValueError(f"model: found no decoder self-attention in {model.config.model_type}")
    return slots


def _kv_sharing_slots(model: PreTrainedModel) -> dict | None:
    """Decoders whose later layers reuse an earlier layer's keys/values (Gemma's KV sharing): those layers read
    that layer's prefix too, as they see its cache in PEFT. None when no layer shares."""
    attentions = [m for m in model.modules() if hasattr(m, "is_kv_shared_layer")]
    if not any(m.is_kv_shared_layer for m in attentions):
        return None
    slots, stores = {}, {}
    for module in attentions:
        slots[module] = stores[module.layer_type] if module.is_kv_shared_layer else module.layer_idx
        if getattr(module, "store_full_length_kv", False):
            stores[module.layer_type] = module.layer_idx
    return slots


def _in_decoder(model: PreTrainedModel, predicate) -> nn.Module | None:
    """The first module of the decoder for which `predicate(name, module)` holds (T5's relative position bias,
    BART's learned positions)."""
    return next((m for name, m in model.named_modules() if "decoder" in name.split(".") and predicate(name, m)),
                None)


def _prefix_relative_bias(attention: nn.Module, lengths, query_length: int, past: int) -> torch.Tensor:
    """`[1 or B, Hq, Sq, P]`: T5's relative position bias of the prefix keys as PEFT places them, the first P
    positions before the sequence (so the queries sit at P + past + i). `lengths`: P, or each row's P `[B, 1]`."""
    if not isinstance(lengths, torch.Tensor):
        return attention.compute_bias(query_length, lengths + past + query_length, past_seen_tokens=lengths + past
                                      )[..., :lengths]
    longest = int(lengths.max())
    rows = []
    for n in lengths[:, 0].tolist():
        bias = attention.compute_bias(query_length, n + past + query_length, past_seen_tokens=n + past)[..., :n]
        rows.append(torch.nn.functional.pad(bias, (0, longest - n)))
    return torch.cat(rows, dim=0)


def get_prefix_model(model: PreTrainedModel, config: PrefixTuningConfig,
                     adapter_name: str = "default") -> PrefixModel:
    """PEFT's `get_peft_model` for prefix tuning: freeze `model` and give it a trainable prefix."""
    return PrefixModel(model, config, adapter_name)


def from_peft(peft_model) -> PrefixModel:
    """A `PrefixModel` over a PEFT prefix-tuning `PeftModel`, sharing its base model and prefix parameters."""
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

