"""Packed batches through the drop-in: several sequences in one row (as `DataCollatorWithFlattening` builds them)
give each sequence the logits, loss and prefix gradients it gets in an ordinary padded batch."""

import pytest
import torch
from tiny_models import VOCAB, tiny_decoder
from transformers import DataCollatorWithFlattening

from prefix_kernels import PrefixTuningConfig, get_prefix_model

LENGTHS = [5, 7, 1, 3]


@pytest.fixture
def model():
    wrapped = get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    wrapped._add_adapter("other", PrefixTuningConfig(num_virtual_tokens=6).resolve(wrapped.config))
    wrapped.prefix_encoders["other"].embedding.weight.data.normal_()
    return wrapped


def examples(lengths=LENGTHS):
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def padded(sequences):
    """(input_ids, attention_mask, labels) right-padded to the longest sequence."""
    longest = max(map(len, sequences))
    ids = torch.zeros(len(sequences), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def packed(sequences, flash_kwargs=False):
    collate = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs, return_position_ids=True)
    return collate([{"input_ids": seq} for seq in sequences])


def assert_each_sequence_equals_its_row(packed_logits, padded_logits, sequences):
    """Packed logits `[1, total, V]`: each sequence's equal its padded row's real positions."""
    start = 0
    for row, seq in enumerate(sequences):
        torch.testing.assert_close(packed_logits[0, start:start + len(seq)], padded_logits[row, :len(seq)],
                                   atol=1e-5, rtol=1e-5)
        start += len(seq)


def grads(model):
    return {name: p.grad.clone() for name, p in model.prefix_encoders.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_packed_equals_padded(model, flash_kwargs):
    sequences = examples()
    model.train()
    ids, mask, labels = padded(sequences)
    reference = model(input_ids=ids, attention_mask=mask, labels=labels)
    reference.loss.backward()
    reference_grads = grads(model)
    model.zero_grad()
    batch = packed(sequences, flash_kwargs)
    assert batch["input_ids"].shape == (1, sum(LENGTHS))
    out = model(**batch)
    out.loss.backward()
    assert_each_sequence_equals_its_row(out.logits, reference.logits, sequences)
    torch.testing.assert_close(out.loss, reference.loss, atol=1e-6, rtol=1e-6)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-6, rtol=1e-5)


def test_packed_sequences_with_their_own_adapters(model):
    """One adapter name per packed sequence; adapters of different lengths restart positions at their own P."""
    sequences = examples()
    names = ["other", "default", "other", "default"]
    ids, mask, _ = padded(sequences)
    batch = packed(sequences)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], adapter_names=names).logits
        one_name = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         adapter_names=["other"]).logits
        all_other = model(input_ids=ids, attention_mask=mask, adapter_names=["other"] * len(sequences)).logits
    start = 0
    for row, seq in enumerate(sequences):
        n = len(seq)
        torch.testing.assert_close(out[0, start:start + n], reference[row, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(one_name[0, start:start + n], all_other[row, :n], atol=1e-5, rtol=1e-5)
        start += n


def test_an_unpacked_row_with_position_ids_is_not_packing(model):
    ids = torch.randint(3, VOCAB, (1, 6))
    with torch.no_grad():
        given = model(input_ids=ids, position_ids=torch.arange(6)[None]).logits
        default = model(input_ids=ids).logits
    torch.testing.assert_close(given, default)


def test_packed_names_must_match_rows_or_sequences(model):
    batch = packed(examples())
    with pytest.raises(ValueError, match=r"^adapter_names: expected one name per batch row or per packed sequence "
                                         r"\(4\), got 2 names"):
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], adapter_names=["other", "default"])


def windowed(name):
    """Mistral and Gemma 2 with a sliding window of 3 (Gemma 2: soft-capped logits too), random weights."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, sliding_window=3, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if name == "mistral":
            return MistralForCausalLM(MistralConfig(**common)).eval()
        return Gemma2ForCausalLM(Gemma2Config(head_dim=8, attn_logit_softcapping=5.0, **common)).eval()


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_packed_keeps_the_sliding_window(name, flash_kwargs):
    """Windowed layers see, per packed sequence, the window they see padded (the window bites: sequences of 5 and 7
    tokens, window 3), prefix gradients included."""
    model = get_prefix_model(windowed(name), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.prefix_encoders["default"].embedding.weight.data.normal_()
    sequences = examples([5, 7, 2])
    ids, mask, labels = padded(sequences)
    reference = model(input_ids=ids, attention_mask=mask, labels=labels)
    reference.loss.backward()
    reference_grad = model.prefix_encoders["default"].embedding.weight.grad.clone()
    model.zero_grad()
    out = model(**packed(sequences, flash_kwargs))
    out.loss.backward()
    assert_each_sequence_equals_its_row(out.logits, reference.logits, sequences)
    torch.testing.assert_close(model.prefix_encoders["default"].embedding.weight.grad, reference_grad,
                               atol=1e-6, rtol=1e-5)


def test_cu_seq_lens_k_alone_is_honoured(model):
    sequences = examples()
    ids, mask, _ = padded(sequences)
    batch = packed(sequences, flash_kwargs=True)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        out = model(input_ids=batch["input_ids"], cu_seq_lens_k=batch["cu_seq_lens_k"]).logits
        ones = model(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"]),
                     cu_seq_lens_q=batch["cu_seq_lens_q"], cu_seq_lens_k=batch["cu_seq_lens_k"]).logits
    assert_each_sequence_equals_its_row(out, reference, sequences)
    torch.testing.assert_close(ones, out, atol=0, rtol=0)


def refusals():
    """(name, the call's keyword arguments besides input_ids, error pattern) of packing signals that cannot be
    honoured."""
    cu = packed(examples(), flash_kwargs=True)["cu_seq_lens_q"]
    total = sum(LENGTHS)
    padding = torch.ones(1, total, dtype=torch.long)
    padding[0, -1] = 0
    return {
        "mask-with-padding": (dict(attention_mask=padding, cu_seq_lens_q=cu, cu_seq_lens_k=cu),
                              r"^attention_mask: with cu_seq_lens_q the packed sequences lie back to back with no "
                              r"padding, so the mask must be None or all ones; got padding"),
        "4d-mask": (dict(attention_mask=torch.ones(1, 1, total, total, dtype=torch.bool), cu_seq_lens_q=cu),
                    r"^attention_mask: .* got a 4-D mask"),
        "two-rows": (dict(cu_seq_lens_q=cu, rows=2), r"^cu_seq_lens_q: packed sequences are one row of back-to-back "
                                                     r"tokens, got 2 rows"),
        "short-offsets": (dict(cu_seq_lens_q=cu[:-1]), r"^cu_seq_lens_q: expected offsets from 0 to the row's 16 "
                                                       r"tokens, never decreasing, got \[0, 5, 12, 13\]"),
        "disagreeing": (dict(cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 16], dtype=torch.int32)),
                        r"^cu_seq_lens_k: expected the same offsets as cu_seq_lens_q"),
    }


@pytest.mark.parametrize("case", list(refusals()))
def test_packing_signals_that_cannot_be_honoured_are_refused(model, case):
    call, message = refusals()[case]
    ids = torch.randint(3, VOCAB, (call.pop("rows", 1), sum(LENGTHS)))
    with pytest.raises(ValueError, match=message):
        model(input_ids=ids, **call)


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_encoder_decoders_refuse_cu_seq_lens(name):
    import transformers as T

    torch.manual_seed(0)
    base = T.T5ForConditionalGeneration(T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                   num_heads=4, decoder_start_token_id=0, dropout_rate=0.0)) \
        if name == "t5" else T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64))
    wrapped = get_prefix_model(base.eval(), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4))
    batch = packed(examples(), flash_kwargs=True)
    with pytest.raises(ValueError, match=r"^cu_seq_lens_q: packed sequences are not supported by encoder-decoders"):
        wrapped(input_ids=batch["input_ids"], decoder_input_ids=batch["input_ids"],
                cu_seq_lens_q=batch["cu_seq_lens_q"], cu_seq_lens_k=batch["cu_seq_lens_k"])


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_a_packed_sequence_past_the_learned_positions_is_refused_by_name(flash_kwargs):
    model = get_prefix_model(tiny_decoder("gpt2"), PrefixTuningConfig(num_virtual_tokens=8))  # n_positions=128
    fits = packed(examples([120, 3]), flash_kwargs)
    model(**fits)
    batch = packed(examples([3, 121]), flash_kwargs)
    with pytest.raises(ValueError, match=r"^input_ids: the 121 tokens of a packed sequence need positions up to 129, "
                                         r"but gpt2 numbers only 128 and the prefix takes the first 8; give at most "
                                         r"120 tokens per sequence"):
        model(**batch)
