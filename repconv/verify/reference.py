"""The bar an output is held to: the original model's own rounding noise, measured per input.

A fused model computes the same function as the original with different rounding, so how far
it may be from the original depends on how much rounding the original itself does: a deep
network with large activations is 3e-5 of its output scale away from its exact (float64)
result in float32, a small one 1e-7. A fixed tolerance is too loose for the second or refuses
the first. So, where the models are compared in float32 (fp32 models, and fp16/bf16 models
upcast to float32), the ORIGINAL also runs in float64 on each input (its floating tensors
upcast in place, exactly, and put back right after that run), and for every output leaf:

- ``noise``: max |original - original in float64| / scale, the original's own rounding error;
- ``reference_error``: max |fused - original in float64| / scale, the fused model's;
- the output passes when ``reference_error <= max(rtol, noise_factor * noise)`` (plus
  ``atol`` in absolute terms).

A correct fold has ``reference_error`` about ``noise`` (docs/tolerances.md has the measured
ratios; ``NOISE_FACTOR`` in :mod:`repconv.verify.outputs` leaves a margin above them). Where the
original does not run in float64 (an op without a double kernel, a tensor the in-place upcast
cannot reach, no memory for the float64 copy), verification falls back to the fixed ``rtol``
against the original as run, and the report says why.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from repconv.errors import one_line
from repconv.verify.inputs import floating_to
from repconv.verify.report import OutputError
from repconv.verify.scales import nonfinite_mismatches, sentinel_groups

FLOAT64 = "float64"  # VerifyReport.reference when the bar is noise-relative
ORIGINAL = "original"  # ... when outputs are compared with the original as run (fixed rtol)

_PRECISION = {torch.float16: 0, torch.bfloat16: 0, torch.float32: 1, torch.float64: 2}


def _own_tensors(module: nn.Module) -> Iterator[Tensor]:
    yield from (t for t in module._parameters.values() if t is not None)
    yield from (t for t in module._buffers.values() if t is not None)
    yield from (v for v in vars(module).values() if isinstance(v, Tensor))


def _tensors_of(model: nn.Module) -> Iterator[Tensor]:
    for module in model.modules():
        yield from _own_tensors(module)


def _upcast(tensors: Iterator[Tensor], dtype: torch.dtype,
            saved: dict[int, tuple[Tensor, Tensor]]) -> None:
    for tensor in tensors:
        if (tensor.is_floating_point() and id(tensor) not in saved
                and _PRECISION.get(tensor.dtype, 2) < _PRECISION[dtype]):
            saved[id(tensor)] = (tensor, tensor.data)
            tensor.data = tensor.data.to(dtype)


def _put_back(saved: dict[int, tuple[Tensor, Tensor]]) -> None:
    for tensor, data in saved.values():
        tensor.data = data
    saved.clear()


@contextmanager
def computed_in_per_module(dtype: torch.dtype, model: nn.Module) -> Iterator[None]:
    """Like `computed_in`, but each module's own tensors are upcast only while its forward
    runs: a checkpoint is never held twice over in float64. A tensor read outside its module's
    forward (a tied weight read by the parent) meets the input's dtype and raises; callers
    then use `computed_in`."""
    saved_by_call: list[dict[int, tuple[Tensor, Tensor]]] = []

    def upcast(module: nn.Module, _args: object) -> None:
        saved: dict[int, tuple[Tensor, Tensor]] = {}
        _upcast(_own_tensors(module), dtype, saved)
        saved_by_call.append(saved)

    def put_back(_module: nn.Module, _args: object, _output: object) -> None:
        _put_back(saved_by_call.pop())

    handles = []
    try:
        for module in model.modules():
            if next(_own_tensors(module), None) is not None:
                handles.append(module.register_forward_pre_hook(upcast))
                handles.append(module.register_forward_hook(put_back, always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for saved in reversed(saved_by_call):
            _put_back(saved)


@contextmanager
def computed_in(dtype: torch.dtype | None, *models: nn.Module) -> Iterator[None]:
    """Every floating tensor of ``models`` less precise than ``dtype`` upcast in place (exact),
    and its own data put back afterwards (storage sharing included), also when the upcast
    itself fails part way (out of memory)."""
    saved: dict[int, tuple[Tensor, Tensor]] = {}
    try:
        for model in models if dtype is not None else ():
            _upcast(_tensors_of(model), dtype, saved)
        yield
    finally:
        _put_back(saved)


def error_of(expected: Tensor, got: Tensor) -> tuple[float, float, float]:
    """(max abs error, max abs error / max |expected|, max |expected|), in float64; NaN is
    infinitely wrong."""
    if not expected.numel():
        return 0.0, 0.0, 0.0
    a64 = expected.detach().double()
    scale = float(a64.abs().max())
    # one float64 temporary at a time: outputs can be as large as a segmentation map (a64
    # is a copy unless ``expected`` was float64 already)
    difference = a64 - got.detach() if expected.dtype == torch.float64 else a64.sub_(got.detach())
    abs_error = float(difference.abs_().max())
    if abs_error != abs_error:
        abs_error = float("inf")
    return abs_error, abs_error / scale if scale > 0 else abs_error, scale


def leaves(output: object) -> tuple[list[tuple[str, Tensor]], str]:
    """The tensor leaves of an output, and its structure (containers, non-tensor leaves)."""
    flat, spec = tree_flatten(output)
    tensors = [(f"output[{i}]", leaf) for i, leaf in enumerate(flat) if isinstance(leaf, Tensor)]
    structure = [type(leaf).__name__ if not isinstance(leaf, Tensor) else "Tensor"
                 for leaf in flat]
    return tensors, f"{spec} {structure}"


@dataclass
class Float64Reference:
    """Runs the original model in float64, one input at a time. ``problem`` (set on the first
    failure, after which it is not tried again) says why there is no float64 reference."""

    original: nn.Module
    problem: str = ""
    seconds: float = 0.0  # spent on the float64 runs (upcast, forward, put back)
    whole_model: bool = False  # upcast all at once: a per-module upcast failed on this model

    def _forward(self, given: tuple[Any, ...]) -> tuple[list[tuple[str, Tensor]], str]:
        upcast = (computed_in(torch.float64, self.original) if self.whole_model
                  else computed_in_per_module(torch.float64, self.original))
        with upcast:
            output = self.original(*floating_to(given, torch.float64, copy=True))
            return leaves(output)

    def run(self, given: tuple[Any, ...], expected: list[tuple[str, Tensor]],
            structure: str) -> list[Tensor] | None:
        """The original's output leaves on ``given`` computed in float64, or None (and
        ``problem``) where it cannot run so or returns something else than in its dtype."""
        if self.problem:
            return None
        start = time.perf_counter()
        try:
            try:
                got, got_structure = self._forward(given)
            except Exception:
                if self.whole_model:
                    raise
                self.whole_model = True
                got, got_structure = self._forward(given)
            if got_structure != structure or [t.shape for _, t in got] != [
                    t.shape for _, t in expected]:
                self.problem = "the original model returns other outputs in float64"
            elif any(t.dtype != torch.float64 for (_, t), (_, e) in zip(got, expected)
                     if e.is_floating_point()):
                self.problem = "the original model does not compute its outputs in float64"
            return None if self.problem else [t for _, t in got]
        except Exception as exc:  # no double kernel, a tensor not upcast, out of memory
            self.problem = f"the original model does not run in float64 ({one_line(exc)})"
            return None
        finally:
            self.seconds += time.perf_counter() - start


def compare_output(name: str, expected: Tensor, got: Tensor, reference: Tensor | None, *,
                   rtol: float, atol: float, noise_factor: float) -> OutputError:
    """One output leaf: ``got`` (fused) against ``expected`` (the original as run) and, where
    there is one, against ``reference`` (the original in float64), with the bar above. Each
    sentinel group of `scales.sentinel_groups`, and the bulk, is held to the bar on its own
    scale; non-finite values must match exactly (`scales.nonfinite_mismatches`)."""
    exact = reference if reference is not None and expected.is_floating_point() else None
    nonfinite, mismatches = nonfinite_mismatches(
        expected.detach(), got.detach(), *(() if exact is None else (exact.detach(),)))
    groups = sentinel_groups(exact if exact is not None else expected, nonfinite)
    if nonfinite is None and not groups:  # an ordinary output: one scale, as it always was
        return _group_error(name, expected, got, exact, rtol=rtol, atol=atol,
                            noise_factor=noise_factor)
    finite = torch.ones_like(expected, dtype=torch.bool) if nonfinite is None else ~nonfinite
    bulk = finite.clone()
    for group in groups:
        bulk &= ~group
    parts = [_group_error(name, expected[mask], got[mask],
                          None if exact is None else exact[mask], rtol=rtol, atol=atol,
                          noise_factor=noise_factor) for mask in (*groups, bulk)]
    decisive = max(parts, key=lambda part: (not part.passed, part.margin))
    return OutputError(
        name, list(expected.shape),
        max_abs_error=math.inf if mismatches else max(p.max_abs_error for p in parts),
        max_rel_error=math.inf if mismatches else max(p.max_rel_error for p in parts),
        passed=not mismatches and all(p.passed for p in parts),
        reference_error=decisive.reference_error, noise=decisive.noise,
        tolerance=decisive.tolerance, nonfinite_mismatches=mismatches,
        sentinels=sum(int(group.sum()) for group in groups))


def _group_error(name: str, expected: Tensor, got: Tensor, reference: Tensor | None, *,
                 rtol: float, atol: float, noise_factor: float) -> OutputError:
    """The bar on ``got`` against ``expected`` (and ``reference``), on their own scale."""
    abs_error, rel_error, scale = error_of(expected, got)
    if reference is None:
        return OutputError(name, list(expected.shape), abs_error, rel_error,
                           abs_error <= atol + rtol * scale, rel_error, None, rtol)
    ref_abs, ref_rel, ref_scale = error_of(reference, got)
    noise = error_of(reference, expected)[1]
    # an original that overflows in its dtype is not noisy, it is wrong: no widening
    tolerance = max(rtol, noise_factor * noise) if math.isfinite(noise) else rtol
    return OutputError(name, list(expected.shape), abs_error, rel_error,
                       ref_abs <= atol + tolerance * ref_scale, ref_rel, noise, tolerance)
