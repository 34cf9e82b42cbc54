"""Adapters on disk, in PEFT's format: `adapter_config.json` and `adapter_model.safetensors`.

The weights file holds `prompt_embeddings` `[P, L * 2 * token_dim]` (the projected table) and, for task types
with a head (sequence or token classification, QA), the head's weights under PEFT's `base_model.` keys. Files
are untrusted input: only regular JSON and safetensors files are read (never pickle, never a FIFO or a device),
every size read from them is bounded against the model before anything is allocated (tensor shapes are read
from the safetensors header first), and tables holding NaN or inf are refused. Adapter names are names, never
paths.
"""

import os
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel

from .config import ModelMismatchError, PrefixTuningConfig, check_regular_file

WEIGHTS_NAME = "adapter_model.safetensors"
TABLE_KEY = "prompt_embeddings"
HEAD_PREFIX = "base_model."  # PEFT's key prefix for the task head saved with the prefix
_NOT_IN_NAMES = ("/", "\\", ".", ":", "\0")


def check_adapter_name(adapter_name) -> str:
    """Return `adapter_name` if it is a plain name; raise ValueError naming `adapter_name` otherwise. Names become
    sub-directories in `save_pretrained`, so separators, dots, drive colons and empty names are refused."""
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name: expected a string, got {type(adapter_name).__name__}")
    if not adapter_name.strip() or any(c in adapter_name for c in _NOT_IN_NAMES):
        raise ValueError(f"adapter_name: expected a plain name (no '/', '\\', '.', ':', not empty), got "
                         f"{adapter_name!r}")
    return adapter_name


def adapter_dir(directory, adapter_name: str) -> str:
    """PEFT's layout: the "default" adapter at the top, every other one in a sub-directory of its name."""
    return os.fspath(directory) if adapter_name == "default" else os.path.join(directory, adapter_name)


@dataclass(frozen=True)
class SavedAdapter:
    """A saved adapter, checked against the model it is loaded into."""

    config: PrefixTuningConfig  # resolved against the model
    table: torch.Tensor  # [P, L * 2 * token_dim], finite
    heads: dict[str, torch.Tensor]  # parameter name in the model -> weights


def read_adapter(directory, model: PreTrainedModel, is_trainable: bool) -> SavedAdapter:
    """Read and check the adapter saved in `directory` for `model`; raise before anything is allocated."""
    config, path = _read_config(directory, model.config, is_trainable)
    _check_projection(config, model)
    table, heads = _read_tensors(path, dict(model.named_parameters()), config)
    return SavedAdapter(config, table, heads)


def read_prefix_table(directory, model_config) -> tuple[PrefixTuningConfig, torch.Tensor]:
    """The config (resolved against `model_config`, a transformers config) and `prompt_embeddings` table of the
    adapter saved in `directory`, for an engine that serves the prefix without the transformers model (vLLM), with
    the same checks. A file carrying anything else (task-head weights) is refused: such an engine has no head to load
    it into. No projection MLP is ever built from the file, so `encoder_hidden_size` sizes nothing here."""
    config, path = _read_config(directory, model_config, is_trainable=False)
    table, _ = _read_tensors(path, {}, config)
    return config, table


def _read_config(directory, model_config, is_trainable: bool) -> tuple[PrefixTuningConfig, str]:
    """The adapter config in `directory`, resolved against `model_config`, and the path of its weights file."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"directory: {directory!r} is not a directory")
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.lexists(path):  # checked first: a pickle-only directory is told why it is refused
        found = ", ".join(sorted(os.listdir(directory))) or "nothing"
        raise ValueError(f"directory: expected {WEIGHTS_NAME} (safetensors is required; pickle files are refused), "
                         f"found: {found}")
    check_regular_file(path, WEIGHTS_NAME)
    config = PrefixTuningConfig.from_pretrained(directory)
    config.inference_mode = not is_trainable
    try:
        config = config.resolve(model_config)
    except ModelMismatchError as e:
        raise ValueError(f"directory: the adapter in {directory!r} was trained for a different model ({e})") from None
    return config, path


def _check_projection(config: PrefixTuningConfig, model: PreTrainedModel) -> None:
    """`encoder_hidden_size` sizes the projection MLP of `prefix_projection` (loading builds none: a saved adapter
    holds the table the MLP projects to): at most as many parameters as the whole model."""
    hidden, width = config.encoder_hidden_size, config.table_layers * 2 * config.token_dim
    budget = sum(p.numel() for p in model.parameters())
    largest = (budget - width) // (config.token_dim + 1 + width)
    if hidden > largest:
        raise ValueError(f"encoder_hidden_size: {hidden} would make a projection MLP larger than the whole model "
                         f"({budget:,d} parameters); expected at most {largest}")


def _read_tensors(path: str, params: dict[str, torch.Tensor],
                  config: PrefixTuningConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The table and the task-head weights (by parameter name, among the model's `params`) of the safetensors file at
    `path`. Every shape is checked from the file's header before any tensor is read; then dtypes and values."""
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            _check_shapes(shapes, params, config)
            tensors = {key: f.get_tensor(key) for key in shapes}
    except SafetensorError as e:  # a truncated or corrupt file
        raise ValueError(f"{WEIGHTS_NAME}: cannot be read as safetensors ({e})") from None
    table = tensors.pop(TABLE_KEY)
    if not table.is_floating_point():
        raise ValueError(f"{TABLE_KEY}: expected a floating-point table, got {table.dtype}")
    _check_finite(f"{TABLE_KEY}:", table, path)
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{WEIGHTS_NAME}: {key!r} must be floating point, got {tensor.dtype}")
        _check_finite(f"{WEIGHTS_NAME}: {key!r}", tensor, path)
    return table, {key.removeprefix(HEAD_PREFIX): tensor for key, tensor in tensors.items()}


def _check_shapes(shapes: dict[str, tuple[int, ...]], params: dict[str, torch.Tensor],
                  config: PrefixTuningConfig) -> None:
    """The table must be `[P, L * 2 * token_dim]` for `config` (resolved); any other tensor must be a parameter of a
    module the config's `modules_to_save` names, in that parameter's shape."""
    if TABLE_KEY not in shapes:
        raise ValueError(f"{WEIGHTS_NAME}: expected a tensor named {TABLE_KEY!r}, found {sorted(shapes)}")
    heads = set(config.modules_to_save or ())
    for key, shape in shapes.items():
        if key == TABLE_KEY:
            expected = (config.num_virtual_tokens, config.table_layers * 2 * config.token_dim)
            if shape != expected:
                raise ValueError(f"{TABLE_KEY}: expected shape {list(expected)}, got {shape}")
            continue
        name = key.removeprefix(HEAD_PREFIX)
        if not key.startswith(HEAD_PREFIX) or name not in params:
            raise ValueError(f"{WEIGHTS_NAME}: {key!r} is neither {TABLE_KEY!r} nor a parameter of the model")
        if not heads.intersection(name.split(".")[:-1]):
            raise ValueError(f"{WEIGHTS_NAME}: {key!r} is not in a module the config's modules_to_save names "
                             f"({sorted(heads) or 'none'})")
        if shape != tuple(params[name].shape):
            raise ValueError(f"{WEIGHTS_NAME}: {key!r} has shape {list(shape)}, the model's is "
                             f"{list(params[name].shape)}")


def _check_finite(name: str, tensor: torch.Tensor, path: str) -> None:
    """`name` is how the message starts: the table's key, or the file and a head parameter's key."""
    bad = tensor.numel() - int(torch.isfinite(tensor).sum())
    if bad:
        raise ValueError(f"{name} holds {bad} non-finite values (NaN or inf) in {path!r}; expected finite numbers")


def write_adapter(directory, config: PrefixTuningConfig, table: torch.Tensor, heads: dict[str, torch.Tensor]) -> None:
    """Write one adapter in PEFT's format into `directory`."""
    config.save_pretrained(directory)
    tensors = {TABLE_KEY: table.detach().to("cpu").contiguous(),
               **{f"{HEAD_PREFIX}{name}": t.detach().to("cpu").contiguous() for name, t in heads.items()}}
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
