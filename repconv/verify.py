"""Numerical proof that a fused model computes what the original did.

Both models run on the same seeded random inputs; every leaf of (possibly nested) tuple, list
or dict outputs is compared. Error is measured relative to each output's scale (max |value|):
activations of networks with real BN statistics reach 1e16, so absolute tolerances lie.
A verification that compared nothing (no output tensor, or an empty one) fails: it proved
nothing.
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
from repconv.metadata import check_seed

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
    elements_compared: int = 0  # output elements compared per seeded input
    problem: str = ""  # why it failed other than by error size: outputs that cannot be compared

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        problem = f": {self.problem}" if self.problem else ""
        # zero elements compared always comes with a problem that says so
        elements = f" of {self.elements_compared:,} element(s)" if self.elements_compared else ""
        return (
            f"verification {verdict}{problem}: max scale-relative error "
            f"{self.max_rel_error:.2e} (tolerance {self.rtol:.0e}), max abs error "
            f"{self.max_abs_error:.2e}, {self.outputs_compared} output(s){elements} x "
            f"{self.trials} seeded input(s)"
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


def _leaves(output: object) -> tuple[list[tuple[str, Tensor]], str]:
    """The tensor leaves of an output, and its structure (containers, non-tensor leaves)."""
    leaves, spec = tree_flatten(output)
    tensors = [(f"output[{i}]", leaf) for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    structure = [type(leaf).__name__ if not isinstance(leaf, Tensor) else "Tensor"
                 for leaf in leaves]
    return tensors, f"{spec} {structure}"


def _structure_problem(expected: list[tuple[str, Tensor]], got: list[tuple[str, Tensor]],
                       expected_structure: str, got_structure: str) -> str:
    """Why two outputs cannot be compared leaf by leaf ("" when they can)."""
    if not expected:
        return "the original model returned no tensor, so nothing was compared"
    empty = next((name for name, t in expected if t.numel() == 0), None)
    if empty is not None:
        return f"{empty} has no elements, so nothing was compared"
    if len(expected) != len(got) or expected_structure != got_structure:
        return (f"the fused model returns {len(got)} tensor(s) in a different structure than "
                f"the original's {len(expected)}")
    return ""


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
    check_seed(seed)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if rtol is None:
        tensors = [*inputs, *original.parameters(), *original.buffers()]
        dtypes = {t.dtype for t in tensors if t.is_floating_point()}
        rtol = max((DEFAULT_RTOL.get(d, 1e-5) for d in dtypes), default=1e-5)
    worst_rel, worst_abs, worst_name, compared, elements = 0.0, 0.0, "", 0, 0
    problem = ""
    passed = True
    with eval_mode(original, fused), torch.no_grad():
        for trial in range(trials):
            trial_inputs = random_inputs(inputs, seed + trial)
            try:  # each model gets its own copy: a model may change its input in place
                expected, expected_structure = _leaves(
                    original(*(x.clone() for x in trial_inputs)))
                got, got_structure = _leaves(fused(*(x.clone() for x in trial_inputs)))
            except Exception as exc:  # model code failing on the input is a usage problem
                raise TraceError(f"the model fails on inputs of shape "
                                 f"{[list(x.shape) for x in inputs]}: {exc}"[:300]) from exc
            problem = _structure_problem(expected, got, expected_structure, got_structure)
            if problem:
                passed, worst_rel, worst_abs = False, float("inf"), float("inf")
                break
            compared = len(expected)
            elements = sum(a.numel() for _, a in expected)
            for (name, a), (_, b) in zip(expected, got):
                if a.shape != b.shape:
                    passed, worst_name = False, name
                    worst_rel = worst_abs = float("inf")
                    problem = f"{name} has shape {list(b.shape)}, the original's {list(a.shape)}"
                    continue
                a64, b64 = a.double(), b.double()
                scale = float(a64.abs().max())
                abs_error = float((a64 - b64).abs().max())
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
        elements_compared=elements,
        problem=problem,
    )
