"""repconv/fold/rules/avg_pool.py alone: average pooling that counts padded zeros (or has no
padding) becomes a depthwise box filter; excluded padding, ceil_mode with stride > 1 and a
window read from the input's shape are refused with the reason."""

from __future__ import annotations

import pytest
import torch.nn.functional as F
from helpers.graphs import applied, in_float64, traced
from helpers.measure import rel_err
from helpers.tensors import randn
from torch import Tensor, nn

from repconv.fold.rules import avg_pool
from repconv.fold.rules.base import Refusal, Unary

POOLS = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
SPATIAL = {1: (9,), 2: (8, 9), 3: (5, 6, 7)}


class Wrap(nn.Module):
    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(x)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_pool_counting_padding_is_a_depthwise_box_filter(nd: int) -> None:
    model = Wrap(POOLS[nd](3, stride=2, padding=1))
    x = randn(2, 4, *SPATIAL[nd], seed=nd)
    graph = traced(model, x)
    answer = graph.lower(avg_pool.lower, "pool")
    assert isinstance(answer, Unary)
    assert answer.source is graph.node("x") and answer.label == "AvgPool"
    affine = answer.affine
    assert (affine.groups, affine.kernel_size, affine.stride, affine.padding) == (
        4, (3,) * nd, (2,) * nd, (1,) * nd)
    assert rel_err(in_float64(model, x), applied(affine, x)) < 1e-12


def test_functional_pool_strides_by_its_kernel_by_default() -> None:
    class Functional(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return F.avg_pool2d(x, (2, 3))

    model = Functional()
    x = randn(1, 3, 8, 9, seed=0)
    answer = traced(model, x).lower(avg_pool.lower, "avg_pool2d")
    assert isinstance(answer, Unary) and answer.affine.stride == (2, 3)
    assert rel_err(in_float64(model, x), applied(answer.affine, x)) < 1e-12


def test_divisor_override() -> None:
    model = Wrap(nn.AvgPool2d(2, padding=1, divisor_override=3))
    x = randn(1, 2, 6, 6, seed=1)
    answer = traced(model, x).lower(avg_pool.lower, "pool")
    assert isinstance(answer, Unary)
    assert float(answer.affine.weight.flatten()[0]) == pytest.approx(1 / 3)
    assert rel_err(in_float64(model, x), applied(answer.affine, x)) < 1e-12


def test_excluded_padding_without_padding_is_a_box_filter() -> None:
    model = Wrap(nn.AvgPool2d(3, stride=1, padding=0, count_include_pad=False))
    x = randn(1, 2, 6, 6, seed=2)
    answer = traced(model, x).lower(avg_pool.lower, "pool")
    assert isinstance(answer, Unary)
    assert rel_err(in_float64(model, x), applied(answer.affine, x)) < 1e-12


def test_ceil_mode_with_stride_one_is_a_box_filter() -> None:
    model = Wrap(nn.AvgPool2d(3, stride=1, padding=1, ceil_mode=True))
    x = randn(1, 2, 6, 7, seed=3)
    answer = traced(model, x).lower(avg_pool.lower, "pool")
    assert isinstance(answer, Unary)
    assert rel_err(in_float64(model, x), applied(answer.affine, x)) < 1e-12


def test_excluded_padding_is_refused() -> None:
    graph = traced(Wrap(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)),
                   randn(1, 2, 6, 6, seed=0))
    assert graph.lower(avg_pool.lower, "pool") == Refusal(
        "avg pool pool excludes padding from the average: not a convolution")


def test_ceil_mode_with_stride_is_refused() -> None:
    graph = traced(Wrap(nn.AvgPool2d(2, stride=2, ceil_mode=True)), randn(1, 2, 7, 7, seed=0))
    assert graph.lower(avg_pool.lower, "pool") == Refusal(
        "avg pool pool uses ceil_mode with stride > 1: partial windows")


def test_window_from_the_input_shape_is_refused() -> None:
    class GlobalPool(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return F.avg_pool2d(x, x.shape[2:])

    graph = traced(GlobalPool(), randn(1, 2, 5, 5, seed=0))
    assert graph.lower(avg_pool.lower, "avg_pool2d") == Refusal(
        "avg pool avg_pool2d takes its window from the input's shape: a conv would fix it to "
        "the example's size")


def test_other_ops_are_not_this_rules() -> None:
    class Others(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return F.max_pool2d(x, 2) + F.adaptive_avg_pool2d(x, 2)

    graph = traced(Others(), randn(1, 2, 4, 4, seed=0))
    assert graph.unmatched(avg_pool.lower) == ["max_pool2d", "adaptive_avg_pool2d", "add"]
