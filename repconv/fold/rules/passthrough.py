"""Rule: ops that are the identity in eval mode.

Pattern: ``nn.Identity``, the identity BatchNorm slot a fold leaves (`repconv.fold.slot`),
``nn.Dropout*`` (eval), ``F.dropout(training=False)``, and the
``.contiguous()`` / ``.clone()`` / ``.detach()`` / ``+x`` methods.
Conditions: dropout modules are in eval mode; ``.contiguous()`` only where its input already
was contiguous on the example (otherwise it copies, and a later ``.view`` may rely on that).
Formula: the identity map.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from repconv.fold import algebra
from repconv.fold.graph import GraphContext
from repconv.fold.rules.base import Refusal, Unary, channels, spatial_dims
from repconv.fold.slot import is_identity_slot

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_METHODS = ("contiguous", "clone", "detach")
_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, operator.pos)


def _was_contiguous(node: object) -> bool:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta is not None and meta.memory_format == torch.contiguous_format


def lower(node: fx.Node, ctx: GraphContext) -> Unary | Refusal | None:
    if node.op == "call_module":
        module = ctx.submodule(node)
        if isinstance(module, _DROPOUT) and module.training:
            return Refusal(f"dropout {node.target} is in train mode")
        slot = is_identity_slot(module)
        if not isinstance(module, (nn.Identity, *_DROPOUT)) and not slot:
            return None
        label = "Identity" if slot else type(module).__name__
    elif node.op == "call_method" and node.target in _METHODS and len(node.args) == 1:
        if node.target == "contiguous" and not _was_contiguous(node.args[0]):
            return None
        label = node.target
    elif node.op == "call_function" and node.target in _FUNCTIONS:
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        if node.target is not operator.pos and ctx.constant(training) is not False:
            return None
        label = getattr(node.target, "__name__", "identity")
    else:
        return None
    source = node.args[0]
    nd = spatial_dims(source)
    if nd is None or not ctx.is_tensor_input(source):
        return None
    return Unary(source, algebra.identity(channels(source), nd), label, free=label != "clone")
