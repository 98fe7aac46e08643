"""Validation of the tensors a file holds: dense, with values, floating point where the model
needs it, and BatchNorm statistics a fold can use."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from repconv.errors import InputError
from repconv.fold.algebra import bn_statistics_problem


def _check_data(name: str, tensor: Tensor) -> None:
    if tensor.is_meta:
        raise InputError(f"tensor {name} is a meta tensor, which holds no values; the "
                         "checkpoint was saved without its weights")
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise InputError(f"tensor {name} is not a dense tensor ({tensor.layout}, quantized: "
                         f"{tensor.is_quantized}); repconv reads dense weights only")


def _check_float(name: str, tensor: Tensor) -> None:
    if not tensor.is_floating_point():
        raise InputError(f"tensor {name} has dtype {tensor.dtype} where the model needs "
                         "floating-point values; the checkpoint is damaged")


def check_tensors(weights: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> None:
    """Weights hold data in a dense layout, and every floating-point slot of the model gets a
    floating-point tensor (an int64 or bool weight would fail deep inside torch)."""
    for name, tensor in weights.items():
        _check_data(name, tensor)
        if own[name].is_floating_point():
            _check_float(name, tensor)


def check_module(model: nn.Module) -> None:
    """The tensors of a pickled module, checked like loaded weights."""
    for name, tensor in model.named_buffers():
        _check_data(name, tensor)
    for name, tensor in model.named_parameters():
        _check_data(name, tensor)
        _check_float(name, tensor)
    check_statistics(model)


def check_statistics(model: nn.Module) -> None:
    """BN statistics that are NaN/Inf or negative make the fold meaningless: stop early."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        mean, var = module.running_mean, module.running_var
        if mean is None or var is None:
            continue
        problem = bn_statistics_problem(mean, var)
        if problem:
            raise InputError(f"BatchNorm {name}: {problem}; the checkpoint is damaged (use an "
                             "earlier epoch)")
