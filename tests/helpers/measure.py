"""What the tests measure on models: conv, BatchNorm and linear counts, the aten ops and module
calls a forward executes, and scale-relative error."""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.module import register_module_forward_pre_hook

from repconv.fold.slot import is_identity_slot
from repconv.measure.opcount import OpCounts, count_ops

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def count_convs(model: nn.Module) -> int:
    return sum(isinstance(m, CONVS) for m in model.modules())


def count_bns(model: nn.Module) -> int:
    """BatchNorm modules that normalise: the identity slots a fold leaves do not count."""
    return sum(isinstance(m, _BatchNorm) and not is_identity_slot(m) for m in model.modules())


def count_linears(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in model.modules())


def executed(model: nn.Module, *args: object, **kwargs: object) -> OpCounts:
    """The aten ops one forward of ``model`` runs."""
    return count_ops(lambda: model(*args, **kwargs))


def module_calls(model: nn.Module, *args: object) -> Counter[str]:
    """The module calls one forward of ``model`` makes, by class name: the Python work a small
    deploy model pays on each call beyond its ops."""
    calls: Counter[str] = Counter()
    handle = register_module_forward_pre_hook(lambda m, _: calls.update([type(m).__name__]))
    try:
        with torch.no_grad():
            model(*args)
    finally:
        handle.remove()
    return calls


def rel_err(expected: Tensor, got: Tensor) -> float:
    """max|expected - got| / max|expected|, in float64: error relative to the expected output's
    scale (an all-zero ``expected`` gives the absolute error over the smallest float64)."""
    assert expected.shape == got.shape, (expected.shape, got.shape)
    expected, got = expected.detach().double(), got.detach().double()
    scale = max(float(expected.abs().max()), 1e-300)
    return float((expected - got).abs().max()) / scale
