"""Reference models written the way third-party code is written: no repconv awareness.

Each one reproduces a pattern from a real framework that a fuser meets in the wild (timm,
torchvision, ShuffleNet code). The detector lives in ``user_models_detector.py``; the
HuggingFace-style wrappers and the timm-like classifier in ``user_models_wrappers.py``.
Give them random BN statistics (``reference_blocks.randomize_bn``) before comparing
anything: fresh BatchNorms are the identity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ------------------------------------------------------------------ 2. timm metadata asserts


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d, trimmed: asserts on ``x.ndim`` before ``F.batch_norm``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 apply_act: bool = True, act_layer: type[nn.Module] = nn.ReLU) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.drop = nn.Identity()
        self.act = act_layer() if apply_act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        bn_training = True if self.training else (
            self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats
                         else None,
                         self.running_var if not self.training or self.track_running_stats
                         else None,
                         self.weight, self.bias, bn_training, factor, self.eps)
        x = self.drop(x)
        return self.act(x)


class ConvNormAct(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1,
                 apply_act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = BatchNormAct2d(cout, apply_act=apply_act)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return self.bn(x)


class RepVggBlock(nn.Module):
    """timm byobnet.RepVggBlock: kxk + 1x1 ConvNormAct (no act) + identity BN, then ReLU."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1) -> None:
        super().__init__()
        use_ident = cin == cout and stride == 1
        self.identity = BatchNormAct2d(cout, apply_act=False) if use_ident else None
        self.conv_kxk = ConvNormAct(cin, cout, k, stride, apply_act=False)
        self.conv_1x1 = ConvNormAct(cin, cout, 1, stride, apply_act=False)
        self.attn = nn.Identity()
        self.drop_path = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.reparam_conv = None

    def forward(self, x: Tensor) -> Tensor:
        if self.reparam_conv is not None:
            return self.act(self.attn(self.reparam_conv(x)))
        if self.identity is None:
            x = self.conv_1x1(x) + self.conv_kxk(x)
        else:
            identity = self.identity(x)
            x = self.conv_1x1(x) + self.conv_kxk(x)
            x = self.drop_path(x)
            x = x + identity
        x = self.attn(x)
        return self.act(x)


class ShapeCheckedConvBN(nn.Module):
    """Reads shape, size(), dim(), dtype and device of the conv output before its BN."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.out_chs = cout
        self.conv = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        n, c, h, w = y.shape
        torch._assert(y.dim() == 4, "expected a 4D feature map")
        torch._assert(y.size(1) == self.out_chs, "channel count changed")
        torch._assert(y.dtype == x.dtype, "dtype changed")
        torch._assert(y.device == x.device, "device changed")
        y = self.bn(y)
        return self.act(y).view(n, c, h, w)


class MetadataNet(nn.Module):
    BLOCKS = ("stages.0", "stages.1", "stages.2")

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = ConvNormAct(3, c, 3, stride=2)
        self.stages = nn.Sequential(RepVggBlock(c, c), RepVggBlock(c, 2 * c, stride=2),
                                    RepVggBlock(2 * c, 2 * c))
        self.final = ShapeCheckedConvBN(2 * c, 2 * c)

    def forward(self, x: Tensor) -> Tensor:
        return self.final(self.stages(self.stem(x)))


# ------------------------------------------------------------------ 3. ShuffleNet channel shuffle


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, c: int = 24, groups: int = 3) -> None:
        super().__init__()
        self.groups = groups
        self.conv1 = nn.Conv2d(3, c, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.gconv = nn.Conv2d(c, c, 1, groups=groups, bias=False)
        self.gbn = nn.BatchNorm2d(c)
        self.dwconv = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.dwbn = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        out = self.gbn(self.gconv(x))
        out = channel_shuffle(out, self.groups)
        return F.relu(self.dwbn(self.dwconv(out)))


# ------------------------------------------------------------------ 4. single-input cat


class SingleInputCat(nn.Module):
    """Code written for N branches, run with one: ``torch.cat([x], 1)``."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.pool_bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([F.relu(x)], 1)
        y = torch.cat([self.bn1(self.conv1(x))], 1)  # folds with the conv before it
        y = torch.cat([F.relu(y)], 1)  # alone between two non-linear ops
        y = torch.cat([self.pool_bn(F.max_pool2d(y, 2))], 1)  # a lone BN in a one-input cat
        return self.bn2(self.conv2(F.relu(y)))


# ------------------------------------------------------------------ 5. discarded branches


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class AuxHeadNet(nn.Module):
    """Deep supervision: the aux head is computed and only a training loss would read it."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, c)
        self.main = nn.Sequential(_conv_bn_relu(c, c), nn.Conv2d(c, 4, 1))
        self.aux = nn.Sequential(_conv_bn_relu(c, c), nn.Conv2d(c, 4, 1))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        aux = self.aux(x)  # noqa: F841 (read by the training loss in the real code)
        return self.main(x)


class EagerAuxNet(nn.Module):
    """Same, but the parent does not trace (a data-dependent guard), so the discard is hidden."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, c)
        self.classifier = nn.Sequential(_conv_bn_relu(c, c), nn.Conv2d(c, 4, 1))
        self.aux_classifier = nn.Sequential(_conv_bn_relu(c, c), nn.Conv2d(c, 4, 1))

    def forward(self, x: Tensor) -> Any:
        feats = self.stem(x)
        if feats.abs().amax() > 1e6:  # overflow guard on a tensor value
            feats = feats / feats.abs().amax()
        aux = self.aux_classifier(feats)
        out = self.classifier(feats)
        if self.training:
            return out, aux
        return out


# ------------------------------------------------------------------ 8. never slower


class LoneBatchNorms(nn.Module):
    """BNs with a non-linear op on both sides: only a slower conv could replace them."""

    LONE = ("post_relu_bn", "post_pool_bn")

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.post_relu_bn = nn.BatchNorm2d(c)
        self.pool = nn.MaxPool2d(2)
        self.post_pool_bn = BatchNormAct2d(c)  # timm: F.batch_norm, then its own ReLU
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.post_relu_bn(x))
        x = self.post_pool_bn(self.pool(x))
        return self.conv2(x)


class NarrowChain(nn.Module):
    """1x1 32→4 then 3x3 4→32 (unpadded: the chain is exact, only its cost forbids it)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, 32)
        self.reduce = nn.Conv2d(32, 4, 1, bias=False)
        self.reduce_bn = nn.BatchNorm2d(4)
        self.expand = nn.Conv2d(4, 32, 3, bias=False)
        self.expand_bn = nn.BatchNorm2d(32)

    def forward(self, x: Tensor) -> Tensor:
        x = self.reduce_bn(self.reduce(self.stem(x)))
        return F.relu(self.expand_bn(self.expand(x)))


# ------------------------------------------------------------------ 9. every BN explained


class MixedBatchNorms(nn.Module):
    BNS = ("conv1_bn", "relu_bn", "batchstat_bn", "conv3_bn")

    def __init__(self, c: int = 12) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, 1, 1, bias=False)
        self.conv1_bn = nn.BatchNorm2d(c)
        self.relu_bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.batchstat_bn = nn.BatchNorm2d(c, track_running_stats=False)
        self.conv3 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.conv3_bn = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1_bn(self.conv1(x)))
        x = F.relu(self.relu_bn(x))
        x = F.relu(self.batchstat_bn(self.conv2(x)))
        return self.conv3_bn(self.conv3(x))


# ------------------------------------------------------------------ 10. built through --model
# The CLI tests write a --model module that imports one of these.


class TupleHead(nn.Module):
    """Returns a nested structure: (map, (pooled, {"doubled": map * 2}))."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor]]]:
        y = self.bn(self.conv(x))
        return y, (y.flatten(1).mean(1), {"doubled": y * 2})


class Eigen(nn.Module):
    """A Conv-BN whose head calls an op torch's ONNX exporter has no translation for."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x)).flatten(2)
        return torch.linalg.eigh(y @ y.transpose(-1, -2)).eigenvalues


class ReturnsNone(nn.Module):
    """A forward that computes and returns nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> None:
        self.bn(self.conv(x))
