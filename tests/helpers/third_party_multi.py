"""Iteration over ``torch.split``, a conv shared across levels with one BN per level, and an
``OrderedDict`` of features.

* pytorchcv's ``MixConv`` (``models/common.py``, MixNet): ``xx = torch.split(x, ...)`` then
  ``zip(xx, self._modules.values())`` iterates a traced value (fx: "Proxy object cannot be
  iterated"); the block's one BN follows the ``torch.cat`` of the split convs.
* effdet's ``HeadNet`` (``effdet/efficientdet.py``): each repeat's ``SeparableConv2d`` is shared
  by all pyramid levels, with one BN per (repeat, level) in ``bn_rep[repeat][level]``. It traces;
  the obstacle is the shared weight.
* torchvision's ``IntermediateLayerGetter`` (``models/_utils.py``): returns an ``OrderedDict``;
  fx's trace returns an ``immutable_dict`` with the same values.

None ships a fuse. Hand-written deploy forms: MixConv's convs get their slice of the BN; the
head gets one folded copy of each pointwise conv PER LEVEL (unshared; same op count, no BN);
the ResNet under the getter gets each BN folded into its conv.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import Tensor, nn

from helpers.third_party_yolo import fuse_conv_and_bn

# ------------------------------------------------------------------ pytorchcv MixConv


class MixConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: list[int], stride: int,
                 groups: int = 1) -> None:
        super().__init__()
        self.splitted_in_channels = self.split_channels(in_channels, len(kernel_size))
        splitted_out_channels = self.split_channels(out_channels, len(kernel_size))
        for i, k in enumerate(kernel_size):
            out_i = splitted_out_channels[i]
            self.add_module(str(i), nn.Conv2d(
                self.splitted_in_channels[i], out_i, k, stride, k // 2,
                groups=out_i if out_channels == groups else groups, bias=False))
        self.axis = 1

    def forward(self, x: Tensor) -> Tensor:
        xx = torch.split(x, self.splitted_in_channels, dim=self.axis)
        out = [conv_i(x_i) for x_i, conv_i in zip(xx, self._modules.values())]
        return torch.cat(tuple(out), dim=self.axis)

    @staticmethod
    def split_channels(channels: int, kernel_count: int) -> list[int]:
        splitted = [channels // kernel_count] * kernel_count
        splitted[0] += channels - sum(splitted)
        return splitted


class MixConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: list[int],
                 stride: int = 1, groups: int = 1, activate: bool = True) -> None:
        super().__init__()
        self.activate, self.use_bn = activate, True
        self.conv = MixConv(in_channels, out_channels, kernel_size, stride, groups)
        self.bn = nn.BatchNorm2d(out_channels)
        if activate:
            self.activ = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.use_bn:
            x = self.bn(x)
        if self.activate:
            x = self.activ(x)
        return x


class MixUnit(nn.Module):
    """MixNet's unit: grouped 1x1 expansion, mixed depthwise kxk, grouped 1x1 projection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, exp_kernels: int,
                 dw_kernels: list[int], exp_factor: int = 3) -> None:
        super().__init__()
        mid = in_channels * exp_factor
        self.residual = in_channels == out_channels and stride == 1
        self.conv1 = MixConvBlock(in_channels, mid, [1] * exp_kernels)
        self.conv2 = MixConvBlock(mid, mid, dw_kernels, stride, groups=mid)
        self.conv3 = MixConvBlock(mid, out_channels, [1] * exp_kernels, activate=False)

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        x = self.conv3(self.conv2(self.conv1(x)))
        return x + identity if self.residual else x


class MixNetTiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            MixConvBlock(3, 16, [3], stride=2), MixUnit(16, 24, 2, 2, [3, 5, 7]),
            MixUnit(24, 24, 1, 2, [3, 5]), MixUnit(24, 32, 2, 1, [3, 5, 7, 9]))

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


@torch.no_grad()
def fold_mixnet(model: nn.Module) -> nn.Module:
    """Each split conv takes its slice of the block's BN; the BN goes."""
    for block in model.modules():
        if isinstance(block, MixConvBlock) and block.use_bn:
            start = 0
            for name, conv in list(block.conv.named_children()):
                part = copy.deepcopy(block.bn)
                stop = start + conv.out_channels
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    getattr(part, attr).data = getattr(block.bn, attr)[start:stop].clone()
                setattr(block.conv, name, fuse_conv_and_bn(conv, part))
                start = stop
            block.use_bn = False
            del block.bn
    return model.eval()


# ------------------------------------------------------------------ effdet HeadNet


class SeparableConv2d(nn.Module):
    def __init__(self, channels: int, out_channels: int, bias: bool) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, bias=False)
        self.conv_pw = nn.Conv2d(channels, out_channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_pw(self.conv_dw(x))


class HeadNet(nn.Module):
    """effdet's class/box head: shared convs, BN per (repeat, level), repeats first."""

    def __init__(self, channels: int, num_levels: int, repeats: int, num_outputs: int) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.conv_rep = nn.ModuleList(SeparableConv2d(channels, channels, bias=True)
                                      for _ in range(repeats))
        self.bn_rep = nn.ModuleList(
            nn.ModuleList(nn.Sequential(OrderedDict([("bn", nn.BatchNorm2d(channels, eps=1e-3))]))
                          for _ in range(num_levels))
            for _ in range(repeats))
        self.act = nn.SiLU(inplace=True)
        self.predict = SeparableConv2d(channels, num_outputs, bias=True)

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        outputs = []
        for level in range(self.num_levels):
            x_level = x[level]
            for conv, bn in zip(self.conv_rep, self.bn_rep):
                x_level = conv(x_level)
                x_level = bn[level](x_level)
                x_level = self.act(x_level)
            outputs.append(self.predict(x_level))
        return outputs


class HeadNetDeploy(nn.Module):
    """The head unshared: level l runs its own copies, each pointwise conv holding BN (r, l)."""

    def __init__(self, head: HeadNet) -> None:
        super().__init__()
        self.num_levels = head.num_levels
        self.conv_rep = nn.ModuleList()
        for level in range(head.num_levels):
            convs = nn.ModuleList()
            for conv, bn in zip(head.conv_rep, head.bn_rep):
                sep = SeparableConv2d(conv.conv_dw.in_channels, conv.conv_pw.out_channels, True)
                sep.conv_dw = conv.conv_dw
                sep.conv_pw = fuse_conv_and_bn(conv.conv_pw, bn[level].bn)
                convs.append(sep)
            self.conv_rep.append(convs)
        self.act = head.act
        self.predict = head.predict

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        outputs = []
        for level in range(self.num_levels):
            x_level = x[level]
            for conv in self.conv_rep[level]:
                x_level = self.act(conv(x_level))
            outputs.append(self.predict(x_level))
        return outputs


class TinyEfficientDet(nn.Module):
    """Three pyramid levels from stride-2 conv-BN-SiLU stages, then a shared class head."""

    def __init__(self, channels: int = 16, levels: int = 3, repeats: int = 3) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(3 if i == 0 else channels, channels, 3, 2, 1, bias=False),
                          nn.BatchNorm2d(channels), nn.SiLU())
            for i in range(levels + 1))
        self.class_net = HeadNet(channels, levels, repeats, num_outputs=9 * 4)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i:
                feats.append(x)
        return self.class_net(feats)


@torch.no_grad()
def fold_efficientdet(model: TinyEfficientDet) -> TinyEfficientDet:
    for stage in model.stages:
        stage[0] = fuse_conv_and_bn(stage[0], stage[1])
        stage[1] = nn.Identity()
    model.class_net = HeadNetDeploy(model.class_net)
    return model.eval()


# ------------------------------------------------------------------ torchvision getter


class IntermediateLayerGetter(nn.ModuleDict):
    def __init__(self, model: nn.Module, return_layers: dict[str, str]) -> None:
        remaining = dict(return_layers)
        layers = OrderedDict()
        for name, module in model.named_children():
            layers[name] = module
            remaining.pop(name, None)
            if not remaining:
                break
        super().__init__(layers)
        self.return_layers = return_layers

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2),
                                    BasicBlock(2 * width, 2 * width))
        self.layer3 = nn.Sequential(BasicBlock(2 * width, 4 * width, 2))
        self.fc = nn.Linear(4 * width, 10)


class TinyFCN(nn.Module):
    """torchvision's FCN pattern: the getter as ``self.backbone``, a classifier on "out", and an
    ``OrderedDict`` result carrying the auxiliary features too."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.backbone = IntermediateLayerGetter(TinyResNet(), {"layer2": "aux", "layer3": "out"})
        self.classifier = nn.Sequential(nn.Conv2d(64, 16, 3, padding=1, bias=False),
                                        nn.BatchNorm2d(16), nn.ReLU(),
                                        nn.Conv2d(16, num_classes, 1))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.backbone(x)
        result = OrderedDict()
        result["out"] = self.classifier(features["out"])
        result["aux"] = features["aux"]
        return result


@torch.no_grad()
def fold_fcn(model: nn.Module) -> nn.Module:
    for owner in list(model.modules()):
        for conv_name, bn_name in (("conv1", "bn1"), ("conv2", "bn2"), ("0", "1")):
            conv, bn = getattr(owner, conv_name, None), getattr(owner, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(owner, conv_name, fuse_conv_and_bn(conv, bn))
                setattr(owner, bn_name, nn.Identity())
    return model.eval()
