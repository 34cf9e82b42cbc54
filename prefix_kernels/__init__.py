"""Prefix tuning with the prefix read inside the attention kernel, never concatenated into the KV cache."""

from .config import PrefixTuningConfig
from .encoder import PrefixEncoder
from .models import PrefixModel, from_peft, get_prefix_model
from .ops import prefix_attention

__all__ = ["PrefixTuningConfig", "PrefixEncoder", "prefix_attention", "PrefixModel", "get_prefix_model", "from_peft"]
