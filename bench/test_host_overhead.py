"""Host overhead: what a call costs where its arithmetic is negligible, against SDPA.

    pytest bench/test_host_overhead.py --benchmark-json bench/results/host.json

- `op host overhead`: one decode step of a small model (B=8, Hq=8, Hkv=2, one query, 100 sequence keys, D=32):
  SDPA on the sequence keys alone (`sdpa`), against `prefix_attention` with a shared prefix of 16 keys
  (`prefix_shared`) and with a bank of 4 adapters of 16..64 keys read by index with per-row lengths
  (`prefix_bank`), without autograd, then the same with inputs that require grad (the forward, recording the
  graph). A timed round is `CALLS_PER_ROUND` back-to-back calls; `host_us` is the time per call. On CUDA it is the
  host's time to issue a call (the loop of calls timed without waiting for the GPU, which keeps up with them), and
  `kernel_us` the GPU's own time per call (`measure.kernel_seconds`).
- `model generate host overhead`: greedy generation on a small Llama (hidden 256, 4 layers), 8 rows left-padded,
  4 adapters of P 16..64 (`prefix_mixed`, one adapter per row) and the first of them for every row
  (`prefix_single`), against the base model (`no_prefix`), in interleaved rounds.

Every provider of a group is also timed in interleaved rounds (`measure.interleaved_seconds`).
"""

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from measure import DEVICE, DTYPE, SIZE, interleaved, kernel_seconds, measure, record_interleaved, sync
from transformers import LlamaConfig, LlamaForCausalLM

from prefix_kernels import PrefixTuningConfig, get_prefix_model, prefix_attention

B, HQ, HKV, SKV, D = 8, 8, 2, 100, 32
CALLS_PER_ROUND = {"smoke": 2, "cpu": 200, "cuda": 200}[SIZE]
ROUNDS, WARMUP = {"smoke": (1, 0), "cpu": (15, 3), "cuda": (15, 3)}[SIZE]
LENGTHS = (16, 32, 48, 64)  # the bank's adapters
GENERATE = {"smoke": (2, 8, 2), "cpu": (8, 40, 48), "cuda": (8, 40, 48)}[SIZE]  # (rows, prompt, new tokens)
GEN_ROUNDS, GEN_WARMUP = {"smoke": (1, 0), "cpu": (11, 1), "cuda": (5, 1)}[SIZE]
OP_GROUP = f"op host overhead decode B={B} Hq={HQ} Hkv={HKV} Skv={SKV} D={D}"


def decode_inputs(requires_grad: bool) -> dict:
    """provider -> (args, kwargs) of one decode call, the same q, k, v for all."""
    generator = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE, DTYPE).requires_grad_(requires_grad)

    q = t(B, 1, HQ, D).transpose(1, 2)  # as transformers passes it
    k, v = t(B, HKV, SKV, D), t(B, HKV, SKV, D)
    bank = {"prefix_index": (torch.arange(B) % len(LENGTHS)).to(DEVICE),
            "prefix_lengths": torch.tensor([LENGTHS[i % len(LENGTHS)] for i in range(B)], device=DEVICE)}
    return {
        "sdpa": ((q, k, v), dict(enable_gqa=True)),
        "prefix_shared": ((q, k, v, t(HKV, 16, D), t(HKV, 16, D)), {}),
        "prefix_bank": ((q, k, v, t(len(LENGTHS), HKV, max(LENGTHS), D), t(len(LENGTHS), HKV, max(LENGTHS), D)),
                        bank),
    }


def decode_calls(requires_grad: bool) -> dict:
    """provider -> one timed round: `CALLS_PER_ROUND` calls, under no_grad unless the inputs require grad."""
    calls = {}
    for provider, (args, kwargs) in decode_inputs(requires_grad).items():
        op = F.scaled_dot_product_attention if provider == "sdpa" else prefix_attention

        def one(op=op, args=args, kwargs=kwargs):
            return op(*args, **kwargs)

        def round_(one=one):
            with torch.set_grad_enabled(requires_grad):
                for _ in range(CALLS_PER_ROUND):
                    one()

        calls[provider] = (one, round_)
    return calls


@pytest.fixture(scope="module", params=[False, True], ids=["no_grad", "grad"])
def decode(request):
    calls = decode_calls(request.param)
    together = interleaved(request, {name: round_ for name, (_, round_) in calls.items()}, ROUNDS, WARMUP)
    return request.param, calls, together


def host_seconds(one) -> float:
    """Seconds per call the host spends issuing `one` (the GPU is not waited for between calls)."""
    sync()
    start = time.perf_counter()
    for _ in range(CALLS_PER_ROUND):
        one()
    seconds = (time.perf_counter() - start) / CALLS_PER_ROUND
    sync()
    return seconds


@pytest.mark.parametrize("provider", ["sdpa", "prefix_shared", "prefix_bank"])
def test_op_host_overhead(benchmark, decode, provider):
    requires_grad, calls, together = decode
    one, round_ = calls[provider]
    group = f"{OP_GROUP} {'with grad' if requires_grad else 'no grad'}"
    median = measure(benchmark, round_, group=group, provider=provider, baseline="sdpa", rounds=ROUNDS,
                     warmup=WARMUP)
    record_interleaved(benchmark, provider, together)
    if median is None:
        return
    if DEVICE == "cuda":
        with torch.set_grad_enabled(requires_grad):
            benchmark.extra_info["host_us"] = min(host_seconds(one) for _ in range(5)) * 1e6
            benchmark.extra_info["kernel_us"] = kernel_seconds(one)[0] * 1e6
    else:
        benchmark.extra_info["host_us"] = benchmark.stats.stats.median / CALLS_PER_ROUND * 1e6


SMALL_LLAMA = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def generation(request):
    """provider -> greedy generation on the small Llama, and their interleaved medians."""
    config = LlamaConfig(**SMALL_LLAMA)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = LlamaForCausalLM(config).to(DEVICE, DTYPE).eval()
        model = get_prefix_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                          num_virtual_tokens=LENGTHS[0]))
        for i, length in enumerate(LENGTHS[1:]):
            model._add_adapter(f"a{i}", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length)
                               .resolve(model.config))
    names = list(model.prefix_encoders)
    rows, prompt, new = GENERATE
    ids = torch.randint(3, SMALL_LLAMA["vocab_size"], (rows, prompt), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for r in range(rows):
        mask[r, : 3 * r] = 0  # left padding of different lengths
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    greedy = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    calls = {
        "prefix_mixed": lambda: model.generate(adapter_names=[names[r % len(names)] for r in range(rows)], **greedy),
        "prefix_single": lambda: model.generate(**greedy),
        "no_prefix": lambda: base.generate(**greedy),
    }
    with torch.no_grad():
        return calls, interleaved(request, calls, GEN_ROUNDS, GEN_WARMUP)


@pytest.mark.parametrize("provider", ["prefix_mixed", "prefix_single", "no_prefix"])
def test_generate_host_overhead(benchmark, generation, provider):
    calls, together = generation
    rows, prompt, new = GENERATE
    group = (f"model generate host overhead Llama L=4 hidden=256 B={rows} left-padded prompt={prompt} new={new} "
             f"adapters P={'..'.join(map(str, LENGTHS[::3]))}")
    with torch.no_grad():
        median = measure(benchmark, calls[provider], group=group, provider=provider, baseline="no_prefix",
                         rounds=GEN_ROUNDS, warmup=GEN_WARMUP)
    record_interleaved(benchmark, provider, together)
    if median is not None:
        benchmark.extra_info["tokens_per_s"] = rows * new / median
