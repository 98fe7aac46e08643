"""A YOLOv10-style end-to-end detector, written the way ultralytics writes it.

Sources read: ultralytics ``nn/modules/head.py`` (``Detect`` with ``forward_end2end`` and
``v10Detect`` of the 8.3 releases, and the current ``Detect``), ``nn/modules/block.py``
(``SCDown``, ``DFL``), ``utils/tal.py`` (``make_anchors``, ``dist2bbox``), ``nn/tasks.py``
(``BaseModel.fuse``, ``DetectionModel._predict_once``) and ``engine/exporter.py`` (what it sets on
the head). The code is this file's own; ``Conv`` is the same as yolov9's.

What stops ``torch.fx``: traced from the root, the head's anchor cache on ``self`` under
``if self.dynamic or self.shape != shape`` (a branch on a traced shape); traced alone, its list
input is one Proxy that ``[xi.detach() for xi in x]`` cannot iterate. The exporter runs the
model's ``fuse()`` and then sets ``export``, ``max_det``, ``dynamic`` and ``format`` on the head.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from helpers.third_party_yolo import Conv, fuse_conv_and_bn


class SCDown(nn.Module):
    def __init__(self, c1: int, c2: int, k: int, s: int) -> None:
        super().__init__()
        self.cv1 = Conv(c1, c2, 1, 1)
        self.cv2 = Conv(c2, c2, k=k, s=s, g=c2, act=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv2(self.cv1(x))


class DFL(nn.Module):
    def __init__(self, c1: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x: Tensor) -> Tensor:
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


def make_anchors(feats: list[Tensor], strides: Tensor,
                 offset: float = 0.5) -> tuple[Tensor, Tensor]:
    anchor_points, stride_tensor = [], []
    dtype, device = feats[0].dtype, feats[0].device
    for i, stride in enumerate(strides):
        h, w = feats[i].shape[2:]
        sx = torch.arange(end=w, device=device, dtype=dtype) + offset
        sy = torch.arange(end=h, device=device, dtype=dtype) + offset
        sy, sx = torch.meshgrid(sy, sx, indexing="ij")
        anchor_points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_tensor.append(torch.full((h * w, 1), stride, dtype=dtype, device=device))
    return torch.cat(anchor_points), torch.cat(stride_tensor)


def dist2bbox(distance: Tensor, anchor_points: Tensor, xywh: bool = True,
              dim: int = -1) -> Tensor:
    lt, rb = distance.chunk(2, dim)
    x1y1, x2y2 = anchor_points - lt, anchor_points + rb
    if xywh:
        return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), dim)
    return torch.cat((x1y1, x2y2), dim)


class V10Detect(nn.Module):
    """ultralytics 8.3 ``Detect`` with ``end2end = True`` and v10Detect's light class head.

    Eval forward (``forward_end2end``): the one-to-one branch runs on DETACHED copies of the
    inputs, then the one-to-many branch (``cv2``/``cv3``) overwrites the caller's list in place
    (``x[i] = ...``). Only ``one2one`` feeds the decoded, top-k post-processed detections ``y``
    (anchors cached on ``self`` under ``if self.dynamic or self.shape != shape``). Returned:
    ``y`` when ``self.export`` (the exporter sets it) -- the one-to-many branch is computed and
    DISCARDED -- else ``(y, {"one2many": x, "one2one": one2one})``: the raw one-to-many maps ARE
    returned, in the auxiliary dict. ``fuse()`` (called by the framework's model ``fuse()``)
    replaces ``cv2`` and ``cv3`` by ``nn.Identity`` lists: what ``y`` needs stays the same, but
    in non-export mode the returned "one2many" maps become ``cat(x, x)`` of the input features,
    not the head's. The framework's deploy form is equal to training only in ``y`` and
    "one2one". (Current ultralytics, the YOLO26-era ``Detect``: same contract; its ``fuse()``
    sets ``cv2 = cv3 = None`` and "one2many" becomes an empty dict.)"""

    dynamic = False
    export = False
    end2end = True
    max_det = 300
    shape = None
    anchors = torch.empty(0)
    strides = torch.empty(0)

    def __init__(self, nc: int = 80, ch: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.nc, self.nl, self.reg_max = nc, len(ch), 16
        self.no = nc + self.reg_max * 4
        self.stride = torch.zeros(self.nl)
        c2, c3 = max((16, ch[0] // 4, self.reg_max * 4)), max(ch[0], min(self.nc, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * self.reg_max, 1))
            for x in ch)
        self.cv3 = nn.ModuleList(
            nn.Sequential(nn.Sequential(Conv(x, x, 3, g=x), Conv(x, c3, 1)),
                          nn.Sequential(Conv(c3, c3, 3, g=c3), Conv(c3, c3, 1)),
                          nn.Conv2d(c3, self.nc, 1))
            for x in ch)
        self.dfl = DFL(self.reg_max)
        self.one2one_cv2 = copy.deepcopy(self.cv2)
        self.one2one_cv3 = copy.deepcopy(self.cv3)

    def forward(self, x: list[Tensor]) -> Any:
        x_detach = [xi.detach() for xi in x]
        one2one = [torch.cat((self.one2one_cv2[i](x_detach[i]), self.one2one_cv3[i](x_detach[i])),
                             1) for i in range(self.nl)]
        for i in range(self.nl):
            x[i] = torch.cat((self.cv2[i](x[i]), self.cv3[i](x[i])), 1)
        if self.training:
            return {"one2many": x, "one2one": one2one}
        y = self._inference(one2one)
        y = self.postprocess(y.permute(0, 2, 1), self.max_det, self.nc)
        return y if self.export else (y, {"one2many": x, "one2one": one2one})

    def _inference(self, x: list[Tensor]) -> Tensor:
        shape = x[0].shape  # BCHW
        x_cat = torch.cat([xi.view(shape[0], self.no, -1) for xi in x], 2)
        if self.dynamic or self.shape != shape:
            self.anchors, self.strides = (a.transpose(0, 1)
                                          for a in make_anchors(x, self.stride, 0.5))
            self.shape = shape
        box, cls = x_cat.split((self.reg_max * 4, self.nc), 1)
        # end-to-end: boxes stay xyxy
        dbox = dist2bbox(self.dfl(box), self.anchors.unsqueeze(0), xywh=False, dim=1)
        return torch.cat((dbox * self.strides, cls.sigmoid()), 1)

    def bias_init(self) -> None:
        """Box biases 1.0, class biases log(5 / nc / (640 / stride)^2): few objects per image."""
        for box_heads, cls_heads in ((self.cv2, self.cv3), (self.one2one_cv2, self.one2one_cv3)):
            for a, b, s in zip(box_heads, cls_heads, self.stride):
                a[-1].bias.data[:] = 1.0
                b[-1].bias.data[: self.nc] = math.log(5 / self.nc / (640 / s) ** 2)

    @staticmethod
    def postprocess(preds: Tensor, max_det: int, nc: int = 80) -> Tensor:
        batch_size, anchors, _ = preds.shape
        boxes, scores = preds.split([4, nc], dim=-1)
        index = scores.amax(dim=-1).topk(min(max_det, anchors))[1].unsqueeze(-1)
        boxes = boxes.gather(dim=1, index=index.repeat(1, 1, 4))
        scores = scores.gather(dim=1, index=index.repeat(1, 1, nc))
        scores, index = scores.flatten(1).topk(min(max_det, anchors))
        i = torch.arange(batch_size)[..., None]
        return torch.cat([boxes[i, index // nc], scores[..., None],
                          (index % nc)[..., None].float()], dim=-1)

    def fuse(self) -> None:
        """v10Detect.fuse: remove the one-to-many head."""
        self.cv2 = self.cv3 = nn.ModuleList([nn.Identity()] * self.nl)


# (from, module, args): a yolov10n-like backbone, narrowed, feeding the end-to-end head
V10_LAYOUT: list[tuple[int | list[int], type[nn.Module], tuple]] = [
    (-1, Conv, (3, 16, 3, 2)),  # 0 P1/2
    (-1, Conv, (16, 32, 3, 2)),  # 1 P2/4
    (-1, Conv, (32, 48, 3, 2)),  # 2 P3/8
    (-1, SCDown, (48, 64, 3, 2)),  # 3 P4/16
    (-1, SCDown, (64, 96, 3, 2)),  # 4 P5/32
    ([2, 3, 4], V10Detect, (4, (48, 64, 96))),  # 5
]


class DetectionModel(nn.Module):
    """ultralytics' layer routing: each layer carries ``f`` (from) and ``i`` (index)."""

    def __init__(self, layout: list[tuple[int | list[int], type[nn.Module], tuple]],
                 export: bool = True, max_det: int = 300) -> None:
        super().__init__()
        layers, save = [], []
        for i, (f, module, args) in enumerate(layout):
            m_ = module(*args)
            m_.i, m_.f = i, f
            save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
            layers.append(m_)
        self.model = nn.Sequential(*layers)
        self.save = sorted(save)
        self.stride = torch.tensor([8.0, 16.0, 32.0])
        self.model[-1].stride = self.stride
        self.model[-1].bias_init()
        if export:  # what the exporter sets on the head
            self.model[-1].export = True
            self.model[-1].max_det = max_det

    def forward(self, x: Tensor) -> Any:
        y: list[Tensor | None] = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x


def v10_detector(export: bool = True, max_det: int = 20) -> DetectionModel:
    """As exported: ``export`` and ``max_det`` set on the head. 20 detections, not 300: on random
    weights the low-score tail holds exact ties, and top-k orders tied scores arbitrarily."""
    return DetectionModel(V10_LAYOUT, export=export, max_det=max_det)


@torch.no_grad()
def ultralytics_fuse(model: nn.Module) -> nn.Module:
    """ultralytics' ``BaseModel.fuse`` on this model: each Conv's BN folded with
    ``forward = forward_fuse``, and ``v10Detect.fuse()``: the one-to-many head removed."""
    for m in model.modules():
        if isinstance(m, Conv) and hasattr(m, "bn"):
            m.conv = fuse_conv_and_bn(m.conv, m.bn)
            delattr(m, "bn")
            m.forward = m.forward_fuse
        if isinstance(m, V10Detect):
            m.fuse()
    return model.eval()
