"""Rule: branches added or subtracted.

Pattern: ``a + b``, ``a - b`` (operators, ``torch.add/sub``, tensor methods, in-place forms)
where both a and b depend on the input.
Conditions: a, b and the result have the same shape (no broadcasting).
Formula: ``Sum((a, 1), (b, ±1))``; the driver folds it with ``algebra.add`` when every term is a
linear map of the same input.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from repconv.fold.graph import GraphContext, tensor_shape
from repconv.fold.rules.base import Sum

_ADD = (operator.add, operator.iadd, torch.add, "add", "add_")
_SUB = (operator.sub, operator.isub, torch.sub, "sub", "sub_")


def lower(node: fx.Node, ctx: GraphContext) -> Sum | None:
    if node.op not in ("call_function", "call_method") or node.target not in (*_ADD, *_SUB):
        return None
    if len(node.args) != 2 or node.kwargs.get("alpha") not in (None, 1):
        return None
    left, right = node.args
    if not (ctx.is_tensor_input(left) and ctx.is_tensor_input(right)):
        return None
    shape = tensor_shape(node)
    if tensor_shape(left) != shape or tensor_shape(right) != shape or len(shape) < 2:
        return None
    sign = -1.0 if node.target in _SUB else 1.0
    return Sum(((left, 1.0), (right, sign)), "sub" if sign < 0 else "add")
