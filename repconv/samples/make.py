"""Generate the sample training checkpoints shipped in ``sample_checkpoints/``.

Usage::

    python -m repconv.samples.make [OUT_DIR] [--only NAME ...]

For every entry in :data:`repconv.samples.SAMPLES` the model is built and trained for a
few SGD steps on synthetic data (random images whose labels are a fixed random linear
function of their per-channel means), in train mode, so that the BatchNorm running
statistics come from real forward passes. The result is saved as a realistic training
checkpoint::

    {"state_dict": ..., "optimizer": ..., "epoch": 3, "arch": "module:function",
     "arch_kwargs": {...}, "input_shape": [1, 3, 32, 32]}

Everything is seeded, single-threaded and uses deterministic algorithms, and the file is
serialized through an in-memory buffer (so the temporary file name never leaks into the
archive); regenerating on the same torch build and CPU gives byte-identical files.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repconv.samples import SAMPLES, SampleSpec, build_sample

__all__ = [
    "BATCH_SIZE",
    "DEFAULT_OUT_DIR",
    "EPOCHS",
    "SEED",
    "STEPS_PER_EPOCH",
    "SampleResult",
    "deterministic",
    "main",
    "make_checkpoint",
    "save_checkpoint",
    "synthetic_batches",
    "write_samples",
]

DEFAULT_OUT_DIR = "sample_checkpoints"
SEED = 0
EPOCHS = 3
STEPS_PER_EPOCH = 10
BATCH_SIZE = 32
LR = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


@dataclass(frozen=True)
class SampleResult:
    """What :func:`write_samples` wrote for one sample."""

    name: str
    path: Path
    size: int
    first_loss: float
    final_loss: float


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed torch, force one thread and deterministic algorithms; restore afterwards."""
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
            torch.set_num_threads(prev_threads)


def synthetic_batches(
    input_shape: Sequence[int],
    num_classes: int,
    steps: int,
    batch_size: int = BATCH_SIZE,
    seed: int = SEED,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``steps`` batches of ``(images, labels)`` from a fixed generator.

    Images are Gaussian noise plus a random per-image, per-channel offset; the label is
    the argmax of a fixed random linear function of the per-channel means, so there is a
    real (learnable) signal.
    """
    channels, *spatial = (int(d) for d in input_shape[1:])
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, num_classes, generator=gen)
    bias = 0.1 * torch.randn(num_classes, generator=gen)
    for _ in range(steps):
        offsets = torch.randn(batch_size, channels, *([1] * len(spatial)), generator=gen)
        noise = torch.randn(batch_size, channels, *spatial, generator=gen)
        images = offsets + 0.5 * noise
        means = images.flatten(2).mean(dim=2)
        labels = (means @ weight + bias).argmax(dim=1)
        yield images, labels


def make_checkpoint(spec: SampleSpec, seed: int = SEED) -> tuple[dict[str, Any], list[float]]:
    """Build and briefly train the model for ``spec``; return ``(checkpoint, losses)``."""
    with deterministic(seed):
        model: nn.Module = build_sample(spec)
        model.train()
        optimizer = torch.optim.SGD(
            model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
        )
        losses: list[float] = []
        batches = synthetic_batches(
            spec.input_shape, spec.num_classes, EPOCHS * STEPS_PER_EPOCH, seed=seed
        )
        for images, labels in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        checkpoint: dict[str, Any] = {
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": EPOCHS,
            "arch": spec.builder,
            "arch_kwargs": dict(spec.kwargs),
            "input_shape": [int(d) for d in spec.input_shape],
        }
    return checkpoint, losses


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> int:
    """Atomically ``torch.save`` ``checkpoint`` to ``path``; return the size in bytes.

    Serialization goes through a ``BytesIO`` so the archive's internal record names do not
    depend on the (temporary) file name, then a temp file in the same directory is
    ``os.replace``-d over the destination.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return len(data)


def write_samples(
    out_dir: str | os.PathLike[str] = DEFAULT_OUT_DIR,
    names: Sequence[str] | None = None,
    verbose: bool = True,
) -> list[SampleResult]:
    """Generate the sample checkpoints (all of :data:`SAMPLES`, or ``names``) into ``out_dir``."""
    out = Path(out_dir)
    selected = list(SAMPLES) if names is None else list(names)
    unknown = [n for n in selected if n not in SAMPLES]
    if unknown:
        raise KeyError(f"unknown sample(s) {unknown}; known: {sorted(SAMPLES)}")
    results: list[SampleResult] = []
    for name in selected:
        spec = SAMPLES[name]
        checkpoint, losses = make_checkpoint(spec)
        path = out / spec.filename
        size = save_checkpoint(checkpoint, path)
        result = SampleResult(name, path, size, losses[0], losses[-1])
        results.append(result)
        if verbose:
            print(
                f"{path}  {size} bytes  final_loss={result.final_loss:.4f}"
                f" (first={result.first_loss:.4f})",
                flush=True,
            )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m repconv.samples.make",
        description="Generate the deterministic sample training checkpoints.",
    )
    parser.add_argument(
        "out_dir",
        nargs="?",
        default=DEFAULT_OUT_DIR,
        help=f"output directory (default: {DEFAULT_OUT_DIR})",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        choices=sorted(SAMPLES),
        help="generate only these samples",
    )
    args = parser.parse_args(argv)
    write_samples(args.out_dir, args.only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
