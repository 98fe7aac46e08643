"""Lowering rules, one per file, each turning one kind of fx node into a linear op.

The driver asks the rules in this order and takes the first answer that is not None. Order
matters only where patterns overlap: a constant-operand add is a channel shift (channel_scale)
before it could be a branch sum.
"""

from repconv.fold.rules import (
    avg_pool,
    batch_norm,
    branch_sum,
    channel_scale,
    concat,
    conv,
    pad,
    pad_value,
    passthrough,
    token_reshape,
)
from repconv.fold.rules.base import Concat, LinearOp, Refusal, Rule, Sum, Unary

RULES: tuple[Rule, ...] = (
    conv.lower,
    batch_norm.lower,
    avg_pool.lower,
    pad_value.lower,
    pad.lower,
    passthrough.lower,
    token_reshape.lower,
    channel_scale.lower,
    branch_sum.lower,
    concat.lower,
)

__all__ = ["RULES", "Concat", "LinearOp", "Refusal", "Rule", "Sum", "Unary"]
