"""Border writes as one value, for the analysis graph only.

A forward that pads and then writes a per-channel constant over the whole border, in place
(DBB's ``BNAndPadLayer``: ``out = F.pad(bn(x), [p] * 4); out[:, :, 0:p, :] = v; ...``), pads
with that constant. fx records the writes as ``operator.setitem`` nodes whose effect is not in
the graph's data flow, so the rules could not read them. `fold_border_writes` replaces each
such pad and its writes by one `pad_value` node that the readers after the last write read;
rules/pad_value.py lowers it. The graph changed is the one analysis reads; rewrites are made in
the module's own forward, where a region's members are removed, writes included.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from repconv.fold.graph import GraphContext, metadata_read, tensor_shape


def pad_value(x: Tensor, pads: list[int], value: Tensor) -> Tensor:
    """``F.pad(x, pads)`` with the padded border set to ``value`` (per channel), exactly."""
    padded = F.pad(x, pads)
    border = torch.ones(padded.shape[2:], dtype=torch.bool, device=x.device)
    interior = tuple(slice(pads[2 * (len(padded.shape) - 3 - d)],
                           padded.shape[2 + d] - pads[2 * (len(padded.shape) - 3 - d) + 1])
                     for d in range(len(padded.shape) - 2))
    border[interior] = False
    return torch.where(border, value.reshape(1, -1, *([1] * (padded.dim() - 2))).to(padded),
                       padded)


def _zero_pad(node: fx.Node, ctx: GraphContext) -> list[int] | None:
    """The pads of ``F.pad(x, pads)`` with zeros on spatial dims only, or None."""
    if node.op != "call_function" or node.target is not F.pad:
        return None
    pads = ctx.constant(node.args[1] if len(node.args) > 1 else node.kwargs.get("pad"))
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", 0.0)
    shape = tensor_shape(node)
    if (mode != "constant" or value not in (0, 0.0, None) or shape is None
            or not isinstance(pads, (list, tuple)) or len(pads) > 2 * (len(shape) - 2)):
        return None
    return [int(p) for p in pads]


def _written(index: Any, shape: torch.Size, mask: Tensor) -> bool:
    """Mark in ``mask`` (spatial dims) what ``t[index] = v`` writes; False unless ``index``
    keeps batch and channels whole and is made of slices."""
    if not isinstance(index, tuple) or len(index) < 3 or len(index) > len(shape):
        return False
    if not all(isinstance(i, slice) for i in index):
        return False
    if any(i != slice(None) for i in index[:2]):
        return False
    mask[index[2:]] = True
    return True


def _per_channel(value: Any, channels: int) -> Tensor | None:
    if not isinstance(value, Tensor) or value.numel() != channels:
        return None
    squeezed = [n for n in value.shape if n != 1]
    return value.reshape(-1) if squeezed in ([channels], []) else None


def fold_border_writes(gm: fx.GraphModule) -> int:
    """Replace each zero pad whose whole border is then written with one per-channel constant
    (and nothing reads it in between) by a `pad_value` node; returns how many."""
    ctx = GraphContext(gm)
    folded = 0
    for pad in [n for n in gm.graph.nodes]:
        pads = _zero_pad(pad, ctx)
        shape = tensor_shape(pad)
        if pads is None or shape is None:
            continue
        users = sorted(pad.users, key=lambda n: list(gm.graph.nodes).index(n))
        writes: list[fx.Node] = []
        for user in users:
            if user.op == "call_function" and user.target is operator.setitem \
                    and user.args[0] is pad:
                writes.append(user)
            elif metadata_read(user) is None:
                break  # read before the border is complete: it sees the zeros
        if not writes:
            continue
        mask = torch.zeros(shape[2:], dtype=torch.bool)
        values = [ctx.constant(w.args[2]) for w in writes]
        channels = _per_channel(values[0], int(shape[1])) if values else None
        if channels is None or not all(_written(ctx.constant(w.args[1]), shape, mask)
                                       for w in writes):
            continue
        if not all(isinstance(v, Tensor) and v.shape == values[0].shape
                   and torch.equal(v, values[0]) for v in values):
            continue
        border = torch.ones_like(mask)
        nd = len(shape) - 2
        border[tuple(slice(pads[2 * (nd - 1 - d)], shape[2 + d] - pads[2 * (nd - 1 - d) + 1])
                     for d in range(nd))] = False
        if len(pads) != 2 * nd or not torch.equal(mask, border):
            continue
        with gm.graph.inserting_after(writes[-1]):
            node = gm.graph.call_function(pad_value, (pad.args[0], pads, writes[0].args[2]))
        node.meta = {**pad.meta}
        later = [u for u in users if u not in writes and users.index(u) > users.index(writes[-1])]
        for user in later:
            user.replace_input_with(pad, node)
        for write in writes:
            gm.graph.erase_node(write)
        if not pad.users:
            gm.graph.erase_node(pad)
        folded += 1
    if folded:
        gm.recompile()
    return folded
