"""A YOLOv7-style detector with RepConv and an IDetect head, written the way WongKinYiu/yolov7 does.

Sources read: ``models/common.py`` (``Conv``, ``RepConv`` with ``fuse_repvgg_block``,
``ImplicitA``, ``ImplicitM``) and ``models/yolo.py`` (``IDetect`` with ``fuse``/``fuseforward``,
``Model.forward_once`` and ``Model.fuse``). The code is this file's own.

What stops ``torch.fx`` in ``IDetect.forward`` (eval): ``self.training |= self.export``; a grid
cached per level in a plain list under ``if self.grid[i].shape[2:4] != x[i].shape[2:4]``; and
in-place slice writes into the sigmoid output, ``y[..., 0:2] = (y[..., 0:2] * 2. - 0.5 +
grid) * stride``. ``ImplicitA`` adds a learnt per-channel vector BEFORE each output conv
(``m(x + a)``), ``ImplicitM`` scales its output per channel (``m(x) * m_``); the authors'
``IDetect.fuse`` folds both into the conv: ``b += W @ a``, then ``W *= m_``, ``b *= m_``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from helpers.third_party_yolo import autopad, fuse_conv_and_bn


class Conv(nn.Module):
    """yolov7's Conv: its own SiLU per instance (unlike ultralytics' shared one)."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None,
                 g: int = 1, act: bool | nn.Module = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU() if act is True else (act if isinstance(act, nn.Module)
                                                   else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))

    def fuseforward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))


class RepConv(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, p: int | None = None,
                 g: int = 1, act: bool = True) -> None:
        super().__init__()
        self.deploy, self.groups = False, g
        self.in_channels, self.out_channels = c1, c2
        assert k == 3 and autopad(k, p) == 1
        padding_11 = autopad(k, p) - k // 2
        self.act = nn.SiLU() if act is True else nn.Identity()
        self.rbr_identity = nn.BatchNorm2d(c1) if c2 == c1 and s == 1 else None
        self.rbr_dense = nn.Sequential(nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g,
                                                 bias=False), nn.BatchNorm2d(c2))
        self.rbr_1x1 = nn.Sequential(nn.Conv2d(c1, c2, 1, s, padding_11, groups=g, bias=False),
                                     nn.BatchNorm2d(c2))

    def forward(self, inputs: Tensor) -> Tensor:
        if hasattr(self, "rbr_reparam"):
            return self.act(self.rbr_reparam(inputs))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.act(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)

    @staticmethod
    def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
        std = (bn.running_var + bn.eps).sqrt()
        bias = bn.bias - bn.running_mean * bn.weight / std
        weights = conv.weight * (bn.weight / std).reshape(-1, 1, 1, 1)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          conv.padding, conv.dilation, conv.groups, bias=True,
                          padding_mode=conv.padding_mode)
        fused.weight = nn.Parameter(weights)
        fused.bias = nn.Parameter(bias)
        return fused

    def fuse_repvgg_block(self) -> None:
        if self.deploy:
            return
        self.rbr_dense = self.fuse_conv_bn(self.rbr_dense[0], self.rbr_dense[1])
        self.rbr_1x1 = self.fuse_conv_bn(self.rbr_1x1[0], self.rbr_1x1[1])
        weight_1x1 = nn.functional.pad(self.rbr_1x1.weight, [1, 1, 1, 1])
        if isinstance(self.rbr_identity, nn.BatchNorm2d):
            identity = nn.Conv2d(self.in_channels, self.out_channels, 1, 1, 0, groups=self.groups,
                                 bias=False)
            identity.weight.data = torch.eye(self.in_channels)[:, :, None, None]
            identity = self.fuse_conv_bn(identity, self.rbr_identity)
            bias_identity, weight_identity = identity.bias, nn.functional.pad(identity.weight,
                                                                              [1, 1, 1, 1])
        else:
            bias_identity = torch.zeros_like(self.rbr_1x1.bias)
            weight_identity = torch.zeros_like(weight_1x1)
        self.rbr_dense.weight = nn.Parameter(self.rbr_dense.weight + weight_1x1 + weight_identity)
        self.rbr_dense.bias = nn.Parameter(self.rbr_dense.bias + self.rbr_1x1.bias
                                           + bias_identity)
        self.rbr_reparam = self.rbr_dense
        self.deploy = True
        del self.rbr_identity, self.rbr_1x1, self.rbr_dense
        self.rbr_identity = self.rbr_1x1 = self.rbr_dense = None


class ImplicitA(nn.Module):
    def __init__(self, channel: int) -> None:
        super().__init__()
        self.channel = channel
        self.implicit = nn.Parameter(torch.zeros(1, channel, 1, 1))
        nn.init.normal_(self.implicit, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.implicit + x


class ImplicitM(nn.Module):
    def __init__(self, channel: int) -> None:
        super().__init__()
        self.channel = channel
        self.implicit = nn.Parameter(torch.ones(1, channel, 1, 1))
        nn.init.normal_(self.implicit, mean=1.0, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.implicit * x


class IDetect(nn.Module):
    stride: Tensor | None = None
    export = False

    def __init__(self, nc: int = 80, anchors: tuple = (), ch: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.nc, self.no = nc, nc + 5
        self.nl, self.na = len(anchors), len(anchors[0]) // 2
        self.grid = [torch.zeros(1)] * self.nl
        a = torch.tensor(anchors).float().view(self.nl, -1, 2)
        self.register_buffer("anchors", a)
        self.register_buffer("anchor_grid", a.clone().view(self.nl, 1, -1, 1, 1, 2))
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)
        self.ia = nn.ModuleList(ImplicitA(x) for x in ch)
        self.im = nn.ModuleList(ImplicitM(self.no * self.na) for _ in ch)

    def forward(self, x: list[Tensor]) -> Any:
        z = []
        self.training |= self.export
        for i in range(self.nl):
            x[i] = self.m[i](self.ia[i](x[i]))
            x[i] = self.im[i](x[i])
            self._decode(x, z, i)
        return x if self.training else (torch.cat(z, 1), x)

    def fuseforward(self, x: list[Tensor]) -> Any:
        z = []
        self.training |= self.export
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            self._decode(x, z, i)
        return x if self.training else (torch.cat(z, 1), x)

    def _decode(self, x: list[Tensor], z: list[Tensor], i: int) -> None:
        bs, _, ny, nx = x[i].shape
        x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
        if not self.training:
            if self.grid[i].shape[2:4] != x[i].shape[2:4]:
                self.grid[i] = self._make_grid(nx, ny).to(x[i].device)
            y = x[i].sigmoid()
            y[..., 0:2] = (y[..., 0:2] * 2.0 - 0.5 + self.grid[i]) * self.stride[i]
            y[..., 2:4] = (y[..., 2:4] * 2) ** 2 * self.anchor_grid[i]
            z.append(y.view(bs, -1, self.no))

    def fuse(self) -> None:
        """ImplicitA into the conv's bias (b += W a), then ImplicitM into weight and bias."""
        for i in range(len(self.m)):
            c1, c2, _, _ = self.m[i].weight.shape
            c1_, c2_, _, _ = self.ia[i].implicit.shape
            self.m[i].bias += torch.matmul(self.m[i].weight.reshape(c1, c2),
                                           self.ia[i].implicit.reshape(c2_, c1_)).squeeze(1)
        for i in range(len(self.m)):
            _, c2, _, _ = self.im[i].implicit.shape
            self.m[i].bias *= self.im[i].implicit.reshape(c2)
            self.m[i].weight *= self.im[i].implicit.transpose(0, 1)

    @staticmethod
    def _make_grid(nx: int = 20, ny: int = 20) -> Tensor:
        yv, xv = torch.meshgrid([torch.arange(ny), torch.arange(nx)], indexing="ij")
        return torch.stack((xv, yv), 2).view((1, 1, ny, nx, 2)).float()


ANCHORS = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))
# (from, module, args): yolov7's head end (RepConv per level, then IDetect) on a narrow backbone
V7_LAYOUT: list[tuple[int | list[int], type[nn.Module], tuple]] = [
    (-1, Conv, (3, 16, 3, 2)),  # 0 P1/2
    (-1, Conv, (16, 32, 3, 2)),  # 1 P2/4
    (-1, Conv, (32, 48, 3, 2)),  # 2 P3/8
    (-1, Conv, (48, 64, 3, 2)),  # 3 P4/16
    (-1, Conv, (64, 96, 3, 2)),  # 4 P5/32
    (2, RepConv, (48, 64)),  # 5
    (3, RepConv, (64, 64)),  # 6: identity branch
    (4, RepConv, (96, 128)),  # 7
    ([5, 6, 7], IDetect, (4, ANCHORS, (64, 64, 128))),  # 8
]


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers, save = [], []
        for i, (f, module, args) in enumerate(V7_LAYOUT):
            m_ = module(*args)
            m_.i, m_.f = i, f
            save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
            layers.append(m_)
        self.model = nn.Sequential(*layers)
        self.save = sorted(save)
        head = self.model[-1]
        head.stride = torch.tensor([8.0, 16.0, 32.0])
        head.anchors /= head.stride.view(-1, 1, 1)  # as the builder does; anchor_grid stays px
        self.stride = head.stride

    def forward(self, x: Tensor) -> Any:
        y: list[Tensor | None] = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x


def yolov7_idetect() -> Model:
    """Training form. The implicit vectors start near 0 and 1 in the repo; trained ones are not,
    so they get random values far from both here (from the global RNG: seed it first)."""
    model = Model()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ImplicitA):
                m.implicit.normal_(0.0, 0.5)
            elif isinstance(m, ImplicitM):
                m.implicit.uniform_(0.5, 1.5)
    return model


@torch.no_grad()
def yolov7_fuse(model: nn.Module) -> nn.Module:
    """yolov7's ``Model.fuse``: RepConv merged, plain Conv's BN folded, IDetect's implicits
    folded with ``forward = fuseforward``."""
    for m in model.modules():
        if isinstance(m, RepConv):
            m.fuse_repvgg_block()
        elif type(m) is Conv and hasattr(m, "bn"):
            m.conv = fuse_conv_and_bn(m.conv, m.bn)
            delattr(m, "bn")
            m.forward = m.fuseforward
        elif isinstance(m, IDetect):
            m.fuse()
            m.forward = m.fuseforward
    return model.eval()
