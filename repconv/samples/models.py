"""Small sample architectures written the ordinary *training* way.

These models are deliberately free of any deploy / fusion code: they are the kind of
network a user would hand to ``repconv`` for re-parameterization.

* :class:`RepVGGBlock` -- a RepVGG-style multi-branch block
  (3x3 conv-BN + 1x1 conv-BN + identity-BN, summed, then ReLU).
* :func:`repvgg_tiny` -- a tiny RepVGG-like classifier built from those blocks.
* :func:`resnet_tiny` -- a tiny ResNet-like classifier (Conv-BN pairs, BasicBlocks).

:data:`SAMPLES` describes how the shipped sample checkpoints in ``sample_checkpoints/`` are
built (see :mod:`repconv.samples.make`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "SAMPLES",
    "BasicBlock",
    "RepVGGBlock",
    "RepVGGTiny",
    "ResNetTiny",
    "SampleSpec",
    "build_sample",
    "repvgg_tiny",
    "resnet_tiny",
]


def _conv_bn(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int
) -> nn.Sequential:
    """Return ``nn.Sequential(conv=Conv2d(bias=False), bn=BatchNorm2d)``."""
    return nn.Sequential(
        OrderedDict(
            [
                (
                    "conv",
                    nn.Conv2d(
                        in_channels,
                        out_channels,
                        kernel_size=kernel_size,
                        stride=stride,
                        padding=padding,
                        bias=False,
                    ),
                ),
                ("bn", nn.BatchNorm2d(out_channels)),
            ]
        )
    )


class RepVGGBlock(nn.Module):
    """Training-time RepVGG block: ``relu(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x))``.

    The identity-BN branch exists only when ``in_channels == out_channels`` and
    ``stride == 1``; otherwise :attr:`rbr_identity` is ``None``.

    Attributes:
        rbr_dense: ``Sequential(conv=Conv2d 3x3 (padding 1, no bias), bn=BatchNorm2d)``.
        rbr_1x1: ``Sequential(conv=Conv2d 1x1 (padding 0, no bias), bn=BatchNorm2d)``.
        rbr_identity: ``BatchNorm2d`` on the input, or ``None``.
        nonlinearity: the final ``ReLU``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        """Build the three branches.

        Args:
            in_channels: number of input channels.
            out_channels: number of output channels.
            stride: stride of the 3x3 and 1x1 convolutions.
        """
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.rbr_identity: nn.BatchNorm2d | None = (
            nn.BatchNorm2d(in_channels) if in_channels == out_channels and stride == 1 else None
        )
        self.rbr_dense = _conv_bn(in_channels, out_channels, 3, stride, 1)
        self.rbr_1x1 = _conv_bn(in_channels, out_channels, 1, stride, 0)
        self.nonlinearity = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the branches and apply ReLU."""
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.nonlinearity(out)


class RepVGGTiny(nn.Module):
    """A tiny RepVGG-like classifier: stages of :class:`RepVGGBlock`, avgpool, linear.

    The first block of every stage has stride 2.
    """

    def __init__(
        self,
        num_classes: int = 10,
        width: int = 16,
        num_blocks: tuple[int, ...] = (1, 2, 2, 1),
        width_multipliers: tuple[int, ...] = (1, 1, 2, 4),
        in_channels: int = 3,
    ) -> None:
        """Build the network.

        Args:
            num_classes: size of the classifier output.
            width: base channel width ``w``.
            num_blocks: number of blocks per stage.
            width_multipliers: stage width in multiples of ``w``.
            in_channels: channels of the input image.
        """
        super().__init__()
        if len(num_blocks) != len(width_multipliers):
            raise ValueError("num_blocks and width_multipliers must have the same length")
        self.num_classes = num_classes
        channels = in_channels
        stages: list[nn.Sequential] = []
        for blocks, mult in zip(num_blocks, width_multipliers, strict=True):
            out_channels = width * mult
            layers: list[nn.Module] = []
            for i in range(blocks):
                layers.append(RepVGGBlock(channels, out_channels, stride=2 if i == 0 else 1))
                channels = out_channels
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits of shape ``(N, num_classes)``."""
        x = self.stages(x)
        x = self.gap(x)
        x = torch.flatten(x, 1)
        return self.linear(x)


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    The shortcut is the identity when shapes match, otherwise a strided 1x1 conv + BN
    (``Sequential(conv, bn)``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        """Build the block.

        Args:
            in_channels: number of input channels.
            out_channels: number of output channels.
            stride: stride of the first 3x3 conv (and of the projection shortcut).
        """
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = _conv_bn(in_channels, out_channels, 1, stride, 0)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the residual block."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetTiny(nn.Module):
    """A tiny ResNet-like classifier.

    Stem ``conv3x3-BN-ReLU``, then one :class:`BasicBlock` per stage with widths
    ``[w, 2w, 4w]`` (stages after the first downsample by 2), avgpool, linear.
    """

    def __init__(
        self,
        num_classes: int = 10,
        width: int = 16,
        num_blocks: tuple[int, ...] = (1, 1, 1),
        width_multipliers: tuple[int, ...] = (1, 2, 4),
        in_channels: int = 3,
    ) -> None:
        """Build the network.

        Args:
            num_classes: size of the classifier output.
            width: base channel width ``w``.
            num_blocks: number of basic blocks per stage.
            width_multipliers: stage width in multiples of ``w``.
            in_channels: channels of the input image.
        """
        super().__init__()
        if len(num_blocks) != len(width_multipliers):
            raise ValueError("num_blocks and width_multipliers must have the same length")
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        channels = width
        stages: list[nn.Sequential] = []
        for stage_idx, (blocks, mult) in enumerate(zip(num_blocks, width_multipliers, strict=True)):
            out_channels = width * mult
            layers: list[nn.Module] = []
            for i in range(blocks):
                stride = 2 if (i == 0 and stage_idx > 0) else 1
                layers.append(BasicBlock(channels, out_channels, stride=stride))
                channels = out_channels
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits of shape ``(N, num_classes)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def repvgg_tiny(num_classes: int = 10, width: int = 16) -> nn.Module:
    """Build a :class:`RepVGGTiny`: stages ``[1, 2, 2, 1]`` with widths ``[w, w, 2w, 4w]``."""
    return RepVGGTiny(num_classes=num_classes, width=width)


def resnet_tiny(num_classes: int = 10, width: int = 16) -> nn.Module:
    """Build a :class:`ResNetTiny`: one BasicBlock per stage with widths ``[w, 2w, 4w]``."""
    return ResNetTiny(num_classes=num_classes, width=width)


@dataclass(frozen=True)
class SampleSpec:
    """How one shipped sample checkpoint is built.

    Attributes:
        name: key in :data:`SAMPLES`.
        builder: ``"module:function"`` reference to the model builder.
        kwargs: keyword arguments for the builder (JSON-like values only).
        input_shape: example input shape, e.g. ``(1, 3, 32, 32)``.
        filename: checkpoint file name inside the samples directory.
    """

    name: str
    builder: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = (1, 3, 32, 32)
    filename: str = ""

    @property
    def num_classes(self) -> int:
        """Number of classifier outputs (``kwargs["num_classes"]``, default 10)."""
        return int(self.kwargs.get("num_classes", 10))


def build_sample(spec: SampleSpec) -> nn.Module:
    """Instantiate the (untrained) model described by ``spec``."""
    return _BUILDERS[spec.builder](**spec.kwargs)


_BUILDERS = {"repconv.samples:repvgg_tiny": repvgg_tiny, "repconv.samples:resnet_tiny": resnet_tiny}


SAMPLES: dict[str, SampleSpec] = {
    spec.name: spec
    for spec in (
        SampleSpec(
            name="repvgg_tiny",
            builder="repconv.samples:repvgg_tiny",
            kwargs={"num_classes": 10, "width": 16},
            input_shape=(1, 3, 32, 32),
            filename="repvgg_tiny.pt",
        ),
        SampleSpec(
            name="resnet_tiny",
            builder="repconv.samples:resnet_tiny",
            kwargs={"num_classes": 10, "width": 16},
            input_shape=(1, 3, 32, 32),
            filename="resnet_tiny.pt",
        ),
    )
}
