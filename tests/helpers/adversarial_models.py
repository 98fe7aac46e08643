"""Models on which fusing could silently give a wrong answer (issue 17), written as users write
them: hooks registered by a builder, a forward set on an instance, a branch input changed in
place through a view, masked logits, a child called with a flag computed from the input size,
legacy weight_norm, a root forward replaced by a closure, list and dict inputs.

Each builder is a ``--model helpers.adversarial_models:NAME`` target; ``checkpoint(NAME, path)``
saves the weights a fuse of it reads (BatchNorm statistics randomised)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import repconv
from helpers.reference_blocks import randomize_bn
from repconv.rewrite.plan import PLAN_VERSION

CLAMP = 0.5  # what the hooks clamp to: well inside the activations of random BN statistics


class ConvNet(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN: two conv-BN folds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn(self.conv(x)))))


def plain() -> nn.Module:
    return randomize_bn(ConvNet())


def bn_hook() -> nn.Module:
    """A forward hook on a BN clamping its output."""
    model = plain()
    model.bn.register_forward_hook(lambda _m, _args, out: out.clamp(-CLAMP, CLAMP))
    return model


def conv_pre_hook() -> nn.Module:
    """A forward pre-hook on a conv clamping its input."""
    model = plain()
    model.conv2.register_forward_pre_hook(lambda _m, args: (args[0].clamp(max=CLAMP),))
    return model


def conv_instance_forward() -> nn.Module:
    """``conv.forward`` replaced on the instance, by a closure over the module (its weights
    doubled)."""
    model = plain()
    conv = model.conv2
    conv.forward = lambda x: F.conv2d(x, conv.weight * 2, conv.bias, padding=1)
    return model


class TwoBranches(nn.Module):
    """Two conv-BN branches of the same input, summed: they merge into one conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.abn = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 4, 1)
        self.bbn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.abn(self.a(x)) + self.bbn(self.b(x))


class ChangedThroughView(TwoBranches):
    """Between the two branch reads, part of the input is clamped in place through a view."""

    def __init__(self, view: str) -> None:
        super().__init__()
        self.view = view

    def forward(self, x: Tensor) -> Tensor:
        y = self.abn(self.a(x))
        if self.view == "slice":
            x[:, :2].clamp_(-CLAMP, CLAMP)
        elif self.view == "narrow":
            x.narrow(1, 0, 2).clamp_(-CLAMP, CLAMP)
        else:
            x.view(-1)[:64].clamp_(-CLAMP, CLAMP)
        return y + self.bbn(self.b(x))


def two_branches() -> nn.Module:
    return randomize_bn(TwoBranches())


def through_slice() -> nn.Module:
    return randomize_bn(ChangedThroughView("slice"))


def through_narrow() -> nn.Module:
    return randomize_bn(ChangedThroughView("narrow"))


def through_view() -> nn.Module:
    return randomize_bn(ChangedThroughView("view"))


class MaskedLogits(nn.Module):
    """A classifier whose last 5 of 10 logits are masked with ``fill`` (-1e9, -inf)."""

    def __init__(self, fill: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)
        self.fill = fill

    def forward(self, x: Tensor) -> Tensor:
        features = F.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1).flatten(1)
        mask = torch.arange(10, device=x.device) >= 5
        return self.fc(features).masked_fill(mask, self.fill)


def masked_1e9() -> nn.Module:
    return randomize_bn(MaskedLogits(-1e9))


def masked_inf() -> nn.Module:
    return randomize_bn(MaskedLogits(float("-inf")))


class FlaggedBlock(nn.Module):
    """Two branches merged in its own forward (so fusing rewrites that forward), then a ReLU
    only when called with ``big``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.bn1 = nn.BatchNorm2d(4)

    def forward(self, x: Tensor, big: bool = False) -> Tensor:
        y = self.bn(self.conv(x)) + self.bn1(self.conv1(x))
        return torch.relu(y) if big else y


class SizeFlag(nn.Module):
    """The child is called with a flag computed from the input size: the root does not trace
    (a shape in control flow), the child traces with the flag held at the example's value."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.block = FlaggedBlock()

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return self.block(x, x.shape[-1] > 96).mean((2, 3))


def size_flag() -> nn.Module:
    return randomize_bn(SizeFlag())



def frozen_flag_deploy(train: Path, out: Path) -> Path:
    """The deploy file fusing used to write for ``size_flag``: the child's forward traced with
    ``big`` held at the example's False (fused here from the child alone, called so, its plan
    step moved under the child's name)."""
    weights = torch.load(train, weights_only=True)["state_dict"]
    block = FlaggedBlock()
    block.load_state_dict({k.removeprefix("block."): v for k, v in weights.items()
                           if k.startswith("block.")})
    result = repconv.fuse(block.eval(), torch.randn(1, 4, 32, 32), check=False)
    (step,) = result.plan
    assert step["kind"] == "frame" and step["concrete"] == {"big": False}
    state = {k: v for k, v in weights.items() if not k.startswith("block.")}
    state.update({f"block.{k}": v for k, v in result.model.state_dict().items()})
    torch.save({"repconv_deploy": PLAN_VERSION, "input_shape": [1, 3, 32, 32],
                "plan": [{**step, "scope": "block"}], "state_dict": state}, out)
    return out


def weight_normed() -> nn.Module:
    """Legacy ``torch.nn.utils.weight_norm``: its ``weight`` is recomputed by a pre-hook and
    cannot be deep-copied."""
    model = plain()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.conv2 = torch.nn.utils.weight_norm(model.conv2)
    return model


def weight_normed_loud() -> nn.Module:
    """The same, letting torch's deprecation warning through (a log on stderr)."""
    model = plain()
    model.conv2 = torch.nn.utils.weight_norm(model.conv2)
    return model


def closure_forward() -> nn.Module:
    """The root's forward monkey-patched with a closure over the module it was built on."""
    model = plain()

    def forward(x: Tensor) -> Tensor:
        return model.bn2(model.conv2(torch.relu(model.bn(model.conv(x)))))

    model.forward = forward
    return model


class ListInput(nn.Module):
    """Takes a list of (C, H, W) images of any sizes, as torchvision detectors do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = plain()

    def forward(self, images: list[Tensor]) -> list[Tensor]:
        return [self.net(image.unsqueeze(0)) for image in images]


class DictInput(nn.Module):
    """Takes a dict of tensors and returns one."""

    def __init__(self) -> None:
        super().__init__()
        self.image = plain()
        self.aux = plain()

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"image": self.image(batch["image"]), "aux": self.aux(batch["aux"]).mean((2, 3))}


def wide() -> nn.Module:
    """A 1x1 conv to 1024 channels and its BN: each activation is 1024/3 times the input."""
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 1024, 1), nn.BatchNorm2d(1024)))


def checkpoint(name: str, path: Path, input_shape: list[int] | None = None) -> Path:
    """The weights of builder ``name`` with its input shape, as a training script saves them."""
    torch.manual_seed(0)
    model = globals()[name]()
    shape = input_shape or [1, 4 if isinstance(model, TwoBranches) else 3, 32, 32]
    torch.save({"state_dict": model.state_dict(), "input_shape": shape}, path)
    return path

