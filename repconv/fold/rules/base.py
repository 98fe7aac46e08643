"""What a lowering rule returns: a node's value as a linear function of other nodes, or a reason.

A rule looks at one fx node and answers with
- ``Unary``:   node = affine(source)               (conv, BN, pooling, scale, padding, ...)
- ``Sum``:     node = sum of coefficient * term    (branches added or subtracted)
- ``Concat``:  node = cat(parts, dim=1)            (branches stacked along channels)
- ``Refusal``: the node is one of the rule's ops but cannot be folded, and why
- ``None``:    not this rule's op.
Rules never mutate the graph; the rewrite driver alone does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import fx

from repconv.fold.algebra import Affine
from repconv.fold.graph import GraphContext, tensor_shape


@dataclass(frozen=True)
class Unary:
    source: fx.Node
    affine: Affine
    label: str
    # the identity at no cost (a view, eval dropout): a fold may leave it where it runs; an
    # identity that runs an op (``x + 0``, ``x * 1``, ``.clone()``) is rewritten away instead
    free: bool = False
    # maps applied after ``affine``, in order: an op that is one conv only next to its
    # neighbours (a pad with a value, ``shift(+c) . pad0 . shift(-c)``) folds as several
    then: tuple[Affine, ...] = ()


@dataclass(frozen=True)
class Sum:
    terms: tuple[tuple[fx.Node, float], ...]
    label: str = "add"


@dataclass(frozen=True)
class Concat:
    parts: tuple[fx.Node, ...]
    label: str = "cat"


@dataclass(frozen=True)
class Refusal:
    reason: str


LinearOp = Unary | Sum | Concat
Rule = Callable[[fx.Node, GraphContext], LinearOp | Refusal | None]


def spatial_dims(node: fx.Node) -> int | None:
    """Number of spatial dims of a (batch, channels, *spatial) tensor node."""
    shape = tensor_shape(node)
    return None if shape is None or len(shape) < 2 else len(shape) - 2


def channels(node: fx.Node) -> int:
    shape = tensor_shape(node)
    assert shape is not None
    return int(shape[1])


def describe(node: fx.Node) -> str:
    """Where a node comes from, for messages: its module path, or its node name."""
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return f"{path} ({node.name})"
    return node.name
