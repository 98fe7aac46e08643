"""Rule: branches concatenated along channels.

Pattern: ``torch.cat([a, b, ...], dim=1)`` (or the equivalent negative dim).
Conditions: every part depends on the input.
Formula: ``Concat(parts)``; the driver folds it with ``algebra.concat`` when every part is a
linear map of the same input. ``cat([x])`` is the identity (a copy), which a fold may leave
where it runs.
"""

from __future__ import annotations

import torch
from torch import fx

from repconv.fold import algebra
from repconv.fold.graph import GraphContext, tensor_shape
from repconv.fold.rules.base import Concat, Unary, channels, spatial_dims


def lower(node: fx.Node, ctx: GraphContext) -> Concat | None:
    if node.op != "call_function" or node.target not in (torch.cat, torch.concat):
        return None
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    shape = tensor_shape(node)
    if shape is None or len(shape) < 2 or not isinstance(parts, (list, tuple)):
        return None
    if dim not in (1, 1 - len(shape)):
        return None
    if not all(ctx.is_tensor_input(p) for p in parts):
        return None
    if len(parts) == 1:  # cat([x]) copies x: the identity, left where it runs (a copy is cheap)
        source = parts[0]
        return Unary(source, algebra.identity(channels(source), spatial_dims(source) or 0),
                     "cat", free=True)
    return Concat(tuple(parts))
