"""`PrefixTuningConfig`: PEFT's prefix-tuning configuration, field for field, so configs and adapters carry over."""

import dataclasses
import json
import os
import stat
from dataclasses import dataclass, field
from typing import Any

CONFIG_NAME = "adapter_config.json"
MAX_CONFIG_BYTES = 1 << 20  # PEFT writes about 1 KB; a config is read whole, so its size is bounded first
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM", "QUESTION_ANS", "FEATURE_EXTRACTION")
# The task heads that train (and are saved) alongside the prefix, by PEFT's module names.
# Where an encoder-decoder's prefix goes: "peft", decoder self-attention only, PEFT's layout; "full", also encoder
# self-attention and cross-attention, the form of Li & Liang's paper (one table of 3 * L layers).
PLACEMENTS = ("peft", "full")
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"], "QUESTION_ANS": ["qa_outputs"]}
PEFT_TYPE = "PREFIX_TUNING"


class ModelMismatchError(ValueError):
    """A config field that contradicts the model it is applied to (an adapter trained for another model)."""


@dataclass
class PrefixTuningConfig:
    """Prefix tuning's settings, with PEFT's field names, defaults and meanings.

    Fields left None (`token_dim`, `num_attention_heads`, `num_layers`, `encoder_hidden_size`,
    `num_transformer_submodules`) are filled from the base model's config by `resolve`, exactly as PEFT does.
    With grouped-query attention the prefix is stored per KV head: `token_dim = head_dim * num_key_value_heads`
    and `num_attention_heads = num_key_value_heads`. `modules_to_save` names the task head that trains with the
    prefix (PEFT's default for SEQ_CLS / TOKEN_CLS: "classifier", "score"; QUESTION_ANS: "qa_outputs").

    >>> PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20).num_virtual_tokens
    20
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None
    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    modules_to_save: list[str] | None = None
    encoder_decoder_placement: str = "peft"
    peft_type: str = PEFT_TYPE
    extra_fields: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.task_type = getattr(self.task_type, "value", self.task_type)  # accepts peft.TaskType members
        self.peft_type = getattr(self.peft_type, "value", self.peft_type)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that holds an invalid value."""
        if self.peft_type != PEFT_TYPE:
            raise ValueError(f"peft_type: expected {PEFT_TYPE!r}, got {self.peft_type!r}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type: expected one of {', '.join(TASK_TYPES)} or None, got {self.task_type!r}")
        if self.encoder_decoder_placement not in PLACEMENTS:
            raise ValueError(f"encoder_decoder_placement: expected one of {', '.join(PLACEMENTS)}, "
                             f"got {self.encoder_decoder_placement!r}")
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights: expected None or 'zero', got {self.init_weights!r}")
        for name in ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers", "encoder_hidden_size",
                     "num_transformer_submodules"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}: expected a positive int or None, got {value!r}")
        for name in ("prefix_projection", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        for name in ("base_model_name_or_path", "revision"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: expected a string or None, got {getattr(self, name)!r}")
        modules = self.modules_to_save
        names = isinstance(modules, (list, tuple)) and all(isinstance(m, str) for m in modules)
        if modules is not None and not names:
            raise ValueError(f"modules_to_save: expected a list of module names or None, got {modules!r}")
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(
                f"num_transformer_submodules: expected 1, 2 or None, got {self.num_transformer_submodules}")
        if self.token_dim is not None and self.num_attention_heads is not None:
            if self.token_dim % self.num_attention_heads:
                raise ValueError(
                    f"token_dim: expected a multiple of num_attention_heads={self.num_attention_heads}, "
                    f"got {self.token_dim}"
                )

    @property
    def head_dim(self) -> int:
        return self.token_dim // self.num_attention_heads

    @property
    def table_layers(self) -> int:
        """Layers of prefix the encoder produces: num_layers, or 3 * num_layers for the full encoder-decoder form
        (encoder self-attention, decoder self-attention, cross-attention)."""
        return self.num_layers * (3 if self.encoder_decoder_placement == "full" else 1)

    def resolve(self, model_config) -> "PrefixTuningConfig":
        """A copy with every None field inferred from a transformers config; explicit fields must agree with it."""
        inferred = infer_from_model_config(model_config, self.task_type)
        values = dataclasses.asdict(self)
        for name, model_value in inferred.items():
            given = values[name]
            if given is None:
                values[name] = model_value
            elif name not in ("encoder_hidden_size", "num_transformer_submodules") and given != model_value:
                raise ModelMismatchError(
                    f"{name}: the config says {given} but the model ({getattr(model_config, 'model_type', '?')}) "
                    f"needs {model_value}"
                )
        if values["encoder_decoder_placement"] == "full":
            _check_full_placement(model_config, values["num_layers"])
        if values["num_virtual_tokens"] is None:
            raise ValueError("num_virtual_tokens: expected a positive int, got None")
        if values["encoder_hidden_size"] is None:
            values["encoder_hidden_size"] = values["token_dim"]
        if values["modules_to_save"] is None and self.task_type in TASK_HEADS:
            values["modules_to_save"] = list(TASK_HEADS[self.task_type])
        if values["base_model_name_or_path"] is None:
            values["base_model_name_or_path"] = getattr(model_config, "_name_or_path", None) or None
        return PrefixTuningConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        """PEFT's `adapter_config.json` content (unknown fields read from a file are kept). The one field PEFT does
        not have, `encoder_decoder_placement`, is written only when it is not PEFT's layout, so PEFT reads our
        adapters without a warning."""
        values = dataclasses.asdict(self)
        extra = values.pop("extra_fields")
        if values["encoder_decoder_placement"] == "peft":
            del values["encoder_decoder_placement"]
        return {**extra, **values}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PrefixTuningConfig":
        """A config from `to_dict`'s (or PEFT's) fields; fields it does not know are kept in `extra_fields`."""
        if not isinstance(values, dict):
            raise TypeError(f"config: expected a dict, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra_fields"}
        return cls(**{k: v for k, v in values.items() if k in known},
                   extra_fields={k: v for k, v in values.items() if k not in known})

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `adapter_config.json` into `directory` (created if needed)."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "PrefixTuningConfig":
        """Read `adapter_config.json` from `directory` (ours or PEFT's)."""
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.lexists(path):
            raise FileNotFoundError(f"directory: no {CONFIG_NAME} in {os.fspath(directory)!r}")
        check_regular_file(path, CONFIG_NAME)
        size = os.path.getsize(path)
        if size > MAX_CONFIG_BYTES:
            raise ValueError(f"{CONFIG_NAME}: {size:,d} bytes in {path!r}; expected at most {MAX_CONFIG_BYTES:,d} "
                             "for a config")
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{CONFIG_NAME}: not valid JSON ({e}) in {path!r}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{CONFIG_NAME}: not UTF-8 text ({e}) in {path!r}") from None
        except RecursionError:
            raise ValueError(f"{CONFIG_NAME}: nested too deeply to be a config in {path!r}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{CONFIG_NAME}: expected a JSON object of config fields, got {type(values).__name__}")
        return cls.from_dict(values)


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


def check_regular_file(path: str, name: str) -> None:
    """Refuse, naming `name`, a path that is not a regular file (or a link to one): reading a FIFO or a device
    such as /dev/zero would block or never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ValueError(f"{name}: {path!r} is a link to nothing; expected a regular file") from None
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise ValueError(f"{name}: {path!r} is {kind}; expected a regular file")


def _first(config: dict, names: tuple[str, ...], what: str) -> int:
    for name in names:
        if config.get(name) is not None:
            return config[name]
    raise ValueError(f"{what}: the model config has none of {', '.join(names)}; set it in PrefixTuningConfig")


def infer_from_model_config(model_config, task_type: str | None) -> dict[str, int]:
    """PEFT's inference of the prefix's dimensions from a transformers config (GQA included)."""
    values = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    values = values.get("text_config") or values
    num_layers = getattr(model_config, "num_hidden_layers", None) or _first(
        values, ("num_hidden_layers", "num_layers", "n_layer"), "num_layers")
    token_dim = _first(values, ("hidden_size", "n_embd", "d_model"), "token_dim")
    heads = _first(values, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
                   "num_attention_heads")
    if values.get("num_key_value_heads") is not None:
        head_dim, heads = _widest_kv_layer(values, values.get("head_dim") or token_dim // heads)
        token_dim = head_dim * heads
    return {
        "num_layers": num_layers,
        "token_dim": token_dim,
        "num_attention_heads": heads,
        "encoder_hidden_size": token_dim,
        "num_transformer_submodules": 2 if task_type == "SEQ_2_SEQ_LM" else 1,
    }


def _widest_kv_layer(values: dict, head_dim: int) -> tuple[int, int]:
    """(head_dim, KV heads) of the layer with the widest keys: models with per-layer attention shapes (Gemma's
    global layers) get the prefix provisioned for the largest, as PEFT does; narrower layers read a slice."""
    kv_heads = values["num_key_value_heads"]
    if values.get("global_head_dim") is not None:
        return values["global_head_dim"], values.get("num_global_key_value_heads") or kv_heads
    widest = (head_dim, kv_heads)
    for layer in (values.get("per_layer_config") or {}).values():  # only each layer's overrides
        layer_dims = (layer.get("head_dim", head_dim), layer.get("num_key_value_heads", kv_heads))
        if layer_dims[0] > widest[0]:
            widest = layer_dims
    return widest


def _check_full_placement(model_config, num_layers: int) -> None:
    if not getattr(model_config, "is_encoder_decoder", False):
        raise ValueError(f"encoder_decoder_placement: 'full' needs an encoder-decoder model, got "
                         f"{getattr(model_config, 'model_type', '?')}")
    decoder_layers = getattr(model_config, "num_decoder_layers", None) or getattr(model_config, "decoder_layers",
                                                                                num_layers)
    if decoder_layers != num_layers:
        raise ValueError(f"encoder_decoder_placement: 'full' needs as many decoder layers as encoder layers "
                         f"({num_layers}), got {decoder_layers}")
