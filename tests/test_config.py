"""`PrefixTuningConfig` and `PrefixEncoder`: PEFT's fields, inference, layout and errors."""

import copy
import json

import peft
import pytest
import torch
from tiny_models import DECODERS, tiny_decoder

from prefix_kernels import PrefixEncoder, PrefixTuningConfig

INFERRED = ("num_layers", "token_dim", "num_attention_heads", "encoder_hidden_size", "num_transformer_submodules")


def peft_model_for(name, **kwargs):
    return peft.get_peft_model(tiny_decoder(name), peft.PrefixTuningConfig(task_type="CAUSAL_LM", **kwargs))


@pytest.mark.parametrize("name", DECODERS)
def test_inference_equals_peft(name):
    theirs = peft_model_for(name, num_virtual_tokens=6).peft_config["default"]
    ours = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6).resolve(tiny_decoder(name).config)
    for field in INFERRED:
        assert getattr(ours, field) == getattr(theirs, field), field


def test_grouped_query_attention_stores_kv_heads():
    model = tiny_decoder("llama")  # 8 query heads, 2 KV heads, head_dim 8
    config = PrefixTuningConfig(num_virtual_tokens=3).resolve(model.config)
    assert (config.num_attention_heads, config.token_dim, config.head_dim) == (2, 16, 8)


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("projection", [False, True])
def test_encoder_layout_equals_peft_cache(name, projection):
    """Layer i's prefix keys/values are exactly what PEFT puts in layer i of its cache."""
    peft_model = peft_model_for(name, num_virtual_tokens=5, prefix_projection=projection)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=projection)
    encoder = PrefixEncoder(config.resolve(peft_model.base_model.config))
    encoder.load_state_dict(peft_model.prompt_encoder["default"].state_dict())
    prefix = encoder()  # [L, 2, Hkv, P, D]
    cache = peft_model.get_prompt(batch_size=1)
    assert prefix.shape[0] == len(cache.layers)
    for i, layer in enumerate(cache.layers):
        torch.testing.assert_close(prefix[i, 0], layer.keys[0])
        torch.testing.assert_close(prefix[i, 1], layer.values[0])


def test_projection_fold_keeps_output():
    config = PrefixTuningConfig(num_virtual_tokens=4, token_dim=32, num_attention_heads=4, num_layers=2,
                                prefix_projection=True, encoder_hidden_size=20)
    encoder = PrefixEncoder(config)
    before = encoder().detach().clone()
    encoder.fold()
    assert not hasattr(encoder, "transform") and encoder.embedding.weight.shape == (4, 2 * 2 * 32)
    torch.testing.assert_close(encoder(), before)


@pytest.mark.parametrize("projection", [False, True])
def test_zero_init(projection):
    config = PrefixTuningConfig(num_virtual_tokens=4, token_dim=32, num_attention_heads=4, num_layers=2,
                                prefix_projection=projection, init_weights="zero")
    prefix = PrefixEncoder(config)()
    assert prefix.shape == (2, 2, 4, 4, 8)
    if not projection:
        assert torch.count_nonzero(prefix) == 0


def test_dict_and_json_round_trip(tmp_path):
    config = PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=7, prefix_projection=True)
    assert PrefixTuningConfig.from_dict(config.to_dict()) == config
    config.save_pretrained(tmp_path)
    assert PrefixTuningConfig.from_pretrained(tmp_path) == config
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PREFIX_TUNING" and saved["num_virtual_tokens"] == 7


def test_peft_config_dict_loads_and_keeps_unknown_fields():
    theirs = peft_model_for("gpt2", num_virtual_tokens=4).peft_config["default"]
    ours = PrefixTuningConfig.from_dict(theirs.to_dict())
    assert ours.num_virtual_tokens == 4 and ours.task_type == "CAUSAL_LM"
    assert set(theirs.to_dict()) <= set(ours.to_dict())


@pytest.mark.parametrize("field, value", [
    ("num_virtual_tokens", 0), ("task_type", "SUMMARIZE"), ("init_weights", "normal"), ("peft_type", "LORA"),
    ("num_layers", -2), ("num_transformer_submodules", 3),
])
def test_invalid_field_is_named(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: .*{value}"):
        PrefixTuningConfig(**{"num_virtual_tokens": 4, field: value})


def test_token_dim_must_divide_by_heads():
    with pytest.raises(ValueError, match="^token_dim: expected a multiple of num_attention_heads=5, got 32"):
        PrefixTuningConfig(num_virtual_tokens=4, token_dim=32, num_attention_heads=5)


def test_config_contradicting_the_model():
    model = tiny_decoder("llama")
    with pytest.raises(ValueError, match=r"^num_layers: the config says 7 but the model \(llama\) needs 3"):
        PrefixTuningConfig(num_virtual_tokens=4, num_layers=7).resolve(model.config)
    config = PrefixTuningConfig(num_virtual_tokens=4, token_dim=64)
    with pytest.raises(ValueError, match="^token_dim"):
        config.resolve(model.config)
    assert config == copy.deepcopy(config) and config.num_layers is None  # resolve leaves the original alone


def test_missing_num_virtual_tokens():
    with pytest.raises(ValueError, match="^num_virtual_tokens"):
        PrefixTuningConfig().resolve(tiny_decoder("gpt2").config)
