"""YOLOv9's GELAN blocks, written the way WongKinYiu/yolov9 writes them.

Sources read: ``models/common.py`` (``Conv``, ``RepConvN``, ``RepNBottleneck``, ``RepNCSP``,
``RepNCSPELAN4``, ``ELAN1``, ``AConv``, ``SPPELAN``), ``models/detect/gelan-t.yaml`` and
``models/yolo.py`` (``Model.fuse``). The code is this file's own. ultralytics carries the same
``Conv`` and the same blocks (``RepCSP``/``RepBottleneck``/``RepConv``).

What stops ``torch.fx``: ``y = list(self.cv1(x).chunk(2, 1))`` then
``y.extend(m(y[-1]) for m in [...])`` iterates a traced value. ``Conv.default_act`` and
``RepConvN.default_act`` are ONE ``SiLU`` object per class, shared by every instance: the same
module object sits at many paths of the model, and a traced scope calls it many times.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def autopad(k: int, p: int | None = None, d: int = 1) -> int:
    if d > 1:
        k = d * (k - 1) + 1
    return k // 2 if p is None else p


class Conv(nn.Module):
    default_act = nn.SiLU()  # one module object shared by every Conv

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None,
                 g: int = 1, d: int = 1, act: bool | nn.Module = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = (self.default_act if act is True
                    else act if isinstance(act, nn.Module) else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))


@torch.no_grad()
def fuse_conv_and_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """The frameworks' conv+BN fold: diag(gamma/std) @ W and the matching bias, in float32."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True).requires_grad_(False)
    w_conv = conv.weight.view(conv.out_channels, -1)
    w_bn = torch.diag(bn.weight.div(torch.sqrt(bn.eps + bn.running_var)))
    fused.weight.copy_(torch.mm(w_bn, w_conv).view(fused.weight.shape))
    b_conv = torch.zeros(conv.weight.shape[0]) if conv.bias is None else conv.bias
    b_bn = bn.bias - bn.weight.mul(bn.running_mean).div(torch.sqrt(bn.running_var + bn.eps))
    fused.bias.copy_(torch.mm(w_bn, b_conv.reshape(-1, 1)).reshape(-1) + b_bn)
    return fused


# ------------------------------------------------------------------ YOLOv9 GELAN


class RepConvN(nn.Module):
    default_act = nn.SiLU()  # shared, like Conv's

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, p: int = 1, g: int = 1,
                 act: bool = True) -> None:
        super().__init__()
        assert k == 3 and p == 1
        self.g, self.c1, self.c2 = g, c1, c2
        self.act = self.default_act if act is True else nn.Identity()
        self.bn = None  # yolov9 never builds the identity branch
        self.conv1 = Conv(c1, c2, k, s, p=p, g=g, act=False)
        self.conv2 = Conv(c1, c2, 1, s, p=(p - k // 2), g=g, act=False)

    def forward_fuse(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))

    def forward(self, x: Tensor) -> Tensor:
        id_out = 0 if self.bn is None else self.bn(x)
        return self.act(self.conv1(x) + self.conv2(x) + id_out)

    @staticmethod
    def _fuse_bn_tensor(branch: Conv) -> tuple[Tensor, Tensor]:
        bn = branch.bn
        std = (bn.running_var + bn.eps).sqrt()
        return (branch.conv.weight * (bn.weight / std).reshape(-1, 1, 1, 1),
                bn.bias - bn.running_mean * bn.weight / std)

    def fuse_convs(self) -> None:
        if hasattr(self, "conv"):
            return
        k3, b3 = self._fuse_bn_tensor(self.conv1)
        k1, b1 = self._fuse_bn_tensor(self.conv2)
        c = self.conv1.conv
        self.conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
                              c.dilation, c.groups, bias=True).requires_grad_(False)
        self.conv.weight.data = k3 + F.pad(k1, [1, 1, 1, 1])
        self.conv.bias.data = b3 + b1
        for param in self.parameters():
            param.detach_()
        del self.conv1, self.conv2, self.bn


class RepNBottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1,
                 k: tuple[int, int] = (3, 3), e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = RepConvN(c1, c_, k[0], 1)
        self.cv2 = Conv(c_, c2, k[1], 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: Tensor) -> Tensor:
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class RepNCSP(nn.Module):
    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1,
                 e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(RepNBottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class RepNCSPELAN4(nn.Module):
    def __init__(self, c1: int, c2: int, c3: int, c4: int, c5: int = 1) -> None:
        super().__init__()
        self.c = c3 // 2
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = nn.Sequential(RepNCSP(c3 // 2, c4, c5), Conv(c4, c4, 3, 1))
        self.cv3 = nn.Sequential(RepNCSP(c4, c4, c5), Conv(c4, c4, 3, 1))
        self.cv4 = Conv(c3 + (2 * c4), c2, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend((m(y[-1])) for m in [self.cv2, self.cv3])
        return self.cv4(torch.cat(y, 1))


class AConv(nn.Module):
    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.cv1 = Conv(c1, c2, 3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.avg_pool2d(x, 2, 1, 0, False, True)
        return self.cv1(x)


class SP(nn.Module):
    def __init__(self, k: int = 3, s: int = 1) -> None:
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=s, padding=k // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.m(x)


class SPPELAN(nn.Module):
    def __init__(self, c1: int, c2: int, c3: int) -> None:
        super().__init__()
        self.c = c3
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2, self.cv3, self.cv4 = SP(5), SP(5), SP(5)
        self.cv5 = Conv(4 * c3, c2, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = [self.cv1(x)]
        y.extend(m(y[-1]) for m in [self.cv2, self.cv3, self.cv4])
        return self.cv5(torch.cat(y, 1))


class ELAN1(nn.Module):
    def __init__(self, c1: int, c2: int, c3: int, c4: int) -> None:
        super().__init__()
        self.c = c3 // 2
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = Conv(c3 // 2, c4, 3, 1)
        self.cv3 = Conv(c4, c4, 3, 1)
        self.cv4 = Conv(c3 + (2 * c4), c2, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in [self.cv2, self.cv3])
        return self.cv4(torch.cat(y, 1))


class GELANNet(nn.Module):
    """gelan-t's backbone (yolov9's ``models/detect/gelan-t.yaml``, layers 0-6, widths as there)
    and its SPPELAN: each RepNCSPELAN4 holds two RepNCSPs of THREE RepNBottlenecks."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(
            Conv(3, 16, 3, 2), Conv(16, 32, 3, 2), ELAN1(32, 32, 32, 16),
            AConv(32, 64), RepNCSPELAN4(64, 64, 64, 32, 3),
            AConv(64, 96), RepNCSPELAN4(96, 96, 96, 48, 3), SPPELAN(96, 64, 32))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


@torch.no_grad()
def yolov9_fuse(model: nn.Module) -> nn.Module:
    """yolov9's ``Model.fuse``: each RepConvN merged, each Conv's BN folded, and the fused
    modules' ``forward`` set to ``forward_fuse``."""
    for m in model.modules():
        if isinstance(m, RepConvN):
            m.fuse_convs()
            m.forward = m.forward_fuse
        if isinstance(m, Conv) and hasattr(m, "bn"):
            m.conv = fuse_conv_and_bn(m.conv, m.bn)
            delattr(m, "bn")
            m.forward = m.forward_fuse
    return model.eval()
