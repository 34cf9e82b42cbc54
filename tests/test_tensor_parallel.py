"""Tensor parallelism (transformers' `tp_plan="auto"`) on 2 CPU processes (gloo): every rank computes what one
process computes — logits, greedy tokens, every prefix gradient, the prefix after 3 SGD steps (with and without the
MLP projection), a bank of two adapters of different lengths, packed rows — the adapter saved from rank 0 reloads in
one process and in PEFT, and each decoder family's shipped plan either works the same way or is refused by name."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from test_distributed import run_two_ranks
from tp_run import CASES, FAMILIES, batch, record, save_models

from prefix_kernels import PrefixModel

# What each family's shipped plan does on 2 ranks: None = works, else the start of the refusal
OUTCOMES = {
    "llama": None, "mistral": None, "qwen2": None, "qwen3": None, "gemma": None, "gemma2": None, "gemma3": None,
    "gemma4": None, "phi": None, "gptj": None,
    "phi3": None, "olmo2": None,  # q/k/v gathered (Phi3's fused qkv_proj): every rank computes every head
    "mistral_1_kv_head": "model: mistral's tensor-parallel plan shards model.layers.0.self_attn.k_proj 'colwise', but "
                         "its 16 rows hold 1 KV heads (head_dim 16), which 2 ranks cannot split into whole heads",
    "gpt_neox": "model: gpt_neox's tensor-parallel plan shards gpt_neox.layers.0.attention as {'query_key_value': "
                "'colwise', 'dense': 'rowwise'}, where prefix_kernels cannot tell which KV heads each rank holds",
    "gpt2": "`tp_size=2` was requested, but `GPT2LMHeadModel` has no `tp_plan`",  # transformers' own refusal
    "opt": "`tp_size=2` was requested, but `OPTForCausalLM` has no `tp_plan`",
    # Llama under plans given at load time
    "llama_gathered": None,  # every rank computes every head
    "llama_unit_colwise": "model: llama's tensor-parallel plan shards model.layers.0.self_attn as {'q_proj': "
                          "'unit_colwise', 'k_proj': 'unit_colwise', 'v_proj': 'unit_colwise', 'o_proj': "
                          "'unit_rowwise'}, where prefix_kernels cannot tell which KV heads each rank holds",
    "torch_parallelize_module": "model: model.layers.0.self_attn's weights are DTensors, sharded outside "
                                "transformers' tp_plan",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one process's tensors, its refusals, its trained model, every rank's (tensors, refusals), the directory)."""
    directory = tmp_path_factory.mktemp("tp")
    save_models(directory)
    run_two_ranks("tp_run.py", directory, timeout=180)
    single = record(directory, lambda case: FAMILIES[CASES[case][0]][0].from_pretrained(directory / CASES[case][0]))
    ranks = [(load_file(directory / f"rank{r}.safetensors"), json.loads((directory / f"rank{r}.json").read_text()))
             for r in range(2)]
    return (*single, ranks, directory)


def close(got: torch.Tensor, want: torch.Tensor, relative: float) -> None:
    torch.testing.assert_close(got, want, rtol=relative, atol=relative * want.abs().max().item())


def test_every_rank_equals_one_process(runs):
    single, _, _, ranks, _ = runs
    refused = {name for name, outcome in OUTCOMES.items() if outcome is not None}
    for tensors, _ in ranks:
        assert tensors.keys() == {key for key in single if key.split("/")[0] not in refused}
        for key, got in tensors.items():
            if key.endswith("tokens"):
                assert torch.equal(got, single[key]), key
            elif key.endswith("logits"):
                close(got, single[key], 1e-4)
            else:  # the prefix parameters and their gradients
                close(got, single[key], 1e-5)


def test_every_kv_head_gets_its_gradient_and_training_moves_the_prefix(runs):
    """The gradients compared above are whole: no layer's key or value of any head is left at zero."""
    single = runs[0]
    head_dim = 8
    for key in ("train/grad0/default.embedding.weight", "projection/grad0/default.transform.2.weight",
                "bank/grad/a.embedding.weight", "bank/grad/b.embedding.weight",
                "train/packed_grad/default.embedding.weight"):
        rows = single[key] if "transform" in key else single[key].T  # [L * 2 * Hkv * D, ...]
        assert (rows.reshape(-1, head_dim * rows.shape[1]).abs().amax(dim=1) > 0).all(), key
    for case in ("train", "projection"):
        moved = single[f"{case}/trained/default.embedding.weight"] - single[f"{case}/initial/default.embedding.weight"]
        assert moved.abs().max() > 1e-3


def test_the_adapter_saved_on_rank_0_reloads_in_one_process_and_in_peft(runs):
    _, _, trained, _, directory = runs
    trained.eval()
    ids, mask = batch()
    base = FAMILIES["llama"][0]
    ours = PrefixModel.from_pretrained(base.from_pretrained(directory / "llama"), directory / "trained")
    theirs = peft.PeftModel.from_pretrained(base.from_pretrained(directory / "llama"), directory / "trained")
    with torch.no_grad():
        want = trained(input_ids=ids[:2]).logits
        close(ours(input_ids=ids[:2]).logits, want, 1e-5)
        close(theirs(input_ids=ids[:2]).logits, want, 1e-4)


def test_each_family_works_or_is_refused_by_name(runs):
    _, refused_alone, _, ranks, _ = runs
    assert refused_alone == {}  # one process runs every family
    for _, refusals in ranks:
        assert set(refusals) == {name for name, outcome in OUTCOMES.items() if outcome is not None}
        for name, message in refusals.items():
            assert message.startswith(OUTCOMES[name]), message
    assert set(OUTCOMES) == set(CASES) | {"torch_parallelize_module"}
