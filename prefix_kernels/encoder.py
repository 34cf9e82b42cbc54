"""`PrefixEncoder`: PEFT's parameterisation of the per-layer prefix keys/values."""

import dataclasses

import torch
from torch import nn

from .config import PrefixTuningConfig


class PrefixEncoder(nn.Module):
    """Produces every layer's prefix keys/values, once per forward (never per batch row).

    Without projection (or in inference mode) the parameters are the prefix itself, an
    `Embedding(P, L * 2 * token_dim)`; with `prefix_projection` they are an `Embedding(P, token_dim)` followed by
    `Linear(token_dim, encoder_hidden_size) -> Tanh -> Linear(encoder_hidden_size, L * 2 * token_dim)`.
    `init_weights="zero"` zeroes the embedding (or the last Linear). Layer i's key is PEFT's flat chunk 2i, its
    value chunk 2i + 1.

    >>> cfg = PrefixTuningConfig(num_virtual_tokens=4, token_dim=32, num_attention_heads=2, num_layers=3)
    >>> PrefixEncoder(cfg)().shape  # [L, 2, H_kv, P, D]
    torch.Size([3, 2, 2, 4, 16])
    """

    def __init__(self, config: PrefixTuningConfig):
        super().__init__()
        for name in ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers"):
            if getattr(config, name) is None:
                raise ValueError(f"{name}: PrefixEncoder needs it set (PrefixTuningConfig.resolve fills it), got None")
        self.num_layers = config.table_layers
        self.num_heads = config.num_attention_heads
        self.num_virtual_tokens = config.num_virtual_tokens
        self.token_dim = config.token_dim
        self.prefix_projection = config.prefix_projection and not config.inference_mode
        flat_dim = self.num_layers * 2 * config.token_dim
        if self.prefix_projection:
            hidden = config.encoder_hidden_size or config.token_dim
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(config.token_dim, hidden), nn.Tanh(), nn.Linear(hidden, flat_dim)
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, flat_dim)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def flat_table(self) -> torch.Tensor:
        """PEFT's `prompt_embeddings`: `[P, L * 2 * token_dim]`, projected through the MLP when there is one."""
        if self.prefix_projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight

    def forward(self) -> torch.Tensor:
        """`[L, 2, H_kv, P, D]` (layer, key/value, head, token, dim), contiguous."""
        p, h = self.num_virtual_tokens, self.num_heads
        table = self.flat_table().view(p, self.num_layers * 2, h, self.token_dim // h)
        return table.permute(1, 2, 0, 3).reshape(self.num_layers, 2, h, p, self.token_dim // h)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP by the table it projects to (what a saved adapter holds); the output is unchanged."""
        if not self.prefix_projection:
            return
        table = self.flat_table().detach().clone()
        self.embedding = nn.Embedding.from_pretrained(table, freeze=False)
        del self.transform
        self.prefix_projection = False

    @classmethod
    def from_table(cls, config: PrefixTuningConfig, table: torch.Tensor) -> "PrefixEncoder":
        """An encoder holding a saved `prompt_embeddings` table `[P, L * 2 * token_dim]`, as `fold` leaves one: no
        projection MLP is built (nor its memory allocated), whatever `config.prefix_projection` says."""
        with torch.device("meta"):  # the structure only: no memory, no random draws
            encoder = cls(dataclasses.replace(config, prefix_projection=False))
        expected = (encoder.num_virtual_tokens, encoder.num_layers * 2 * encoder.token_dim)
        if not isinstance(table, torch.Tensor) or tuple(table.shape) != expected:
            got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
            raise ValueError(f"prompt_embeddings: expected shape {list(expected)}, got {got}")
        encoder.embedding = nn.Embedding.from_pretrained(table.to(torch.get_default_dtype(), copy=True),
                                                         freeze=config.inference_mode)
        return encoder
