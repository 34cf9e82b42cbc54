"""Mixed precision: under `torch.autocast` (what `bf16=True` turns on in transformers' Trainer and in TRL, where it
is the default) the drop-in runs attention in the autocast dtype, as SDPA does, and is as accurate as PEFT there."""

import copy

import peft
import torch
from tiny_models import VOCAB, tiny_decoder

from prefix_kernels import PrefixTuningConfig, get_prefix_model


def test_bf16_autocast_is_as_accurate_as_peft():
    base = tiny_decoder("llama")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                              num_virtual_tokens=4))
    ours = get_prefix_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    ours.prefix_encoders["default"].load_state_dict(theirs.prompt_encoder["default"].state_dict())
    ids = torch.randint(3, VOCAB, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)

    def run(model, weight, autocast):
        """(logits of the real tokens, the prefix embedding's gradient)"""
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        return out.logits.detach().float()[mask.bool()], weight.grad.clone()

    prefix = ours.prefix_encoders["default"].embedding.weight
    logits, grad = run(ours, prefix, autocast=False)
    ours_logits, ours_grad = run(ours, prefix, autocast=True)
    peft_logits, peft_grad = run(theirs, theirs.prompt_encoder["default"].embedding.weight, autocast=True)
    assert (ours_logits - logits).abs().max() > 0  # bf16 did run
    assert (ours_logits - logits).abs().max() <= 2 * (peft_logits - logits).abs().max()
    assert (ours_grad - grad).abs().max() <= 2 * (peft_grad - grad).abs().max()
