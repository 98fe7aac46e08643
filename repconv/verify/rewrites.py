"""The per-rewrite error table: each fused conv of a deployed model against the original ops it
replaced, fed the same activation, so that a failed verification names the rewrite that broke
it (errors do not accumulate over depth here, unlike the outputs).

The activation reaching each fused conv comes from a reference fused model (``repconv.fuse`` of
the original, whose ``originals`` map each fused conv's path to the ops it replaced). The
deployed conv at the same path is run on it: the module itself when the deployed model has one
there (.pt, .safetensors, pickled), else the reference conv with the deployed model's weights
at that path (a .pt2 program keeps its weights' names, not its modules).

A rewrite passes when at every output element ``|error| <= rtol * (sum |w * x| + |b|)``, the
sum of magnitudes that element adds up, computed by the same conv on ``|x|`` with ``|w|``,
``|b|`` (each at least the dtype's smallest normal number, under which rounding is absolute).
Rounding the fused weights to the model's dtype moves an element by at most the dtype's unit
roundoff times that sum, however much its terms cancel, so the bound holds at any depth and
width; a scale-relative error (kept in the row as ``max_rel_error``) has no such guarantee.

The error is taken against the replaced ops run in float64 (their tensors upcast in place,
exactly, and put back), on the same activation: the bound is about the fused conv's rounding,
and the replaced ops round too, by more than it where a branch's BN subtracts a running mean
from a much larger conv output or branches cancel (MobileOne: 3.9e-4 of the fused magnitude in
float32, against a bound of 1e-4). That rounding is kept in the row as ``noise``. Where the
replaced ops do not run in float64, the row compares with them as run and says so
(``reference``).

That worst-case bound grows with the number of terms, while rounding errors add up like a
random walk: a wide conv (4,608 terms) whose weights are all x1.02 stays within bf16's bound.
So where the weights are fp16/bf16 (``unit``, the dtype's machine epsilon), a row must also be
within ``ROUNDING_SIGMAS`` standard deviations of what rounding each deployed weight and bias to
the dtype could do: ``sigma**2 = sum (ulp(w)**2 / 12) * x**2 + ulp(b)**2 / 12`` (each
rounding uniform within half its ulp), plus ``ARITHMETIC_RTOL`` of the magnitude for the
float32 arithmetic. Kept in the row as ``rounding_sigmas`` (max error / sigma).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from repconv.errors import one_line
from repconv.fold.calls import copies
from repconv.fold.local_check import as_token_shape
from repconv.rewrite.record import RewriteRecord
from repconv.verify.reference import FLOAT64, ORIGINAL, computed_in, error_of
from repconv.verify.report import RewriteError

_CALLABLE = (nn.modules.conv._ConvNd, nn.Linear)
# The max of |N(0, 1)| over a million elements is about 5; a uniform rounding error is at most
# sqrt(3) sigma per term. Correct folds reach 5.0 sigma on timm models, one conv of bf16
# weights x1.02 16 or more (docs/tolerances.md). A coherent error (many identical weights
# rounded alike, on inputs of one sign) can reach sqrt(3 * n) sigma: 10 holds up to 33 taps.
ROUNDING_SIGMAS = 10.0
# the float32 arithmetic of the fused conv itself, against the float64 reference
ARITHMETIC_RTOL = 1e-5


@dataclass
class RewriteCheck:
    reference: nn.Module  # the fused model the activations come from
    originals: Mapping[str, nn.Module]  # fused conv path -> the ops it replaced
    records: Sequence[RewriteRecord]
    deployed: nn.Module  # the model under test (may be ``reference`` itself)
    _state: dict[str, Tensor] = field(default_factory=dict)

    def modules(self) -> list[nn.Module]:
        """Every module whose tensors take part (to run them in one dtype)."""
        return [self.reference, *self.originals.values()]

    def errors(self, inputs: tuple[Any, ...], rtol: float, atol: float,
               floor: float, unit: float | None = None) -> list[RewriteError]:
        """Run the reference model once on ``inputs``; at each fused conv, compare. ``floor``:
        the smallest normal number of the weights' dtype, below which rounding is absolute;
        ``unit``: fp16/bf16 weights' machine epsilon, for the rounding bound (else None)."""
        records = {r.fused_module: r for r in self.records if r.fused_module}
        rows: dict[str, RewriteError] = {}
        handles = []
        for path in self.originals:
            def hook(_module: nn.Module, args: tuple, output: Tensor, path: str = path) -> None:
                if path in rows:  # a conv called twice is checked on its first call
                    return
                rows[path] = _row(path, None, problem="being compared")  # hooks re-enter
                rows[path] = self._compare(path, records.get(path), args[0], output, rtol, atol,
                                           floor, unit)
            handles.append(self.reference.get_submodule(path).register_forward_hook(hook))
        self._state = {} if self.deployed is self.reference else dict(
            self.deployed.state_dict(keep_vars=True))
        try:
            self.reference(*copies(inputs))
        finally:
            for handle in handles:
                handle.remove()
            self._state = {}
        return [rows.get(path) or _row(path, records.get(path), problem="not run on the input")
                for path in self.originals]

    def _compare(self, path: str, record: RewriteRecord | None, x: Tensor, output: Tensor,
                 rtol: float, atol: float, floor: float, unit: float | None) -> RewriteError:
        try:
            conv, weights = self._deployed_conv(path)
        except LookupError as exc:
            return _row(path, record, problem=str(exc))
        got = output if self.deployed is self.reference else functional_call(conv, weights, (x,))
        expected = as_token_shape(self.originals[path](x.clone()), got)
        if not isinstance(got, Tensor) or got.shape != expected.shape:
            return _row(path, record, problem="the deployed conv returns another shape")
        exact, note = self._exact(path, x, expected)
        # what each output element sums: sum |w * x| + |b|, the scale rounding errors scale with
        # (a weight under ``floor`` is rounded to an absolute step: counted as ``floor``)
        magnitude = functional_call(conv, {k: v.abs().clamp_min(floor)
                                           for k, v in weights.items()}, (x.abs(),)).double()
        tiny = torch.finfo(torch.float64).tiny
        reference = exact if exact is not None else expected.double()
        error = (reference - got.double()).abs().nan_to_num(float("inf"))
        abs_error, rel_error, _ = error_of(expected, got)
        relative = error / magnitude.clamp_min(tiny)
        noise = None if exact is None or exact is expected else float(
            ((expected.double() - exact).abs().nan_to_num(float("inf"))
             / magnitude.clamp_min(tiny)).max())
        passed = bool((error <= atol + rtol * magnitude).all())
        sigmas = None
        if unit is not None:
            sigma = _rounding_sigma(conv, weights, x, unit, floor)
            sigmas = float((error / sigma.clamp_min(tiny)).max())
            passed &= bool((error <= atol + ARITHMETIC_RTOL * magnitude
                            + ROUNDING_SIGMAS * sigma).all())
        return _row(path, record, abs_error, rel_error, float(relative.max()), passed,
                    reference=ORIGINAL if exact is None else FLOAT64, noise=noise,
                    reference_note=note, rounding_sigmas=sigmas)

    def _exact(self, path: str, x: Tensor, expected: Tensor) -> tuple[Tensor | None, str]:
        """The replaced ops' output on ``x`` computed in float64 (``expected`` itself when they
        already ran so), or None and why they do not run in float64."""
        if expected.dtype == torch.float64:
            return expected, ""
        original = self.originals[path]
        try:
            with computed_in(torch.float64, original):
                exact = as_token_shape(original(x.to(torch.float64, copy=True)), expected)
        except Exception as exc:  # no double kernel, a tensor not upcast, out of memory
            return None, f"the replaced ops do not run in float64 ({one_line(exc)})"
        if not isinstance(exact, Tensor) or exact.shape != expected.shape or (
                exact.dtype != torch.float64):
            return None, "the replaced ops do not compute their output in float64"
        return exact, ""

    def _deployed_conv(self, path: str) -> tuple[nn.Module, dict[str, Tensor]]:
        """The deployed conv at ``path`` and its weights: its own module where it has one, else
        the reference conv to run the deployed weights of that name with."""
        try:
            module = self.deployed.get_submodule(path)
        except AttributeError:
            module = None
        if isinstance(module, _CALLABLE):
            return module, dict(module.named_parameters())
        conv = self.reference.get_submodule(path)
        names = [name for name, _ in conv.named_parameters()]
        missing = [name for name in names if f"{path}.{name}" not in self._state]
        if missing:
            raise LookupError(f"the deployed model has no {path}.{missing[0]} (fused by another "
                              "repconv version, or at another input shape?)")
        weights = {name: self._state[f"{path}.{name}"] for name in names}
        if any(weights[n].shape != p.shape for n, p in conv.named_parameters()):
            raise LookupError(f"the deployed model's {path} weights have other shapes")
        return conv, weights


def _rounding_sigma(conv: nn.Module, weights: dict[str, Tensor], x: Tensor, unit: float,
                    floor: float) -> Tensor:
    """Per output element, the standard deviation of what rounding every weight and bias to a
    dtype of machine epsilon ``unit`` does (uniform within half an ulp each), in float64."""
    def variance(t: Tensor) -> Tensor:
        _, exponent = torch.frexp(t.detach().double().abs().clamp_min(floor))
        ulp = torch.ldexp(torch.full_like(t, unit, dtype=torch.float64), exponent - 1)
        return ulp.square() / 12
    variances = {name: variance(t) for name, t in weights.items()}
    return functional_call(conv, variances, (x.double().square(),)).sqrt()


def _row(path: str, record: RewriteRecord | None, abs_error: float = 0.0,
         rel_error: float = 0.0, magnitude_error: float = 0.0, passed: bool = True,
         problem: str = "", *, reference: str = "", noise: float | None = None,
         reference_note: str = "", rounding_sigmas: float | None = None) -> RewriteError:
    return RewriteError(
        fused_module=path,
        kind=record.kind if record else "",
        replaced=record.replaced if record else "",
        sources=list(record.sources) if record else [],
        max_abs_error=abs_error,
        max_rel_error=rel_error,
        magnitude_error=magnitude_error,
        passed=passed,
        problem=problem,
        reference=reference,
        noise=noise,
        reference_note=reference_note,
        rounding_sigmas=rounding_sigmas,
    )

