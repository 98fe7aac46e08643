"""Rule: padding with a per-channel value.

Pattern: ``pad_value(x, pads, c)`` (repconv/fold/inplace.py makes it from ``F.pad`` and in-place
writes of ``c`` over the whole border, as DBB's ``BNAndPadLayer`` does).
Conditions: symmetric pads on spatial dims; ``c`` a constant with one value per channel.
Formula: ``pad_c(x) = pad_0(x - c) + c``: the maps ``shift(-c)``, ``zero_pad(p)``,
``shift(+c)`` in turn. It is one conv only where its neighbour cancels the shift: after a map
whose value at zero is ``c`` (a BatchNorm with ``c = BN(0)``), ``shift(-c)`` leaves a zero
bias and the zero pad folds (algebra's zero-bias check decides, and refuses otherwise).
"""

from __future__ import annotations

import torch
from torch import fx

from repconv.fold import algebra
from repconv.fold.graph import GraphContext
from repconv.fold.inplace import pad_value
from repconv.fold.rules.base import Refusal, Unary, channels, spatial_dims


def lower(node: fx.Node, ctx: GraphContext) -> Unary | Refusal | None:
    if node.op != "call_function" or node.target is not pad_value:
        return None
    source, pads, value = node.args
    nd = spatial_dims(source)
    c = ctx.constant(value)
    if nd is None or not nd or c is None or not ctx.is_tensor_input(source):
        return None
    pairs = [pads[i : i + 2] for i in range(0, len(pads), 2)]
    if len(pairs) != nd or any(left != right for left, right in pairs):
        return Refusal(f"asymmetric padding {list(pads)}: not a conv padding")
    padding = tuple(pairs[nd - 1 - d][0] for d in range(nd))  # F.pad lists the last dim first
    n = channels(source)
    shift = c.detach().double().reshape(-1)
    ones = torch.ones(n, dtype=torch.float64)
    return Unary(source, algebra.diagonal(ones, -shift, nd), "pad_value",
                 then=(algebra.zero_pad(n, padding), algebra.diagonal(ones, shift, nd)))
