"""The result of a verification: what was compared on which inputs, the error of every output
and of every rewrite, as a report that renders itself (rich) and serialises to JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from rich.console import Group
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from repconv.rewrite_check import RewriteError


@dataclass(frozen=True)
class OutputError:
    """One output leaf on one input."""

    name: str
    shape: list[int]
    max_abs_error: float
    max_rel_error: float
    passed: bool


@dataclass(frozen=True)
class Run:
    """One input given to both models: where it came from, its shapes, the error per output."""

    source: str
    seed: int | None
    input_shapes: list[list[int]]
    outputs_compared: int
    elements_compared: int
    outputs: list[OutputError]


@dataclass(frozen=True)
class SkippedRun:
    source: str
    input_shapes: list[list[int]]
    reason: str


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

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        problem = f": {self.problem}" if self.problem else ""
        # zero elements compared always comes with a problem that says so
        elements = f" of {self.elements_compared:,} element(s)" if self.elements_compared else ""
        shapes = len({str(r.input_shapes) for r in self.runs})
        at = f" at {shapes} shape(s)" if shapes > 1 else ""
        return (
            f"verification {verdict}{problem}: max scale-relative error "
            f"{self.max_rel_error:.2e} (tolerance {self.rtol:.0e}), max abs error "
            f"{self.max_abs_error:.2e}, {self.outputs_compared} output(s){elements} x "
            f"{self.trials} input(s){at}"
        )

    def rewrite_summary(self) -> str:
        compared = [r for r in self.rewrite_errors if not r.problem]
        failed = [r for r in compared if not r.passed]
        if failed:
            named = ", ".join(f"{r.fused_module} ({r.magnitude_error:.1e})" for r in failed[:5])
            return (f"{len(failed)} of {len(compared)} rewrite(s) differ from the ops they "
                    f"replaced by more than {self.rewrite_rtol:.0e}: {named}")
        worst = max(compared, key=lambda r: r.magnitude_error, default=None)
        where = f" (worst {worst.magnitude_error:.1e}: {worst.fused_module})" if worst else ""
        return (f"{len(compared)} rewrite(s) each within {self.rewrite_rtol:.0e} of the ops they "
                f"replaced{where}")

    def __rich__(self) -> Group:
        style = "green" if self.passed else "bold red"
        parts: list[Text | Table] = [Text(self.summary(), style=style)]
        if len(self.runs) > 1:
            table = Table(box=None, pad_edge=False)
            for column in ("input", "shapes", "outputs", "elements", "max rel error"):
                table.add_column(column, justify="left" if column in ("input", "shapes")
                                 else "right")
            for run in self.runs:
                worst = max((o.max_rel_error for o in run.outputs), default=0.0)
                table.add_row(run.source, " ".join("x".join(map(str, s))
                                                   for s in run.input_shapes),
                              str(run.outputs_compared), f"{run.elements_compared:,}",
                              Text(f"{worst:.2e}", style="" if all(
                                  o.passed for o in run.outputs) else "bold red"))
            parts.append(table)
        parts += [Text(f"not compared at {s.source} {s.input_shapes}: {s.reason}",
                       style="yellow") for s in self.skipped_runs]
        if self.rewrite_errors:
            parts.append(Text(self.rewrite_summary(), style=style))
            parts += [Text(f"  {r.fused_module}: {r.problem}", style="yellow")
                      for r in self.rewrite_errors if r.problem]
        return Group(*parts)
