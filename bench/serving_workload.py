"""The serving workload the vLLM benchmark (`test_vllm.py`, in vLLM's own environment) and this library's own
continuous batching (`test_serving.py`, group "vLLM's workload") both serve: the same model, adapters and requests,
so their tokens/s can be set side by side (from two runs: vLLM pins a transformers the package's engine does not
take, so they cannot share a process).
"""

import copy
from dataclasses import dataclass

import torch
from measure import SIZE
from transformers import LlamaConfig, LlamaForCausalLM

from prefix_kernels import PrefixTuningConfig, get_prefix_model

SHAPES = {  # Llama-shaped, random weights; head dims vLLM's CPU attention takes
    "smoke": dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "cpu": dict(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2),
    "cuda": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=4),
}
ADAPTERS = {"smoke": {"a": 5, "b": 40}, "cpu": {"a": 16, "b": 48, "c": 100, "d": 128},
            "cuda": {"a": 16, "b": 48, "c": 100, "d": 128}}[SIZE]  # name -> P
REQUESTS, PROMPT, NEW = {"smoke": (4, (8, 24), 4), "cpu": (32, (64, 256), 32), "cuda": (256, (128, 1024), 128)}[SIZE]
DTYPE = "bfloat16" if SIZE == "cuda" else "float32"
MAX_LEN = PROMPT[1] + max(ADAPTERS.values()) + NEW
MODEL = "Llama L={num_hidden_layers} hidden={hidden_size} Hq={num_attention_heads} Hkv={num_key_value_heads}".format(
    **SHAPES[SIZE])


@dataclass(frozen=True)
class Workload:
    """The requests every provider serves: prompts (token ids) and the adapter each names."""

    prompts: list[list[int]]
    adapters: list[str]

    @classmethod
    def mixed(cls) -> "Workload":
        generator = torch.Generator().manual_seed(0)
        lengths = torch.randint(PROMPT[0], PROMPT[1] + 1, (REQUESTS,), generator=generator).tolist()
        prompts = [torch.randint(3, SHAPES[SIZE]["vocab_size"], (n,), generator=generator).tolist() for n in lengths]
        names = list(ADAPTERS)
        return cls(prompts, [names[i % len(names)] for i in range(REQUESTS)])


def write_model(root) -> None:
    """The model in `root/model` and one adapter of each length in `root/<name>`, random weights."""
    config = LlamaConfig(**SHAPES[SIZE], max_position_embeddings=MAX_LEN, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(copy.deepcopy(config)).save_pretrained(root / "model")
        for name, length in ADAPTERS.items():
            get_prefix_model(LlamaForCausalLM(copy.deepcopy(config)),
                             PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length)).save_pretrained(
                                 root / name)
