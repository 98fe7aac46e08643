"""Seeded inputs and a forward without autograd."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal values from a private generator (the global RNG is untouched), drawn in
    float32 and cast to ``dtype``."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def run(model: nn.Module, *args: object, **kwargs: object) -> object:
    """``model(*args, **kwargs)`` under ``torch.no_grad()``."""
    with torch.no_grad():
        return model(*args, **kwargs)
