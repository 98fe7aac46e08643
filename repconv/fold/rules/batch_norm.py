"""Rule: BatchNorm in eval form.

Pattern: ``nn.BatchNorm{1,2,3}d`` and subclasses keeping its forward, as call_module (not the
slot a fold leaves, `repconv.fold.slot`: that is an identity, `passthrough`); or
``F.batch_norm(x, running_mean, running_var, weight, bias, training=False, ..., eps)`` with
constant statistics (what a BatchNorm subclass with its own forward traces to).
Conditions: running statistics exist (without them BN normalises with batch statistics even in
eval); the module is in eval mode; statistics are finite and the variance is not negative.
Formula: ``y = x * w / sqrt(var + eps) + (b - mean * w / sqrt(var + eps))``, a per-channel
diagonal map.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn

from repconv.fold import algebra
from repconv.fold.graph import GraphContext
from repconv.fold.rules.base import Refusal, Unary, describe, spatial_dims
from repconv.fold.slot import is_identity_slot

_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def lower(node: fx.Node, ctx: GraphContext) -> Unary | Refusal | None:
    if node.op == "call_module":
        module = ctx.submodule(node)
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or is_identity_slot(module):
            return None
        where = describe(node)
        if module.running_mean is None or module.running_var is None:
            return Refusal(f"BatchNorm {where} has no running statistics "
                           "(track_running_stats=False): it uses batch statistics even in eval")
        if module.training:
            return Refusal(f"BatchNorm {where} is in train mode; call model.eval() first")
        source, mean, var = node.args[0], module.running_mean, module.running_var
        weight, bias, eps = module.weight, module.bias, module.eps
        label = type(module).__name__
    elif node.op == "call_function" and node.target is F.batch_norm:
        args = dict(zip(_BN_ARGS, node.args))
        args.update(node.kwargs)
        source = args["input"]
        if not ctx.is_tensor_input(source):
            return None
        where = describe(node)
        if ctx.constant(args.get("training", False)) is not False:
            return Refusal(f"batch_norm at {where} runs in training mode (batch statistics)")
        mean, var = ctx.constant(args["running_mean"]), ctx.constant(args["running_var"])
        if mean is None or var is None:
            return Refusal(f"batch_norm at {where} has no constant running statistics")
        weight, bias = ctx.constant(args.get("weight")), ctx.constant(args.get("bias"))
        eps = ctx.constant(args.get("eps", 1e-5))
        label = "batch_norm"
    else:
        return None
    problem = algebra.bn_statistics_problem(mean, var)
    if problem:
        return Refusal(f"BatchNorm {where}: {problem}")
    nd = spatial_dims(source)
    if nd is None:
        return None
    return Unary(source, algebra.from_bn(mean, var, weight, bias, float(eps), nd), label)
