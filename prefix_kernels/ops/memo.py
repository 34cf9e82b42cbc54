"""What a call derives from its small per-row tensors, kept on them for the next call.

A model call hands the same bank index, prefix lengths, key-padding mask and packed offsets to every attention
layer. What the op derives from them (their checks, a padding plan, a mask over the prefix keys) is computed by
the first layer and kept on the tensor itself, keyed by what was derived and the tensor's version counter, so an
in-place change recomputes it. Inference-mode tensors keep no version counter: for them nothing is kept.
"""

import torch

_ATTRIBUTE = "_prefix_kernels_memo"


def derived(t: torch.Tensor, key: tuple, compute):
    """`compute()`, computed once per `key` and version of `t`."""
    if t.is_inference():
        return compute()
    memo = t.__dict__.get(_ATTRIBUTE)
    version = t._version
    if memo is None or memo[0] != version:
        memo = (version, {})
        t.__dict__[_ATTRIBUTE] = memo
    if key not in memo[1]:
        memo[1][key] = compute()
    return memo[1][key]
