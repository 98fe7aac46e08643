"""The result of a verification: what was compared on which inputs, the error of every output
and of every rewrite, as a report that renders itself (rich) and serialises to JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text

# how many float32 units one unit of fp16/bf16 is (2^13, 2^16): the default noise factor of an
# fp16/bf16 model compared in float32 scales its float32 noise to its own dtype by this
UNIT_RATIO = {dtype: torch.finfo(dtype).eps / torch.finfo(torch.float32).eps
              for dtype in (torch.float16, torch.bfloat16)}
_UNIT_RATIO_BY_NAME = {str(dtype).removeprefix("torch."): r for dtype, r in UNIT_RATIO.items()}


def times(ratio: float) -> str:
    """An error-to-noise ratio: "0.72x", "1.3x", "400x"."""
    return f"{ratio:.2g}x" if ratio < 1 else f"{ratio:.1f}x" if ratio < 10 else f"{ratio:.0f}x"


@dataclass(frozen=True)
class OutputError:
    """One output leaf on one input. ``max_*_error``: against the original as run;
    ``reference_error``: against the reference (the original in float64 when ``noise`` is set,
    else the original as run), which must be within ``tolerance`` (scale-relative)."""

    name: str
    shape: list[int]
    max_abs_error: float
    max_rel_error: float
    passed: bool
    reference_error: float = 0.0
    noise: float | None = None  # max |original - original in float64| / scale
    tolerance: float = 0.0  # max(rtol, noise_factor * noise), or rtol without a noise
    # positions where one model has inf/NaN and the other not the same one (fails when > 0)
    nonfinite_mismatches: int = 0
    # elements judged on their own scale (repconv.verify.scales): sentinels far above the rest
    sentinels: int = 0

    @property
    def margin(self) -> float:
        """reference_error / tolerance: above 1 fails (atol aside)."""
        if self.nonfinite_mismatches:
            return float("inf")
        if self.tolerance > 0:
            return self.reference_error / self.tolerance
        return float("inf") if self.reference_error > 0 else 0.0


@dataclass(frozen=True)
class Run:
    """One input given to both models: where it came from, its shapes, the error per output."""

    source: str
    seed: int | None
    input_shapes: list[list[int]]
    outputs_compared: int
    elements_compared: int
    outputs: list[OutputError]
    seconds: float = 0.0  # both models and the float64 reference on this input


@dataclass(frozen=True)
class SkippedRun:
    source: str
    input_shapes: list[list[int]]
    reason: str


@dataclass(frozen=True)
class RewriteError:
    """One fused conv against the ops it replaced. ``problem`` says why it was not compared."""

    fused_module: str
    kind: str
    replaced: str
    sources: list[str]
    max_abs_error: float
    max_rel_error: float  # max |error| / max |original|, as for the outputs
    # max over elements of |error| / (sum |w * x| + |b|), the error against ``reference``:
    # what rewrite_rtol bounds
    magnitude_error: float
    passed: bool
    problem: str = ""
    reference: str = ""  # "float64": the replaced ops run in float64; "original": as run
    # the replaced ops' own rounding (as run against float64) over the same magnitude; None
    # without a float64 run
    noise: float | None = None
    reference_note: str = ""  # why the replaced ops were not run in float64
    # fp16/bf16 weights: max error / sigma of the weights' rounding (None otherwise)
    rounding_sigmas: float | None = None


@dataclass(frozen=True)
class VerifyReport:
    passed: bool
    max_abs_error: float
    max_rel_error: float
    rtol: float
    atol: float
    trials: int  # inputs compared
    seed: int
    input_shapes: list[list[int]]  # of the example input
    outputs_compared: int
    worst_output: str
    elements_compared: int = 0  # output elements compared on the first input
    problem: str = ""  # why it failed other than by error size: outputs that cannot be compared
    dtype: str = ""  # least precise floating dtype of the model and inputs: sets the defaults
    compared_in: str = ""  # the dtype both models ran in
    runs: list[Run] = field(default_factory=list)
    skipped_runs: list[SkippedRun] = field(default_factory=list)
    rewrite_rtol: float | None = None
    rewrite_errors: list[RewriteError] = field(default_factory=list)
    worst_rewrite: str = ""
    # the bar (repconv.verify.reference): "float64" (noise-relative) or "original" (fixed rtol)
    reference: str = ""
    reference_note: str = ""  # why the reference is not float64
    noise_factor: float = 0.0  # tolerance = max(rtol, noise_factor * noise)
    # the output closest to (or furthest over) its tolerance: where, and its numbers
    deciding_output: str = ""
    reference_error: float = 0.0
    noise: float | None = None
    tolerance: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def noise_unit_ratio(self) -> float:
        """The model dtype's unit in float32 units (1 for float32): the noise is shown scaled
        to the dtype by it."""
        return _UNIT_RATIO_BY_NAME.get(self.dtype, 1.0) if self.compared_in == "float32" else 1.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        problem = f": {self.problem}" if self.problem else ""
        # zero elements compared always comes with a problem that says so
        elements = f" of {self.elements_compared:,} element(s)" if self.elements_compared else ""
        shapes = len({str(r.input_shapes) for r in self.runs})
        at = f" at {shapes} shape(s)" if shapes > 1 else ""
        sizes = (f"max abs error {self.max_abs_error:.2e}, {self.outputs_compared} "
                 f"output(s){elements} x {self.trials} input(s){at}")
        if self.noise is None or self.problem:
            fallback = f" ({self.reference_note})" if self.reference_note and self.runs else ""
            return (f"verification {verdict}{problem}: max scale-relative error "
                    f"{self.max_rel_error:.2e} (tolerance {self.rtol:.0e}{fallback}), {sizes}")
        return f"verification {verdict}: {self.noise_summary()}; {sizes}"

    def noise_summary(self) -> str:
        """The deciding output's error against the float64 original, next to the original's
        own noise: "error 3.0e-03 ... is 400x the original's own float32 noise 7.5e-06"."""
        noise = (self.noise or 0.0) * self.noise_unit_ratio
        ratio = (times(self.reference_error / noise) if noise > 0 else
                 "above" if self.reference_error > 0 else "equal to")
        where = f"{self.deciding_output}: " if not self.passed else ""
        verb = "is" if not self.passed else "at"
        scaled = (f" x {self.noise_unit_ratio:g} ({self.dtype}'s unit) = {noise:.2e}"
                  if self.noise_unit_ratio != 1 else "")
        factor = self.noise_factor / self.noise_unit_ratio
        return (f"{where}error {self.reference_error:.2e} of the output's scale against the "
                f"original run in float64, {verb} {ratio} the original's own {self.compared_in} "
                f"noise {self.noise or 0.0:.2e}{scaled} (allowed {self.tolerance or 0.0:.2e}: "
                f"{factor:g}x the noise{' so scaled' if scaled else ''}, at least "
                f"{self.rtol:.0e})")

    def rewrite_summary(self) -> str:
        compared = [r for r in self.rewrite_errors if not r.problem]
        failed = [r for r in compared if not r.passed]
        if failed:
            named = ", ".join(f"{r.fused_module} ({r.magnitude_error:.1e}" + (
                f", {r.rounding_sigmas:.0f} sigma of rounding)" if r.rounding_sigmas is not None
                else ")") for r in failed[:5])
            sigmas = (" or more than the rounding of their weights could" if any(
                r.rounding_sigmas is not None for r in failed) else "")
            return (f"{len(failed)} of {len(compared)} rewrite(s) differ from the ops they "
                    f"replaced by more than {self.rewrite_rtol:.0e}{sigmas}: {named}")
        worst = max(compared, key=lambda r: r.magnitude_error, default=None)
        where = f" (worst {worst.magnitude_error:.1e}: {worst.fused_module})" if worst else ""
        return (f"{len(compared)} rewrite(s) each within {self.rewrite_rtol:.0e} of the ops they "
                f"replaced{where}")

    def __rich__(self) -> Group:
        style = "green" if self.passed else "bold red"
        parts: list[Text | Table] = [Text(self.summary(), style=style)]
        if len(self.runs) > 1 or self.noise is not None:
            parts.append(self._runs_table())
        parts += [Text(f"not compared at {s.source} {s.input_shapes}: {s.reason}",
                       style="yellow") for s in self.skipped_runs]
        if self.rewrite_errors:
            parts.append(Text(self.rewrite_summary(), style=style))
            parts += [Text(f"  {r.fused_module}: {r.problem}", style="yellow")
                      for r in self.rewrite_errors if r.problem]
        return Group(*parts)

    def _runs_table(self) -> Table:
        """One row per input: its worst output's error against the original as run and, with a
        float64 reference, against that, the original's own noise, their ratio and the bar."""
        noisy = self.noise is not None
        # fits a CI log's 80 columns: the summary line above gives outputs and elements
        columns = ["input", "shapes", *([] if noisy else ["outputs", "elements"]), "error"]
        ratio = f"ratio to noise x{self.noise_unit_ratio:g}" if self.noise_unit_ratio != 1 else (
            "ratio")
        columns += ["vs float64", "own noise", ratio, "allowed"] if noisy else []
        columns.append("s")
        table = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0))
        for column in columns:
            table.add_column(column, justify="left" if column in ("input", "shapes") else "right")
        for run in self.runs:
            worst = max((o.max_rel_error for o in run.outputs), default=0.0)
            style = "" if all(o.passed for o in run.outputs) else "bold red"
            counts = [] if noisy else [str(run.outputs_compared), f"{run.elements_compared:,}"]
            row = [run.source, " ".join("x".join(map(str, s)) for s in run.input_shapes),
                   *counts, f"{worst:.2e}"]
            decisive = max(run.outputs, key=lambda o: o.margin, default=None)
            if noisy and decisive is not None and decisive.noise is not None:
                scaled = decisive.noise * self.noise_unit_ratio  # the ratio is to the bar's
                ratio = times(decisive.reference_error / scaled) if scaled > 0 else "-"
                row += [f"{decisive.reference_error:.2e}", f"{decisive.noise:.2e}", ratio,
                        f"{decisive.tolerance:.2e}"]
            elif noisy:
                row += ["-", "-", "-", f"{self.rtol:.0e}"]
            row.append(f"{run.seconds:.2f}")
            table.add_row(*(Text(cell, style=style) for cell in row))
        return table
