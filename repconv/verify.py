"""Numerical proof that a fused model computes what the original did.

Both models run on the same seeded random inputs; every leaf of (possibly nested) tuple, list
or dict outputs is compared. Error is measured relative to each output's scale (max |value|):
activations of networks with real BN statistics reach 1e16, so absolute tolerances lie.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from rich.text import Text
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from repconv.errors import InputError, TraceError

# Default scale-relative tolerance by dtype: fused weights are exact in float64 and rounded
# once, so what remains is the rounding of the arithmetic. The least precise floating dtype among
# the inputs and the model's tensors sets it (a float32 conv feeding a float64 scale rounds like
# float32).
DEFAULT_RTOL = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


@dataclass(frozen=True)
class VerifyReport:
    passed: bool
    max_abs_error: float
    max_rel_error: float
    rtol: float
    atol: float
    trials: int
    seed: int
    input_shapes: list[list[int]]
    outputs_compared: int
    worst_output: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"verification {verdict}: max scale-relative error {self.max_rel_error:.2e} "
            f"(tolerance {self.rtol:.0e}), max abs error {self.max_abs_error:.2e}, "
            f"{self.outputs_compared} output(s) x {self.trials} seeded input(s)"
        )

    def __rich__(self) -> Text:
        return Text(self.summary(), style="green" if self.passed else "bold red")


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Run models in eval mode, then restore every submodule's own training flag."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    for module, _ in saved:  # flags, not .eval(): torch.export modules refuse eval()
        module.training = False
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


def random_inputs(example_inputs: tuple[Tensor, ...], seed: int) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.dtype)
        if x.is_floating_point()
        else x
        for x in example_inputs
    )


def _leaves(output: object) -> list[tuple[str, Tensor]]:
    leaves, _ = tree_flatten(output)
    return [(f"output[{i}]", leaf) for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]


def verify(
    original: nn.Module,
    fused: nn.Module,
    example_inputs: Tensor | tuple[Tensor, ...],
    *,
    rtol: float | None = None,
    atol: float = 0.0,
    seed: int = 0,
    trials: int = 3,
) -> VerifyReport:
    """Compare ``original`` and ``fused`` on ``trials`` seeded random inputs shaped like
    ``example_inputs``. Passes when every leaf has ``max|a-b| <= atol + rtol * max|a|``."""
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise InputError(f"{name} must be a finite number >= 0, not {value}; pass --{name} "
                             "like 1e-5")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if rtol is None:
        tensors = [*inputs, *original.parameters(), *original.buffers()]
        dtypes = {t.dtype for t in tensors if t.is_floating_point()}
        rtol = max((DEFAULT_RTOL.get(d, 1e-5) for d in dtypes), default=1e-5)
    worst_rel, worst_abs, worst_name, compared = 0.0, 0.0, "", 0
    passed = True
    with eval_mode(original, fused), torch.no_grad():
        for trial in range(trials):
            trial_inputs = random_inputs(inputs, seed + trial)
            try:  # each model gets its own copy: a model may change its input in place
                expected = _leaves(original(*(x.clone() for x in trial_inputs)))
                got = _leaves(fused(*(x.clone() for x in trial_inputs)))
            except Exception as exc:  # model code failing on the input is a usage problem
                raise TraceError(f"the model fails on inputs of shape "
                                 f"{[list(x.shape) for x in inputs]}: {exc}"[:300]) from exc
            if len(expected) != len(got):
                raise TraceError(f"fused model returns {len(got)} tensors, original "
                                 f"{len(expected)}")
            compared = len(expected)
            for (name, a), (_, b) in zip(expected, got):
                if a.shape != b.shape:
                    passed, worst_name = False, name
                    worst_rel = worst_abs = float("inf")
                    continue
                a64, b64 = a.double(), b.double()
                scale = float(a64.abs().max()) if a.numel() else 0.0
                abs_error = float((a64 - b64).abs().max()) if a.numel() else 0.0
                if abs_error != abs_error:  # NaN in either output
                    abs_error = float("inf")
                rel_error = abs_error / scale if scale > 0 else abs_error
                if abs_error > atol + rtol * scale:
                    passed = False
                if rel_error >= worst_rel:
                    worst_rel, worst_abs, worst_name = rel_error, abs_error, name
                worst_abs = max(worst_abs, abs_error)
    return VerifyReport(
        passed=passed,
        max_abs_error=worst_abs,
        max_rel_error=worst_rel,
        rtol=rtol,
        atol=atol,
        trials=trials,
        seed=seed,
        input_shapes=[list(x.shape) for x in inputs],
        outputs_compared=compared,
        worst_output=worst_name,
    )
