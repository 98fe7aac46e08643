"""Models whose forward depends on being exported, written as detector code writes them: one
whose reshapes fix the batch size it was traced at, one that returns another structure under
``torch.onnx.is_in_onnx_export()`` (YOLOv6 returns ``x`` alone there, else ``[x, featmaps]``).
Built by `--model helpers.export_models:<name>` with random BatchNorm statistics."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from helpers.reference_blocks import randomize_bn


class _ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)


class BatchGuard(_ConvBN):
    """Takes its batch size from a branch on the input's shape: export fixes it."""

    def forward(self, x: Tensor) -> Tensor:
        y = self.features(x)
        if x.shape[0] == 1:
            return y.reshape(1, 8, -1).mean(-1)
        return y.mean((2, 3))


class ExportBranch(_ConvBN):
    def forward(self, x: Tensor) -> Tensor | list[object]:
        y = self.features(x)
        if torch.onnx.is_in_onnx_export():
            return y
        return [y, [y.mean((2, 3)), y.amax((2, 3))]]


def batch_guard() -> nn.Module:
    return randomize_bn(BatchGuard(), seed=1)


def export_branch() -> nn.Module:
    return randomize_bn(ExportBranch(), seed=2)
