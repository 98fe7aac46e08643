"""Rule: convolution, transposed convolution and linear layers.

Pattern: ``nn.Conv{1,2,3}d`` / ``nn.ConvTranspose{1,2,3}d`` / ``nn.Linear`` (or subclasses
keeping their forward) as call_module, or ``F.conv{1,2,3}d`` / ``F.linear`` with constant
weights.
Conditions: the weight is read at one place (folding a BN into a weight that two call sites
share would change the other one), or the layer is called at several sites and each site gets a
fused copy of its own (``GraphContext.unshare``).
Formula: ``Affine(weight, bias, stride, padding, dilation, groups)``, holding the layer's own
tensors (the fold converts each to float64 where it uses it); a linear layer is the 0-d map
of its input's last dim, on (batch, features) and on (..., features) tokens alike: the token
dims are batch dims (`token_reshape` keeps them so through reshapes); a transposed conv is
an Affine that only composes with a per-channel map after it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn

from repconv.errors import AlgebraError
from repconv.fold import algebra
from repconv.fold.graph import GraphContext
from repconv.fold.rules.base import Refusal, Unary, describe

_FUNCTIONAL_CONV = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _shared(ctx: GraphContext, target: str) -> Refusal | None:
    """Why a layer used at several places cannot fold here: its weights are also read as
    tensors, or it is called again and unsharing is off. A layer called at several sites
    (a detection head's conv applied to every pyramid level, each with its own BN) folds into
    one fused copy per site (``ctx.unshare``): the same ops, none of the BNs, more weights."""
    uses = ctx.uses(target)
    calls = ctx.call_sites[target]
    if uses > calls or (calls > 1 and not ctx.unshare):
        return Refusal(f"weight of {target} is shared by {uses} call sites; folding would change "
                       "the others" + ("" if uses > calls else " (unsharing is off)"))
    return None


def lower(node: fx.Node, ctx: GraphContext) -> Unary | Refusal | None:
    if node.op == "call_module":
        module = ctx.submodule(node)
        if isinstance(module, nn.Linear):
            shared = _shared(ctx, node.target)
            return shared or Unary(
                node.args[0], algebra.from_conv(module.weight, module.bias, as_float64=False),
                "Linear"
            )
        if isinstance(module, _TRANSPOSED):
            shared = _shared(ctx, node.target)
            return shared or Unary(node.args[0], algebra.from_conv_transpose(
                module.weight, module.bias, module.stride, module.padding,
                module.output_padding, module.dilation, module.groups,
            ), type(module).__name__)
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return None
        shared = _shared(ctx, node.target)
        if shared:
            return shared
        try:
            affine = algebra.from_conv(
                module.weight,
                module.bias,
                module.stride,
                module.padding,
                module.dilation,
                module.groups,
                module.padding_mode,
                as_float64=False,
            )
        except AlgebraError as exc:
            return Refusal(f"{describe(node)}: {exc}")
        return Unary(node.args[0], affine, type(module).__name__)
    if node.op != "call_function" or node.target not in (*_FUNCTIONAL_CONV, F.linear):
        return None
    names = _CONV_ARGS if node.target is not F.linear else ("input", "weight", "bias")
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    weight_node = args.get("weight")
    weight = ctx.constant(weight_node)
    if weight is None or not ctx.is_tensor_input(args["input"]):
        return None
    if isinstance(weight_node, fx.Node) and weight_node.op == "get_attr":
        shared = _shared(ctx, weight_node.target)
        if shared:
            return shared
    bias = ctx.constant(args.get("bias"))
    if args.get("bias") is not None and bias is None:
        return None
    try:
        affine = algebra.from_conv(
            weight,
            bias,
            args.get("stride", 1),
            args.get("padding", 0),
            args.get("dilation", 1),
            args.get("groups", 1),
            as_float64=False,
        )
    except AlgebraError as exc:
        return Refusal(f"{describe(node)}: {exc}")
    return Unary(args["input"], affine, node.target.__name__)
