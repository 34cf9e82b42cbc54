"""Adapters on disk, in PEFT's format: `adapter_config.json` and `adapter_model.safetensors`.

The weights file holds `prompt_embeddings` `[P, L * 2 * token_dim]` (the projected table) and, for task types
with a head (sequence or token classification, QA), the head's weights under PEFT's `base_model.` keys. Files
are untrusted input: only JSON and safetensors are read (never pickle), every size and dtype is checked against
the model before anything is allocated, and adapter names are names, never paths.
"""

import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from .config import ModelMismatchError, PrefixTuningConfig

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
    table: torch.Tensor  # [P, L * 2 * token_dim]
    heads: dict[str, torch.Tensor]  # parameter name in the model -> weights


def read_adapter(directory, model: PreTrainedModel, is_trainable: bool) -> SavedAdapter:
    """Read and check the adapter saved in `directory` for `model`; raise before anything is allocated."""
    config, table, tensors = _read(directory, model.config, is_trainable)
    return SavedAdapter(config, table, _check_heads(tensors, model, config))


def read_prefix_table(directory, model_config) -> tuple[PrefixTuningConfig, torch.Tensor]:
    """The config (resolved against `model_config`, a transformers config) and `prompt_embeddings` table of the
    adapter saved in `directory`, for an engine that serves the prefix without the transformers model (vLLM). A
    file carrying anything else (task-head weights) is refused: such an engine has no head to load it into."""
    config, table, tensors = _read(directory, model_config, is_trainable=False)
    if tensors:
        raise ValueError(f"{WEIGHTS_NAME}: expected only {TABLE_KEY!r} in {os.fspath(directory)!r}, also found "
                         f"{sorted(tensors)} (task-head weights cannot be served without the transformers model)")
    return config, table


def _read(directory, model_config, is_trainable: bool) -> tuple[PrefixTuningConfig, torch.Tensor, dict]:
    """The checked config and table of the adapter in `directory`, and its other tensors (unchecked)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"directory: {directory!r} is not a directory")
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):  # checked first: a pickle-only directory is told why it is refused
        found = ", ".join(sorted(os.listdir(directory))) or "nothing"
        raise ValueError(f"directory: expected {WEIGHTS_NAME} (safetensors is required; pickle files are refused), "
                         f"found: {found}")
    config = PrefixTuningConfig.from_pretrained(directory)
    config.inference_mode = not is_trainable
    try:
        config = config.resolve(model_config)
    except ModelMismatchError as e:
        raise ValueError(f"directory: the adapter in {directory!r} was trained for a different model ({e})") from None
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"{WEIGHTS_NAME}: cannot be read as safetensors ({e})") from None
    if TABLE_KEY not in tensors:
        raise ValueError(f"{WEIGHTS_NAME}: expected a tensor named {TABLE_KEY!r}, found {sorted(tensors)}")
    table = tensors.pop(TABLE_KEY)
    check_table(table, config)
    return config, table, tensors


def check_table(table: torch.Tensor, config: PrefixTuningConfig) -> None:
    """A `prompt_embeddings` table must be floating point and `[P, L * 2 * token_dim]` for `config` (resolved)."""
    expected = (config.num_virtual_tokens, config.table_layers * 2 * config.token_dim)
    if not isinstance(table, torch.Tensor) or tuple(table.shape) != expected:
        got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"{TABLE_KEY}: expected shape {list(expected)}, got {got}")
    if not table.is_floating_point():
        raise ValueError(f"{TABLE_KEY}: expected a floating-point table, got {table.dtype}")


def _check_heads(tensors: dict[str, torch.Tensor], model: PreTrainedModel,
                 config: PrefixTuningConfig) -> dict[str, torch.Tensor]:
    """Task-head weights: only parameters of the modules the config's `modules_to_save` names, in a floating
    dtype and the parameter's shape."""
    params = dict(model.named_parameters())
    heads = set(config.modules_to_save or ())
    checked = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(HEAD_PREFIX)
        if not key.startswith(HEAD_PREFIX) or name not in params:
            raise ValueError(f"{WEIGHTS_NAME}: {key!r} is neither {TABLE_KEY!r} nor a parameter of the model")
        if not heads.intersection(name.split(".")[:-1]):
            raise ValueError(f"{WEIGHTS_NAME}: {key!r} is not in a module the config's modules_to_save names "
                             f"({sorted(heads) or 'none'})")
        if not tensor.is_floating_point():
            raise ValueError(f"{WEIGHTS_NAME}: {key!r} must be floating point, got {tensor.dtype}")
        if params[name].shape != tensor.shape:
            raise ValueError(f"{WEIGHTS_NAME}: {key!r} has shape {list(tensor.shape)}, the model's is "
                             f"{list(params[name].shape)}")
        checked[name] = tensor
    return checked


def write_adapter(directory, config: PrefixTuningConfig, table: torch.Tensor, heads: dict[str, torch.Tensor]) -> None:
    """Write one adapter in PEFT's format into `directory`."""
    config.save_pretrained(directory)
    tensors = {TABLE_KEY: table.detach().to("cpu").contiguous(),
               **{f"{HEAD_PREFIX}{name}": t.detach().to("cpu").contiguous() for name, t in heads.items()}}
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})

