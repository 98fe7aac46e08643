"""Training-time reference blocks for re-parameterization tests.

Every module here is written from the published equations of its paper, in its TRAINING
form only: there is deliberately no deploy / switch_to_deploy / reparameterize code and no
fusion code of any kind. The modules are meant to be handed to the fuser, which traces them
with ``torch.fx.symbolic_trace``, so every ``forward`` is fx-traceable: no Python control
flow on tensor values (only on plain Python attributes), standard ``nn`` modules or ``F.*``
calls, and the ops ``+``, ``-``, ``*`` (by constants or ``nn.Parameter`` layer scales) and
``torch.cat`` along dim 1.

Unless stated otherwise a block ends with NO activation (``act=False``); ``act=True``
appends a ReLU after the final sum so tests can check non-linearity boundaries.

Use :func:`randomize_bn` before comparing anything: freshly constructed BatchNorms are the
identity map (mean 0, var 1, weight 1, bias 0) and hide most fusion bugs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "BLOCK_NAMES",
    "LAYER_SCALE_NAMES",
    "ACBlock",
    "BasicResBlock",
    "Bottleneck",
    "Branchy1d",
    "Branchy3d",
    "DBBWithInnerBN",
    "DiverseBranchBlock",
    "FiveBranchConcatBlock",
    "MobileOneBlock",
    "RepGhostBlock",
    "RepMixer",
    "RepVGGBlock",
    "RepViTDWBlock",
    "ScaledDilatedBlock",
    "block_ndim",
    "make_block",
    "randomize_bn",
    "tiny_net",
    "tiny_net_example_input",
]

#: Names (last attribute component) of ``nn.Parameter`` layer scales that
#: :func:`randomize_bn` moves away from their initial value.
LAYER_SCALE_NAMES: tuple[str, ...] = ("layer_scale", "channel_scale")

_CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _uniform(shape: torch.Size, low: float, high: float, gen: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)


def _random_sign(shape: torch.Size, gen: torch.Generator) -> Tensor:
    return torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2.0 - 1.0


def _uniform_avoiding_one(
    shape: torch.Size, low: float, high: float, gen: torch.Generator
) -> Tensor:
    """``U(low, 0.8)`` or ``U(1.25, high)`` with equal probability: never within 0.2 of 1."""
    below = _uniform(shape, low, 0.8, gen)
    above = _uniform(shape, 1.25, high, gen)
    return torch.where(torch.rand(shape, generator=gen) < 0.5, below, above)


@torch.no_grad()
def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm and layer scale in ``module`` non-trivial values.

    For every ``_BatchNorm`` subclass, elementwise: ``running_mean ~ ±U(0.25, 2)``,
    ``running_var ~ U(0.5, 4)`` but never within 0.2 of 1, ``weight ~ ±U(0.5, 2)`` with a
    random sign and magnitude never within 0.2 of 1, and ``bias ~ U(-1, 1)``. Every
    ``nn.Parameter`` whose attribute name is in :data:`LAYER_SCALE_NAMES` becomes
    ``±U(0.5, 1.5)``. Deterministic for a given ``seed`` (a private ``torch.Generator``;
    the global RNG is untouched). Returns ``module`` in ``eval()`` mode.
    """
    gen = torch.Generator().manual_seed(seed)
    for mod in module.modules():
        if isinstance(mod, _BatchNorm):
            if mod.running_mean is not None and mod.running_var is not None:
                shape = mod.running_mean.shape
                mean = _random_sign(shape, gen) * _uniform(shape, 0.25, 2.0, gen)
                var = _uniform_avoiding_one(shape, 0.5, 4.0, gen)
                mod.running_mean.copy_(mean.to(mod.running_mean))
                mod.running_var.copy_(var.to(mod.running_var))
            if mod.weight is not None:
                shape = mod.weight.shape
                weight = _random_sign(shape, gen) * _uniform_avoiding_one(shape, 0.5, 2.0, gen)
                mod.weight.copy_(weight.to(mod.weight))
            if mod.bias is not None:
                mod.bias.copy_(_uniform(mod.bias.shape, -1.0, 1.0, gen).to(mod.bias))
    for name, param in module.named_parameters():
        if name.rsplit(".", 1)[-1] in LAYER_SCALE_NAMES:
            value = _random_sign(param.shape, gen) * _uniform(param.shape, 0.5, 1.5, gen)
            param.copy_(value.to(param))
    return module.eval()


def _conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, ...],
    stride: int = 1,
    padding: int | tuple[int, ...] = 0,
    groups: int = 1,
    dilation: int = 1,
    ndim: int = 2,
) -> nn.Sequential:
    """``BN(conv(x))`` with a bias-free conv, as ``Sequential(conv=..., bn=...)``."""
    seq = nn.Sequential()
    seq.add_module(
        "conv",
        _CONV[ndim](
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
        ),
    )
    seq.add_module("bn", _BN[ndim](out_channels))
    return seq


def _act(act: bool) -> nn.Module:
    return nn.ReLU() if act else nn.Identity()


def _check_groups(in_channels: int, out_channels: int, groups: int) -> None:
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"in_channels={in_channels} and out_channels={out_channels} must both be "
            f"divisible by groups={groups}"
        )


def _bn_zero_response(bn: nn.Module, ndim: int) -> Tensor:
    """Eval-mode response of ``bn`` to a zero input, ``b - mu * gamma / sqrt(var + eps)``.

    Shaped ``[1, C, 1, ...]`` for broadcasting. Computed from the BN's parameters and
    running statistics (even in train mode), exactly as the official DBB ``BNAndPad`` does.

    Written as ``F.batch_norm(zeros, ..., training=False)`` rather than the literal
    arithmetic on purpose: ``torch.fx.symbolic_trace`` does not proxy buffers, so
    ``torch.sqrt(bn.running_var + bn.eps)`` would be evaluated at trace time and frozen into
    a ``_tensor_constant``. Here every BN tensor enters the graph as a ``get_attr`` node and
    the zeros come from ``zeros_like(bn.weight)``, so ``c`` stays input-independent, live
    (tracks later changes to the BN) and dtype/device-correct.
    """
    zeros = torch.zeros_like(bn.weight).reshape(1, -1)
    c = F.batch_norm(zeros, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return c.reshape((1, -1) + (1,) * ndim)


# --------------------------------------------------------------------------------------
# published blocks
# --------------------------------------------------------------------------------------


class RepVGGBlock(nn.Module):
    """RepVGG block (Ding et al., CVPR 2021, Eq. 1-3).

    ``y = BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)``, the identity BN only when
    ``in_channels == out_channels`` and ``stride == 1``. 3x3 padding 1, 1x1 padding 0,
    convs bias-free, both convs use ``stride`` and ``groups``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        groups: int = 1,
        act: bool = False,
    ) -> None:
        super().__init__()
        _check_groups(in_channels, out_channels, groups)
        self.rbr_dense = _conv_bn(in_channels, out_channels, 3, stride, 1, groups)
        self.rbr_1x1 = _conv_bn(in_channels, out_channels, 1, stride, 0, groups)
        self.has_identity = in_channels == out_channels and stride == 1
        self.rbr_identity = nn.BatchNorm2d(in_channels) if self.has_identity else None
        self.act = _act(act)

    def forward(self, x: Tensor) -> Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.act(out)


class ACBlock(nn.Module):
    """Asymmetric Convolution Block (ACNet, Ding et al., ICCV 2019, Sec. 3.3).

    ``y = BN(conv_kxk(x)) + BN(conv_1xk(x)) + BN(conv_kx1(x))`` with paddings
    ``(k//2, k//2)``, ``(0, k//2)`` and ``(k//2, 0)`` so all three outputs align on the
    square kernel's centre. Convs bias-free, shared ``stride`` and ``groups``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: bool = False,
    ) -> None:
        super().__init__()
        _check_groups(in_channels, out_channels, groups)
        k, p = kernel_size, kernel_size // 2
        self.square = _conv_bn(in_channels, out_channels, (k, k), stride, (p, p), groups)
        self.hor = _conv_bn(in_channels, out_channels, (1, k), stride, (0, p), groups)
        self.ver = _conv_bn(in_channels, out_channels, (k, 1), stride, (p, 0), groups)
        self.act = _act(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.square(x) + self.hor(x) + self.ver(x))


class DiverseBranchBlock(nn.Module):
    """Diverse Branch Block (DBB, Ding et al., CVPR 2021, Fig. 2 / Transforms I-VI).

    Four branches summed::

        BN(conv_kxk(x))                                  # stride, padding k//2
      + BN(conv_1x1(x))                                  # stride
      + BN(conv_kxk'(conv_1x1'(x)))                      # 1x1 stride 1, kxk stride/pad k//2
      + BN(avgpool_k(conv_1x1''(x)))                     # avg stride, pad k//2, incl. pad

    All convs are bias-free and use ``groups``. NOTE: the official code places a BN
    between the inner 1x1 conv and the following kxk conv / avg-pool and pads that BN's
    output with the BN's zero-input response (``BNAndPad``). Here the intermediate map
    sends zero to zero (no inner BN), so ordinary zero padding on the kxk conv / avg-pool
    is the equivalent form. :class:`DBBWithInnerBN` has the official semantics.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        internal_channels: int | None = None,
        act: bool = False,
    ) -> None:
        super().__init__()
        _check_groups(in_channels, out_channels, groups)
        k, p = kernel_size, kernel_size // 2
        mid = in_channels if internal_channels is None else internal_channels
        _check_groups(mid, out_channels, groups)
        self.dbb_origin = _conv_bn(in_channels, out_channels, k, stride, p, groups)
        self.dbb_1x1 = _conv_bn(in_channels, out_channels, 1, stride, 0, groups)
        self.kxk_conv1 = nn.Conv2d(in_channels, mid, 1, groups=groups, bias=False)
        self.kxk_conv2 = nn.Conv2d(mid, out_channels, k, stride, p, groups=groups, bias=False)
        self.kxk_bn = nn.BatchNorm2d(out_channels)
        self.avg_conv = nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=False)
        self.avg_pool = nn.AvgPool2d(k, stride, p, count_include_pad=True)
        self.avg_bn = nn.BatchNorm2d(out_channels)
        self.act = _act(act)

    def forward(self, x: Tensor) -> Tensor:
        out = self.dbb_origin(x) + self.dbb_1x1(x)
        out = out + self.kxk_bn(self.kxk_conv2(self.kxk_conv1(x)))
        out = out + self.avg_bn(self.avg_pool(self.avg_conv(x)))
        return self.act(out)


class DBBWithInnerBN(nn.Module):
    """DBB with the official inner BN + ``BNAndPad`` semantics (Ding et al., CVPR 2021).

    Same four branches as :class:`DiverseBranchBlock`, but in the 1x1->kxk and the
    1x1->avg branches the 1x1 conv is followed by a BN, and the following kxk conv /
    avg-pool use ``padding=0`` after an explicit pad with the BN's zero-input response
    ``c = b - mu * gamma / sqrt(var + eps)``::

        t = BN1(conv_1x1(x));  t = F.pad(t - c, [p] * 4) + c;  BN2(conv_kxk(t, padding=0))

    which equals ``BN2(conv_kxk(BN1(conv_1x1(zero_pad(x)))))``, i.e. the official code's
    ``BNAndPad`` (both branches, as in the official ``dbb_1x1_kxk`` and ``dbb_avg``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        internal_channels: int | None = None,
        act: bool = False,
    ) -> None:
        super().__init__()
        _check_groups(in_channels, out_channels, groups)
        k, p = kernel_size, kernel_size // 2
        mid = in_channels if internal_channels is None else internal_channels
        _check_groups(mid, out_channels, groups)
        self.pad = p
        self.dbb_origin = _conv_bn(in_channels, out_channels, k, stride, p, groups)
        self.dbb_1x1 = _conv_bn(in_channels, out_channels, 1, stride, 0, groups)
        self.kxk_conv1 = nn.Conv2d(in_channels, mid, 1, groups=groups, bias=False)
        self.kxk_bn1 = nn.BatchNorm2d(mid)
        self.kxk_conv2 = nn.Conv2d(mid, out_channels, k, stride, 0, groups=groups, bias=False)
        self.kxk_bn2 = nn.BatchNorm2d(out_channels)
        self.avg_conv = nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=False)
        self.avg_bn1 = nn.BatchNorm2d(out_channels)
        self.avg_pool = nn.AvgPool2d(k, stride, 0)
        self.avg_bn2 = nn.BatchNorm2d(out_channels)
        self.act = _act(act)

    def _bn_and_pad(self, t: Tensor, bn: nn.Module) -> Tensor:
        """Official ``BNAndPad``: ``BN(t)`` padded by ``p`` with ``BN``'s zero response."""
        t = bn(t)
        if self.pad > 0:
            c = _bn_zero_response(bn, 2)
            t = F.pad(t - c, [self.pad] * 4) + c
        return t

    def forward(self, x: Tensor) -> Tensor:
        out = self.dbb_origin(x) + self.dbb_1x1(x)
        t = self._bn_and_pad(self.kxk_conv1(x), self.kxk_bn1)
        out = out + self.kxk_bn2(self.kxk_conv2(t))
        a = self._bn_and_pad(self.avg_conv(x), self.avg_bn1)
        out = out + self.avg_bn2(self.avg_pool(a))
        return self.act(out)


class MobileOneBlock(nn.Module):
    """MobileOne block (Vasu et al., CVPR 2023, Fig. 3 / Sec. 3.2).

    ``y = sum_{i<num_branches} BN_i(conv_kxk_i(x)) + BN(conv_1x1(x)) + BN(x)``. The 1x1
    "scale" branch exists only when ``kernel_size > 1`` and ``use_scale_branch``; the
    identity BN only when ``in_channels == out_channels`` and ``stride == 1``. All convs
    bias-free with ``stride`` and ``groups`` (``groups=in_channels`` for MobileOne's
    depthwise stage). ``num_branches=0, use_scale_branch=False`` leaves only ``BN(x)``
    (FastViT's RepMixer ``norm``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        num_branches: int = 3,
        use_scale_branch: bool = True,
        act: bool = False,
    ) -> None:
        super().__init__()
        _check_groups(in_channels, out_channels, groups)
        p = kernel_size // 2
        self.rbr_skip = (
            nn.BatchNorm2d(in_channels) if in_channels == out_channels and stride == 1 else None
        )
        self.rbr_conv = nn.ModuleList(
            _conv_bn(in_channels, out_channels, kernel_size, stride, p, groups)
            for _ in range(num_branches)
        )
        self.rbr_scale = (
            _conv_bn(in_channels, out_channels, 1, stride, 0, groups)
            if kernel_size > 1 and use_scale_branch
            else None
        )
        if self.rbr_skip is None and self.rbr_scale is None and num_branches == 0:
            raise ValueError("MobileOneBlock needs at least one branch")
        self.act = _act(act)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor | None = None
        if self.rbr_skip is not None:
            out = self.rbr_skip(x)
        if self.rbr_scale is not None:
            y = self.rbr_scale(x)
            out = y if out is None else out + y
        for branch in self.rbr_conv:
            y = branch(x)
            out = y if out is None else out + y
        return self.act(out)


class RepMixer(nn.Module):
    """FastViT RepMixer token mixer (Vasu et al., ICCV 2023, Eq. 2).

    ``y = x + layer_scale * (mixer(x) - norm(x))`` with, as in the official code,
    ``mixer = MobileOneBlock(dim, dim, k, groups=dim, num_branches=1)`` i.e.
    ``BN(dwconv_kxk(x)) + BN(dwconv_1x1(x)) + BN(x)`` and
    ``norm = MobileOneBlock(..., num_branches=0, use_scale_branch=False)`` i.e. ``BN(x)``.
    ``layer_scale`` has shape ``[dim, 1, 1]``; without it ``y = x + mixer(x) - norm(x)``.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 3,
        use_layer_scale: bool = True,
        layer_scale_init: float = 1e-5,
        act: bool = False,
    ) -> None:
        super().__init__()
        self.norm = MobileOneBlock(
            dim, dim, kernel_size, groups=dim, num_branches=0, use_scale_branch=False
        )
        self.mixer = MobileOneBlock(dim, dim, kernel_size, groups=dim, num_branches=1)
        self.use_layer_scale = use_layer_scale
        if use_layer_scale:
            self.layer_scale = nn.Parameter(layer_scale_init * torch.ones(dim, 1, 1))
        self.act = _act(act)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_layer_scale:
            out = x + self.layer_scale * (self.mixer(x) - self.norm(x))
        else:
            out = x + self.mixer(x) - self.norm(x)
        return self.act(out)


class RepViTDWBlock(nn.Module):
    """RepViT ``RepVGGDW`` token mixer (Wang et al., CVPR 2024).

    ``y = BN(BN(dwconv3x3(x)) + dwconv1x1(x) + x)``; the 3x3 conv is bias-free, the 1x1
    depthwise conv HAS a bias and no BN of its own.
    """

    def __init__(self, channels: int, act: bool = False) -> None:
        super().__init__()
        self.conv = _conv_bn(channels, channels, 3, 1, 1, groups=channels)
        self.conv1 = nn.Conv2d(channels, channels, 1, groups=channels, bias=True)
        self.bn = nn.BatchNorm2d(channels)
        self.act = _act(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x) + self.conv1(x) + x))


class RepGhostBlock(nn.Module):
    """RepGhost re-parameterizable cheap operation (Chen et al., 2022, Fig. 3).

    ``y = BN(dwconv_kxk(x)) + BN(x)``: the depthwise "cheap operation" plus the
    ``fusion_bn`` identity branch that replaces GhostNet's concatenation.
    """

    def __init__(self, channels: int, kernel_size: int = 3, act: bool = False) -> None:
        super().__init__()
        self.cheap_operation = _conv_bn(
            channels, channels, kernel_size, 1, kernel_size // 2, groups=channels
        )
        self.fusion_bn = nn.BatchNorm2d(channels)
        self.act = _act(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.cheap_operation(x) + self.fusion_bn(x))


# --------------------------------------------------------------------------------------
# invented blocks (no published model has these)
# --------------------------------------------------------------------------------------


class FiveBranchConcatBlock(nn.Module):
    """Invented: two summed pairs and an avg-pool branch, concatenated on channels.

    ``y = cat([BN(conv3x3(x)) + BN(conv1x5(x)),
              BN(conv5x1(x)) + BN(conv1x1(x)),
              BN(avgpool3x3(x))], dim=1)``

    Paddings ``(1,1)``, ``(0,2)``, ``(2,0)``, ``0``; the avg-pool has stride ``stride``,
    padding 1 and ``count_include_pad=True``. The avg-pool branch keeps ``in_channels``
    channels, so ``out_channels - in_channels >= 2`` is split between the two pairs
    (first pair gets the ceiling half).
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, act: bool = False
    ) -> None:
        super().__init__()
        rest = out_channels - in_channels
        if rest < 2:
            raise ValueError(
                f"out_channels ({out_channels}) must be at least in_channels + 2 "
                f"({in_channels + 2})"
            )
        ca, cb = (rest + 1) // 2, rest // 2
        self.split = (ca, cb, in_channels)
        self.b3x3 = _conv_bn(in_channels, ca, (3, 3), stride, (1, 1))
        self.b1x5 = _conv_bn(in_channels, ca, (1, 5), stride, (0, 2))
        self.b5x1 = _conv_bn(in_channels, cb, (5, 1), stride, (2, 0))
        self.b1x1 = _conv_bn(in_channels, cb, 1, stride, 0)
        self.pool = nn.AvgPool2d(3, stride, 1, count_include_pad=True)
        self.pool_bn = nn.BatchNorm2d(in_channels)
        self.act = _act(act)

    def forward(self, x: Tensor) -> Tensor:
        a = self.b3x3(x) + self.b1x5(x)
        b = self.b5x1(x) + self.b1x1(x)
        c = self.pool_bn(self.pool(x))
        return self.act(torch.cat([a, b, c], dim=1))


class ScaledDilatedBlock(nn.Module):
    """Invented: ``y = 0.5 * BN(conv3x3_dil2(x)) - BN(conv1x1(x)) + s * x``.

    The 3x3 conv has dilation 2 and padding 2; ``s = channel_scale`` is a Parameter of
    shape ``[C]`` (init ones) broadcast via ``reshape(1, -1, 1, 1)``. Stride 1, in == out.
    """

    def __init__(self, channels: int, groups: int = 1, act: bool = False) -> None:
        super().__init__()
        _check_groups(channels, channels, groups)
        self.dilated = _conv_bn(channels, channels, 3, 1, 2, groups, dilation=2)
        self.point = _conv_bn(channels, channels, 1, 1, 0, groups)
        self.channel_scale = nn.Parameter(torch.ones(channels))
        self.act = _act(act)

    def forward(self, x: Tensor) -> Tensor:
        out = 0.5 * self.dilated(x) - self.point(x)
        out = out + self.channel_scale.reshape(1, -1, 1, 1) * x
        return self.act(out)


class _BranchyNd(nn.Module):
    """``BN(conv_k3(x)) + BN(conv_k1(x)) + BN(x)`` in ``ndim`` spatial dimensions."""

    ndim: int = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        groups: int = 1,
        act: bool = False,
    ) -> None:
        super().__init__()
        _check_groups(in_channels, out_channels, groups)
        nd = self.ndim
        self.conv3 = _conv_bn(in_channels, out_channels, 3, stride, 1, groups, ndim=nd)
        self.conv1 = _conv_bn(in_channels, out_channels, 1, stride, 0, groups, ndim=nd)
        self.identity = (
            _BN[nd](in_channels) if in_channels == out_channels and stride == 1 else None
        )
        self.act = _act(act)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv3(x) + self.conv1(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)


class Branchy1d(_BranchyNd):
    """Invented 1D RepVGG: ``BN(conv1d_k3(x)) + BN(conv1d_k1(x)) + BN(x)``.

    Padding 1 / 0; identity BN only when in == out and stride == 1.
    """

    ndim = 1


class Branchy3d(_BranchyNd):
    """Invented 3D RepVGG: ``BN(conv3d_3x3x3(x)) + BN(conv3d_1x1x1(x)) + BN(x)``.

    Padding 1 / 0; identity BN only when in == out and stride == 1.
    """

    ndim = 3


# --------------------------------------------------------------------------------------
# plain ResNet blocks
# --------------------------------------------------------------------------------------


class BasicResBlock(nn.Module):
    """ResNet basic block (He et al., CVPR 2016, Fig. 2 left).

    ``y = relu(BN(conv3x3(relu(BN(conv3x3_s(x))))) + shortcut(x))`` with
    ``shortcut = x`` when ``in == out`` and ``stride == 1``, else ``BN(conv1x1_s(x))``.
    The final ReLU is part of the paper's block, so here ``act`` defaults to True.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, act: bool = True
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if in_channels == out_channels and stride == 1:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = _conv_bn(in_channels, out_channels, 1, stride, 0)
        self.act = _act(act)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck (He et al., CVPR 2016, Fig. 5 right; stride on the 3x3).

    ``y = relu(BN(conv1x1(relu(BN(conv3x3_s(relu(BN(conv1x1(x)))))))) + shortcut(x))``,
    ``mid_channels`` defaults to ``max(1, out_channels // 4)``; ``groups`` applies to the
    3x3 (ResNeXt). Shortcut as in :class:`BasicResBlock`. ``act`` defaults to True.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        groups: int = 1,
        mid_channels: int | None = None,
        act: bool = True,
    ) -> None:
        super().__init__()
        mid = max(1, out_channels // 4) if mid_channels is None else mid_channels
        _check_groups(mid, mid, groups)
        self.conv1 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        if in_channels == out_channels and stride == 1:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = _conv_bn(in_channels, out_channels, 1, stride, 0)
        self.act = _act(act)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + self.shortcut(x))


# --------------------------------------------------------------------------------------
# registry + tiny nets
# --------------------------------------------------------------------------------------

# name -> (factory(in, out, stride, act), spatial dims, supports stride/channel change)
_Factory = Callable[[int, int, int, bool], nn.Module]


def _fixed(ctor: Callable[[int, bool], nn.Module], name: str) -> _Factory:
    def build(cin: int, cout: int, stride: int, act: bool) -> nn.Module:
        if cin != cout or stride != 1:
            raise ValueError(f"{name} needs in_channels == out_channels and stride == 1")
        return ctor(cin, act)

    return build


_REGISTRY: dict[str, tuple[_Factory, int, bool]] = {
    "RepVGGBlock": (lambda i, o, s, a: RepVGGBlock(i, o, s, act=a), 2, True),
    "ACBlock": (lambda i, o, s, a: ACBlock(i, o, stride=s, act=a), 2, True),
    "DiverseBranchBlock": (lambda i, o, s, a: DiverseBranchBlock(i, o, stride=s, act=a), 2, True),
    "DBBWithInnerBN": (lambda i, o, s, a: DBBWithInnerBN(i, o, stride=s, act=a), 2, True),
    "MobileOneBlock": (lambda i, o, s, a: MobileOneBlock(i, o, stride=s, act=a), 2, True),
    "RepMixer": (_fixed(lambda c, a: RepMixer(c, act=a), "RepMixer"), 2, False),
    "RepViTDWBlock": (_fixed(lambda c, a: RepViTDWBlock(c, act=a), "RepViTDWBlock"), 2, False),
    "RepGhostBlock": (_fixed(lambda c, a: RepGhostBlock(c, act=a), "RepGhostBlock"), 2, False),
    "FiveBranchConcatBlock": (lambda i, o, s, a: FiveBranchConcatBlock(i, o, s, act=a), 2, True),
    "ScaledDilatedBlock": (
        _fixed(lambda c, a: ScaledDilatedBlock(c, act=a), "ScaledDilatedBlock"),
        2,
        False,
    ),
    "Branchy1d": (lambda i, o, s, a: Branchy1d(i, o, s, act=a), 1, True),
    "Branchy3d": (lambda i, o, s, a: Branchy3d(i, o, s, act=a), 3, True),
    "BasicResBlock": (lambda i, o, s, a: BasicResBlock(i, o, s, act=a), 2, True),
    "Bottleneck": (lambda i, o, s, a: Bottleneck(i, o, s, act=a), 2, True),
}

#: Every block name accepted by :func:`make_block` and :func:`tiny_net`.
BLOCK_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _lookup(block_name: str) -> tuple[_Factory, int, bool]:
    try:
        return _REGISTRY[block_name]
    except KeyError:
        raise ValueError(f"unknown block {block_name!r}; expected one of {BLOCK_NAMES}") from None


def block_ndim(block_name: str) -> int:
    """Return the number of spatial dimensions (1, 2 or 3) the named block works on."""
    return _lookup(block_name)[1]


def make_block(
    block_name: str,
    in_channels: int,
    out_channels: int | None = None,
    stride: int = 1,
    act: bool = False,
) -> nn.Module:
    """Build the named block with default hyper-parameters.

    ``out_channels`` defaults to ``in_channels``. Note ``BasicResBlock`` / ``Bottleneck``
    keep their paper's final ReLU only when ``act=True``.
    """
    factory = _lookup(block_name)[0]
    return factory(in_channels, in_channels if out_channels is None else out_channels, stride, act)


def tiny_net(block_name: str, channels: int = 8, num_classes: int = 10) -> nn.Sequential:
    """Small classifier around two instances of the named block.

    ``stem (conv3x3 3->C, BN, ReLU) -> block(stride 1) -> ReLU -> block(stride 2 where the
    block supports it) -> global avg-pool -> flatten -> Linear``. Conv dimensionality
    follows the block (see :func:`tiny_net_example_input` for a matching input). Blocks
    that support it also change channels in the second block (``C -> 2C``);
    ``FiveBranchConcatBlock`` goes ``C -> 2C -> 3C``.
    """
    factory, nd, flexible = _lookup(block_name)
    c = channels
    if block_name == "FiveBranchConcatBlock":
        c1, c2 = 2 * c, 3 * c
    elif flexible:
        c1, c2 = c, 2 * c
    else:
        c1, c2 = c, c
    stride2 = 2 if flexible else 1
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[nd]
    return nn.Sequential(
        _CONV[nd](3, c, 3, padding=1, bias=False),
        _BN[nd](c),
        nn.ReLU(),
        factory(c, c1, 1, False),
        nn.ReLU(),
        factory(c1, c2, stride2, False),
        pool(1),
        nn.Flatten(),
        nn.Linear(c2, num_classes),
    )


def tiny_net_example_input(block_name: str, batch: int = 1, seed: int = 0) -> Tensor:
    """Deterministic input for :func:`tiny_net`.

    Shape ``[B,3,32]``, ``[B,3,32,32]`` or ``[B,3,16,16,16]`` by the block's dimensionality.
    """
    spatial = {1: (32,), 2: (32, 32), 3: (16, 16, 16)}[block_ndim(block_name)]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 3, *spatial), generator=gen)
