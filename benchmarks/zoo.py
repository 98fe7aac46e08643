"""Zoo benchmark: repconv against timm's hand-written deploy forms on real architectures.

For each model (random weights, realistic BatchNorm statistics; see zoo_models.py) it compares
the training model, timm's ``reparameterize_model`` and ``repconv.fuse``: conv and BatchNorm
ops executed (counted through a dispatch mode), repconv's scale-relative error at the fuse
input, at batch 2 and at another size, batch-1 latency as interleaved medians, and fuse time.
Bars per model: repconv leaves no more BN ops and runs no more convs than the hand-written
form, errors <= 1e-4, latency <= 1.05x the hand-written form's.

Run: `make zoo` or `OMP_WAIT_POLICY=PASSIVE .venv-zoo/bin/python benchmarks/zoo.py [--models
a,b] [--subset] [--rounds N] [--threads N] [--json PATH]`. Without the passive wait policy,
OpenMP threads spin at barriers, and on a CPU shared with other work 2-thread runs become
20-40x slower and their latencies meaningless.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from _timing import HOW, interleaved_ms
from zoo_models import (
    BY_NAME,
    HAND_WRITTEN,
    REPCONV,
    SUBSET,
    SUBSET_SIZES,
    TRAINING,
    ZOO,
    ZOO_SIZES,
    Comparison,
    ZooModel,
    compare,
    correctness_failures,
    seeded_input,
)

from repconv.measure.opcount import OpCounts

LATENCY_BAR = 1.05  # repconv / hand-written, batch 1
SHORT = {TRAINING: "t", HAND_WRITTEN: "h", REPCONV: "r"}


@dataclass
class Row:
    """One model's line in the table: its comparison, latencies and the bars it fails."""

    comparison: Comparison
    latency_ms: dict[str, float]
    failed_bars: list[str]

    def ratio(self, baseline: str) -> float | None:
        """repconv's latency over ``baseline``'s."""
        if REPCONV not in self.latency_ms or baseline not in self.latency_ms:
            return None
        return self.latency_ms[REPCONV] / self.latency_ms[baseline]

    def to_dict(self) -> dict[str, object]:
        return {**self.comparison.to_dict(), "latency_ms": self.latency_ms,
                "repconv_vs_hand_written": self.ratio(HAND_WRITTEN),
                "repconv_vs_training": self.ratio(TRAINING), "failed_bars": self.failed_bars}


def measure(spec: ZooModel, sizes: tuple[int, int], rounds: int) -> Row:
    """Compare ``spec``'s forms, then time them: batch 1, interleaved round by round."""
    comparison = compare(spec, sizes)
    latency: dict[str, float] = {}
    if REPCONV in comparison.forms:
        x = seeded_input((1, 3, comparison.size, comparison.size), seed=4)
        try:
            with torch.no_grad():
                latency = interleaved_ms(comparison.forms, x, warmup=5, rounds=rounds)
        except Exception as exc:  # a failing model must not stop the zoo
            comparison.problems.append(f"latency: {type(exc).__name__}: {exc}"[:200])
    comparison.forms.clear()  # free the models: only the measurements are kept
    row = Row(comparison, latency, correctness_failures(comparison))
    ratio = row.ratio(HAND_WRITTEN)
    if (ratio is None and not row.failed_bars) or (ratio is not None and ratio > LATENCY_BAR):
        row.failed_bars.append("latency")
    return row


def _per_form(ops: dict[str, OpCounts], metric: str) -> str:
    return "/".join(str(getattr(ops[form], metric)) if form in ops else "-" for form in SHORT)


def _error(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "inf" if math.isinf(value) else f"{value:.1e}"


def _worst(errors: dict[str, float | None]) -> str:
    measured = [error for error in errors.values() if error is not None]
    return _error(max(measured)) if measured else "-"


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: list[Row], sizes: tuple[int, int]) -> str:
    size, other = sizes
    checks = (f"{size}px b1", f"{size}px b2", f"{other}px b1")
    header = ["model", "family", "convs t/h/r", "BN t/h/r", "ops t/h/r",
              *(f"err {check}" for check in checks), "hand err", "fp32 noise",
              "r/h", "r/t", "fuse s", "bars"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        c = row.comparison
        cells = [
            c.name, c.family,
            _per_form(c.ops, "convs"), _per_form(c.ops, "batchnorms"), _per_form(c.ops, "total"),
            *(_error(c.errors[check]) if check in c.errors else "-" for check in checks),
            _worst(c.hand_written_errors), _worst(c.float32_noise),
            _number(row.ratio(HAND_WRITTEN)), _number(row.ratio(TRAINING)),
            _number(c.fuse_seconds, 1),
            "✗ " + ", ".join(row.failed_bars) if row.failed_bars else "✓",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    """The summary line, then the models failing each bar."""
    passing = sum(not row.failed_bars for row in rows)
    families = len({row.comparison.family for row in rows})
    ratios = {row.comparison.name: ratio for row in rows
              if (ratio := row.ratio(HAND_WRITTEN)) is not None}
    line = f"{len(rows)} models ({families} families): {passing} meet all bars"
    if ratios:
        geomean = math.exp(statistics.fmean(math.log(r) for r in ratios.values()))
        worst = max(ratios, key=ratios.__getitem__)
        line += (f"; geomean latency repconv/hand-written {geomean:.3f}; "
                 f"worst {ratios[worst]:.2f} ({worst})")
    by_bar: dict[str, list[str]] = {}
    for row in rows:
        for bar in row.failed_bars:
            by_bar.setdefault(bar, []).append(row.comparison.name)
    failing = [f"- ✗ {bar} ({len(models)}): {', '.join(models)}"
               for bar, models in by_bar.items()]
    return "\n".join([line, "", *failing]) if failing else line


def problems(rows: list[Row]) -> str:
    notes = [f"- {row.comparison.name}: {problem}" for row in rows
             for problem in row.comparison.problems]
    return "\n".join(["exceptions and notes (by model and stage):", *notes]) if notes else ""


def header(sizes: tuple[int, int], rounds: int) -> str:
    """When, on what, and how to read the table."""
    wait_policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    return (
        f"# repconv zoo, {datetime.date.today()}\n\n"
        f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"timm {timm.__version__}, {torch.get_num_threads()} threads "
        f"(OMP_WAIT_POLICY={wait_policy}). Fuse at {sizes[0]}px batch 1; latency: batch 1, "
        f"median of {rounds} interleaved rounds after 5 warm-up calls, {HOW}.\n\n"
        "Forms: t = training model (eval), h = timm reparameterize_model, r = repconv.fuse. "
        "err = max|r - t| / max|t| at each check (n/a: t itself fails there); hand err = the "
        "same for h (worst check); fp32 noise = t in float32 against t in float64 (worst "
        "check), the floor for any fold; r/h, r/t = latency ratios; fuse s includes repconv's "
        "own verification. Timings are noisy: other work shares the CPU.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated timm model names (default: the zoo)")
    parser.add_argument("--subset", action="store_true",
                        help="the CI subset at its sizes (tests/zoo)")
    parser.add_argument("--rounds", type=int, default=20, help="latency rounds per model")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.models:
        specs = [BY_NAME.get(name) or ZooModel(name, "other", hand_written=False)
                 for name in args.models.split(",")]
    else:
        specs = [BY_NAME[name] for name in SUBSET] if args.subset else list(ZOO)
    sizes = SUBSET_SIZES if args.subset else ZOO_SIZES
    torch.set_num_threads(args.threads)
    print(header(sizes, args.rounds), flush=True)
    rows = []
    start = time.perf_counter()
    for index, spec in enumerate(specs, 1):
        print(f"[{index}/{len(specs)}] {spec.name}", file=sys.stderr, flush=True)
        rows.append(measure(spec, sizes, args.rounds))
    print(markdown_table(rows, sizes))
    print(f"\n{summary(rows)}\n")
    if notes := problems(rows):
        print(notes + "\n")
    print(f"total time {time.perf_counter() - start:.0f}s")
    if args.json:
        args.json.write_text(json.dumps([row.to_dict() for row in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
