"""Results that render themselves (rich) and serialise to JSON."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from torch import nn

from repconv.rewrite.record import RewriteRecord
from repconv.verify.report import VerifyReport


@dataclass(frozen=True)
class ModelCounts:
    modules: int
    convs: int
    batchnorms: int
    parameters: int

    @classmethod
    def of(cls, model: nn.Module) -> ModelCounts:
        leaves = [m for m in model.modules() if not list(m.children())]
        return cls(
            modules=len(leaves),
            convs=sum(isinstance(m, nn.modules.conv._ConvNd) for m in leaves),
            batchnorms=sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
            parameters=sum(p.numel() for p in model.parameters()),
        )


@dataclass(frozen=True)
class SkipRecord:
    where: str
    reason: str


@dataclass
class FuseReport:
    rewrites: list[RewriteRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    cuts: list[SkipRecord] = field(default_factory=list)  # folds kept apart, each still folded
    notes: list[str] = field(default_factory=list)
    before: ModelCounts | None = None
    after: ModelCounts | None = None
    verification: VerifyReport | None = None
    show_rewrites: bool = False

    def rewrites_by_kind(self) -> dict[str, int]:
        return dict(Counter(r.kind for r in self.rewrites).most_common())

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        del data["show_rewrites"]
        data["rewrites_by_kind"] = self.rewrites_by_kind()
        return data

    def __rich__(self) -> RenderableType:
        parts: list[RenderableType] = []
        for note in self.notes:
            parts.append(Text(f"note: {note}", style="yellow"))
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.rewrites_by_kind().items())
        parts.append(Text(f"{len(self.rewrites)} rewrites: {kinds or 'none'}", style="bold"))
        if self.before and self.after:
            table = Table(box=None, pad_edge=False)
            table.add_column("")
            table.add_column("before", justify="right")
            table.add_column("after", justify="right")
            for name in ("modules", "convs", "batchnorms", "parameters"):
                table.add_row(
                    name, f"{getattr(self.before, name):,}", f"{getattr(self.after, name):,}"
                )
            parts.append(table)
        if self.show_rewrites and self.rewrites:
            table = Table(title="rewrites", title_justify="left", box=None, pad_edge=False)
            table.add_column("where", overflow="fold")  # a module path is worth two lines
            for column in ("kind", "ops", "kernel", "groups", "MACs before→after"):
                table.add_column(column)
            for r in self.rewrites:
                table.add_row(
                    ".".join(filter(None, (r.scope, r.module or f"(removed {r.replaced})"))),
                    r.kind,
                    str(len(r.ops)),
                    "x".join(map(str, r.kernel_size)) or "fc",
                    str(r.groups),
                    f"{r.macs_before:,}→{r.macs_after:,}",
                )
            parts.append(table)
        if self.skipped:
            parts.append(Text(f"left unfused ({len(self.skipped)}):", style="bold"))
            parts.extend(Text(f"  {s.where}: {s.reason}") for s in self.skipped)
        if self.show_rewrites and self.cuts:
            parts.append(Text(f"folded apart, not into one conv ({len(self.cuts)}):",
                              style="bold"))
            parts.extend(Text(f"  {s.where}: {s.reason}") for s in self.cuts)
        if self.verification is not None:
            parts.append(self.verification)
        return Group(*parts)
