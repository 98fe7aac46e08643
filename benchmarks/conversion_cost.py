"""Conversion cost: `repconv fuse`, with and without its verification, against what any deploy
step already pays, a plain ``torch.load`` + ``torch.save`` of the same checkpoint, and the same
with an fsync of the file it wrote (``load+save+fsync``): `repconv fuse` waits for its OUT to be
on disk before renaming it into place, a plain torch.save does not, so on a disk that writes
slowly at the time the plain baseline leaves out a wait the fuse pays. Each job runs in a fresh
process that first imports torch and repconv (identical for every job, not timed); the figures
are the job's wall time and its peak RSS above that interpreter baseline (the kernel's
high-water mark, reset after the imports, minus the RSS then), best of five runs. The four
jobs run interleaved, round by round (in an order that rotates each round, so each follows
each of the others), so a burst of load from elsewhere slows each alike, and each writes a
new file (the last round's is removed first) after an ``os.sync()``: what earlier jobs wrote
is on disk, so no job pays for another's writeback. The tables are printed and saved to
benchmarks/results_conversion.md.

Checkpoints: a small one (a RepVGG of the sample family, width 96, 224px, 7 MB) and a large one
generated into a temp folder (a RepVGG-style network of 21 blocks, widths 256 to 1024, 120M
parameters, 480 MB, 128px, built with ``--model conversion_cost:big_repvgg``).

Run: `make bench` or `python benchmarks/conversion_cost.py [--runs 5]`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results_conversion.md"
JOBS = ("plain", "durable", "skip", "fuse")
BIG = {"width": 256, "num_blocks": (1, 3, 7, 10), "width_multipliers": (1, 1, 2, 4)}

# One job per process: imports first (the baseline), then the job; prints JSON.
_CHILD = r"""
import json, os, sys, time
from pathlib import Path
import torch
import repconv.cli  # the CLI's imports are part of the baseline
from repconv.formats.syscalls import keep_freed_memory
from repconv.pipeline import Options, fuse_checkpoint

def status_mb(key):
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith(key)) / 1024

job, source, target, model = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
fsynced = [0.0]  # the job's wait for the disk
fsync = os.fsync

def timed_fsync(handle):
    began = time.perf_counter()
    try:
        fsync(handle)
    finally:
        fsynced[0] += time.perf_counter() - began

os.fsync = timed_fsync
baseline = status_mb("VmRSS")
with open("/proc/self/clear_refs", "w") as refs:  # the peak (VmHWM) starts again from here
    refs.write("5")
start = time.perf_counter()
seconds = {}
if job in ("plain", "durable"):
    torch.save(torch.load(source, map_location="cpu", weights_only=True), target)
    if job == "durable":  # the bytes on disk, as repconv waits for before it renames OUT
        handle = os.open(target, os.O_RDONLY)
        os.fsync(handle)
        os.close(handle)
else:
    keep_freed_memory()  # as the repconv command does for its process
    options = Options(model=model or None)
    seconds = fuse_checkpoint(source, target, options, check=job == "fuse").seconds
total = time.perf_counter() - start
print(json.dumps({"seconds": total, "rss_mb": status_mb("VmHWM") - baseline,
                  "baseline_mb": baseline, "stages": seconds, "fsync": fsynced[0]}))
"""


def big_repvgg() -> nn.Module:
    """The large checkpoint's architecture (``--model conversion_cost:big_repvgg``)."""
    from repconv.samples import RepVGGTiny

    return RepVGGTiny(num_classes=1000, **BIG)


def _randomize_bn(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            shape = module.running_var.shape
            module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(shape, generator=generator) * 2 + 0.5)
            module.weight.data.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(shape, generator=generator) * 0.1)
    return model


def _checkpoints(folder: Path) -> list[tuple[Path, str]]:
    from repconv.samples import repvgg_tiny

    torch.manual_seed(0)
    small = folder / "repvgg_w96.pt"
    kwargs = {"num_classes": 1000, "width": 96}
    torch.save({"state_dict": _randomize_bn(repvgg_tiny(**kwargs)).state_dict(),
                "arch": "repconv.samples:repvgg_tiny", "arch_kwargs": kwargs,
                "input_shape": [1, 3, 224, 224]}, small)
    big = folder / "repvgg_120m.pt"
    torch.save({"state_dict": _randomize_bn(big_repvgg()).state_dict(),
                "input_shape": [1, 3, 128, 128]}, big)
    return [(small, ""), (big, "conversion_cost:big_repvgg")]


def _run(job: str, source: Path, target: Path, model: str) -> dict:
    # every job writes a new file, as a deploy step usually does: a torch.save over the last
    # round's 457 MB file spends about 0.28 s truncating it first (load+save 0.99 s against
    # 0.72 s to a new file), which is no part of what a plain save costs
    target.unlink(missing_ok=True)
    # the files earlier jobs wrote go to disk first: their writeback (which a plain torch.save
    # leaves to the kernel) must not slow this job
    os.sync()
    out = subprocess.run([sys.executable, "-c", _CHILD, job, str(source), str(target), model],
                         check=True, capture_output=True, text=True, cwd=HERE).stdout
    return json.loads(out.strip().splitlines()[-1])


def _best_interleaved(source: Path, folder: Path, model: str, runs: int) -> dict[str, dict]:
    """Each job's best run, the jobs taking turns round by round, in an order that rotates: a
    job meets the memory the job before it freed (on this VM, freed memory goes back to the
    host, and a page taken again costs a fault there too; see docs/benchmarks.md), so each job
    follows each of the others in turn."""
    results: dict[str, list[dict]] = {job: [] for job in JOBS}
    for round_ in range(runs):
        turn = round_ % len(JOBS)
        for job in JOBS[turn:] + JOBS[:turn]:
            results[job].append(_run(job, source, folder / f"{job}.pt", model))
    best = {}
    for job, runs_of_job in results.items():
        fastest = min(runs_of_job, key=lambda r: r["seconds"])
        best[job] = {"seconds": fastest["seconds"],
                     "every": [(r["seconds"], r["fsync"]) for r in runs_of_job],
                     "rss_mb": min(r["rss_mb"] for r in runs_of_job),
                     "verify": fastest["stages"].get("verify", 0.0),
                     "stages": fastest["stages"]}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # five: on disk, the first round's plain load+save (of a checkpoint just written) took 1.6
    # to 1.8 s against 0.7 to 0.9 s in every run of 2026-12-07, which left two rounds of three
    parser.add_argument("--runs", type=int, default=5,
                        help="fresh processes per figure (a round of the large checkpoint's "
                        "four jobs takes 10 to 60 s)")
    parser.add_argument("--folder", type=Path, default=None,
                        help="where the checkpoints and the files written go (default: the "
                        "system's temp folder); /dev/shm, memory, takes the disk's speed out")
    args = parser.parse_args()
    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    say(f"# Conversion cost, {datetime.date.today()}")
    say()
    say(f"`python benchmarks/conversion_cost.py`: torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPU cores, load average at the "
        f"start {_load()}; best of {args.runs} fresh processes, the "
        f"jobs interleaved; files in {_filesystem(args.folder)}; RSS = peak above the "
        "interpreter after imports")
    say()
    say("| checkpoint | size | load+save s | fuse --skip-verify s (ratio) | fuse s (ratio) | "
        "of which verification s | fuse − verification (ratio) | load+save+fsync s | "
        "--skip-verify ÷ load+save+fsync | load+save RSS MB | --skip-verify RSS MB (÷ size) | "
        "fuse RSS MB (÷ size) |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    stages, every = [], []
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        folder = Path(tmp)
        for source, model in _checkpoints(folder):
            size = source.stat().st_size / 2**20
            best = _best_interleaved(source, folder, model, args.runs)
            plain, durable = best["plain"], best["durable"]
            quick, full = best["skip"], best["fuse"]
            rest = full["seconds"] - full["verify"]
            say(f"| {source.name} | {size:.0f} MB | {plain['seconds']:.2f} | "
                f"{quick['seconds']:.2f} ({quick['seconds'] / plain['seconds']:.2f}x) | "
                f"{full['seconds']:.2f} ({full['seconds'] / plain['seconds']:.1f}x) | "
                f"{full['verify']:.2f} | {rest:.2f} ({rest / plain['seconds']:.2f}x) | "
                f"{durable['seconds']:.2f} | {quick['seconds'] / durable['seconds']:.2f}x | "
                f"{plain['rss_mb']:.0f} | {quick['rss_mb']:.0f} ({quick['rss_mb'] / size:.1f}x)"
                f" | {full['rss_mb']:.0f} ({full['rss_mb'] / size:.1f}x) |")
            stages.append((source.name, quick["stages"], full["stages"]))
            every.append(f"{source.name}: " + "; ".join(
                f"{job} " + ", ".join(f"{s:.2f}" + (f" ({f:.2f})" if f else "")
                                      for s, f in best[job]["every"]) for job in JOBS))
    say()
    say("Every run (s), in the order run, in brackets the part spent in fsync, waiting for the "
        "disk (a plain torch.save's time varies most: it leaves its pages to the kernel, whose "
        "state it then meets):")
    say()
    for line in every:
        say(f"- {line}")
    say()
    say("Where `repconv fuse` spends its time (s), without and with the verification: load (read, "
        "build, check), fuse (trace, fold, local checks, rewrite), verify, write")
    say()
    say("| checkpoint | job | load | fuse | verify | write |")
    say("|---|---|---:|---:|---:|---:|")
    for name, *jobs in stages:
        for job, seconds in zip(("--skip-verify", "fuse"), jobs):
            say(f"| {name} | {job} | " + " | ".join(
                f"{seconds.get(k, 0.0):.2f}" for k in ("load", "fuse", "verify", "write")) + " |")
    say()
    say(f"Load average at the end {_load()}.")
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"saved to {RESULTS.relative_to(ROOT)}")


def _filesystem(folder: Path | None) -> str:
    """The folder the files go in and its filesystem's type (Linux), for the record."""
    where = Path(folder or tempfile.gettempdir()).resolve()
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return str(where)
    mount = max((m for m in mounts if where.is_relative_to(m[1])), key=lambda m: len(m[1]))
    return f"{where} ({mount[2]})"


def _load() -> str:
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


if __name__ == "__main__":
    main()
