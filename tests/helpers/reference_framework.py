"""A detector framework's model handling, written the way such frameworks write it (YOLOv5/v7
style), with no repconv awareness: a ``fuse()`` that walks every module and folds ``m.bn``
into ``m.conv`` wherever ``hasattr(m, "bn")``, an ``attempt_load`` that upcasts the EMA and
fuses it (``ckpt['ema'].float().fuse().eval()``), and an EMA that deep-copies the model and
averages its state_dict. A deploy file must survive all of it (issue 16).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn


def fuse_conv_and_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new conv computing ``bn(conv(x))``, through a diagonal matrix as frameworks do."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True).requires_grad_(False)
    fused = fused.to(conv.weight.device)
    w_conv = conv.weight.clone().view(conv.out_channels, -1)
    w_bn = torch.diag(bn.weight.div(torch.sqrt(bn.eps + bn.running_var)))
    fused.weight.copy_(torch.mm(w_bn, w_conv).view(fused.weight.shape))
    b_conv = (torch.zeros(conv.weight.size(0), device=conv.weight.device) if conv.bias is None
              else conv.bias)
    b_bn = bn.bias - bn.weight.mul(bn.running_mean).div(torch.sqrt(bn.running_var + bn.eps))
    fused.bias.copy_(torch.mm(w_bn, b_conv.reshape(-1, 1)).reshape(-1) + b_bn)
    return fused


def fuse(model: nn.Module) -> nn.Module:
    """Fold every ``m.bn`` into ``m.conv``; a layer with ``forward_fuse`` switches to it."""
    for m in model.modules():
        conv, bn = getattr(m, "conv", None), getattr(m, "bn", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            m.conv = fuse_conv_and_bn(conv, bn)
            delattr(m, "bn")
            if hasattr(m, "forward_fuse"):
                m.forward = m.forward_fuse
    return model


def attempt_load(path: Path) -> nn.Module:
    """The framework's loader: the EMA (else the model) upcast, fused, in eval mode."""
    ckpt: Any = torch.load(path, map_location="cpu", weights_only=False)
    model = (ckpt.get("ema") or ckpt["model"]) if isinstance(ckpt, dict) else ckpt
    model = model.float()
    model = model.fuse() if callable(getattr(model, "fuse", None)) else fuse(model)
    return model.eval()


class ModelEMA:
    """The exponential moving average of a model's weights, kept in a deep copy."""

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        self.ema = copy.deepcopy(model).eval()
        self.updates = 0
        self.decay = lambda x: decay * (1 - math.exp(-x / 2000))
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def update(self, model: nn.Module) -> None:
        with torch.no_grad():
            self.updates += 1
            d = self.decay(self.updates)
            state = model.state_dict()
            for k, v in self.ema.state_dict().items():
                if v.dtype.is_floating_point:
                    v *= d
                    v += (1 - d) * state[k].detach()
