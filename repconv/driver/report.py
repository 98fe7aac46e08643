"""Results that render themselves (rich) and serialise to JSON."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from torch import nn

from repconv.fold.reasons import Skip
from repconv.fold.slot import real_batchnorms
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
            batchnorms=real_batchnorms(model),
            parameters=sum(p.numel() for p in model.parameters()),
        )


@dataclass
class FuseReport:
    rewrites: list[RewriteRecord] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    cuts: list[Skip] = field(default_factory=list)  # folds kept apart, each still folded
    notes: list[str] = field(default_factory=list)
    before: ModelCounts | None = None
    after: ModelCounts | None = None
    verification: VerifyReport | None = None
    show_rewrites: bool = False

    def rewrites_by_kind(self) -> dict[str, int]:
        return dict(Counter(r.kind for r in self.rewrites).most_common())

    def left_by_cause(self) -> dict[str, list[Skip]]:
        """What is left unfused, grouped by cause, the largest group first."""
        groups: dict[str, list[Skip]] = {}
        for skip in self.skipped:
            groups.setdefault(skip.cause, []).append(skip)
        return dict(sorted(groups.items(), key=lambda item: -len(item[1])))

    def unfolded_batchnorms(self) -> list[Skip]:
        """The BatchNorms left that a hand-written deploy form would fold (a conv next to them,
        run on the example): what --strict fails on."""
        return [s for s in self.skipped if s.folds_elsewhere]

    def left_summary(self) -> str:
        """"left unfused: 3 BatchNorm(s) (2 next to a conv), 1 merge(s) of branches"."""
        kinds = Counter(s.kind for s in self.skipped)
        foldable = len(self.unfolded_batchnorms())
        parts = [(kinds["batchnorm"], "BatchNorm(s)" + (
            f" ({foldable} next to a conv)" if foldable else "")),
            (kinds["merge"], "merge(s) of branches"), (kinds["op"], "other op(s)")]
        return "left unfused: " + ", ".join(f"{n} {what}" for n, what in parts if n)

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        del data["show_rewrites"]
        data["rewrites_by_kind"] = self.rewrites_by_kind()
        for key in ("skipped", "cuts"):
            for row, skip in zip(data[key], getattr(self, key)):
                row["cause"] = skip.cause
        data["left"] = {
            "batchnorms": sum(s.kind == "batchnorm" for s in self.skipped),
            "batchnorms_next_to_a_conv": len(self.unfolded_batchnorms()),
            "merges": sum(s.kind == "merge" for s in self.skipped),
            "by_cause": {cause: len(skips) for cause, skips in self.left_by_cause().items()},
        }
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
            style = "bold yellow" if self.unfolded_batchnorms() else "bold"
            parts.append(Text(self.left_summary(), style=style))
            for cause, skips in self.left_by_cause().items():
                first = skips[0]
                parts.append(Text(f"  {len(skips)} x {cause}: first {first.where}: "
                                  f"{first.reason}"))
            if self.show_rewrites:
                parts.append(Text(f"every op left ({len(self.skipped)}):", style="bold"))
                parts.extend(Text(f"  {s.where}: {s.reason}") for s in self.skipped)
        if self.show_rewrites and self.cuts:
            parts.append(Text(f"folded apart, not into one conv ({len(self.cuts)}):",
                              style="bold"))
            parts.extend(Text(f"  {s.where}: {s.reason}") for s in self.cuts)
        if self.verification is not None:
            parts.append(self.verification)
        return Group(*parts)
