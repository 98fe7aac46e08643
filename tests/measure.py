"""What the tests measure on models: conv and BatchNorm counts, scale-relative error."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def count_convs(model: nn.Module) -> int:
    return sum(isinstance(m, CONVS) for m in model.modules())


def count_bns(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def rel_err(expected: Tensor, got: Tensor) -> float:
    """max|a - b| / max|a|, in float64: error relative to the output's scale."""
    assert expected.shape == got.shape, (expected.shape, got.shape)
    expected, got = expected.detach().double(), got.detach().double()
    return float((expected - got).abs().max() / expected.abs().max())
