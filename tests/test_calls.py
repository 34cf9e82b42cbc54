"""Each call carries its own state: threads and nested calls see only their own adapters, the base model outside a
call computes what it computed before wrapping, disable_adapter and unload give the base model back."""

import copy
import threading

import peft
import pytest
import torch
from tiny_models import VOCAB, tiny_decoder

from prefix_kernels import PrefixModel, PrefixTuningConfig, from_peft, get_prefix_model

LENGTHS = {"default": 5, "short": 2, "long": 9}


@pytest.fixture
def model():
    """The tiny Llama with three adapters of different lengths."""
    wrapped = get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(num_virtual_tokens=LENGTHS["default"]))
    for name in ("short", "long"):
        config = PrefixTuningConfig(num_virtual_tokens=LENGTHS[name]).resolve(wrapped.config)
        wrapped._add_adapter(name, config)
    return wrapped


def padded(b=3, s=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, s), generator=generator)
    mask = torch.ones(b, s, dtype=torch.long)
    if b > 1:
        mask[1, s - 2:] = 0
        mask[-1, s - 4:] = 0
    return ids, mask


def test_threads_each_get_their_own_adapters(model):
    """Two threads generating with different adapters at once: every result equals the same call made alone."""
    ids, _ = padded(2, 5)
    jobs = {"a": ["short", "long"], "b": ["long", "default"]}
    expected = {key: model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, adapter_names=names)
                for key, names in jobs.items()}
    results, start = {key: [] for key in jobs}, threading.Barrier(len(jobs))

    def work(key):
        start.wait()
        for _ in range(6):
            results[key].append(model.generate(input_ids=ids, max_new_tokens=5, do_sample=False,
                                               adapter_names=jobs[key]))
            results[key].append(model(input_ids=ids, adapter_names=jobs[key]).logits.argmax(-1))

    threads = [threading.Thread(target=work, args=(key,)) for key in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with torch.no_grad():
        expected_logits = {key: model(input_ids=ids, adapter_names=names).logits.argmax(-1)
                           for key, names in jobs.items()}
    for key in jobs:
        assert len(results[key]) == 12
        for i, got in enumerate(results[key]):
            assert torch.equal(got, expected[key] if i % 2 == 0 else expected_logits[key]), (key, i)


def test_a_nested_call_sees_only_its_own_adapter(model):
    """A call made from inside another call (here from a forward hook) uses its own adapter; the outer call
    continues with its own."""
    ids, _ = padded(1, 6)
    inner = []

    def hook(module, args, output):
        if not inner:
            inner.append(None)  # before the nested call, which runs this hook too
            inner[0] = model(input_ids=ids, adapter_names=["long"]).logits

    handle = model.get_base_model().model.layers[0].register_forward_hook(hook)
    with torch.no_grad():
        outer = model(input_ids=ids, adapter_names=["short"]).logits
    handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(inner[0], model(input_ids=ids, adapter_names=["long"]).logits, rtol=0, atol=0)
        torch.testing.assert_close(outer, model(input_ids=ids, adapter_names=["short"]).logits, rtol=0, atol=0)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_the_base_model_computes_what_it_did_before_wrapping(name, attention):
    base = tiny_decoder(name)
    base.set_attn_implementation(attention)
    ids, mask = padded()
    with torch.no_grad():
        before = [base(input_ids=ids).logits, base(input_ids=ids, attention_mask=mask).logits]
        generated = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    wrapped = get_prefix_model(base, PrefixTuningConfig(num_virtual_tokens=4))
    with torch.no_grad():
        after = [base(input_ids=ids).logits, base(input_ids=ids, attention_mask=mask).logits]
        assert not torch.allclose(wrapped(input_ids=ids).logits, before[0], atol=1e-3)  # the wrapper does differ
        assert torch.equal(base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False),
                           generated)
    for a, b in zip(after, before):
        assert torch.equal(a, b)


def test_from_peft_leaves_the_peft_model_computing_what_it_did():
    base = tiny_decoder("llama")
    theirs = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    ids, mask = padded()
    with torch.no_grad():
        before = theirs(input_ids=ids, attention_mask=mask).logits
        ours = from_peft(theirs)
        after = theirs(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(after[real], before[real], rtol=0, atol=1e-6)
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits[real], before[real],
                                   atol=2e-5, rtol=1e-4)


def test_wrapping_a_wrapped_model_is_refused(model):
    with pytest.raises(ValueError, match="^model: already wrapped by a PrefixModel; call unload"):
        get_prefix_model(model.get_base_model(), PrefixTuningConfig(num_virtual_tokens=2))


def test_disable_adapter_runs_the_base_model(model):
    ids, mask = padded()
    base = copy.deepcopy(model.get_base_model()).eval()
    with torch.no_grad():
        with model.disable_adapter():
            disabled = model(input_ids=ids, attention_mask=mask).logits
            generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        enabled = model(input_ids=ids, attention_mask=mask).logits
        plain = base(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(disabled[real], plain[real], atol=1e-6, rtol=0)
    assert not torch.allclose(enabled[real], plain[real], atol=1e-3)
    model.unload()
    assert torch.equal(generated, base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3,
                                                do_sample=False))


def test_disable_adapter_is_per_thread(model):
    ids, _ = padded(1, 5)
    with torch.no_grad():
        enabled = model(input_ids=ids).logits
        seen = []
        with model.disable_adapter():
            worker = threading.Thread(target=lambda: seen.append(model(input_ids=ids).logits))
            worker.start()
            worker.join()
    assert torch.equal(seen[0], enabled)


def test_unload_gives_the_base_model_back():
    base = tiny_decoder("gpt2")
    base.lm_head.weight.requires_grad_(False)  # a choice of the user's that unload must keep
    attention = base.config._attn_implementation
    grads = {name: p.requires_grad for name, p in base.named_parameters()}
    wrapped = get_prefix_model(base, PrefixTuningConfig(num_virtual_tokens=3))
    assert not any(p.requires_grad for p in base.parameters())
    assert wrapped.unload() is base
    assert base.config._attn_implementation == attention
    assert {name: p.requires_grad for name, p in base.named_parameters()} == grads
    with pytest.raises(RuntimeError, match="^PrefixModel: unload"):
        wrapped(input_ids=torch.tensor([[3, 4]]))
    with pytest.raises(RuntimeError, match="^PrefixModel: unload"):
        wrapped.generate(input_ids=torch.tensor([[3, 4]]), max_new_tokens=1)
    get_prefix_model(base, PrefixTuningConfig(num_virtual_tokens=3))  # and it can be wrapped again


def test_forward_takes_exactly_one_name_per_row(model):
    ids, _ = padded(4, 5)
    for names in (["short", "long"], ["short"] * 3, ["short"] * 5):
        with pytest.raises(ValueError, match=r"^adapter_names: expected one name per batch row \(4\), got "
                                             rf"{len(names)} names"):
            model(input_ids=ids, adapter_names=names)


def test_adapter_names_may_be_any_iterable(model):
    ids, _ = padded(2, 5)
    with torch.no_grad():
        listed = model(input_ids=ids, adapter_names=["short", "long"]).logits
        generated = model(input_ids=ids, adapter_names=(n for n in ["short", "long"])).logits
    assert torch.equal(listed, generated)
    with pytest.raises(TypeError, match="^adapter_names: expected a non-empty list"):
        model(input_ids=ids, adapter_names=iter([]))


@pytest.mark.parametrize("settings", [dict(num_return_sequences=2, do_sample=True, top_k=1),
                                      dict(num_beams=3, num_return_sequences=2, do_sample=False)])
def test_generate_follows_each_row_into_its_beams_and_sequences(model, settings):
    """One name per input row; generate's expansion (beams, num_return_sequences) carries it along."""
    prompts = [torch.randint(3, VOCAB, (5,)) for _ in range(2)]
    ids = torch.stack(prompts)
    together = model.generate(input_ids=ids, max_new_tokens=4, adapter_names=["short", "long"], **settings)
    per_row = together.shape[0] // 2
    for row, name in enumerate(["short", "long"]):
        alone = model.generate(input_ids=ids[row:row + 1], max_new_tokens=4, adapter_names=[name], **settings)
        assert torch.equal(together[row * per_row:(row + 1) * per_row], alone), name


def test_peft_config_is_accepted():
    wrapped = get_prefix_model(tiny_decoder("llama"), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                              num_virtual_tokens=3))
    assert isinstance(wrapped.peft_config["default"], PrefixTuningConfig)
    assert wrapped.peft_config["default"].num_virtual_tokens == 3


@pytest.mark.parametrize("bad", ["", "  ", "a/b", "..", ".", "v1.2", "/tmp/abs", "a\\b", "c:x"])
def test_adapter_names_are_names_not_paths(model, bad, tmp_path):
    model.save_pretrained(tmp_path / "saved")
    before = (list(model.peft_config), {n: p.clone() for n, p in model.named_parameters()})
    for call in (lambda: model.load_adapter(tmp_path / "saved", adapter_name=bad),
                 lambda: PrefixModel.from_pretrained(tiny_decoder("llama"), tmp_path / "saved", adapter_name=bad),
                 lambda: get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(num_virtual_tokens=2), bad)):
        with pytest.raises(ValueError, match="^adapter_name: expected a plain name"):
            call()
    assert list(model.peft_config) == before[0]
    assert all(torch.equal(p, before[1][n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("call, step", [("forward", 1), ("generate", 3)])
def test_unload_from_another_thread_fails_the_call_in_flight(model, call, step):
    """unload() in another thread while a call runs (here after the first layer of its `step`-th forward): the call
    raises rather than return a result computed partly without the prefix; the base model is given back."""
    ids, _ = padded(1, 5)
    base = model.get_base_model()
    reference = copy.deepcopy(base)
    forwards = []

    def unload_elsewhere(module, args, output):
        forwards.append(None)
        if len(forwards) == step:
            worker = threading.Thread(target=model.unload)
            worker.start()
            worker.join()

    handle = base.model.layers[0].register_forward_hook(unload_elsewhere)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"^PrefixModel: unload\(\) gave the base model back "
                                                            r"while this call ran"):
        if call == "forward":
            model(input_ids=ids)
        else:
            model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    handle.remove()
    assert len(forwards) == step  # the call stopped at the step the unload happened in
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
