"""Many adapters over one base model: loading, switching, and mixed batches read from one bank."""

import copy
import shutil

import pytest
import torch
from tiny_models import VOCAB, tiny_decoder

from prefix_kernels import PrefixModel, PrefixTuningConfig, get_prefix_model

LENGTHS = {"default": 5, "short": 2, "long": 9}


@pytest.fixture
def saved_adapters(tmp_path):
    """Three adapters of different lengths for the tiny Llama, saved in PEFT's format."""
    dirs = {}
    for seed, (name, length) in enumerate(LENGTHS.items()):
        torch.manual_seed(seed)
        model = get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(num_virtual_tokens=length))
        dirs[name] = tmp_path / name
        model.save_pretrained(dirs[name])
    return dirs


def load_all(dirs):
    model = PrefixModel.from_pretrained(tiny_decoder("llama"), dirs["default"])
    for name in ("short", "long"):
        model.load_adapter(dirs[name], adapter_name=name)
    return model


def padded_batch(lengths, s):
    ids = torch.randint(3, VOCAB, (len(lengths), s))
    mask = torch.zeros(len(lengths), s, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return ids, mask


def test_mixed_batch_equals_each_row_alone(saved_adapters):
    model = load_all(saved_adapters)
    names = ["long", "default", "short", "long"]
    ids, mask = padded_batch([8, 6, 8, 3], 8)
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        for row, name in enumerate(names):
            n = int(mask[row].sum())
            model.set_adapter(name)
            alone = model(input_ids=ids[row:row + 1, :n]).logits
            torch.testing.assert_close(mixed[row, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_mixed_generation_equals_each_row_alone(saved_adapters):
    model = load_all(saved_adapters)
    names = ["short", "long", "default"]
    prompts = [torch.randint(3, VOCAB, (n,)) for n in (5, 2, 4)]
    ids = torch.zeros(3, 5, dtype=torch.long)
    mask = torch.zeros(3, 5, dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding, as for generation
        ids[row, 5 - len(prompt):] = prompt
        mask[row, 5 - len(prompt):] = 1
    together = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              adapter_names=names)
    for row, (name, prompt) in enumerate(zip(names, prompts)):
        alone = model.generate(input_ids=prompt[None], max_new_tokens=6, do_sample=False, adapter_names=[name])
        assert torch.equal(together[row, 5:], alone[0, len(prompt):]), name


def test_adapters_differ(saved_adapters):
    model = load_all(saved_adapters)
    ids, _ = padded_batch([6], 6)
    with torch.no_grad():
        outs = [model(input_ids=ids, adapter_names=[name]).logits for name in LENGTHS]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_set_adapter_switches_the_active_prefix(saved_adapters):
    model = load_all(saved_adapters)
    ids, _ = padded_batch([6], 6)
    with torch.no_grad():
        model.set_adapter("short")
        active = model(input_ids=ids).logits
        named = model(input_ids=ids, adapter_names=["short"]).logits
    torch.testing.assert_close(active, named)
    assert model.active_adapter == "short"


def test_from_pretrained_under_a_name(saved_adapters):
    model = PrefixModel.from_pretrained(tiny_decoder("llama"), saved_adapters["long"], adapter_name="long")
    assert list(model.prefix_encoders) == ["long"] and model.active_adapter == "long"


def test_save_and_reload_several_adapters(saved_adapters, tmp_path):
    model = load_all(saved_adapters)
    model.save_pretrained(tmp_path / "all")
    reloaded = PrefixModel.from_pretrained(tiny_decoder("llama"), tmp_path / "all")
    reloaded.load_adapter(tmp_path / "all" / "long", adapter_name="long")
    ids, _ = padded_batch([4], 4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, adapter_names=["long"]).logits,
                                   model(input_ids=ids, adapter_names=["long"]).logits)


def test_unknown_adapter_names_are_named(saved_adapters):
    model = load_all(saved_adapters)
    ids, _ = padded_batch([4, 4], 4)
    with pytest.raises(ValueError, match=r"^adapter_names: unknown adapter\(s\) \['nope'\]"):
        model(input_ids=ids, adapter_names=["default", "nope"])
    with pytest.raises(ValueError, match="^adapter_names: expected one name per batch row"):
        model(input_ids=ids, adapter_names=["default", "short", "long"])
    with pytest.raises(TypeError, match="^adapter_names"):
        model(input_ids=ids, adapter_names="default")


def test_failed_load_leaves_the_model_unchanged(saved_adapters, tmp_path):
    model = load_all(saved_adapters)
    before = copy.deepcopy(model.state_dict())
    shutil.copytree(saved_adapters["short"], tmp_path / "broken")
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="^adapter_config.json: not valid JSON"):
        model.load_adapter(tmp_path / "broken", adapter_name="broken")
    with pytest.raises(ValueError, match="already loaded"):
        model.load_adapter(saved_adapters["short"], adapter_name="short")
    assert list(model.prefix_encoders) == list(LENGTHS) and model.active_adapter == "default"
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
