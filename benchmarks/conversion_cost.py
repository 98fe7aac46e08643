"""Conversion cost: `repconv fuse` (load, trace, fuse, verify, write) against what any deploy step
already pays, a plain load + save of the same checkpoint. Reported as ratios of time and of peak
memory (max RSS of a fresh process each), measured in one run.

Run: `make bench` or `python benchmarks/conversion_cost.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Each child process does one job and prints its wall time and peak RSS as JSON.
_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import torch
job, source, target = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
start = time.perf_counter()
if job == "plain":
    from repconv.checkpoint import load_checkpoint
    loaded = load_checkpoint(source)
    torch.save(loaded.model.state_dict(), target)
else:
    from repconv.pipeline import Options, fuse_checkpoint
    fuse_checkpoint(source, target, Options())
seconds = time.perf_counter() - start
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "rss_mb": peak_mb}))
"""


def _run(job: str, source: Path, target: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _CHILD, job, str(source), str(target)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _bigger_checkpoint(folder: Path) -> Path:
    """A wider RepVGG of the sample family at 224px: ~3M parameters."""
    from repconv.samples import repvgg_tiny

    kwargs = {"num_classes": 1000, "width": 96}
    model = repvgg_tiny(**kwargs)
    path = folder / "repvgg_w96.pt"
    torch.save({"state_dict": model.state_dict(), "arch": "repconv.samples:repvgg_tiny",
                "arch_kwargs": kwargs, "input_shape": [1, 3, 224, 224]}, path)
    return path


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sources = [ROOT / "sample_checkpoints" / "repvgg_tiny.pt",
                   ROOT / "sample_checkpoints" / "resnet_tiny.pt", _bigger_checkpoint(folder)]
        print("| checkpoint | size | load+save s | repconv fuse s | time ratio | RSS ratio |")
        print("|---|---:|---:|---:|---:|---:|")
        for source in sources:
            plain = min((_run("plain", source, folder / "plain.pt") for _ in range(3)),
                        key=lambda r: r["seconds"])
            fused = min((_run("fuse", source, folder / "fused.pt") for _ in range(3)),
                        key=lambda r: r["seconds"])
            size_mb = source.stat().st_size / 2**20
            print(f"| {source.name} | {size_mb:.1f} MB | {plain['seconds']:.2f} | "
                  f"{fused['seconds']:.2f} | {fused['seconds'] / plain['seconds']:.1f}x | "
                  f"{fused['rss_mb'] / plain['rss_mb']:.2f}x |")


if __name__ == "__main__":
    main()
