"""Prefix tuning with the prefix read inside the attention kernel, never concatenated into the KV cache."""

from .ops import prefix_attention

__all__ = ["prefix_attention"]
