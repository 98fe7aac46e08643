"""Third-party patterns torch.fx cannot trace (issue 15): repconv against the authors' own deploy
forms (tests/helpers/third_party_*.py).

Per model: conv, BN and total aten ops executed at the fuse input by the training form (t), the
hand-written deploy form (h) and ``repconv.fuse(t, x, check=False).model`` (r); the worst
scale-relative error of h and r against t over the fuse input and the model's other shapes (or
where r raises); latency ratios r/h and t/h from ONE interleaved run (benchmarks/_timing.py) at the
fuse input, with h'/h (h loaded twice) as that run's noise floor; the r/h geo-mean over issue 15's
five reference models and over all; and what repconv's report says today. Written to
benchmarks/results_third_party.md.

Run: `python benchmarks/third_party.py [--rounds 200] [--threads 1]`.
"""

from __future__ import annotations

import argparse
import datetime
import io
import math
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

from _timing import HOW, interleaved_ms  # noqa: E402
from helpers.measure import rel_err  # noqa: E402
from helpers.third_party_models import (  # noqa: E402
    MODELS,
    ThirdPartyModel,
    executed,
    run,
    shaped_input,
)

import repconv  # noqa: E402
from repconv.measure.opcount import OpCounts  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results_third_party.md"


# issue 15's five reference models, whose bar is r/h <= 1.00 geo-mean and none above 1.05
REFERENCE = ("dbb_resnet18", "gelan_repncspelan4", "yolov10_e2e_head", "yolov7_idetect",
             "size_flag_child")


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def worst_error(reference: nn.Module, model: nn.Module, spec: ThirdPartyModel) -> str:
    worst = 0.0
    for shape in (spec.example, *spec.shapes):
        x = shaped_input(shape)
        expected = run(reference, x)
        try:
            got = run(model, x)
        except Exception as exc:  # a deploy model that fails at some size is the finding
            return f"raises at {'x'.join(map(str, shape))}: {first_line(exc)}"
        if len(got) != len(expected) or any(e.shape != g.shape for e, g in zip(expected, got)):
            return f"other outputs at {'x'.join(map(str, shape))}"
        worst = max(worst, *(rel_err(e, g) for e, g in zip(expected, got)))
    return f"{worst:.1e}"


def repconv_says(result: repconv.FuseResult) -> Iterator[str]:
    report = result.report
    yield f"{len(report.notes)} notes, {len(report.skipped)} skips"
    if report.notes:
        yield f"first note: {report.notes[0][:240]}"
    for skip in report.skipped[:2]:
        yield f"skip: {skip.where}: {skip.reason[:200]}"


def as_shipped(model: nn.Module) -> nn.Module:
    """``model`` as a deploy step loads it: pickled and loaded again. Every form is timed so,
    with its tensors allocated afresh in module order: ``repconv.fuse``'s model shares the
    training model's tensors where it changed nothing, and in memory that layout alone moved a
    small model's latency by up to 5% (DBB ResNet-18)."""
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False).eval()


def table_row(spec: ThirdPartyModel, training: nn.Module, fused: nn.Module, fuse_s: float,
              rounds: int) -> tuple[str, float | None]:
    """The model's table row, and its latency ratio r/h (None where r raises)."""
    hand = spec.hand_written(training)
    x = shaped_input(spec.example)
    # h2: the authors' form shipped a second time, the run's noise floor for r/h
    models = {"t": as_shipped(training), "h": as_shipped(hand), "h2": as_shipped(hand),
              "r": as_shipped(fused)}
    counts: dict[str, OpCounts | None] = {}
    for key, model in models.items():
        try:
            counts[key] = executed(model, x)
        except Exception:  # worst_error says how it fails
            counts[key] = None
    if counts["r"] is None:
        del models["r"]
    with torch.inference_mode():
        ms = interleaved_ms(models, x, rounds=rounds)
    ops = " | ".join("/".join("raises" if c is None else str(getattr(c, kind))
                              for key, c in counts.items() if key != "h2")
                     for kind in ("convs", "batchnorms", "total"))
    ratio = ms["r"] / ms["h"] if "r" in ms else None
    return (f"| {spec.name} | {ops} | {worst_error(training, hand, spec)} "
            f"| {worst_error(training, fused, spec)} | {'—' if ratio is None else f'{ratio:.2f}'} "
            f"| {ms['h2'] / ms['h']:.2f} | {ms['t'] / ms['h']:.2f} | {fuse_s:.1f} |", ratio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = [
        f"# repconv on third-party patterns fx cannot trace, {datetime.date.today()}", "",
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{args.threads} thread(s); load average at the start "
        f"{'/'.join(f'{v:.1f}' for v in os.getloadavg())}. Models: tests/helpers/third_party_*.py.",
        "",
        "t = training form (eval), h = the authors' deploy conversion, r = "
        "`repconv.fuse(t, x, check=False).model`, x = 1x3x64x64. Ops: aten ops executed at x "
        "after one warm-up call (conv / BatchNorm / all that move data). err: worst "
        "max|a - t| / max|t| over x and the model's other shapes (batch 2, 96, 77x101, 128; "
        "detectors 96x128, 128x96, 128). r/h, t/h: latency ratios at x, median of "
        f"{args.rounds} interleaved rounds in this one run ({HOW}), each form as a deploy "
        "step loads it (pickled and loaded again: its tensors allocated afresh); h'/h: the "
        "authors' form loaded a second time against itself, what layout alone moves a ratio "
        "in this run.", "",
        "| model | convs t/h/r | BN t/h/r | ops t/h/r | err h | err r | r/h | h'/h | t/h "
        "| fuse s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    rows, notes = [], []
    ratios: dict[str, float] = {}
    for spec in MODELS:
        training = spec.training(0)
        x = shaped_input(spec.example)
        began = time.perf_counter()
        result = repconv.fuse(training, x.clone(), check=False)
        fuse_s = time.perf_counter() - began
        row, ratio = table_row(spec, training, result.model, fuse_s, args.rounds)
        rows.append(row)
        if ratio is not None:
            ratios[spec.name] = ratio
        print(row, flush=True)
        notes += [f"- **{spec.name}** ({spec.source}): {spec.construct}",
                  *(f"  - {line}" for line in repconv_says(result))]
    reference = [ratios[name] for name in REFERENCE if name in ratios]
    summary = [f"r/h geo-mean over issue 15's {len(reference)} reference models: "
               f"{geomean(reference):.3f}; above 1.05: {sum(r > 1.05 for r in reference)}",
               f"r/h geo-mean over the {len(ratios)} models r runs on: "
               f"{geomean(list(ratios.values())):.3f}; above 1.05: "
               f"{sum(r > 1.05 for r in ratios.values())}"]
    tail = ["", *summary, "", "## What stops fx, and what repconv reports", "", *notes]
    print("\n".join(tail))
    lines = [*header, *rows, *tail]
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"\nsaved to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
