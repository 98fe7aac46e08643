"""Rule: per-channel affine maps by constants (layer scale, constant multiply, bias shift).

Pattern: ``x * c``, ``c * x``, ``x / c``, ``-x``, ``x + c``, ``x - c``, ``c - x`` (operators,
``torch.*`` and tensor methods) where x depends on the input and c is a constant: a number or a
tensor that broadcasts along channels only (shape [C,1,1], [1,C,1,1], or [C] for (N, C) inputs).
Conditions: c broadcasts to the input's shape without growing it, and varies along channels at
most.
Formula: ``diag(scale) x + shift``.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor, fx

from repconv.fold import algebra
from repconv.fold.graph import GraphContext, tensor_shape
from repconv.fold.rules.base import Unary, channels, spatial_dims

_MUL = (operator.mul, torch.mul, "mul")
_DIV = (operator.truediv, torch.div, "div")
_ADD = (operator.add, torch.add, "add")
_SUB = (operator.sub, torch.sub, "sub")
_NEG = (operator.neg, torch.neg, "neg")


def _per_channel(value: object, shape: torch.Size) -> Tensor | None:
    """``value`` as a [C] tensor if it broadcasts along channels of ``shape`` only."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((int(shape[1]),), float(value), dtype=torch.float64)
    if not isinstance(value, Tensor) or value.dim() > len(shape):
        return None
    aligned = value.reshape((1,) * (len(shape) - value.dim()) + tuple(value.shape))
    for dim, size in enumerate(aligned.shape):
        if size != 1 and (dim != 1 or size != shape[1]):
            return None
    return aligned.reshape(-1).double().expand(int(shape[1])).clone()


def lower(node: fx.Node, ctx: GraphContext) -> Unary | None:
    if node.op not in ("call_function", "call_method") or node.kwargs.get("alpha") is not None:
        return None
    target = node.target
    if target in _NEG and len(node.args) == 1:
        source = node.args[0]
        scale_shift = (-1.0, 0.0)
    elif len(node.args) == 2 and target in (*_MUL, *_DIV, *_ADD, *_SUB):
        left, right = node.args
        if ctx.is_tensor_input(left) and ctx.is_constant(right):
            source, const, const_first = left, ctx.constant(right), False
        elif ctx.is_tensor_input(right) and ctx.is_constant(left) and target not in _DIV:
            source, const, const_first = right, ctx.constant(left), True
        else:
            return None
        shape = tensor_shape(source)
        if shape is None or len(shape) < 2 or tensor_shape(node) != shape:
            return None
        c = _per_channel(const, shape)
        if c is None:
            return None
        if target in _MUL:
            scale_shift = (c, 0.0)
        elif target in _DIV:
            scale_shift = (1.0 / c, 0.0)
        elif target in _ADD:
            scale_shift = (1.0, c)
        else:
            scale_shift = (-1.0, c) if const_first else (1.0, -c)
    else:
        return None
    nd = spatial_dims(source)
    if nd is None or not ctx.is_tensor_input(source):
        return None
    n = channels(source)
    scale = torch.as_tensor(scale_shift[0], dtype=torch.float64).expand(n)
    shift = torch.as_tensor(scale_shift[1], dtype=torch.float64).expand(n)
    return Unary(source, algebra.diagonal(scale, shift, nd), "scale")
