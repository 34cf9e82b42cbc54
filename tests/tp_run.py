"""Prefix tuning on tensor-parallel models (transformers' `tp_plan`), and the same runs in one process.

Run under `torchrun --nproc_per_node=2 tp_run.py DIR`, where DIR holds the tiny models and two adapters saved by
`save_models(DIR)`: every rank loads each case's model with its shipped plan (`DistributedConfig(tp_size=2)`, as
`tp_plan="auto"` does; gloo, CPU) or with the plan of `OVERRIDES`, and writes what it computed to
`DIR/rank<r>.safetensors` (tensors) and `DIR/rank<r>.json` (refusals); rank 0 also saves the adapter it trained to
`DIR/trained`. `record(DIR, load)` with a plain `from_pretrained` is the same run in one process (a case refused
under tensor parallelism runs there too).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers as T
from safetensors.torch import save_file
from tiny_models import VOCAB

from prefix_kernels import PrefixModel, PrefixTuningConfig, get_prefix_model

STEPS = 3
COMMON = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
# The decoder families' shipped tensor-parallel plans, on tiny configs: 2 KV heads (one per rank) unless named.
FAMILIES = {
    "llama": (T.LlamaForCausalLM, T.LlamaConfig, dict(SIZES, num_attention_heads=8, num_key_value_heads=2)),
    "mistral": (T.MistralForCausalLM, T.MistralConfig, dict(SIZES, num_key_value_heads=2, sliding_window=None)),
    "mistral_1_kv_head": (T.MistralForCausalLM, T.MistralConfig, dict(SIZES, num_key_value_heads=1,
                                                                       sliding_window=None)),
    "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config, dict(SIZES, num_key_value_heads=2)),
    "qwen3": (T.Qwen3ForCausalLM, T.Qwen3Config, dict(SIZES, num_key_value_heads=2, head_dim=16)),
    "gemma": (T.GemmaForCausalLM, T.GemmaConfig, dict(SIZES, num_key_value_heads=2, head_dim=16)),
    "gemma2": (T.Gemma2ForCausalLM, T.Gemma2Config, dict(SIZES, num_key_value_heads=2, head_dim=16,
                                                        attn_logit_softcapping=5.0)),
    "gemma3": (T.Gemma3ForCausalLM, T.Gemma3TextConfig, dict(SIZES, num_key_value_heads=2, head_dim=16,
                                                            sliding_window=64)),
    # per-layer head dims (global layers twice as wide) and layers 2-3 reusing layers 0-1's keys/values
    "gemma4": (T.Gemma4ForCausalLM, T.Gemma4TextConfig, dict(
        SIZES, num_hidden_layers=4, num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=64,
        num_kv_shared_layers=2, layer_types=["sliding_attention", "full_attention"] * 2,
        vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8)),
    "phi": (T.PhiForCausalLM, T.PhiConfig, SIZES),
    "phi3": (T.Phi3ForCausalLM, T.Phi3Config, dict(SIZES, num_key_value_heads=2)),
    "olmo2": (T.Olmo2ForCausalLM, T.Olmo2Config, dict(SIZES, num_key_value_heads=2)),
    "gptj": (T.GPTJForCausalLM, T.GPTJConfig, dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8)),
    "gpt_neox": (T.GPTNeoXForCausalLM, T.GPTNeoXConfig, SIZES),
    "gpt2": (T.GPT2LMHeadModel, T.GPT2Config, dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    "opt": (T.OPTForCausalLM, T.OPTConfig, dict(hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                               num_attention_heads=4, word_embed_proj_dim=64)),
}
ATTENTION = "model.layers.*.self_attn."
# Plans given at load time (transformers' `DistributedConfig(tp_plan=...)` overrides the shipped rules it names)
OVERRIDES = {
    "llama_gathered": ("llama", {ATTENTION + "q_proj": "colwise_gather_output",
                                 ATTENTION + "k_proj": "colwise_gather_output",
                                 ATTENTION + "v_proj": "colwise_gather_output",
                                 ATTENTION + "o_proj": "rowwise_split_input"}),
    "llama_unit_colwise": ("llama", {ATTENTION + "q_proj": "unit_colwise", ATTENTION + "k_proj": "unit_colwise",
                                     ATTENTION + "v_proj": "unit_colwise", ATTENTION + "o_proj": "unit_rowwise"}),
}
CASES = {**{name: (name, None) for name in FAMILIES}, **OVERRIDES}  # case -> (saved model, plan override)
ADAPTERS = {"a": 4, "b": 6}  # name -> num_virtual_tokens: a bank of two lengths


def save_models(directory: Path) -> None:
    """The tiny models (random weights) and two random adapters for Llama's."""
    for name, (cls, config_cls, sizes) in FAMILIES.items():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            cls(config_cls(**COMMON, **sizes)).save_pretrained(directory / name)
    for seed, (name, length) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        base = FAMILIES["llama"][0].from_pretrained(directory / "llama")
        get_prefix_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length)).save_pretrained(
            directory / "adapters" / name)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) `[3, 8]`, the last row left-padded by 3."""
    ids = torch.randint(3, VOCAB, (3, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


def packed() -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids `[1, 11]`, position_ids): sequences of 4, 5 and 2 tokens in one row."""
    ids = torch.randint(3, VOCAB, (1, 11), generator=torch.Generator().manual_seed(2))
    return ids, torch.cat([torch.arange(4), torch.arange(5), torch.arange(2)])[None]


def grads(model: PrefixModel) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.prefix_encoders.named_parameters()}


def train(base, seed: int, projection: bool, out: dict, key: str) -> PrefixModel:
    """Three SGD steps on `batch()`; records the prefix parameters before and after them, the first logits, every
    step's prefix gradients, the greedy tokens and the gradients of a packed batch."""
    torch.manual_seed(seed)  # ranks draw different prefixes: the wrapper makes them equal
    model = get_prefix_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                      prefix_projection=projection, encoder_hidden_size=24))
    out.update({f"{key}/initial/{name}": p.detach().clone() for name, p in model.prefix_encoders.named_parameters()})
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids, mask = batch()
    for step in range(STEPS):
        optimizer.zero_grad()
        result = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        result.loss.backward()
        if step == 0:
            out[f"{key}/logits"] = result.logits.detach()
        out.update({f"{key}/grad{step}/{name}": g for name, g in grads(model).items()})
        optimizer.step()
    out.update({f"{key}/trained/{name}": p.detach().clone() for name, p in model.prefix_encoders.named_parameters()})
    out[f"{key}/tokens"] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    optimizer.zero_grad()
    packed_ids, positions = packed()
    model(input_ids=packed_ids, position_ids=positions, labels=packed_ids).loss.backward()
    out.update({f"{key}/packed_grad/{name}": g for name, g in grads(model).items()})
    return model


def bank(base, directory: Path, out: dict) -> None:
    """Two saved adapters of different lengths, resumed for training: a mixed batch's logits and both adapters'
    gradients, and a mixed `generate`."""
    model = PrefixModel.from_pretrained(base, directory / "adapters" / "a", adapter_name="a", is_trainable=True)
    model.load_adapter(directory / "adapters" / "b", adapter_name="b", is_trainable=True)
    ids, mask = batch()
    names = ["b", "a", "b"]
    result = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), adapter_names=names)
    result.loss.backward()
    out["bank/logits"] = result.logits.detach()
    out.update({f"bank/grad/{name}": g for name, g in grads(model).items()})
    out["bank/tokens"] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                        adapter_names=names)


def family(base, name: str, seed: int, out: dict) -> None:
    """One training forward and backward of a fresh prefix (unpadded rows): the logits and the prefix gradient."""
    torch.manual_seed(seed)
    model = get_prefix_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    ids = batch()[0][:2]
    result = model(input_ids=ids, labels=ids)
    result.loss.backward()
    out[f"{name}/logits"] = result.logits.detach()
    out.update({f"{name}/grad/{key}": g for key, g in grads(model).items()})


def torch_parallelized(directory: Path) -> str:
    """What wrapping says about a model whose attention torch's own `parallelize_module` sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    base = FAMILIES["llama"][0].from_pretrained(directory / "llama")
    styles = {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel(),
              "o_proj": RowwiseParallel()}
    parallelize_module(base.model.layers[0].self_attn, init_device_mesh("cpu", (dist.get_world_size(),)), styles)
    try:
        get_prefix_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    except ValueError as e:
        return str(e)
    return "wrapped"


def record(directory: Path, load, seed: int = 0) -> tuple[dict, dict, PrefixModel]:
    """(tensors, refusals: family -> message, the model trained without projection) of every case."""
    out, refusals = {}, {}
    trained = train(load("llama"), seed, projection=False, out=out, key="train")
    train(load("llama"), seed, projection=True, out=out, key="projection")
    bank(load("llama"), directory, out)
    for name in CASES:
        try:
            family(load(name), name, seed, out)
        except ValueError as e:
            refusals[name] = str(e)
    return out, refusals, trained


if __name__ == "__main__":
    directory = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def load(case):
        name, plan = CASES[case]
        config = T.DistributedConfig(tp_size=dist.get_world_size(), tp_plan=plan or "auto")
        return FAMILIES[name][0].from_pretrained(directory / name, distributed_config=config)

    out, refusals, trained = record(directory, load, seed=rank)
    refusals["torch_parallelize_module"] = torch_parallelized(directory)
    if rank == 0:
        trained.save_pretrained(directory / "trained")
    save_file({k: v.contiguous() for k, v in out.items()}, directory / f"rank{rank}.safetensors")
    (directory / f"rank{rank}.json").write_text(json.dumps(refusals))
    dist.destroy_process_group()
