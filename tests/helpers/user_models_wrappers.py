"""Models whose *callers* matter: HuggingFace-style wrappers that call a backbone with keyword
flags and get an ``OrderedDict``-subclass output back, and a timm-like classifier whose root
methods (``forward_features``, ``forward_head``, ``reset_classifier``) and plain attributes users
rely on. Written without repconv awareness; see ``reference_blocks.randomize_bn``.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

# ------------------------------------------------------------------ 6. HF-style backbone wrapper


class ModelOutput(OrderedDict):
    """transformers.utils.ModelOutput, trimmed: a dataclass whose set fields are also keys."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                self[f.name] = value

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, str):
            return dict(self.items())[k]
        return self.to_tuple()[k]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self[k] for k in self.keys())


@dataclasses.dataclass
class BackboneOutput(ModelOutput):
    last_hidden_state: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None


class HFConvLayer(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1,
                 activation: bool = True) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.normalization = nn.BatchNorm2d(cout)
        self.activation = nn.ReLU() if activation else nn.Identity()

    def forward(self, input: Tensor) -> Tensor:
        return self.activation(self.normalization(self.convolution(input)))


class HFShortCut(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.normalization = nn.BatchNorm2d(cout)

    def forward(self, input: Tensor) -> Tensor:
        return self.normalization(self.convolution(input))


class HFBasicLayer(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        shortcut = cin != cout or stride != 1
        self.shortcut = HFShortCut(cin, cout, stride) if shortcut else nn.Identity()
        self.layer = nn.Sequential(HFConvLayer(cin, cout, stride=stride),
                                   HFConvLayer(cout, cout, activation=False))
        self.activation = nn.ReLU()

    def forward(self, hidden_state: Tensor) -> Tensor:
        residual = hidden_state
        hidden_state = self.layer(hidden_state)
        residual = self.shortcut(residual)
        hidden_state += residual
        return self.activation(hidden_state)


class HFBackbone(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.embedder = nn.Sequential(HFConvLayer(3, c, 3, stride=2), nn.MaxPool2d(3, 2, 1))
        self.stages = nn.ModuleList([HFBasicLayer(c, c), HFBasicLayer(c, 2 * c, stride=2)])
        self.num_features = 2 * c

    def forward(self, pixel_values: Tensor, output_hidden_states: bool = False,
                return_dict: bool = True) -> Any:
        hidden_states = () if output_hidden_states else None
        x = self.embedder(pixel_values)
        for stage in self.stages:
            if output_hidden_states:
                hidden_states = (*hidden_states, x)
            x = stage(x)
        if output_hidden_states:
            hidden_states = (*hidden_states, x)
        if not return_dict:
            return tuple(v for v in (x, hidden_states) if v is not None)
        return BackboneOutput(last_hidden_state=x, hidden_states=hidden_states)


class BackboneClassifier(nn.Module):
    def __init__(self, num_labels: int = 10) -> None:
        super().__init__()
        self.backbone = HFBackbone()
        self.head = nn.Linear(self.backbone.num_features, num_labels)

    def forward(self, pixel_values: Tensor) -> Tensor:
        out = self.backbone(pixel_values, output_hidden_states=True, return_dict=True)
        return self.head(out.last_hidden_state.mean((2, 3)))


class ModalClassifier(BackboneClassifier):
    """Branches on a non-tensor argument of its own forward: fx cannot trace the root."""

    def forward(self, x: Tensor, mode: str = "logits") -> Any:  # type: ignore[override]
        out = self.backbone(x, output_hidden_states=mode == "features", return_dict=True)
        if mode == "features":
            return out.hidden_states
        logits = self.head(out.last_hidden_state.mean((2, 3)))
        return logits.softmax(-1) if mode == "probs" else logits


# ------------------------------------------------------------------ 7. timm-like classifier


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.drop_block = nn.Identity()
        self.act1 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                         nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.act1(self.drop_block(self.bn1(self.conv1(x))))
        x = self.bn2(self.conv2(self.aa(x)))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act2(x)


class TimmLikeResNet(nn.Module):
    def __init__(self, num_classes: int = 10, c: int = 16) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = 0.0
        self.grad_checkpointing = False
        self.pretrained_cfg = {"url": "", "num_classes": num_classes, "input_size": (3, 64, 64),
                               "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                               "first_conv": "conv1", "classifier": "fc"}
        self.feature_info = [{"num_chs": c, "reduction": 2, "module": "act1"}]
        self.conv1 = nn.Conv2d(3, c, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(c, c), BasicBlock(c, c))
        self.layer2 = nn.Sequential(BasicBlock(c, 2 * c, 2), BasicBlock(2 * c, 2 * c))
        self.num_features = 2 * c
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return self.layer2(self.layer1(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.flatten(self.global_pool(x))
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
