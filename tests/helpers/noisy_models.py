"""Plain conv-BN networks whose float32 rounding noise is as large as chosen: used by
tests/test_verify_tolerance.py and benchmarks/numerics.py."""

from __future__ import annotations

import torch
from torch import nn


def deep_conv_bn(depth: int = 8, width: int = 16, offset: float = 100.0, seed: int = 0,
                 size: int = 40) -> nn.Sequential:
    """``depth`` x (unpadded 3x3 conv, BN, ReLU), in eval mode with running statistics from a
    few train-mode forwards at ``size`` px. Every BN but the last adds ``offset`` to its
    output, which the next BN's running mean takes away again: each conv sums terms
    ``offset`` times larger than what is left after that cancellation, so float32 rounds
    away about ``offset * 1e-7`` of the signal per layer (offset 100: noise ~7e-5 of the
    output scale; 0: ~2e-6). Unpadded, so no border effects swamp the variance."""
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        channels = 3 if i == 0 else width
        conv = nn.Conv2d(channels, width, 3, bias=False)
        bn = nn.BatchNorm2d(width, momentum=None)
        with torch.no_grad():
            conv.weight.normal_(0.0, (2.0 / (9 * channels)) ** 0.5, generator=generator)
            bn.weight.uniform_(0.5, 1.5, generator=generator)
            bn.bias.normal_(0.0, 1.0, generator=generator).add_(offset if i < depth - 1 else 0.0)
        layers += [conv, bn, nn.ReLU()]
    model = nn.Sequential(*layers).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, size, size, generator=generator))
    return model.eval()
