"""The op is one registered custom op, and nothing on the per-layer path reads device data on the host:
`torch.compile(fullgraph=True)` equals eager for the op with a bank, a padded training step and a StaticCache
decode step of a mixed-adapter batch; padding keeps the kernel's causal mode."""

import pytest
import torch
from tiny_models import VOCAB, tiny_decoder
from transformers import StaticCache

from prefix_kernels import PrefixTuningConfig, get_prefix_model, prefix_attention
from prefix_kernels.integrations import attention_interface
from prefix_kernels.ops.prefix_attention import _attention


def bank_inputs():
    b, hq, hkv, s, d, p, n = 3, 4, 2, 7, 16, 5, 4
    tensors = [torch.randn(shape, requires_grad=True) for shape in
               ((b, hq, s, d), (b, hkv, s, d), (b, hkv, s, d), (n, hkv, p, d), (n, hkv, p, d))]
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, :2] = False
    return tensors, torch.tensor([2, 0, 3]), torch.tensor([5, 3, 4]), mask


def test_opcheck():
    (q, k, v, pk, pv), index, lengths, mask = bank_inputs()
    for causal, padding in ((True, mask[:, None, None, :]), (False, None)):
        args = (q, k, v, pk, pv, index, lengths, padding, None, None, None, 0, 0, causal, 0.25, None, None, "torch")
        torch.library.opcheck(_attention, args)


def test_fullgraph_op_with_a_bank():
    tensors, index, lengths, mask = bank_inputs()

    def attend(q, k, v, pk, pv):
        return prefix_attention(q, k, v, pk, pv, prefix_index=index, prefix_lengths=lengths, attention_mask=mask)

    eager = attend(*tensors)
    compiled = torch.compile(attend, fullgraph=True)(*tensors)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(compiled.sum(), tensors), torch.autograd.grad(eager.sum(), tensors)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_fullgraph_padded_training_step():
    model = get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    model.train()
    ids = torch.randint(3, VOCAB, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)

    def step(call):
        out = call(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grad = model.prefix_encoders["default"].embedding.weight.grad.clone()
        model.zero_grad()
        return out.logits.detach(), grad

    eager = step(model)
    compiled = step(torch.compile(model, fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(compiled[1], eager[1], rtol=0, atol=1e-7)


def test_fullgraph_static_cache_decode_of_a_mixed_batch():
    model = get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    model._add_adapter("short", PrefixTuningConfig(num_virtual_tokens=3).resolve(model.config))
    names = ["default", "short", "short"]
    ids = torch.randint(3, VOCAB, (3, 6))

    def decode(step):
        cache = StaticCache(config=model.config, max_cache_len=16)
        logits = []
        with torch.no_grad():
            out = model(input_ids=ids, cache=cache, cache_position=torch.arange(6), adapter_names=names)
            for t in range(6, 10):
                token = out.logits[:, -1:].argmax(-1)
                out = step(input_ids=token, cache=cache, cache_position=torch.tensor([t]), adapter_names=names)
                logits.append(out.logits)
        return torch.cat(logits, dim=1)

    eager = decode(model)
    # A mixed batch's plan is built outside compiled code (its names would otherwise be baked into the graph), so
    # fullgraph=True goes on the base model, which receives the plan as tensors.
    model.get_base_model().compile(fullgraph=True)
    try:
        torch.testing.assert_close(decode(model), eager, rtol=0, atol=1e-6)
    finally:
        model.get_base_model()._compiled_call_impl = None


@pytest.mark.parametrize("padding", ["left", "right"])
def test_padding_keeps_the_kernels_causal_mode(monkeypatch, padding):
    """A padded causal batch reaches the op as causal plus a key-padding mask, never a dense 4-D mask."""
    seen = []

    def spy(*args, **kwargs):
        seen.append((kwargs["causal"], None if kwargs["attention_mask"] is None else kwargs["attention_mask"].dim()))
        return prefix_attention(*args, **kwargs)

    monkeypatch.setattr(attention_interface, "prefix_attention", spy)
    model = get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    ids = torch.randint(3, VOCAB, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0 if padding == "left" else 1
    mask[1, 5:] = 0 if padding == "right" else 1
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert seen and all(s == (True, 2) for s in seen)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_layers_of_a_mixed_adapter_decode_step_never_wait_for_the_gpu():
    """On a GPU, a StaticCache decode step of a batch mixing adapters of different lengths runs its decoder layers
    (attention with the prefix, on backend "triton") under `set_sync_debug_mode("error")`, which raises on any
    host-device synchronisation. The call's plan is built before the first layer, outside the checked span."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    base = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    model = get_prefix_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    model._add_adapter("long", PrefixTuningConfig(num_virtual_tokens=24).resolve(model.config))
    names, ids = ["default", "long", "default"], torch.randint(3, VOCAB, (3, 6), device="cuda")
    cache = StaticCache(config=config, max_cache_len=32)
    layers = base.model.layers
    with torch.no_grad():
        out = model(input_ids=ids, cache=cache, cache_position=torch.arange(6, device="cuda"), adapter_names=names)
        for t in range(6, 9):  # the last step checked; the ones before compile and autotune the kernels
            checked = t == 8
            hooks = [layers[0].register_forward_pre_hook(lambda *_: torch.cuda.set_sync_debug_mode("error")),
                     layers[-1].register_forward_hook(lambda *_: torch.cuda.set_sync_debug_mode("default"))
                     ] if checked else []
            try:
                out = model(input_ids=out.logits[:, -1:].argmax(-1), cache=cache,
                            cache_position=torch.tensor([t], device="cuda"), adapter_names=names)
            finally:
                for hook in hooks:
                    hook.remove()
                torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.logits).all()


def test_compiled_model_compiles_once_for_every_adapter_composition():
    """Under torch.compile(model), a mixed batch's adapter names reach compiled code as tensors (bank index,
    lengths, positions): six compositions of three adapters of different lengths compile one set of graphs, and
    each equals eager."""
    model = get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    for name, length in (("short", 2), ("long", 9)):
        model._add_adapter(name, PrefixTuningConfig(num_virtual_tokens=length).resolve(model.config))
    graphs = []

    def count(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    compiled = torch.compile(model, backend=count)
    ids = torch.randint(3, VOCAB, (3, 6))
    compositions = [["default", "short", "long"], ["long", "long", "short"], ["short", "default", "default"],
                    ["default", "default", "default"], ["long", "short", "default"], ["short", "short", "short"]]
    with torch.no_grad():
        for i, names in enumerate(compositions):
            out = compiled(input_ids=ids, adapter_names=names).logits
            torch.testing.assert_close(out, model(input_ids=ids, adapter_names=names).logits, rtol=0, atol=1e-6)
            if i == 0:
                first = len(graphs)
    assert first > 0 and len(graphs) == first, f"{len(graphs) - first} graphs compiled after the first composition"


def test_generate_on_a_base_model_compiled_in_place_keeps_the_prefix():
    """`Module.compile()` of the base model compiles its original forward; generate() and mixed batches still read
    the prefix (the per-call view does not inherit the compiled call)."""
    model = get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    model.prefix_encoders["default"].embedding.weight.data.normal_()
    ids = torch.randint(3, VOCAB, (2, 6))
    expected = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    model.get_base_model().compile(backend="eager")
    try:
        torch.testing.assert_close(model.generate(input_ids=ids, max_new_tokens=4, do_sample=False), expected)
    finally:
        model.get_base_model()._compiled_call_impl = None
    base_tokens = tiny_decoder("llama").generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert not torch.equal(expected, base_tokens)
