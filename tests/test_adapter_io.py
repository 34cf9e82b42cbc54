"""Reading adapters from disk: every broken directory is refused with an error naming the problem, before the
model changes; pickle is never opened; unknown config fields survive a load and re-save."""

import copy
import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_decoder

from prefix_kernels import PrefixModel, PrefixTuningConfig, get_prefix_model

P = 4
TABLE_SHAPE = (P, 3 * 2 * 16)  # the tiny Llama: 3 layers x (key, value) x token_dim 16 (2 KV heads of dim 8)


@pytest.fixture
def adapter_dir(tmp_path):
    """A valid adapter for the tiny Llama, saved in PEFT's format."""
    model = get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(num_virtual_tokens=P))
    model.save_pretrained(tmp_path / "good")
    return tmp_path / "good"


class _Tripwire:
    """Unpickling this creates `path`: proof that a loader opened the pickle."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def pickle_only(directory):
    for child in directory.iterdir():
        child.unlink()
    with open(directory / "adapter_model.bin", "wb") as f:
        pickle.dump({"prompt_embeddings": _Tripwire(directory / "unpickled")}, f)


def config_edit(**changes):
    """A breaker that rewrites adapter_config.json with `changes`; keys left None are dropped (read as defaults)."""
    def breaker(directory):
        path = directory / "adapter_config.json"
        values = json.loads(path.read_text())
        values.update(changes)
        path.write_text(json.dumps({k: v for k, v in values.items() if v is not None}))
    return breaker


def config_text(text):
    def breaker(directory):
        (directory / "adapter_config.json").write_text(text)
    return breaker


def weights(tensors):
    def breaker(directory):
        save_file(tensors, directory / "adapter_model.safetensors")
    return breaker


def both(*breakers):
    def breaker(directory):
        for each in breakers:
            each(directory)
    return breaker


def truncated(directory):
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def remove(name):
    def breaker(directory):
        (directory / name).unlink()
    return breaker


BROKEN = {
    "pickle-only": (pickle_only, ValueError, r"^directory: expected adapter_model\.safetensors \(safetensors is "
                                             r"required; pickle files are refused\), found: adapter_model\.bin$"),
    "no-config": (remove("adapter_config.json"), FileNotFoundError, "^directory: no adapter_config.json in"),
    "malformed-json": (config_text('{"num_virtual_tokens": 4,'), ValueError, "^adapter_config.json: not valid JSON"),
    "not-utf8": (lambda d: (d / "adapter_config.json").write_bytes(b'{"num_virtual_tokens": "\xff\xfe"}'), ValueError,
                 r"^adapter_config.json: not UTF-8 text .* in '.*not-utf8/adapter_config.json'$"),
    "deeply-nested": (config_text("[" * 100_000 + "]" * 100_000), ValueError,
                      r"^adapter_config.json: nested too deeply to be a config in '.*deeply-nested"),
    "json-list": (config_text("[4]"), ValueError, "^adapter_config.json: expected a JSON object of config fields, "
                                                  "got list"),
    "no-num-virtual-tokens": (config_edit(num_virtual_tokens=None), ValueError,
                              "^num_virtual_tokens: expected a positive int, got None"),
    "num-virtual-tokens-str": (config_edit(num_virtual_tokens="4"), ValueError,
                               "^num_virtual_tokens: expected a positive int or None, got '4'"),
    "prefix-projection-str": (config_edit(prefix_projection="yes"), ValueError,
                              "^prefix_projection: expected a bool, got 'yes'"),
    "modules-to-save-str": (config_edit(modules_to_save="lm_head"), ValueError,
                            "^modules_to_save: expected a list of module names or None, got 'lm_head'"),
    "revision-int": (config_edit(revision=3), ValueError, "^revision: expected a string or None, got 3"),
    "task-type": (config_edit(task_type="CAUSAL"), ValueError, "^task_type: expected one of"),
    "lora-config": (config_edit(peft_type="LORA"), ValueError, "^peft_type: expected 'PREFIX_TUNING', got 'LORA'"),
    "other-model": (config_edit(num_layers=5), ValueError,
                    r"^directory: the adapter in '.*other-model' was trained for a different model \(num_layers: the "
                    r"config says 5 but the model \(llama\) needs 3\)$"),
    "table-shape": (weights({"prompt_embeddings": torch.zeros(P + 1, TABLE_SHAPE[1])}), ValueError,
                    r"^prompt_embeddings: expected shape \[4, 96\], got \(5, 96\)"),
    "no-table": (weights({"prefix": torch.zeros(TABLE_SHAPE)}), ValueError,
                 r"^adapter_model\.safetensors: expected a tensor named 'prompt_embeddings', found \['prefix'\]"),
    "stray-tensor": (weights({"prompt_embeddings": torch.zeros(TABLE_SHAPE), "base_model.nope": torch.zeros(1)}),
                     ValueError, "^adapter_model.safetensors: 'base_model.nope' is neither 'prompt_embeddings' nor"),
    "table-int": (weights({"prompt_embeddings": torch.zeros(TABLE_SHAPE, dtype=torch.int64)}), ValueError,
                  "^prompt_embeddings: expected a floating-point table, got torch.int64"),
    # sizes are checked against the table before anything is allocated (this would be a 1 GB encoder)
    "huge-p": (config_edit(num_virtual_tokens=2_000_000), ValueError,
               r"^prompt_embeddings: expected shape \[2000000, 96\], got \(4, 96\)"),
    "head-not-saved": (weights({"prompt_embeddings": torch.zeros(TABLE_SHAPE),
                                "base_model.lm_head.weight": torch.zeros(97, 64)}), ValueError,
                       "^adapter_model.safetensors: 'base_model.lm_head.weight' is not in a module the config's "
                       "modules_to_save names"),
    "head-int": (both(config_edit(modules_to_save=["lm_head"]),
                      weights({"prompt_embeddings": torch.zeros(TABLE_SHAPE),
                               "base_model.lm_head.weight": torch.zeros(97, 64, dtype=torch.int32)})), ValueError,
                 "^adapter_model.safetensors: 'base_model.lm_head.weight' must be floating point, got torch.int32"),
    "truncated": (truncated, ValueError, r"^adapter_model\.safetensors: cannot be read as safetensors"),
    "no-weights": (remove("adapter_model.safetensors"), ValueError,
                   r"^directory: expected adapter_model\.safetensors .* found: adapter_config\.json$"),
}


@pytest.fixture(params=list(BROKEN), ids=list(BROKEN))
def broken(request, adapter_dir, tmp_path):
    """(a damaged copy of the adapter, expected exception type, message pattern)."""
    breaker, error, message = BROKEN[request.param]
    directory = tmp_path / request.param
    shutil.copytree(adapter_dir, directory)
    breaker(directory)
    return directory, error, message


def test_load_adapter_refuses_and_changes_nothing(broken, adapter_dir):
    directory, error, message = broken
    model = PrefixModel.from_pretrained(tiny_decoder("llama"), adapter_dir)
    model.load_adapter(adapter_dir, adapter_name="other")
    model.set_adapter("other")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        model.load_adapter(directory, adapter_name="new")
    assert list(model.prefix_encoders) == list(model.peft_config) == ["default", "other"]
    assert model.active_adapter == "other"
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not (directory / "unpickled").exists()


def test_from_pretrained_refuses_and_leaves_the_base_model_alone(broken):
    directory, error, message = broken
    base = tiny_decoder("llama")
    attention = base.config._attn_implementation
    with pytest.raises(error, match=message):
        PrefixModel.from_pretrained(base, directory)
    assert base.config._attn_implementation == attention
    assert all(p.requires_grad for p in base.parameters()) and not base._forward_pre_hooks
    assert not (directory / "unpickled").exists()


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="^directory: .* is not a directory"):
        PrefixModel.from_pretrained(tiny_decoder("llama"), tmp_path / "absent")


def test_unknown_config_fields_survive_a_resave(adapter_dir, tmp_path):
    config_edit(peft_version="0.99.0", my_notes={"data": ["a", "b"], "epochs": 3})(adapter_dir)
    model = PrefixModel.from_pretrained(tiny_decoder("llama"), adapter_dir)
    model.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert saved["peft_version"] == "0.99.0" and saved["my_notes"] == {"data": ["a", "b"], "epochs": 3}
    assert saved["num_virtual_tokens"] == P and saved["peft_type"] == "PREFIX_TUNING"
