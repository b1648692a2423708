"""A small single-device transformer encoder over token sequences (an image's rows are tokens), mean-pooled into
one prediction per sample.

Written for one device; strategy ``tensor`` cuts it from outside (``parallel/tensor.py``'s default plan names
``attn.q/k/v/out`` and ``mlp.up/down``). The one concession: attention reshapes its projections into ``-1`` heads
of ``head_dim``, so a projection holding a slice of the heads runs just those.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections (each can be cut by heads)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"transformer: dim = {dim} must be a multiple of heads = {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, tokens, dim) -> (n, tokens, dim)."""
        n, t, _ = x.shape
        q, k, v = (p(x).view(n, t, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, -1))


class FeedForward(nn.Module):
    """The block's MLP: up to ``hidden`` features, GELU, back down."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim)."""
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), FeedForward(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, tokens, dim) -> (n, tokens, dim)."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Tokens of ``in_features`` (the input reshaped to (n, -1, in_features)) -> ``out_features`` per sample."""

    def __init__(self, in_features: int = 8, out_features: int = 10, dim: int = 64, heads: int = 4,
                 layers: int = 2, mlp_ratio: int = 4, max_tokens: int = 64) -> None:  # fmt: skip
        super().__init__()
        self.in_features, self.max_tokens = in_features, max_tokens
        self.embed = nn.Linear(in_features, dim)
        self.pos = nn.Parameter(torch.empty(max_tokens, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio * dim) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, out_features)
        # Last, after the children drew theirs: the order in which caldera.models.materialize initialises a model
        # built on the meta device (children first), so both give the same weights from one seed.
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the parameters this module owns itself (the position embedding)."""
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, ...) with a multiple of ``in_features`` values per sample -> (n, out_features)."""
        x = x.reshape(x.shape[0], -1, self.in_features)
        if x.shape[1] > self.max_tokens:
            raise ValueError(f"transformer: {x.shape[1]} tokens exceed max_tokens = {self.max_tokens}")
        h = self.embed(x) + self.pos[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))
