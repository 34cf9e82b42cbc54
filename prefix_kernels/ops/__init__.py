from .prefix_attention import prefix_attention

__all__ = ["prefix_attention"]
