"""repconv/fold/rules/batch_norm.py alone: an eval BatchNorm (module, subclass, or
``F.batch_norm`` with constant statistics) becomes the per-channel Affine it computes; no
running statistics, train mode, and NaN/Inf or negative statistics are refused with the
reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.graphs import applied, in_float64, traced
from helpers.measure import rel_err
from helpers.reference_blocks import randomize_bn
from helpers.tensors import randn
from torch import Tensor, nn

from repconv.fold import algebra
from repconv.fold.rules import batch_norm
from repconv.fold.rules.base import Refusal, Unary

BNS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: (7,), 2: (5, 6), 3: (3, 4, 5)}


class Wrap(nn.Module):
    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_eval_batchnorm_is_a_per_channel_affine(nd: int) -> None:
    model = randomize_bn(Wrap(BNS[nd](6, eps=1e-3)), seed=nd)
    x = randn(2, 6, *SPATIAL[nd], seed=nd)
    graph = traced(model, x)
    answer = graph.lower(batch_norm.lower, "bn")
    assert isinstance(answer, Unary)
    assert answer.source is graph.node("x") and answer.label == f"BatchNorm{nd}d"
    assert algebra.is_per_channel(answer.affine) and answer.affine.weight.dtype == torch.float64
    assert rel_err(in_float64(model, x), applied(answer.affine, x)) < 1e-12


def test_batchnorm_on_features_of_a_2d_input() -> None:
    model = randomize_bn(Wrap(nn.BatchNorm1d(5)), seed=4)
    x = randn(3, 5, seed=0)
    answer = traced(model, x).lower(batch_norm.lower, "bn")
    assert isinstance(answer, Unary) and answer.affine.nd == 0
    assert rel_err(in_float64(model, x), applied(answer.affine, x)) < 1e-12


def test_batchnorm_without_affine_parameters() -> None:
    model = randomize_bn(Wrap(nn.BatchNorm2d(4, affine=False)), seed=5)
    x = randn(1, 4, 3, 3, seed=0)
    answer = traced(model, x).lower(batch_norm.lower, "bn")
    assert isinstance(answer, Unary)
    assert rel_err(in_float64(model, x), applied(answer.affine, x)) < 1e-12


class KeepsForward(nn.BatchNorm2d):
    """A subclass that adds nothing to the forward: a call like its base's."""


def test_subclass_keeping_the_forward_is_lowered_as_a_module() -> None:
    model = randomize_bn(Wrap(KeepsForward(4)), seed=6)
    x = randn(1, 4, 3, 3, seed=0)
    answer = traced(model, x).lower(batch_norm.lower, "bn")
    assert isinstance(answer, Unary) and answer.label == "KeepsForward"
    assert rel_err(in_float64(model, x), applied(answer.affine, x)) < 1e-12


class OwnForward(nn.BatchNorm2d):
    """timm's BatchNormAct2d, trimmed: its own forward calls ``F.batch_norm``."""

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)


def test_functional_batch_norm_with_constant_statistics() -> None:
    model = randomize_bn(Wrap(OwnForward(4, eps=1e-2)), seed=7)
    x = randn(2, 4, 5, 5, seed=1)
    graph = traced(model, x)
    answer = graph.lower(batch_norm.lower, "batch_norm")
    assert isinstance(answer, Unary) and answer.label == "batch_norm"
    assert answer.source is graph.node("x")
    assert rel_err(in_float64(model, x), applied(answer.affine, x)) < 1e-12


def test_no_running_statistics_is_refused() -> None:
    graph = traced(Wrap(nn.BatchNorm2d(4, track_running_stats=False)).eval(),
                   randn(2, 4, 3, 3, seed=0))
    assert graph.lower(batch_norm.lower, "bn") == Refusal(
        "BatchNorm bn has no running statistics (track_running_stats=False): it uses batch "
        "statistics even in eval")


def test_train_mode_is_refused() -> None:
    model = randomize_bn(Wrap(nn.BatchNorm2d(4)), seed=0)
    graph = traced(model, randn(2, 4, 3, 3, seed=0))
    graph.gm.bn.train()
    assert graph.lower(batch_norm.lower, "bn") == Refusal(
        "BatchNorm bn is in train mode; call model.eval() first")


@pytest.mark.parametrize(("buffer", "value", "problem"), [
    ("running_mean", float("nan"), "running statistics contain NaN or Inf"),
    ("running_var", float("inf"), "running statistics contain NaN or Inf"),
    ("running_var", -0.5, "negative running_var entries"),
])
def test_damaged_statistics_are_refused(buffer: str, value: float, problem: str) -> None:
    model = randomize_bn(Wrap(nn.BatchNorm2d(4)), seed=0)
    graph = traced(model, randn(1, 4, 3, 3, seed=0))
    getattr(graph.gm.bn, buffer)[2] = value
    assert graph.lower(batch_norm.lower, "bn") == Refusal(f"BatchNorm bn: {problem}")


class Functional(nn.Module):
    """``F.batch_norm`` in the model's own forward, its flags and statistics given here."""

    def __init__(self, training: bool, batch_statistics: bool) -> None:
        super().__init__()
        self.training_flag, self.batch_statistics = training, batch_statistics
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x: Tensor) -> Tensor:
        if self.batch_statistics:
            return F.batch_norm(x, x.mean((0, 2, 3)), x.var((0, 2, 3)), training=False)
        return F.batch_norm(x, self.mean, self.var, training=self.training_flag)


def test_functional_batch_norm_in_training_mode_is_refused() -> None:
    graph = traced(Functional(training=True, batch_statistics=False), randn(2, 4, 3, 3, seed=0))
    assert graph.lower(batch_norm.lower, "batch_norm") == Refusal(
        "batch_norm at batch_norm runs in training mode (batch statistics)")


def test_functional_batch_norm_with_statistics_of_the_input_is_refused() -> None:
    graph = traced(Functional(training=False, batch_statistics=True), randn(2, 4, 3, 3, seed=0))
    assert graph.lower(batch_norm.lower, "batch_norm") == Refusal(
        "batch_norm at batch_norm has no constant running statistics")


class NotNorms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.gn = nn.GroupNorm(2, 4)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(self.gn(self.conv(x)), [3, 3]) + 1


def test_other_ops_are_not_this_rules() -> None:
    graph = traced(NotNorms(), randn(1, 4, 3, 3, seed=0))
    assert graph.unmatched(batch_norm.lower) == ["conv", "gn", "layer_norm", "add"]
