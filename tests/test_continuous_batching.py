"""Continuous batching in transformers' engine with an adapter per request: every request's greedy tokens equal that
request alone through `PrefixModel.generate`; prefix caching shared within an adapter, never across; bad requests
refused by name while the engine keeps serving; nothing left behind on the model."""

import logging

import pytest
import torch
from tiny_models import VOCAB, tiny_decoder
from transformers import Gemma2Config, Gemma2ForCausalLM, GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from prefix_kernels import PrefixModel, PrefixTuningConfig, get_prefix_model
from prefix_kernels.integrations import continuous_batching

LENGTHS = {"default": 5, "short": 2, "long": 9}
NEW = 5
PAGE = 8  # tokens per cache page: prompts below span several


def greedy(new: int = NEW, **kwargs) -> GenerationConfig:
    return GenerationConfig(**{"max_new_tokens": new, "do_sample": False, "eos_token_id": 2, "pad_token_id": 0,
                               **kwargs})


def engine(**kwargs) -> ContinuousBatchingConfig:
    return ContinuousBatchingConfig(**{"page_size": PAGE, "num_blocks": 96, "max_batch_tokens": 64, **kwargs})


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """Three adapters of different lengths for the tiny Llama (GQA: 8 query heads, 2 KV heads), saved."""
    dirs = {}
    for seed, (name, length) in enumerate(LENGTHS.items()):
        torch.manual_seed(seed)
        model = get_prefix_model(tiny_decoder("llama"), PrefixTuningConfig(num_virtual_tokens=length))
        dirs[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(dirs[name])
    return dirs


def served(dirs, names=("short", "long")) -> PrefixModel:
    model = PrefixModel.from_pretrained(tiny_decoder("llama"), dirs["default"])
    for name in names:
        model.load_adapter(dirs[name], adapter_name=name)
    return model


def prompts(lengths, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def alone(model: PrefixModel, prompt: list[int], name: str | None, config: GenerationConfig) -> list[int]:
    names = None if name is None else [name]
    out = model.generate(torch.tensor([prompt]), generation_config=config, adapter_names=names)
    return out[0, len(prompt):].tolist()


def results(manager, count: int) -> dict:
    found = {}
    while len(found) < count:
        result = manager.get_result(timeout=20)
        assert result is not None, f"the engine stopped with {count - len(found)} requests unanswered"
        found[result.request_id] = result
    return found


def test_generate_batch_mixed_adapters_equal_each_request_alone(adapter_dirs):
    model = served(adapter_dirs)
    inputs = prompts([4, 19, 1, 30, 7])
    names = ["long", "short", "default", "long", "short"]
    out = model.generate_batch(inputs, generation_config=greedy(), continuous_batching_config=engine(),
                               adapter_names=names)
    assert list(out) == [f"req_{i}" for i in range(len(inputs))]
    for result, prompt, name in zip(out.values(), inputs, names):
        assert result.error is None and result.prompt_ids == prompt
        assert result.generated_tokens == alone(model, prompt, name, greedy()), name
    with model.disable_adapter():  # the prefix matters: the base model answers otherwise
        base = [alone(model, prompt, None, greedy()) for prompt in inputs[:2]]
    assert base != [result.generated_tokens for result in out.values()][:2]


def test_requests_join_while_others_run(adapter_dirs):
    model = served(adapter_dirs)
    first, later = prompts([25, 3, 12], seed=1), prompts([6, 17], seed=2)
    manager = model.init_continuous_batching(generation_config=greedy(8), continuous_batching_config=engine())
    manager.start()
    try:
        ids = manager.add_requests(first, adapter_names=["short", "long", "default"])
        done = results(manager, 1)  # one has finished, the others are still running
        ids.append(manager.add_request(later[0], adapter_name="long", max_new_tokens=8))
        model.set_adapter("short")  # requests naming no adapter read the active one at the time they are added
        ids.append(manager.add_request(later[1], max_new_tokens=8))
        done.update(results(manager, 4))
    finally:
        manager.stop()
    for request_id, prompt, name in zip(ids, first + later, ["short", "long", "default", "long", "short"]):
        assert done[request_id].generated_tokens == alone(model, prompt, name, greedy(8)), request_id


def test_requests_put_back_in_the_queue_when_the_cache_is_full_read_their_adapter(adapter_dirs, caplog):
    """A cache too small for every request at once: the engine frees running requests' blocks and queues them again
    (prompt and tokens so far prefilled anew), and prompts longer than a step's token budget are prefilled in chunks."""
    model = served(adapter_dirs)
    inputs = prompts([30, 22, 26, 18], seed=10)
    names = ["long", "short", "default", "long"]
    caplog.set_level(logging.INFO, logger="ContinuousBatchingLogger")
    out = model.generate_batch(inputs, generation_config=greedy(10),
                               continuous_batching_config=engine(num_blocks=10, max_batch_tokens=24),
                               adapter_names=names)
    assert "soft reset" in caplog.text  # the case under test happened
    for result, prompt, name in zip(out.values(), inputs, names):
        assert result.error is None and result.generated_tokens == alone(model, prompt, name, greedy(10)), name


def test_forked_requests_read_their_parent_adapter(adapter_dirs):
    model = served(adapter_dirs)
    inputs = prompts([9, 14], seed=3)
    forking = greedy(num_return_sequences=2, do_sample=True, top_k=1)  # sampling one token: greedy, forked
    out = model.generate_batch(inputs, generation_config=forking, continuous_batching_config=engine(),
                               adapter_names=["long", "short"])
    assert sorted(out) == ["req_0", "req_0__child#0", "req_1", "req_1__child#0"]
    for request_id, result in out.items():
        prompt, name = (inputs[0], "long") if request_id.startswith("req_0") else (inputs[1], "short")
        assert result.generated_tokens == alone(model, prompt, name, greedy()), request_id


def matched_tokens(manager) -> dict:
    """request id -> prompt tokens the cache served from shared blocks, recorded on the manager's own cache."""
    cache = manager.batch_processor.cache
    search, matched = cache.search_prefix_match, {}

    def recording(request_id, prompt_ids):
        matched[request_id] = search(request_id, prompt_ids)
        return matched[request_id]

    cache.search_prefix_match = recording
    return matched


def test_prefix_caching_shares_blocks_within_an_adapter_never_across(adapter_dirs):
    """The same prompt, several pages long, under three adapters one after another, then again: every adapter's
    second request reuses the pages of its first, none of another's."""
    model = served(adapter_dirs)
    prompt = prompts([5 * PAGE + 3], seed=4)[0]
    order = ["long", "short", "default", "short", "long"]
    with model.continuous_batching_context_manager(generation_config=greedy(),
                                                   continuous_batching_config=engine()) as manager:
        assert manager.batch_processor.cache.use_prefix_sharing
        matched = matched_tokens(manager)
        out = {}
        for name in order:  # one at a time: each request's pages are complete before the next is scheduled
            request_id = manager.add_request(prompt, adapter_name=name)
            out[request_id] = (name, results(manager, 1)[request_id])
        assert len(manager._adapters.requests) <= 1  # finished requests are forgotten (the last one at the next step)
    assert [matched[request_id] for request_id in out] == [0, 0, 0, 5 * PAGE, 5 * PAGE]
    expected = {name: alone(model, prompt, name, greedy()) for name in set(order)}
    for name, result in out.values():
        assert result.generated_tokens == expected[name], name


def test_an_adapter_changed_in_place_is_served_afresh(adapter_dirs):
    """After an adapter's weights change, new requests read the new ones and none of the blocks cached before."""
    model = served(adapter_dirs)
    prompt = prompts([3 * PAGE + 1], seed=5)[0]
    with model.continuous_batching_context_manager(generation_config=greedy(),
                                                   continuous_batching_config=engine()) as manager:
        matched = matched_tokens(manager)
        before = manager.add_request(prompt, adapter_name="long")
        old = results(manager, 1)[before].generated_tokens
        with torch.no_grad():
            model.prefix_encoders["long"].embedding.weight.mul_(-1.5)
        after = manager.add_request(prompt, adapter_name="long")
        new = results(manager, 1)[after].generated_tokens
        manager.add_request(prompt, request_id=before, adapter_name="short")  # an id used again, another adapter
        again = results(manager, 1)[before].generated_tokens
    assert matched[after] == 0
    assert new == alone(model, prompt, "long", greedy()) != old
    assert again == alone(model, prompt, "short", greedy())


@pytest.mark.parametrize("family", ["mistral", "gpt2"])
def test_mqa_and_learned_positions_equal_each_request_alone(family):
    """Mistral with one KV head; GPT-2, whose learned positions the prefix's P come first in."""
    model = get_prefix_model(tiny_decoder(family), PrefixTuningConfig(num_virtual_tokens=4))
    inputs = prompts([5, 16], seed=9)
    out = model.generate_batch(inputs, generation_config=greedy(max_new_tokens=12),
                               continuous_batching_config=engine())
    for result, prompt in zip(out.values(), inputs):
        assert result.generated_tokens == alone(model, prompt, None, greedy(max_new_tokens=12))
    if family == "gpt2":  # 128 positions: 4 for the prefix, 120 for the prompt, none left to generate
        manager = model.init_continuous_batching(generation_config=greedy(), continuous_batching_config=engine())
        with pytest.raises(ValueError, match=r"^input_ids: 120 tokens and max_new_tokens=5 exceed gpt2's learned "
                                             r"positions after a prefix of 4 \(124 tokens in all\)"):
            manager.add_request(prompts([120])[0])


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    """Gemma 2: logits soft-capped, sliding and full attention layers in turn (two paged caches); two adapters."""
    def config():
        return Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=48,
                            attn_logit_softcapping=20.0, final_logit_softcapping=None, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2)

    torch.manual_seed(0)
    saved = tmp_path_factory.mktemp("gemma2_long")
    get_prefix_model(Gemma2ForCausalLM(config()), PrefixTuningConfig(num_virtual_tokens=7)).save_pretrained(saved)
    model = get_prefix_model(Gemma2ForCausalLM(config()).eval(), PrefixTuningConfig(num_virtual_tokens=3))
    model.load_adapter(saved, adapter_name="long")
    return model


def test_gemma2_soft_cap_and_layer_types_equal_each_request_alone(gemma2):
    inputs = prompts([20, 5, 33])
    names = ["long", "default", "long"]
    out = gemma2.generate_batch(inputs, generation_config=greedy(), continuous_batching_config=engine(),
                                adapter_names=names)
    for result, prompt, name in zip(out.values(), inputs, names):
        assert result.generated_tokens == alone(gemma2, prompt, name, greedy()), name


def test_requests_longer_than_the_sliding_window_equal_each_request_alone():
    """The window bites (a window of 2 tokens, prompts of 30 and 45): each request's sliding layers see only the
    window of its own keys, and every prefix key."""
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=2,
                          attn_logit_softcapping=20.0, final_logit_softcapping=None, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1)
    model = get_prefix_model(Gemma2ForCausalLM(config).eval(), PrefixTuningConfig(num_virtual_tokens=3))
    model.prefix_encoders["default"].embedding.weight.data.normal_()
    inputs = prompts([30, 45, 9])
    out = model.generate_batch(inputs, generation_config=greedy(max_new_tokens=12),
                               continuous_batching_config=engine())
    for result, prompt in zip(out.values(), inputs):
        assert result.generated_tokens == alone(model, prompt, None, greedy(max_new_tokens=12))


def test_bad_requests_are_refused_by_name_and_the_engine_keeps_serving(adapter_dirs):
    model = served(adapter_dirs)
    good = prompts([7, 4], seed=6)
    with pytest.raises(ValueError, match=r"^adapter_names: unknown adapter\(s\) 'nope'; loaded: \['default', "):
        model.generate_batch(good, generation_config=greedy(), adapter_names=["long", "nope"])
    with pytest.raises(ValueError, match=r"^adapter_names: expected one per input \(2\), got 3 names"):
        model.generate_batch(good, generation_config=greedy(), adapter_names=["long", "short", "long"])
    with pytest.raises(ValueError, match="^persistent_manager"):
        model.generate_batch(good, generation_config=greedy(), persistent_manager=True)
    with model.continuous_batching_context_manager(generation_config=greedy(),
                                                   continuous_batching_config=engine()) as manager:
        first = manager.add_request(good[0], adapter_name="long")
        with pytest.raises(ValueError, match=r"^adapter_name: unknown adapter 'nope'"):
            manager.add_request(good[1], adapter_name="nope")
        with pytest.raises(ValueError, match=r"^input_ids: expected a non-empty list of token ids in \[0, 97\), got "
                                             r"2 ids from 5 to 97"):
            manager.add_request([5, VOCAB], adapter_name="long")
        with pytest.raises(ValueError, match="^adapter_names: unknown"):  # checked before any is queued
            manager.add_requests(good, adapter_names=["short", "nope"])
        second = manager.add_request(good[1], adapter_name="short")
        done = results(manager, 2)
    assert set(done) == {first, second}
    assert done[first].generated_tokens == alone(model, good[0], "long", greedy())
    assert done[second].generated_tokens == alone(model, good[1], "short", greedy())


def test_an_adapter_loaded_while_serving_serves_later_requests(adapter_dirs):
    model = served(adapter_dirs, names=("short",))
    prompt = prompts([13], seed=7)[0]
    manager = model.init_continuous_batching(generation_config=greedy(10), continuous_batching_config=engine())
    manager.start()
    try:
        running = manager.add_request(prompt, adapter_name="short")
        model.load_adapter(adapter_dirs["long"], adapter_name="long")
        later = manager.add_request(prompt, adapter_name="long")
        done = results(manager, 2)
    finally:
        manager.stop()
    assert done[running].generated_tokens == alone(model, prompt, "short", greedy(10))
    assert done[later].generated_tokens == alone(model, prompt, "long", greedy(10))


def test_nothing_is_left_behind(adapter_dirs):
    model = served(adapter_dirs)
    model.train()  # no dropout in the tiny Llama: outputs stay comparable
    base = model.get_base_model()
    ids = torch.tensor([prompts([9], seed=8)[0]])
    implementation = base.config._attn_implementation
    modes = [module.training for module in base.modules()]
    with torch.no_grad():
        wrapped, unwrapped = model(input_ids=ids).logits, base(input_ids=ids).logits
    inputs = prompts([5, 8])
    out = model.generate_batch(inputs, generation_config=greedy(), continuous_batching_config=engine())
    assert [result.generated_tokens for result in out.values()] == [alone(model, p, None, greedy()) for p in inputs]
    manager = model.init_continuous_batching(generation_config=greedy(), continuous_batching_config=engine())
    expected = alone(model, ids[0].tolist(), "long", greedy())
    for _ in range(2):  # a manager starts again after stop
        manager.start()
        request_id = manager.add_request(ids[0].tolist(), adapter_name="long")
        assert results(manager, 1)[request_id].generated_tokens == expected
        manager.stop(keep_for_next_session=True)
    assert base.config._attn_implementation == implementation
    assert getattr(base, "_cached_continuous_batching_manager", None) is None
    assert [module.training for module in base.modules()] == modes
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, wrapped, rtol=0, atol=0)
        torch.testing.assert_close(base(input_ids=ids).logits, unwrapped, rtol=0, atol=0)
    assert model.unload().config._attn_implementation == "sdpa"


def test_configurations_that_pad_steps_are_refused(adapter_dirs):
    model = served(adapter_dirs, names=())
    with pytest.raises(ValueError, match="^continuous_batching_config: CUDA graphs, compiled steps"):
        model.init_continuous_batching(generation_config=greedy(),
                                       continuous_batching_config=engine(use_async_batching=True))
    assert model.get_base_model().config._attn_implementation == "prefix_kernels"


def test_an_untested_transformers_is_refused(adapter_dirs, monkeypatch):
    model = served(adapter_dirs, names=())
    monkeypatch.setattr(continuous_batching.transformers, "__version__", "5.99.0")
    with pytest.raises(RuntimeError, match=r"^transformers 5\.99\.0: continuous batching with prefix adapters"):
        model.generate_batch(prompts([4]), generation_config=greedy())
