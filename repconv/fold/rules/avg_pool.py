"""Rule: average pooling.

Pattern: ``nn.AvgPool{1,2,3}d`` or ``F.avg_pool{1,2,3}d``.
Conditions: padded zeros count in the average (count_include_pad=True) or there is no padding
(otherwise border outputs divide by fewer taps: not a convolution); no ceil_mode unless the
stride is 1 (ceil_mode adds partial windows).
Formula: a depthwise conv whose k taps are 1/k (or 1/divisor_override).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn

from repconv.fold import algebra
from repconv.fold.graph import GraphContext
from repconv.fold.rules.base import Refusal, Unary, channels, describe, spatial_dims

_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_FUNCTIONS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
         "divisor_override")


def _as_tuple(value: object, nd: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value) if len(value) == nd else (int(value[0]),) * nd
    return (int(value),) * nd


def lower(node: fx.Node, ctx: GraphContext) -> Unary | Refusal | None:
    if node.op == "call_module" and isinstance(ctx.submodule(node), _MODULES):
        module = ctx.submodule(node)
        args = {name: getattr(module, name, None) for name in _ARGS[1:]}
        args["input"] = node.args[0]
    elif node.op == "call_function" and node.target in _FUNCTIONS:
        args = dict(zip(_ARGS, node.args))
        args.update(node.kwargs)
    else:
        return None
    source = args["input"]
    nd = spatial_dims(source)
    if nd is None or nd == 0 or not ctx.is_tensor_input(source):
        return None
    sizes = [args["kernel_size"], args.get("stride"), args.get("padding")]
    if any(not ctx.is_constant(v) for v in sizes if v is not None):
        return Refusal(f"avg pool {describe(node)} takes its window from the input's shape: a "
                       "conv would fix it to the example's size")
    kernel = _as_tuple(ctx.constant(args["kernel_size"]), nd)
    stride_arg = ctx.constant(args.get("stride"))
    stride = kernel if stride_arg in (None, [], ()) else _as_tuple(stride_arg, nd)
    padding = _as_tuple(ctx.constant(args.get("padding")) or 0, nd)
    where = describe(node)
    if any(padding) and args.get("count_include_pad") is False:
        return Refusal(f"avg pool {where} excludes padding from the average: not a convolution")
    if args.get("ceil_mode") and any(s > 1 for s in stride):
        return Refusal(f"avg pool {where} uses ceil_mode with stride > 1: partial windows")
    divisor = args.get("divisor_override")
    return Unary(
        source,
        algebra.from_avgpool(channels(source), kernel, stride, padding, divisor),
        "AvgPool",
    )
