"""Convs whose padding is computed in Python from the input size, and a size-flagged child.

* transformers' MobileNetV1 (``modeling_mobilenet_v1.py``): ``apply_tf_padding`` branches on
  ``in_height % stride_height == 0`` before every conv (``config.tf_padding``); fx refuses the
  branch on a traced size.
* timm's ``Conv2dSame`` (``layers/conv2d_same.py``, ``layers/padding.py``): ``pad_same`` computes
  ``max(...)`` of the input size; in a tf_ EfficientNet it is the stride-2 depthwise conv of an
  ``InvertedResidual`` whose BNs are ``BatchNormAct2d`` (BN with its activation inside).
* A child called with a flag computed from the input size, ``self.block(x, big=x.shape[-1] > 96)``,
  whose forward branches on the flag (a pattern of the issue; no library behind it).

The two libraries ship no fuse: their hand-written deploy form is the same module with each BN
folded into its conv (bias on) and the BN removed, the padding code kept as it is. The
size-flagged block has its own ``switch_to_deploy`` (BN folded, its 3x3 + 1x1 pair merged).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers.third_party_yolo import fuse_conv_and_bn

# ------------------------------------------------------------------ transformers MobileNetV1


def apply_tf_padding(features: Tensor, conv_layer: nn.Conv2d) -> Tensor:
    in_height, in_width = features.shape[-2:]
    stride_height, stride_width = conv_layer.stride
    kernel_height, kernel_width = conv_layer.kernel_size
    if in_height % stride_height == 0:
        pad_along_height = max(kernel_height - stride_height, 0)
    else:
        pad_along_height = max(kernel_height - (in_height % stride_height), 0)
    if in_width % stride_width == 0:
        pad_along_width = max(kernel_width - stride_width, 0)
    else:
        pad_along_width = max(kernel_width - (in_width % stride_width), 0)
    pad_left = pad_along_width // 2
    pad_top = pad_along_height // 2
    padding = (pad_left, pad_along_width - pad_left, pad_top, pad_along_height - pad_top)
    return F.pad(features, padding, "constant", 0.0)


class MobileNetV1ConvLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, tf_padding: bool = True) -> None:
        super().__init__()
        self.tf_padding = tf_padding
        padding = 0 if tf_padding else int((kernel_size - 1) / 2)
        self.convolution = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                     groups=groups, bias=False, padding_mode="zeros")
        self.normalization: nn.Module | None = nn.BatchNorm2d(out_channels, eps=0.001,
                                                              momentum=0.9997)
        self.activation = nn.ReLU6()

    def forward(self, features: Tensor) -> Tensor:
        if self.tf_padding:
            features = apply_tf_padding(features, self.convolution)
        features = self.convolution(features)
        if self.normalization is not None:
            features = self.normalization(features)
        if self.activation is not None:
            features = self.activation(features)
        return features


class MobileNetV1(nn.Module):
    """MobileNetV1Model at depth multiplier 0.25 with the first five depthwise-separable
    layers; returns ``(last_hidden_state, pooler_output)``."""

    strides = (1, 2, 1, 2, 1)

    def __init__(self) -> None:
        super().__init__()
        depth = 8
        self.conv_stem = MobileNetV1ConvLayer(3, depth, 3, stride=2)
        self.layer = nn.ModuleList()
        for i, stride in enumerate(self.strides):
            out = depth * 2 if stride == 2 or i == 0 else depth
            self.layer.append(MobileNetV1ConvLayer(depth, depth, 3, stride, groups=depth))
            self.layer.append(MobileNetV1ConvLayer(depth, out, 1))
            depth = out
        self.pooler = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        hidden_states = self.conv_stem(pixel_values)
        for layer_module in self.layer:
            hidden_states = layer_module(hidden_states)
        return hidden_states, torch.flatten(self.pooler(hidden_states), start_dim=1)


@torch.no_grad()
def fold_mobilenet_v1(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, MobileNetV1ConvLayer) and m.normalization is not None:
            m.convolution = fuse_conv_and_bn(m.convolution, m.normalization)
            m.normalization = None
    return model.eval()


# ------------------------------------------------------------------ timm Conv2dSame


def get_same_padding(x: int, kernel_size: int, stride: int, dilation: int) -> int:
    return max((math.ceil(x / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - x, 0)


def pad_same(x: Tensor, kernel_size: list[int], stride: list[int],
             dilation: list[int] = (1, 1)) -> Tensor:
    ih, iw = x.size()[-2:]
    pad_h = get_same_padding(ih, kernel_size[0], stride[0], dilation[0])
    pad_w = get_same_padding(iw, kernel_size[1], stride[1], dilation[1])
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


class Conv2dSame(nn.Conv2d):
    """TensorFlow 'SAME' conv: padding decided per call from the input size."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, 1, groups, bias)

    def forward(self, x: Tensor) -> Tensor:
        x = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation,
                        self.groups)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BN with its activation inside (``bn1``/``bn2`` of an EfficientNet block)."""

    def __init__(self, num_features: int, apply_act: bool = True) -> None:
        super().__init__(num_features, eps=1e-3)
        self.act = nn.SiLU(inplace=True) if apply_act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(x)


class InvertedResidual(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, exp_ratio: int = 4) -> None:
        super().__init__()
        mid = in_chs * exp_ratio
        self.has_skip = in_chs == out_chs and stride == 1
        self.conv_pw = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.bn1 = BatchNormAct2d(mid)
        # timm's create_conv2d(padding='same'): dynamic only where it cannot be static
        self.conv_dw: nn.Conv2d = (Conv2dSame(mid, mid, 3, stride, groups=mid, bias=False)
                                   if stride > 1 else
                                   nn.Conv2d(mid, mid, 3, 1, 1, groups=mid, bias=False))
        self.bn2 = BatchNormAct2d(mid)
        self.conv_pwl = nn.Conv2d(mid, out_chs, 1, bias=False)
        self.bn3 = BatchNormAct2d(out_chs, apply_act=False)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.bn1(self.conv_pw(x))
        x = self.bn2(self.conv_dw(x))
        x = self.bn3(self.conv_pwl(x))
        return x + shortcut if self.has_skip else x


class TfEfficientNetLite(nn.Module):
    """A tf_efficientnet-like trunk: Conv2dSame stem, four inverted residuals (two of stride 2,
    whose depthwise conv is a Conv2dSame), 1x1 head conv, pooled features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_stem = Conv2dSame(3, 16, 3, 2, bias=False)
        self.bn1 = BatchNormAct2d(16)
        self.blocks = nn.Sequential(InvertedResidual(16, 24, 2), InvertedResidual(24, 24, 1),
                                    InvertedResidual(24, 32, 2), InvertedResidual(32, 32, 1))
        self.conv_head = nn.Conv2d(32, 64, 1, bias=False)
        self.bn2 = BatchNormAct2d(64)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv_stem(x))
        x = self.blocks(x)
        x = self.bn2(self.conv_head(x))
        return x.mean((2, 3))


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """``conv`` with ``bn`` folded in, keeping the conv's class (a Conv2dSame stays one)."""
    fused = fuse_conv_and_bn(conv, bn)
    if type(conv) is nn.Conv2d:
        return fused
    same = Conv2dSame(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0],
                      conv.groups, bias=True).requires_grad_(False)
    same.load_state_dict(fused.state_dict())
    return same


@torch.no_grad()
def fold_tf_efficientnet(model: nn.Module) -> nn.Module:
    for owner, pairs in [(model, [("conv_stem", "bn1"), ("conv_head", "bn2")]),
                         *[(b, [("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")])
                           for b in model.blocks]]:
        for conv_name, bn_name in pairs:
            bn = getattr(owner, bn_name)
            setattr(owner, conv_name, _folded(getattr(owner, conv_name), bn))
            setattr(owner, bn_name, bn.act)
    return model.eval()


# ------------------------------------------------------------------ a size-flagged child


class SizeAwareBlock(nn.Module):
    """Downsamples first (conv-BN) when told the input is big; then a RepVGG-style 3x3 + 1x1
    conv-BN pair. ``switch_to_deploy`` folds the down path's BN and merges the pair."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.down_conv = nn.Conv2d(channels, channels, 3, 2, 1, bias=False)
        self.down_bn = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.conv_1x1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn_1x1 = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x: Tensor, big: bool = False) -> Tensor:
        if big:
            x = self.act(self.down_bn(self.down_conv(x)))
        if hasattr(self, "reparam"):
            return self.act(self.reparam(x))
        return self.act(self.bn(self.conv(x)) + self.bn_1x1(self.conv_1x1(x)))

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        self.down_conv = fuse_conv_and_bn(self.down_conv, self.down_bn)
        self.down_bn = nn.Identity()
        main, side = fuse_conv_and_bn(self.conv, self.bn), fuse_conv_and_bn(self.conv_1x1,
                                                                            self.bn_1x1)
        main.weight += F.pad(side.weight, [1, 1, 1, 1])
        main.bias += side.bias
        self.reparam = main
        del self.conv, self.bn, self.conv_1x1, self.bn_1x1


class SizeFlagNet(nn.Module):
    FLAG_ABOVE = 96

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.stem_conv = nn.Conv2d(3, channels, 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(channels)
        self.block = SizeAwareBlock(channels)
        self.head_conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.head_bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem_bn(self.stem_conv(x)))
        x = self.block(x, big=x.shape[-1] > self.FLAG_ABOVE)
        return self.head_bn(self.head_conv(x))


@torch.no_grad()
def fold_size_flag_net(model: nn.Module) -> nn.Module:
    for conv_name, bn_name in (("stem_conv", "stem_bn"), ("head_conv", "head_bn")):
        setattr(model, conv_name, fuse_conv_and_bn(getattr(model, conv_name),
                                                   getattr(model, bn_name)))
        setattr(model, bn_name, nn.Identity())
    model.block.switch_to_deploy()
    return model.eval()
