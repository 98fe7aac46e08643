"""repconv/fold/rules/channel_scale.py alone: an input-dependent value times, over, plus or
minus a constant that varies along channels at most (layer scale, constant multiply, bias
shift, negation) is the per-channel affine it computes; a constant that varies along other
dims, a product of two inputs and ``alpha`` are not this rule's."""

from __future__ import annotations

import operator

import pytest
import torch
from helpers.graphs import applied, in_float64, traced
from helpers.measure import rel_err
from helpers.tensors import randn
from torch import Tensor, nn

from repconv.fold import algebra
from repconv.fold.rules import channel_scale
from repconv.fold.rules.base import Unary


class Scaled(nn.Module):
    """``op(x, constant)`` (or ``op(constant, x)``), the constant a parameter or a number."""

    def __init__(self, op: object, constant: object, constant_first: bool = False) -> None:
        super().__init__()
        self.op, self.constant_first = op, constant_first
        if isinstance(constant, Tensor):
            self.constant = nn.Parameter(constant)
        else:
            self.constant = constant

    def forward(self, x: Tensor) -> Tensor:
        if self.op is operator.neg:
            return -x
        left, right = (self.constant, x) if self.constant_first else (x, self.constant)
        if isinstance(self.op, str):
            return getattr(left, self.op)(right)
        return self.op(left, right)


GAMMA = torch.linspace(-1.5, 2.0, 4)
CASES = {
    "layer scale [C,1,1]": (operator.mul, GAMMA.reshape(4, 1, 1), False),
    "layer scale [1,C,1,1] first": (operator.mul, GAMMA.reshape(1, 4, 1, 1), True),
    "constant multiply": (torch.mul, 0.25, False),
    "number times x": (operator.mul, 3.0, True),
    "divide": (operator.truediv, GAMMA.reshape(4, 1, 1), False),
    "torch.div": (torch.div, 2.0, False),
    "bias shift": (operator.add, GAMMA.reshape(1, 4, 1, 1), False),
    "constant plus x": (operator.add, 0.5, True),
    "method add": ("add", GAMMA.reshape(4, 1, 1), False),
    "subtract": (operator.sub, GAMMA.reshape(4, 1, 1), False),
    "constant minus x": (operator.sub, GAMMA.reshape(4, 1, 1), True),
    "torch.sub": (torch.sub, 1.5, False),
    "negate": (operator.neg, None, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_constant_per_channel_op_is_the_affine_it_computes(case: str) -> None:
    op, constant, first = CASES[case]
    model = Scaled(op, constant, first)
    x = randn(2, 4, 3, 5, seed=1)
    graph = traced(model, x)
    node = next(n for n in graph.gm.graph.nodes if n.op in ("call_function", "call_method")
                and n.target is not getattr)
    answer = graph.lower(channel_scale.lower, node.name)
    assert isinstance(answer, Unary) and answer.label == "scale"
    assert answer.source is graph.node("x")
    assert algebra.is_per_channel(answer.affine)
    assert rel_err(in_float64(model, x), applied(answer.affine, x)) < 1e-12


def test_scale_of_features_of_a_2d_input() -> None:
    model = Scaled(operator.mul, GAMMA)
    x = randn(3, 4, seed=2)
    answer = traced(model, x).lower(channel_scale.lower, "mul")
    assert isinstance(answer, Unary) and answer.affine.nd == 0
    assert rel_err(in_float64(model, x), applied(answer.affine, x)) < 1e-12


class NotChannelScales(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.spatial = nn.Parameter(torch.randn(1, 1, 3, 5))  # varies along H and W
        self.wide = nn.Parameter(torch.randn(2, 4, 1, 1))  # varies along the batch

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return (x * self.spatial, x * self.wide, x * x, torch.add(x, 1.0, alpha=2),
                x + self.spatial.sum())


def test_other_ops_are_not_this_rules() -> None:
    model = NotChannelScales()
    x = randn(2, 4, 3, 5, seed=0)
    graph = traced(model, x)
    assert [graph.lower(channel_scale.lower, name) for name in ("mul", "mul_1", "mul_2", "add")
            ] == [None] * 4
    # a 0-d constant (the sum of a parameter) is a number: a uniform shift of every channel
    shift = graph.lower(channel_scale.lower, "add_1")
    assert isinstance(shift, Unary) and algebra.is_per_channel(shift.affine)
    with torch.no_grad():
        expected = x.double() + model.spatial.sum().double()
    assert rel_err(expected, applied(shift.affine, x)) < 1e-6  # the sum is taken in float32
