"""The deploy dtype (``fuse --dtype``) and what storing the deploy model in float16/bfloat16
costs against a float32 deploy.

Trainers keep their EMA model in fp16 and their loaders upcast it (``.float()``) before use. A
fold written in fp16 rounds every fused weight to fp16; the same fold written in float32 keeps
what the upcast weights give. Both are measured against the float32 original (the stored model
upcast, exactly), so the report says what the stored dtype costs.
"""

from __future__ import annotations

import copy
from enum import Enum

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

LOW_PRECISION = (torch.float16, torch.bfloat16)


class DeployDtype(str, Enum):
    """The dtypes a deploy model can be written in."""

    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"

    @property
    def torch(self) -> torch.dtype:
        return getattr(torch, self.value)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter (float32 for one without)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def to_dtype(model: nn.Module, dtype: DeployDtype | None) -> nn.Module:
    """``model`` with its floating tensors in ``dtype`` (the model itself when it has it)."""
    if dtype is None or model_dtype(model) == dtype.torch:
        return model
    return model.to(dtype.torch)


def _max_error(expected: object, got: object) -> float:
    """max |a - b| / max |a| over the output leaves (in float64)."""
    want = [t for t in tree_flatten(expected)[0] if isinstance(t, Tensor)]
    have = [t for t in tree_flatten(got)[0] if isinstance(t, Tensor)]
    worst = 0.0
    for a, b in zip(want, have):
        a, b = a.detach().double(), b.detach().double()
        worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)))
    return worst


def precision_cost(stored: nn.Module, fused: nn.Module, fused_float32: nn.Module,
                   inputs: tuple[Tensor, ...]) -> str:
    """What the deploy model's low-precision dtype costs: its error run in float32 and a float32
    deploy's (``fused_float32``, the same fold of the upcast weights), both against the stored
    model upcast to float32, on ``inputs``."""
    original = copy.deepcopy(stored).float().eval()
    deployed = copy.deepcopy(fused).float().eval()
    x = tuple(t.float() if t.is_floating_point() else t for t in inputs)
    with torch.no_grad():
        expected = original(*x)
        low, full = _max_error(expected, deployed(*x)), _max_error(expected, fused_float32(*x))
    name = str(model_dtype(fused)).removeprefix("torch.")
    return (f"the deploy model is stored in {name}: run in float32 it errs by {low:.1e} of the "
            f"output's scale against the float32 original (the stored weights upcast), where a "
            f"float32 deploy of the same fold errs by {full:.1e}; --dtype float32 writes that "
            "one")
