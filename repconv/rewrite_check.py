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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

from repconv.report import RewriteRecord
from repconv.verify_reference import error_of


@dataclass(frozen=True)
class RewriteError:
    """One fused conv against the ops it replaced. ``problem`` says why it was not compared."""

    fused_module: str
    kind: str
    replaced: str
    sources: list[str]
    max_abs_error: float
    max_rel_error: float  # max |error| / max |original|, as for the outputs
    magnitude_error: float  # max over elements of |error| / (sum |w * x| + |b|): vs rewrite_rtol
    passed: bool
    problem: str = ""


_CALLABLE = (nn.modules.conv._ConvNd, nn.Linear)


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

    def errors(self, inputs: tuple[Tensor, ...], rtol: float, atol: float,
               floor: float) -> list[RewriteError]:
        """Run the reference model once on ``inputs``; at each fused conv, compare. ``floor``:
        the smallest normal number of the weights' dtype, below which rounding is absolute."""
        records = {r.fused_module: r for r in self.records if r.fused_module}
        rows: dict[str, RewriteError] = {}
        handles = []
        for path in self.originals:
            def hook(_module: nn.Module, args: tuple, output: Tensor, path: str = path) -> None:
                if path in rows:  # a conv called twice is checked on its first call
                    return
                rows[path] = _row(path, None, problem="being compared")  # hooks re-enter
                rows[path] = self._compare(path, records.get(path), args[0], output, rtol, atol,
                                           floor)
            handles.append(self.reference.get_submodule(path).register_forward_hook(hook))
        self._state = {} if self.deployed is self.reference else dict(
            self.deployed.state_dict(keep_vars=True))
        try:
            self.reference(*(x.clone() for x in inputs))
        finally:
            for handle in handles:
                handle.remove()
            self._state = {}
        return [rows.get(path) or _row(path, records.get(path), problem="not run on the input")
                for path in self.originals]

    def _compare(self, path: str, record: RewriteRecord | None, x: Tensor, output: Tensor,
                 rtol: float, atol: float, floor: float) -> RewriteError:
        try:
            conv, weights = self._deployed_conv(path)
        except LookupError as exc:
            return _row(path, record, problem=str(exc))
        got = output if self.deployed is self.reference else functional_call(conv, weights, (x,))
        expected = self.originals[path](x.clone())
        if not isinstance(got, Tensor) or got.shape != expected.shape:
            return _row(path, record, problem="the deployed conv returns another shape")
        # what each output element sums: sum |w * x| + |b|, the scale rounding errors scale with
        # (a weight under ``floor`` is rounded to an absolute step: counted as ``floor``)
        magnitude = functional_call(conv, {k: v.abs().clamp_min(floor)
                                           for k, v in weights.items()}, (x.abs(),))
        error = (expected.double() - got.double()).abs().nan_to_num(float("inf"))
        abs_error, rel_error, _ = error_of(expected, got)
        relative = error / magnitude.double().clamp_min(torch.finfo(torch.float64).tiny)
        return _row(path, record, abs_error, rel_error, float(relative.max()),
                    bool((error <= atol + rtol * magnitude.double()).all()))

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


def _row(path: str, record: RewriteRecord | None, abs_error: float = 0.0,
         rel_error: float = 0.0, magnitude_error: float = 0.0, passed: bool = True,
         problem: str = "") -> RewriteError:
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
    )

