"""The drop-in on decoder-only LMs, held to real PEFT on tiny random models."""

import copy

import peft
import pytest
import torch
from tiny_models import DECODERS, VOCAB, tiny_decoder
from transformers import DynamicCache

from prefix_kernels import PrefixModel, PrefixTuningConfig, from_peft, get_prefix_model

P = 5


def pair(name, projection=False):
    """(PEFT model, our model) over identical base weights and an identical prefix."""
    base = tiny_decoder(name)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection))
    ours = get_prefix_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                     prefix_projection=projection))
    ours.prefix_encoders["default"].load_state_dict(theirs.prompt_encoder["default"].state_dict())
    return theirs, ours


def batch(b=3, s=9, right_padding=False):
    ids = torch.randint(3, VOCAB, (b, s))
    mask = torch.ones(b, s, dtype=torch.long)
    if right_padding:
        mask[1, s - 3:] = 0
        mask[2, s - 5:] = 0
    return ids, mask


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("right_padding", [False, True])
def test_logits_match_peft(name, right_padding):
    theirs, ours = pair(name)
    ids, mask = batch(right_padding=right_padding)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_gradients_match_peft(name, projection):
    theirs, ours = pair(name, projection)
    theirs.train(), ours.train()
    ids, mask = batch(right_padding=True)
    labels = ids.masked_fill(mask == 0, -100)
    theirs(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    mine = dict(ours.prefix_encoders["default"].named_parameters())
    for key, param in theirs.prompt_encoder["default"].named_parameters():
        torch.testing.assert_close(mine[key].grad, param.grad, atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in ours.get_base_model().parameters())


def test_only_the_prefix_trains():
    _, ours = pair("llama")
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable == ["prefix_encoders.default.embedding.weight"]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_peft_adapter_loads_into_ours(tmp_path, name):
    theirs, _ = pair(name, projection=True)
    theirs.save_pretrained(tmp_path)
    ours = PrefixModel.from_pretrained(tiny_decoder(name), tmp_path)
    theirs.eval()
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=2e-5, rtol=1e-4)
    assert not any(p.requires_grad for p in ours.parameters())


@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_our_adapter_loads_into_peft(tmp_path, name):
    _, ours = pair(name, projection=True)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_decoder(name), tmp_path)
    ids, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, atol=2e-5, rtol=1e-4)


def test_resume_training_from_a_saved_adapter(tmp_path):
    _, ours = pair("llama", projection=True)
    ours.save_pretrained(tmp_path)
    resumed = PrefixModel.from_pretrained(tiny_decoder("llama"), tmp_path, is_trainable=True)
    ids, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(resumed(input_ids=ids).logits, ours(input_ids=ids).logits)
    resumed(input_ids=ids, labels=ids).loss.backward()
    assert resumed.prefix_encoders["default"].embedding.weight.grad.abs().sum() > 0


def test_from_peft_shares_parameters():
    theirs, _ = pair("mistral")
    ours = from_peft(theirs)
    shared = theirs.prompt_encoder["default"].embedding.weight
    assert ours.prefix_encoders["default"].embedding.weight is shared
    ids, _ = batch()
    before = ours(input_ids=ids).logits
    with torch.no_grad():
        shared.mul_(2.0)
    assert not torch.allclose(ours(input_ids=ids).logits, before)


def peft_greedy(peft_model, ids, steps):
    """Greedy decoding by full recomputation over PEFT's forward (which does use the prefix)."""
    for _ in range(steps):
        with torch.no_grad():
            logits = peft_model(input_ids=ids).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.parametrize("name", DECODERS)
def test_generate_uses_the_prefix(name):
    theirs, ours = pair(name)
    ids, _ = batch(b=1, s=6)
    settings = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True)
    out = ours.generate(input_ids=ids, **settings)
    assert torch.equal(out.sequences, peft_greedy(theirs, ids, 8))
    plain = ours.unload().generate(input_ids=ids, **settings)
    assert not torch.allclose(out.logits[0], plain.logits[0], atol=1e-3)


def test_cache_never_holds_the_prefix():
    _, ours = pair("llama")
    ids, _ = batch(b=2, s=6)
    cache = DynamicCache(config=ours.config)
    ours.generate(input_ids=ids, max_new_tokens=4, do_sample=False, cache=cache)
    assert cache.get_seq_length() == 6 + 4 - 1
    assert cache.layers[0].keys.shape[-2] == 6 + 4 - 1


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_left_padded_batch_generates_each_row_as_alone(name):
    _, ours = pair(name)
    prompts = [torch.randint(3, VOCAB, (n,)) for n in (7, 4, 2)]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, 7 - len(prompt):] = prompt
        mask[i, 7 - len(prompt):] = 1
    together = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for i, prompt in enumerate(prompts):
        alone = ours.generate(input_ids=prompt[None], max_new_tokens=6, do_sample=False)
        assert torch.equal(together[i, 7:], alone[0, len(prompt):])


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        _, ours = pair(name)
        ours.train()
        if checkpointing:
            ours.gradient_checkpointing_enable()
        ids, mask = batch(right_padding=True)
        ours(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append(ours.prefix_encoders["default"].embedding.weight.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


def test_reentrant_checkpointing_is_refused():
    _, ours = pair("llama")
    with pytest.raises(ValueError, match="^gradient_checkpointing_kwargs: use_reentrant=True"):
        ours.gradient_checkpointing_enable({"use_reentrant": True})


def test_positions_start_after_the_prefix():
    """Real tokens sit at positions P.., as in PEFT (GPT-2's absolute positions make the offset visible)."""
    _, ours = pair("gpt2")
    ids, _ = batch(b=1)
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        default = ours(input_ids=ids).logits
        given = ours(input_ids=ids, position_ids=positions).logits  # given positions are shifted by P too
        from_zero = ours(input_ids=ids, position_ids=positions - P).logits  # lands on positions 0..
    torch.testing.assert_close(default, given)
    assert not torch.allclose(default, from_zero, atol=1e-3)


def test_attributes_fall_through():
    _, ours = pair("gpt2")
    assert ours.config is ours.get_base_model().config
    assert ours.can_generate()


def test_print_trainable_parameters(capsys):
    _, ours = pair("llama")
    ours.print_trainable_parameters()
    trainable = ours.prefix_encoders["default"].embedding.weight.numel()
    assert f"trainable params: {trainable:,d} ||" in capsys.readouterr().out


def test_wrapping_errors():
    with pytest.raises(TypeError, match="^model: expected a transformers PreTrainedModel"):
        get_prefix_model(torch.nn.Linear(2, 2), PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(TypeError, match="^config: expected prefix_kernels.PrefixTuningConfig or peft.Prefix"):
        get_prefix_model(tiny_decoder("gpt2"), {"num_virtual_tokens": 2})


def test_pickle_adapters_are_refused(tmp_path):
    PrefixTuningConfig(num_virtual_tokens=P).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"not loaded")
    model = tiny_decoder("llama")
    with pytest.raises(ValueError, match="safetensors is required"):
        PrefixModel.from_pretrained(model, tmp_path)
    assert model.config._attn_implementation != "prefix_kernels"  # untouched


def test_adapter_for_another_model_is_refused(tmp_path):
    _, ours = pair("llama")
    ours.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="^directory: the adapter in .* was trained for a different model "
                                         r"\(num_layers: the config says 3 but the model \(qwen2\) needs 2\)"):
        PrefixModel.from_pretrained(tiny_decoder("qwen2"), tmp_path)


def test_unknown_adapter_name():
    _, ours = pair("llama")
    with pytest.raises(ValueError, match="^adapter_name: unknown adapter 'other'"):
        ours.set_adapter("other")


def test_triton_backend_drives_the_model(monkeypatch):
    """The drop-in reaches the Triton kernel (interpreted on CPU) with no change, and agrees with torch."""
    _, ours = pair("qwen2")  # GQA, head dim 16
    ours.train()
    ids, mask = batch(s=6, right_padding=True)
    results = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("PREFIX_KERNELS_BACKEND", backend)
        ours.zero_grad()
        out = ours(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        results.append((out.logits, ours.prefix_encoders["default"].embedding.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_static_cache_generates_as_dynamic(name):
    _, ours = pair(name)
    ids, _ = batch(b=2, s=6)
    dynamic = ours.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    static = ours.generate(input_ids=ids, max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert torch.equal(static, dynamic)
