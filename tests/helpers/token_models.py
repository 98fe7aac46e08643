"""Models whose linear layers act on the last dim of (batch, tokens, features) tensors, written
like timm's LeViT (``LinearNorm``: ``bn(linear(x).flatten(0, 1)).reshape_as(x)``), and
look-alikes where the last dim is not a feature dim, which must not fold as if it were."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LinearNorm(nn.Module):
    """timm.models.levit.LinearNorm: BatchNorm1d over the features of every token."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class TokenMlp(nn.Module):
    """LeViT's residual MLP: two LinearNorms around an activation."""

    def __init__(self, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.ln1 = LinearNorm(dim, hidden)
        self.act = nn.Hardswish()
        self.ln2 = LinearNorm(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.ln2(self.act(self.ln1(x)))


class TokenChain(nn.Module):
    """Two LinearNorms back to back, then a token-wise view the fold must leave alone."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.a = LinearNorm(dim, 12)
        self.b = LinearNorm(12, dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.b(self.a(x))
        return y.reshape(y.shape[0], -1, 2, 4).sum(2)


class TokenCat(nn.Module):
    """Two LinearNorms of the same tokens stacked along the token dim (dim 1), not features."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.a = LinearNorm(dim, dim)
        self.b = LinearNorm(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.a(x), self.b(x)], 1)


class LengthMixer(nn.Module):
    """A channels-first (batch, channels, length) tensor whose length a Linear mixes: the
    Linear's map of the last dim never composes with the convs and BatchNorms of dim 1."""

    def __init__(self, channels: int = 6, length: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm1d(channels)
        self.mix = nn.Linear(length, length)
        self.bn2 = nn.BatchNorm1d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn2(self.mix(self.bn(self.conv(x))))
