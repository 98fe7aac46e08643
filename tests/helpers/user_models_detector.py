"""A small YOLO-style detector, written the way the ultralytics framework writes one.

No repconv awareness: the root's forward routes every layer through plain attributes the model
builder sets on each layer (``f`` from-index, ``i`` index, ``type``, ``np``), layers take a
tensor or a list of tensors, ``C2f`` splits with ``list(...chunk(2, 1))`` (fx cannot iterate a
proxy, so neither ``C2f`` nor the root traces), ``RepConv`` sums a 3x3 conv-BN, a 1x1 conv-BN and
an optional identity BN, and ``Detect`` loops over levels, caches anchors in plain attributes
keyed on the input shape (a data-dependent comparison fx cannot trace) and returns ``(y, x)``
in eval mode. ``Conv.default_act`` is one SiLU shared by every ``Conv``, as in ultralytics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def autopad(k: int, p: int | None = None, d: int = 1) -> int:
    """'same' padding."""
    if d > 1:
        k = d * (k - 1) + 1
    return k // 2 if p is None else p


class Conv(nn.Module):
    default_act = nn.SiLU()

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


class Bottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1,
                 k: tuple[int, int] = (3, 3), e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, k[0], 1)
        self.cv2 = Conv(c_, c2, k[1], 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: Tensor) -> Tensor:
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, g: int = 1,
                 e: float = 0.5) -> None:
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut, g, k=(3, 3), e=1.0)
                               for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class RepConv(nn.Module):
    default_act = nn.SiLU()

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, p: int = 1, g: int = 1,
                 d: int = 1, act: bool = True, bn: bool = False) -> None:
        super().__init__()
        assert k == 3 and p == 1
        self.g, self.c1, self.c2 = g, c1, c2
        self.act = self.default_act if act is True else nn.Identity()
        self.bn = nn.BatchNorm2d(num_features=c1) if bn and c2 == c1 and s == 1 else None
        self.conv1 = Conv(c1, c2, k, s, p=p, g=g, act=False)
        self.conv2 = Conv(c1, c2, 1, s, p=(p - k // 2), g=g, act=False)

    def forward(self, x: Tensor) -> Tensor:
        id_out = 0 if self.bn is None else self.bn(x)
        return self.act(self.conv1(x) + self.conv2(x) + id_out)


class Concat(nn.Module):
    def __init__(self, dimension: int = 1) -> None:
        super().__init__()
        self.d = dimension

    def forward(self, x: list[Tensor]) -> Tensor:
        return torch.cat(x, self.d)


class DFL(nn.Module):
    """Distribution focal loss integral: a fixed 1x1 conv after a softmax."""

    def __init__(self, c1: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        x = torch.arange(c1, dtype=torch.float)
        self.conv.weight.data[:] = nn.Parameter(x.view(1, c1, 1, 1))
        self.c1 = c1

    def forward(self, x: Tensor) -> Tensor:
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


def make_anchors(feats: list[Tensor], strides: Tensor,
                 offset: float = 0.5) -> tuple[Tensor, Tensor]:
    anchor_points, stride_tensor = [], []
    dtype, device = feats[0].dtype, feats[0].device
    for i, stride in enumerate(strides):
        _, _, h, w = feats[i].shape
        sx = torch.arange(end=w, device=device, dtype=dtype) + offset
        sy = torch.arange(end=h, device=device, dtype=dtype) + offset
        sy, sx = torch.meshgrid(sy, sx, indexing="ij")
        anchor_points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_tensor.append(torch.full((h * w, 1), float(stride), dtype=dtype, device=device))
    return torch.cat(anchor_points), torch.cat(stride_tensor)


def dist2bbox(distance: Tensor, anchor_points: Tensor, xywh: bool = True,
              dim: int = -1) -> Tensor:
    lt, rb = distance.chunk(2, dim)
    x1y1 = anchor_points - lt
    x2y2 = anchor_points + rb
    if xywh:
        return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), dim)
    return torch.cat((x1y1, x2y2), dim)


class Detect(nn.Module):
    dynamic = False
    export = False
    shape = None
    anchors = torch.empty(0)
    strides = torch.empty(0)

    def __init__(self, nc: int = 80, ch: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.nc = nc
        self.nl = len(ch)
        self.reg_max = 4
        self.no = nc + self.reg_max * 4
        self.stride = torch.zeros(self.nl)  # set by the model builder
        c2, c3 = max((16, ch[0] // 4, self.reg_max * 4)), max(16, min(self.nc, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * self.reg_max, 1))
            for x in ch)
        self.cv3 = nn.ModuleList(
            nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, self.nc, 1)) for x in ch)
        self.dfl = DFL(self.reg_max) if self.reg_max > 1 else nn.Identity()

    def forward(self, x: list[Tensor]) -> Any:
        for i in range(self.nl):
            x[i] = torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1)
        if self.training:
            return x
        y = self._inference(x)
        return y if self.export else (y, x)

    def _inference(self, x: list[Tensor]) -> Tensor:
        shape = x[0].shape  # BCHW
        x_cat = torch.cat([xi.view(shape[0], self.no, -1) for xi in x], 2)
        if self.dynamic or self.shape != shape:
            self.anchors, self.strides = (t.transpose(0, 1)
                                          for t in make_anchors(x, self.stride, 0.5))
            self.shape = shape
        box, cls = x_cat.split((self.reg_max * 4, self.nc), 1)
        dbox = dist2bbox(self.dfl(box), self.anchors.unsqueeze(0), xywh=True, dim=1)
        return torch.cat((dbox * self.strides, cls.sigmoid()), 1)


# (from, module, args, kwargs): a yolov8n-like layout, narrowed
LAYOUT: list[tuple[int | list[int], type[nn.Module], tuple, dict]] = [
    (-1, Conv, (3, 16, 3, 2), {}),  # 0 P1/2
    (-1, Conv, (16, 32, 3, 2), {}),  # 1 P2/4
    (-1, C2f, (32, 32, 1, True), {}),  # 2
    (-1, Conv, (32, 48, 3, 2), {}),  # 3 P3/8
    (-1, RepConv, (48, 48), {"bn": True}),  # 4 (identity BN)
    (-1, Conv, (48, 64, 3, 2), {}),  # 5 P4/16
    (-1, C2f, (64, 64, 1, True), {}),  # 6
    (-1, Conv, (64, 64, 3, 2), {}),  # 7 P5/32
    (-1, RepConv, (64, 64), {}),  # 8 (no identity)
    (-1, nn.Upsample, (None, 2, "nearest"), {}),  # 9
    ([-1, 6], Concat, (1,), {}),  # 10
    (-1, C2f, (128, 64, 1, False), {}),  # 11
    ([4, 11, 8], Detect, (3, (48, 64, 64)), {}),  # 12
]
REPCONV_LAYERS = (4, 8)


class DetectionModel(nn.Module):
    def __init__(self, nc: int = 3) -> None:
        super().__init__()
        layers, save = [], []
        for i, (f, module, args, kwargs) in enumerate(LAYOUT):
            m_ = module(*args, **kwargs)
            t = f"{module.__module__}.{module.__name__}".replace("__main__.", "")
            m_.np = sum(x.numel() for x in m_.parameters())
            m_.i, m_.f, m_.type = i, f, t
            save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
            layers.append(m_)
        self.model = nn.Sequential(*layers)
        self.save = sorted(save)
        self.yaml = {"nc": nc, "scale": "n", "depth_multiple": 0.33}
        self.names = {i: f"class{i}" for i in range(nc)}
        self.stride = torch.tensor([8.0, 16.0, 32.0])
        self.model[-1].stride = self.stride
        self.inplace = True

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(x, dict):  # training batch
            raise NotImplementedError("loss")
        return self.predict(x, *args, **kwargs)

    def predict(self, x: Tensor, profile: bool = False, visualize: bool = False) -> Any:
        return self._predict_once(x, profile, visualize)

    def _predict_once(self, x: Tensor, profile: bool = False, visualize: bool = False) -> Any:
        y = []
        for m in self.model:
            if m.f != -1:  # not from the previous layer
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x

    def is_fused(self, thresh: int = 10) -> bool:
        bn = tuple(v for k, v in nn.__dict__.items() if "Norm" in k)
        return sum(isinstance(v, bn) for v in self.modules()) < thresh
