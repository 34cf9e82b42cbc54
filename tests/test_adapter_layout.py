"""An adapter's layout (task type, encoder-decoder placement, PEFT's num_transformer_submodules) is checked in one
place, as when the wrapper is built, whenever an adapter is added: one whose table would be read in other
attentions than the wrapper's adapters' is refused before anything changes."""

import json

import pytest
import torch
import transformers as T

from prefix_kernels import PrefixModel, PrefixTuningConfig, get_prefix_model

P = 4


def t5():
    torch.manual_seed(0)
    return T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, dropout_rate=0.0)).eval()


def saved(directory, seed, **config):
    """A T5 adapter with random values, saved in `directory`."""
    model = get_prefix_model(t5(), PrefixTuningConfig(num_virtual_tokens=P, **config))
    torch.manual_seed(seed)
    torch.nn.init.normal_(model.prefix_encoders["default"].embedding.weight)
    model.save_pretrained(directory)
    return directory


def logits(model, **call):
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=ids[:, :4], **call).logits


def state(model):
    return list(model.peft_config), {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    names, tensors = before
    after = model.state_dict()
    return list(model.peft_config) == names and after.keys() == tensors.keys() and all(
        torch.equal(after[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("wrapper, adapter, message", [
    (dict(task_type="SEQ_2_SEQ_LM"), dict(task_type=None),
     r"^num_transformer_submodules: the adapter's is 1 \(task_type None\), this model's adapters use 2 \(task_type "
     r"'SEQ_2_SEQ_LM'\)"),
    (dict(task_type=None), dict(task_type="SEQ_2_SEQ_LM"),
     r"^num_transformer_submodules: the adapter's is 2 \(task_type 'SEQ_2_SEQ_LM'\), this model's adapters use 1"),
    (dict(task_type="SEQ_2_SEQ_LM"), dict(task_type="SEQ_2_SEQ_LM", encoder_decoder_placement="full"),
     r"^encoder_decoder_placement: the adapter's is 'full', this model's adapters use 'peft'"),
    (dict(task_type="SEQ_2_SEQ_LM", encoder_decoder_placement="full"), dict(task_type="SEQ_2_SEQ_LM"),
     r"^encoder_decoder_placement: the adapter's is 'peft', this model's adapters use 'full'"),
])
def test_an_adapter_of_another_layout_is_refused(tmp_path, wrapper, adapter, message):
    model = PrefixModel.from_pretrained(t5(), saved(tmp_path / "wrapper", 0, **wrapper))
    before = state(model)
    with pytest.raises(ValueError, match=message):
        model.load_adapter(saved(tmp_path / "other", 1, **adapter), adapter_name="other")
    with pytest.raises(ValueError, match=message):
        model.add_adapter("other", PrefixTuningConfig(num_virtual_tokens=P, **adapter))
    assert unchanged(model, before)


@pytest.mark.parametrize("config", [dict(task_type=None), dict(task_type="SEQ_2_SEQ_LM"),
                                    dict(task_type="SEQ_2_SEQ_LM", encoder_decoder_placement="full")])
def test_an_adapter_of_the_same_layout_gives_what_it_gives_alone(tmp_path, config):
    """Loaded beside another adapter of its layout, each adapter of a mixed batch gives its own from_pretrained's
    logits."""
    first, second = saved(tmp_path / "first", 0, **config), saved(tmp_path / "second", 1, **config)
    model = PrefixModel.from_pretrained(t5(), first)
    model.load_adapter(second, adapter_name="second")
    mixed = logits(model, adapter_names=["default", "second"])
    for row, directory in enumerate((first, second)):
        alone = logits(PrefixModel.from_pretrained(t5(), directory))
        torch.testing.assert_close(mixed[row], alone[row], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[0], logits(PrefixModel.from_pretrained(t5(), second))[0], atol=1e-3)


def bert_classifier():
    torch.manual_seed(0)
    return T.BertForSequenceClassification(T.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                        num_attention_heads=2, intermediate_size=32, num_labels=3))


def test_load_adapter_refuses_the_task_types_from_pretrained_refuses(tmp_path):
    get_prefix_model(bert_classifier(), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2)).save_pretrained(
        tmp_path / "good")
    bad = tmp_path / "causal"
    bad.mkdir()
    get_prefix_model(T.BertModel(bert_classifier().config), PrefixTuningConfig(
        num_virtual_tokens=2)).save_pretrained(bad)
    values = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**values, "task_type": "CAUSAL_LM"}))
    message = r"^task_type: 'CAUSAL_LM' does not fit BertForSequenceClassification, a SEQ_CLS model"
    with pytest.raises(ValueError, match=message):
        PrefixModel.from_pretrained(bert_classifier(), bad)
    model = PrefixModel.from_pretrained(bert_classifier(), tmp_path / "good")
    before = state(model)
    with pytest.raises(ValueError, match=message):
        model.load_adapter(bad, adapter_name="causal")
    with pytest.raises(ValueError, match=r"^task_type: None would leave BertForSequenceClassification's task head"):
        model.add_adapter("none", PrefixTuningConfig(num_virtual_tokens=2))
    assert unchanged(model, before)
