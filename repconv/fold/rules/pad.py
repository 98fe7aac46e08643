"""Rule: zero padding.

Pattern: ``F.pad(x, pads)`` with mode 'constant' and value 0, ``nn.ZeroPad{1,2,3}d`` or
``nn.ConstantPad{1,2,3}d`` with value 0.
Conditions: the same amount on both sides of each spatial dim, nothing on batch or channels.
Formula: the identity with ``padding = p`` (a 1x1 depthwise conv with padding).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn

from repconv.fold import algebra
from repconv.fold.graph import GraphContext
from repconv.fold.rules.base import Refusal, Unary, channels, spatial_dims

_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
            nn.ConstantPad3d)


def lower(node: fx.Node, ctx: GraphContext) -> Unary | Refusal | None:
    if node.op == "call_module" and isinstance(ctx.submodule(node), _MODULES):
        module = ctx.submodule(node)
        source, pads, mode, value = node.args[0], module.padding, "constant", module.value
    elif node.op == "call_function" and node.target is F.pad:
        source = node.args[0]
        pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", 0.0)
        pads = ctx.constant(pads)
    else:
        return None
    nd = spatial_dims(source)
    if nd is None or not nd or mode != "constant" or not ctx.is_tensor_input(source):
        return None
    if value not in (0, 0.0, None):
        return Refusal(f"pads with {value}, not zero")
    if not isinstance(pads, (list, tuple)):
        return Refusal("its pads are computed from the input's size (TF 'SAME' padding): a conv "
                       "would fix them to the example's")
    pads = [int(p) for p in pads]
    if any(p < 0 for p in pads):
        return Refusal("negative padding crops: not a conv padding")
    if len(pads) > 2 * nd:
        return Refusal("pads the batch or channel dim")
    pairs = [pads[i : i + 2] for i in range(0, len(pads), 2)]
    if any(left != right for left, right in pairs):
        return Refusal(f"asymmetric padding {pads}: not a conv padding")
    padding = [0] * nd
    for i, (amount, _) in enumerate(pairs):  # F.pad lists the last dim first
        padding[nd - 1 - i] = amount
    return Unary(source, algebra.zero_pad(channels(source), tuple(padding)), "pad")
