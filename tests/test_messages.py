"""What a user meets when something is wrong: every refusal names the argument and says what to do."""

import pytest
import torch
import transformers as T
from tiny_models import VOCAB, tiny_decoder

from prefix_kernels import PrefixModel, PrefixTuningConfig, get_prefix_model


def test_a_model_name_instead_of_a_model():
    with pytest.raises(TypeError, match=r"^model: expected a loaded transformers model \(for example "
                                        r"AutoModelForCausalLM.from_pretrained\('meta-llama/x'\)\)"):
        PrefixModel.from_pretrained("meta-llama/x", "adapter/")


def test_a_prompt_longer_than_the_positions_left_after_the_prefix():
    model = get_prefix_model(tiny_decoder("gpt2"), PrefixTuningConfig(num_virtual_tokens=8))  # n_positions=128
    fits = torch.randint(3, VOCAB, (1, 120))
    model(input_ids=fits)
    with pytest.raises(ValueError, match=r"^input_ids: 121 tokens after 0 cached ones need positions up to 129, but "
                                         r"gpt2 numbers only 128 and the prefix takes the first 8; give at most 120"):
        model(input_ids=torch.randint(3, VOCAB, (1, 121)))
    with pytest.raises(ValueError, match="^input_ids: 125 tokens"):
        model.generate(input_ids=torch.randint(3, VOCAB, (1, 125)), max_new_tokens=2)


def bert_classifier():
    torch.manual_seed(0)
    return T.BertForSequenceClassification(T.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                        num_attention_heads=2, intermediate_size=32, num_labels=3))


@pytest.mark.parametrize("task_type, message", [
    (None, r"^task_type: None would leave BertForSequenceClassification's task head frozen \(untrained\); expected "
           r"'SEQ_CLS'"),
    ("CAUSAL_LM", r"^task_type: 'CAUSAL_LM' does not fit BertForSequenceClassification, a SEQ_CLS model; expected "
                  r"'SEQ_CLS'"),
])
def test_a_task_type_that_leaves_a_head_untrained_is_refused(task_type, message):
    model = bert_classifier()
    with pytest.raises(ValueError, match=message):
        get_prefix_model(model, PrefixTuningConfig(task_type=task_type, num_virtual_tokens=2))
    assert all(p.requires_grad for p in model.parameters())  # untouched


def test_seq2seq_on_a_decoder_is_refused():
    with pytest.raises(ValueError, match=r"^task_type: 'SEQ_2_SEQ_LM' does not fit LlamaForCausalLM, a CAUSAL_LM "
                                         r"model; expected 'CAUSAL_LM'"):
        get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2))


def test_a_saved_adapter_loads_into_peft_without_a_warning(tmp_path, recwarn):
    import peft

    get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(task_type="CAUSAL_LM",
                                                               num_virtual_tokens=3)).save_pretrained(tmp_path)
    peft.PeftModel.from_pretrained(tiny_decoder("llama"), tmp_path)
    assert not [w for w in recwarn if "encoder_decoder_placement" in str(w.message)]


def test_gradient_checkpointing_raises_no_deprecation_warning(recwarn):
    model = get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(num_virtual_tokens=3))
    model.gradient_checkpointing_enable()
    model.activation_checkpointing_enable()
    assert not [w for w in recwarn if "deprecated" in str(w.message)]


def test_a_call_without_inputs_is_refused_by_name():
    model = get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="^input_ids: expected input_ids or inputs_embeds"):
        model()


def test_the_adapter_methods_users_call():
    """PEFT's names are provided; transformers' own PEFT integration (which would ask for PEFT's LoRA) is refused
    with a message of ours."""
    model = get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(num_virtual_tokens=2))
    model.add_adapter("second", PrefixTuningConfig(num_virtual_tokens=3))
    assert model.active_adapters == ["default"] and list(model.peft_config) == ["default", "second"]
    assert model.get_prefix("second").shape[3] == 3 and model.get_nb_trainable_parameters()[0] == 2 * 96 + 3 * 96
    with pytest.raises(ValueError, match="^adapter_name: 'second' is already loaded"):
        model.add_adapter("second", PrefixTuningConfig(num_virtual_tokens=3))
    with pytest.raises(TypeError, match=r"^adapter_name: expected the name of one loaded adapter, got list \(give each "
                                        r"batch row its own adapter with adapter_names="):
        model.set_adapter(["second"])
    model.set_adapter("second")
    with pytest.warns(UserWarning, match="adapter 'second' was active and is deleted; the active adapter is now "
                                         "'default'"):
        model.delete_adapter("second")
    assert list(model.prefix_encoders) == list(model.peft_config) == ["default"] and model.active_adapters == [
        "default"]
    with pytest.raises(ValueError, match="^adapter_name: 'default' is the only adapter"):
        model.delete_adapter("default")
    with pytest.raises(ValueError, match=r"^adapter_name: unknown adapter 'second'"):
        model.delete_adapter("second")
    for name in ("enable_adapters", "disable_adapters", "get_adapter_state_dict", "merge_and_unload"):
        with pytest.raises(AttributeError, match=rf"^PrefixModel has no {name}\(\): its adapters are managed by"):
            getattr(model, name)


def test_generate_without_input_ids_starts_from_bos_as_the_base_model_does():
    model = get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(num_virtual_tokens=2))
    bos = torch.tensor([[model.config.bos_token_id]])
    assert torch.equal(model.generate(max_new_tokens=4, do_sample=False),
                       model.generate(input_ids=bos, max_new_tokens=4, do_sample=False))


def t5(**config):
    torch.manual_seed(0)
    base = T.T5ForConditionalGeneration(T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                                   dropout_rate=0.0)).eval()
    model = get_prefix_model(base, PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, **config))
    torch.nn.init.normal_(model.prefix_encoders["default"].embedding.weight)
    return model


def generated_logits(model, **inputs):
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    return torch.stack(out.logits)


@pytest.mark.parametrize("placement", ["peft", "full"])
def test_t5_generates_from_embeddings_or_encoder_outputs_as_from_ids(placement):
    model = t5(encoder_decoder_placement=placement)
    ids = torch.randint(3, 100, (2, 6))
    want = generated_logits(model, input_ids=ids)
    embeddings = model.get_base_model().shared(ids).detach()
    torch.testing.assert_close(generated_logits(model, inputs_embeds=embeddings), want)
    if placement == "peft":  # the encoder has no prefix: its plain outputs are the ones generate() computes
        with torch.no_grad():
            encoded = model.get_base_model().get_encoder()(input_ids=ids)
        torch.testing.assert_close(generated_logits(model, encoder_outputs=encoded), want)
    else:
        with pytest.raises(ValueError, match=r"^input_ids: generate\(\) of a prefix in the encoder .* needs "
                                             r"input_ids, inputs_embeds or encoder_outputs, got none"):
            model.generate(max_new_tokens=2)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_4d_float_mask_is_taken_as_the_base_model_takes_it(attention):
    """An additive [B, 1, Sq, Skv] mask, as a caller may give it to transformers, gives what the same pattern gives
    as a padding mask; the base model outside the wrapper still takes it too."""
    base = tiny_decoder("llama")
    base.set_attn_implementation(attention)
    ids = torch.randint(3, VOCAB, (2, 6))
    padding = torch.ones(2, 6, dtype=torch.long)
    padding[1, :2] = 0
    visible = torch.tril(torch.ones(6, 6, dtype=torch.bool)) & padding.bool()[:, None, None, :]
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~visible, torch.finfo(torch.float32).min)
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=additive).logits
        model = get_prefix_model(base, PrefixTuningConfig(num_virtual_tokens=3))
        torch.testing.assert_close(base(input_ids=ids, attention_mask=additive).logits, plain, rtol=0, atol=0)
        got = model(input_ids=ids, attention_mask=additive).logits
        want = model(input_ids=ids, attention_mask=padding).logits
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 2:], want[1, 2:], atol=1e-5, rtol=1e-5)
