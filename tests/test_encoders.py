"""BERT-style encoders (P-Tuning v2): the prefixed encoder against a float64 reference built by hand."""

import copy

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    BloomConfig,
    BloomForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from prefix_kernels import PrefixModel, PrefixTuningConfig, get_prefix_model

P = 4
SIZES = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64, num_labels=3)


def tiny_encoder(kind="bert", head=BertForSequenceClassification):
    torch.manual_seed(0)
    if kind == "roberta":
        return RobertaForSequenceClassification(RobertaConfig(pad_token_id=1, **SIZES)).eval()
    return head(BertConfig(pad_token_id=0, **SIZES)).eval()


def core_of(model):
    return getattr(model, model.base_model_prefix)


def reference_hidden(core, prefix, ids, mask, positions):
    """The encoder by hand in float64: every layer attends to [prefix ; sequence], padding masked."""
    h = core.embeddings(input_ids=ids, position_ids=positions, token_type_ids=torch.zeros_like(ids))
    b, s, _ = h.shape
    n_heads = core.config.num_attention_heads
    visible = torch.cat([torch.ones(b, P, dtype=torch.bool), mask.bool()], dim=1)[:, None, None, :]
    for i, layer in enumerate(core.encoder.layer):
        attn = layer.attention.self

        def heads(x):
            return x.view(b, -1, n_heads, x.shape[-1] // n_heads).transpose(1, 2)

        keys = torch.cat([prefix[i, 0].expand(b, -1, -1, -1), heads(attn.key(h))], dim=2)
        values = torch.cat([prefix[i, 1].expand(b, -1, -1, -1), heads(attn.value(h))], dim=2)
        q = heads(attn.query(h))
        scores = (q @ keys.transpose(-1, -2)) / q.shape[-1] ** 0.5
        context = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ values
        context = context.transpose(1, 2).reshape(b, s, -1)
        h = layer.attention.output.LayerNorm(layer.attention.output.dense(context) + h)
        h = layer.output.LayerNorm(layer.output.dense(layer.intermediate(h)) + h)
    return h


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_encoder_equals_hand_built_reference(kind):
    model = get_prefix_model(tiny_encoder(kind).double(), PrefixTuningConfig(task_type="SEQ_CLS",
                                                                            num_virtual_tokens=P))
    model.prefix_encoders.double()
    pad = model.config.pad_token_id
    ids = torch.randint(5, 120, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    ids = ids.masked_fill(mask == 0, pad)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        if kind == "roberta":  # RoBERTa numbers tokens after padding_idx; the prefix comes first
            positions = (torch.cumsum(mask, 1) + P) * mask + pad
        else:
            positions = torch.arange(7)[None] + P
        want = reference_hidden(core_of(model.get_base_model()), model.get_prefix(), ids, mask, positions)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-10, rtol=0)


def test_classifier_head_trains_with_the_prefix():
    model = get_prefix_model(tiny_encoder(), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prefix_encoders.default.embedding.weight", "base_model.classifier.weight",
                         "base_model.classifier.bias"}


def test_training_lowers_the_loss():
    model = get_prefix_model(tiny_encoder(), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P))
    model.train()
    ids = torch.randint(5, 120, (16, 6))
    labels = (ids[:, 0] % 3)  # learnable from the first token
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(60):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_token_classification():
    model = get_prefix_model(tiny_encoder(head=BertForTokenClassification),
                             PrefixTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=P))
    ids = torch.randint(5, 120, (2, 6))
    out = model(input_ids=ids, labels=torch.zeros(2, 6, dtype=torch.long))
    out.loss.backward()
    assert out.logits.shape == (2, 6, 3)
    assert model.get_base_model().classifier.weight.grad is not None


def test_head_is_saved_and_restored(tmp_path):
    model = get_prefix_model(tiny_encoder(), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P))
    with torch.no_grad():
        model.get_base_model().classifier.weight.add_(1.0)
    model.save_pretrained(tmp_path)
    reloaded = PrefixModel.from_pretrained(tiny_encoder(), tmp_path)
    ids = torch.randint(5, 120, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_peft_saved_head_loads(tmp_path):
    import peft

    theirs = peft.get_peft_model(copy.deepcopy(tiny_encoder()), peft.PrefixTuningConfig(task_type="SEQ_CLS",
                                                                                       num_virtual_tokens=P))
    with torch.no_grad():
        theirs.base_model.classifier.modules_to_save["default"].weight.add_(1.0)
    theirs.save_pretrained(tmp_path)
    ours = PrefixModel.from_pretrained(tiny_encoder(), tmp_path)
    torch.testing.assert_close(ours.get_base_model().classifier.weight,
                               theirs.base_model.classifier.modules_to_save["default"].weight)


def test_model_without_the_attention_interface_is_refused():
    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=50, hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="^model: bloom is not supported: its attention does not go through"):
        get_prefix_model(bloom, PrefixTuningConfig(num_virtual_tokens=2))
    assert bloom.config._attn_implementation != "prefix_kernels"


def test_an_adapter_loaded_into_an_unsupported_model_says_so(tmp_path):
    """The model is checked before the adapter: a Llama adapter in BLOOM is refused for BLOOM, not its sizes."""
    from tiny_models import tiny_decoder

    get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(num_virtual_tokens=2)).save_pretrained(tmp_path)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=50, hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="^model: bloom is not supported"):
        PrefixModel.from_pretrained(bloom, tmp_path)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_packed_sequences_from_cu_seq_lens_equal_each_alone(kind):
    """The collator's `cu_seq_lens_*` without `position_ids`: every packed sequence numbered as it is alone (RoBERTa
    from padding_idx + 1 + P)."""
    from transformers import DataCollatorWithFlattening

    model = get_prefix_model(tiny_encoder(kind, BertForTokenClassification), PrefixTuningConfig(
        task_type="TOKEN_CLS" if kind == "bert" else "SEQ_CLS", num_virtual_tokens=P))
    sequences = [torch.randint(5, 120, (n,)).tolist() for n in (5, 7, 1, 3)]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=False)(
        [{"input_ids": s} for s in sequences])
    assert "position_ids" not in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], cu_seq_lens_q=batch["cu_seq_lens_q"],
                       cu_seq_lens_k=batch["cu_seq_lens_k"], output_hidden_states=True).hidden_states[-1]
        start = 0
        for sequence in sequences:
            alone = model(input_ids=torch.tensor([sequence]), output_hidden_states=True).hidden_states[-1]
            torch.testing.assert_close(packed[0, start:start + len(sequence)], alone[0], atol=1e-5, rtol=1e-5)
            start += len(sequence)


def test_roberta_numbers_embeddings_as_token_ids():
    model = get_prefix_model(tiny_encoder("roberta"), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P))
    ids = torch.randint(5, 120, (2, 6))
    embeddings = model.get_base_model().roberta.embeddings.word_embeddings(ids)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=embeddings).logits, model(input_ids=ids).logits)
