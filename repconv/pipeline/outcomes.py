"""What `repconv fuse`, `inspect` and `verify` return: results that render themselves (rich)
and serialise to the --json document."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text

from repconv.driver.report import FuseReport
from repconv.measure.quant import QuantReport
from repconv.verify.report import VerifyReport


@dataclass
class FuseOutcome:
    """The result of ``repconv fuse``: what was loaded, rewritten, verified and written."""

    input: str
    output: str | None
    loaded: list[str]
    report: FuseReport
    written: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    verification_skipped: bool = False  # --skip-verify
    quant: QuantReport | None = None  # --quant: in the JSON document only when asked for

    @property
    def ok(self) -> bool:
        return self.report.verification is None or self.report.verification.passed

    def to_dict(self) -> dict[str, Any]:
        data = {
            "ok": self.ok,
            "input": self.input,
            "output": self.output,
            "loaded": self.loaded,
            "written": self.written,
            "seconds": self.seconds,
            "verification_skipped": self.verification_skipped,
            **self.report.to_dict(),
        }
        if self.quant is not None:
            data["quant"] = self.quant.to_dict()
        return data

    def __rich__(self) -> RenderableType:
        lines: list[RenderableType] = [Text(f"{self.input}: {', '.join(self.loaded)}")]
        lines.append(self.report)
        if self.verification_skipped:
            lines.append(Text("verification skipped (--skip-verify): the fused model was not "
                              "compared with the original as a whole; each rewrite was checked "
                              "on its own", style="yellow"))
        if self.quant is not None:
            lines.append(self.quant)
        if self.written:
            lines.append(Text(f"wrote {self.output} ({self.written})", style="bold green"))
        elif self.output:
            lines.append(Text(f"nothing written to {self.output}", style="bold red"))
        return Group(*lines)


@dataclass
class VerifyOutcome:
    original: str
    deploy: str
    report: VerifyReport
    input_shape_from: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.report.passed, "original": self.original, "deploy": self.deploy,
                "input_shape_from": self.input_shape_from, "notes": self.notes,
                **self.report.to_dict()}

    def __rich__(self) -> RenderableType:
        return Group(Text(f"{self.deploy} against {self.original} (input shape from "
                          f"{self.input_shape_from})"),
                     *(Text(f"note: {note}", style="yellow") for note in self.notes), self.report)
