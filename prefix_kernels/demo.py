"""Prefix-tune a small Llama-shaped model on a toy task, generate with the prefix, save it and load it back.

    python -m prefix_kernels.demo [--steps 150] [--out DIR]

The base model has random weights and stays frozen; only the prefix (P virtual tokens per layer) trains. The
task: whatever the prompt, answer with the fixed token sequence TARGET. A frozen random model cannot do that;
with a trained prefix it does.
"""

import argparse
import copy
import tempfile

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from . import PrefixModel, PrefixTuningConfig, get_prefix_model

TARGET = [10, 11, 12, 13, 14, 15, 16, 17]
VOCAB = 64


def toy_batch(generator: torch.Generator, batch_size: int = 16):
    """Random prompts of 6 tokens followed by TARGET; the loss counts only the TARGET tokens."""
    prompts = torch.randint(20, VOCAB, (batch_size, 6), generator=generator)
    ids = torch.cat([prompts, torch.tensor(TARGET).expand(batch_size, -1)], dim=1)
    labels = ids.clone()
    labels[:, : prompts.shape[1]] = -100
    return ids, labels


def base_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def greedy(model, prompt: torch.Tensor) -> list[int]:
    out = model.generate(input_ids=prompt, max_new_tokens=len(TARGET), do_sample=False)
    return out[0, prompt.shape[1]:].tolist()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--virtual-tokens", type=int, default=16)
    parser.add_argument("--out", default=None, help="where to save the adapter (default: a temporary directory)")
    args = parser.parse_args(argv)

    base = base_model()
    model = get_prefix_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                   num_virtual_tokens=args.virtual_tokens))
    model.print_trainable_parameters()
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(20, VOCAB, (1, 6), generator=generator)
    print(f"target answer:            {TARGET}")
    print(f"before training:          {greedy(model, prompt)}")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    losses = []
    with tqdm(range(args.steps), desc="prefix tuning") as bar:
        for _ in bar:
            ids, labels = toy_batch(generator)
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    print(f"loss: first step {losses[0]:.3f} -> last step {losses[-1]:.3f}")
    answer = greedy(model, prompt)
    print(f"after training:           {answer}")

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        model.save_pretrained(out)
        reloaded = PrefixModel.from_pretrained(copy.deepcopy(base), out)
        again = greedy(reloaded, prompt)
        print(f"saved to {args.out or 'a temporary directory'}, reloaded: {again}")
    print(f"reloaded output identical: {again == answer}; answers the target: {answer == TARGET}")


if __name__ == "__main__":
    main()
