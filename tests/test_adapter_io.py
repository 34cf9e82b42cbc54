"""Reading adapters from disk: every broken directory is refused with an error naming the problem, before the
model changes; pickle is never opened; unknown config fields survive a load and re-save."""

import copy
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

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


def with_nonfinite(value, key="prompt_embeddings", shape=TABLE_SHAPE):
    tensor = torch.zeros(shape)
    tensor[1, 2] = value
    return {"prompt_embeddings": torch.zeros(TABLE_SHAPE), key: tensor}


def special_file(make):
    """A breaker that replaces the weights file by what `make(path)` creates there."""
    def breaker(directory):
        path = directory / "adapter_model.safetensors"
        path.unlink()
        make(path)
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
    "head-shape": (both(config_edit(modules_to_save=["lm_head"]),
                        weights({"prompt_embeddings": torch.zeros(TABLE_SHAPE),
                                 "base_model.lm_head.weight": torch.zeros(5, 5)})), ValueError,
                   r"^adapter_model.safetensors: 'base_model.lm_head.weight' has shape \[5, 5\], the model's is "
                   r"\[97, 64\]"),
    "table-nan": (weights(with_nonfinite(float("nan"))), ValueError,
                  r"^prompt_embeddings: holds 1 non-finite values \(NaN or inf\) in '.*table-nan/adapter_model"
                  r"\.safetensors'; expected finite numbers"),
    "table-inf": (weights(with_nonfinite(float("-inf"))), ValueError, r"^prompt_embeddings: holds 1 non-finite"),
    "head-nan": (both(config_edit(modules_to_save=["lm_head"]),
                      weights(with_nonfinite(float("nan"), "base_model.lm_head.weight", (97, 64)))), ValueError,
                 r"^adapter_model.safetensors: 'base_model.lm_head.weight' holds 1 non-finite values"),
    # the MLP a projection would build is bounded by the model's size (this one would take 7 GB)
    "huge-encoder-hidden-size": (config_edit(prefix_projection=True, encoder_hidden_size=16_000_000), ValueError,
                                 r"^encoder_hidden_size: 16000000 would make a projection MLP larger than the whole "
                                 r"model \([0-9,]+ parameters\); expected at most [0-9]+$"),
    "weights-fifo": (special_file(os.mkfifo), ValueError,
                     r"^adapter_model.safetensors: '.*weights-fifo/adapter_model.safetensors' is a FIFO; expected a "
                     r"regular file$"),
    "weights-dev-zero": (special_file(lambda path: path.symlink_to("/dev/zero")), ValueError,
                         r"^adapter_model.safetensors: .* is a character device; expected a regular file$"),
    "weights-dangling-link": (special_file(lambda path: path.symlink_to(path.parent / "absent")), ValueError,
                              r"^adapter_model.safetensors: .* is a link to nothing; expected a regular file$"),
    "config-huge": (config_edit(notes="x" * (1 << 20)), ValueError,
                    r"^adapter_config.json: 1,048,[0-9]+ bytes in '.*config-huge/adapter_config.json'; expected at "
                    r"most 1,048,576 for a config$"),
    "config-fifo": (lambda d: ((d / "adapter_config.json").unlink(), os.mkfifo(d / "adapter_config.json")),
                    ValueError, r"^adapter_config.json: .* is a FIFO; expected a regular file$"),
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


def test_a_projection_adapter_resumes_training_without_building_its_mlp(tmp_path, monkeypatch):
    """The saved table is what the MLP projected to: loading it trainable builds no MLP (no Linear layer is made)
    and gives the same logits."""
    trained = get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True,
                                                                         encoder_hidden_size=40))
    trained.save_pretrained(tmp_path)
    base = tiny_decoder("llama")

    def no_linear(*args, **kwargs):
        raise AssertionError("loading a saved table built a Linear layer")

    monkeypatch.setattr(torch.nn, "Linear", no_linear)
    model = PrefixModel.from_pretrained(base, tmp_path, is_trainable=True)
    model.load_adapter(tmp_path, adapter_name="again", is_trainable=True)
    monkeypatch.undo()
    ids = torch.randint(3, 97, (1, 6))
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        for name in ("default", "again"):
            encoder = model.prefix_encoders[name]
            assert not hasattr(encoder, "transform") and encoder.embedding.weight.requires_grad
            torch.testing.assert_close(model(input_ids=ids, adapter_names=[name]).logits, want)


PEAK_RSS = textwrap.dedent("""
    import json, resource, sys
    sys.path.insert(0, sys.argv[2])
    import torch
    from tiny_models import tiny_decoder
    from prefix_kernels import PrefixModel
    model = tiny_decoder("llama")
    PrefixModel.from_pretrained(tiny_decoder("llama"), sys.argv[3])  # imports and first-call allocations done
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        PrefixModel.from_pretrained(model, sys.argv[1], is_trainable=True)
        error = None
    except ValueError as e:
        error = str(e)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"grown_kb": grown, "error": error}))
""")


def test_an_adapter_file_sizing_a_huge_mlp_is_refused_before_allocating(adapter_dir, tmp_path):
    """Measured by the peak resident memory of a fresh process: a 4 KB adapter whose encoder_hidden_size would size a
    450 MB projection MLP is refused, and the process grows by less than 32 MB."""
    huge = tmp_path / "huge"
    shutil.copytree(adapter_dir, huge)
    config_edit(prefix_projection=True, encoder_hidden_size=1_000_000)(huge)
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(huge), os.path.dirname(__file__), str(adapter_dir)],
                            capture_output=True, text=True, timeout=300, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["grown_kb"] < 32 * 1024, measured
    assert measured["error"] is not None and measured["error"].startswith("encoder_hidden_size: 1000000 would make")
