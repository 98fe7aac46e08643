"""Rule: reshapes of token tensors that keep each feature vector whole.

Pattern: ``x.flatten(a, b)``, ``x.reshape(...)``, ``x.view(...)``, ``x.reshape_as(y)``,
``x.view_as(y)``, ``torch.flatten`` / ``torch.reshape``, where ``x`` is a (..., features)
token tensor: the output of a linear layer on tokens, a (batch, features) tensor, or another
such reshape. timm's LeViT runs ``bn(linear(x).flatten(0, 1)).reshape_as(x)``.
Conditions: input and output have rank >= 2 and the same last dim. In row-major order element
``i`` then sits at feature ``i mod features`` on both sides, so the reshape only regroups the
token dims. The sizes are literal ints (sizes read from another tensor's shape would tie the
fold to that tensor); ``y`` of ``reshape_as(y)`` is read for its shape only.
Formula: the identity on the last dim (a 0-d map: token dims are batch dims, as they are for
``nn.Linear``). A 0-d map never composes with a conv's n-d map, so a reshape of a
channels-first tensor is never folded as one of these.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from repconv.fold import algebra
from repconv.fold.graph import GraphContext, tensor_shape
from repconv.fold.rules.base import Unary

_METHODS = ("flatten", "reshape", "view", "reshape_as", "view_as")
_FUNCTIONS = (torch.flatten, torch.reshape)


def _is_token_tensor(node: fx.Node, ctx: GraphContext) -> bool:
    shape = tensor_shape(node)
    if shape is None:
        return False
    if len(shape) == 2:
        return True
    if node.op == "call_module":
        return isinstance(ctx.submodule(node), nn.Linear)
    if node.op == "call_function" and node.target is torch.nn.functional.linear:
        return True
    return _is_reshape(node)


def _is_reshape(node: fx.Node) -> bool:
    return ((node.op == "call_method" and node.target in _METHODS)
            or (node.op == "call_function" and node.target in _FUNCTIONS))


def _literal_sizes(values: tuple[object, ...]) -> bool:
    return all(isinstance(v, int) or (isinstance(v, (list, tuple)) and _literal_sizes(tuple(v)))
               for v in values)


def lower(node: fx.Node, ctx: GraphContext) -> Unary | None:
    if not _is_reshape(node) or not node.args:
        return None
    source = node.args[0]
    if not ctx.is_tensor_input(source) or not _is_token_tensor(source, ctx):
        return None
    if node.target not in ("reshape_as", "view_as") and not _literal_sizes(
            (*node.args[1:], *node.kwargs.values())):
        return None
    before, after = tensor_shape(source), tensor_shape(node)
    if after is None or len(before) < 2 or len(after) < 2 or before[-1] != after[-1]:
        return None
    return Unary(source, algebra.identity(int(after[-1]), 0), str(getattr(
        node.target, "__name__", node.target)), free=True)
