"""repconv/fold/rules/pad.py alone: symmetric zero padding of the spatial dims is the identity
with a border of zeros; a nonzero value, asymmetric or negative padding and padding of the batch
or channel dims are refused with the reason; other modes are not this rule's."""

from __future__ import annotations

import pytest
import torch.nn.functional as F
from helpers.graphs import applied, in_float64, traced
from helpers.measure import rel_err
from helpers.tensors import randn
from torch import Tensor, nn

from repconv.fold.rules import pad
from repconv.fold.rules.base import Refusal, Unary


class Padded(nn.Module):
    """``F.pad(x, pads, mode, value)``."""

    def __init__(self, pads: tuple[int, ...], mode: str = "constant", value: float = 0.0) -> None:
        super().__init__()
        self.pads, self.mode, self.value = pads, mode, value

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, self.pads, self.mode, self.value)


class Wrap(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


def test_symmetric_zero_pad_is_a_padded_identity() -> None:
    model = Padded((1, 1, 2, 2))
    x = randn(2, 3, 5, 6, seed=0)
    graph = traced(model, x)
    answer = graph.lower(pad.lower, "pad")
    assert isinstance(answer, Unary) and answer.label == "pad"
    assert answer.source is graph.node("x")
    assert answer.affine.padding == (2, 1)  # F.pad lists the last dim first
    assert answer.affine.is_pointwise and answer.affine.groups == 3
    assert rel_err(in_float64(model, x), applied(answer.affine, x)) < 1e-12


@pytest.mark.parametrize("layer", [nn.ZeroPad2d(2), nn.ConstantPad2d(1, 0.0),
                                   nn.ConstantPad3d(1, 0.0), nn.ZeroPad1d(3)],
                         ids=["zero2d", "constant2d", "constant3d", "zero1d"])
def test_padding_modules(layer: nn.Module) -> None:
    nd = 3 if isinstance(layer, nn.ConstantPad3d) else 1 if isinstance(layer, nn.ZeroPad1d) else 2
    model = Wrap(layer)
    x = randn(1, 2, *(4,) * nd, seed=nd)
    answer = traced(model, x).lower(pad.lower, "layer")
    assert isinstance(answer, Unary)
    assert rel_err(in_float64(model, x), applied(answer.affine, x)) < 1e-12


@pytest.mark.parametrize(("model", "reason"), [
    (Padded((1, 1, 1, 1), value=0.5), "pads with 0.5, not zero"),
    (Wrap(nn.ConstantPad2d(1, 2.0)), "pads with 2.0, not zero"),
    (Padded((1, 0, 1, 1)), "asymmetric padding [1, 0, 1, 1]: not a conv padding"),
    (Padded((-1, -1, -1, -1)), "negative padding crops: not a conv padding"),
    (Padded((1, 1, 1, 1, 1, 1)), "pads the batch or channel dim"),
], ids=["value", "module value", "asymmetric", "negative", "channels"])
def test_refused_paddings(model: nn.Module, reason: str) -> None:
    graph = traced(model, randn(1, 2, 5, 5, seed=0))
    name = "layer" if isinstance(model, Wrap) else "pad"
    assert graph.lower(pad.lower, name) == Refusal(reason)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_other_modes_are_not_this_rules(mode: str) -> None:
    graph = traced(Padded((1, 1, 1, 1), mode=mode), randn(1, 2, 5, 5, seed=0))
    assert graph.lower(pad.lower, "pad") is None


def test_other_ops_are_not_this_rules() -> None:
    class Others(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x[:, :, 1:-1] * 2

    graph = traced(Others(), randn(1, 2, 5, 5, seed=0))
    assert graph.unmatched(pad.lower) == ["getitem", "mul"]
