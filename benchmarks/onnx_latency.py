"""ONNX Runtime latency: the ONNX exported from each block family's training network, from
repconv's fused network, and from a hand-written deploy network with the same fused weights.

ONNX Runtime folds BatchNorm into the preceding conv itself, but it does not merge parallel
branches: only a fold before export removes them. All three files come from the same exporter
(``repconv.onnx_io.onnx_bytes``, torch's dynamo exporter) and run in CPU sessions with 2 intra-op
threads at batch 1. Latencies are interleaved medians (``_timing.interleaved_ms``), so each ratio
is measured within one run; idle session threads do not spin-wait, or they would slow down the
session being timed. Run: `python benchmarks/onnx_latency.py [--channels 32 --size 64]`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import onnx
import onnxruntime
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

from _timing import HOW, interleaved_ms  # noqa: E402
from deploy_speed import RepVGGTinyDeploy  # noqa: E402
from helpers.reference_blocks import BLOCK_NAMES, block_ndim, randomize_bn, tiny_net  # noqa: E402

import repconv  # noqa: E402
from repconv.errors import RepconvError  # noqa: E402
from repconv.formats.checkpoint import load_checkpoint  # noqa: E402
from repconv.formats.onnx_io import load_onnx_session, onnx_bytes  # noqa: E402

THREADS = 2


def _input(name: str, size: int) -> Tensor:
    spatial = {1: (size * size // 4,), 2: (size, size), 3: (size // 4,) * 3}[block_ndim(name)]
    return torch.randn(1, 3, *spatial)


def _hand_written(fused: nn.Sequential) -> nn.Module | None:
    """tiny_net's deploy form written by hand: stem conv, ReLU, one conv per block (ReLU
    between), pooling, linear. None when a block did not become one conv (the ResNet blocks
    keep their residual)."""
    convs = [m for m in fused.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if len(convs) != 3:
        return None
    return nn.Sequential(convs[0], nn.ReLU(), convs[1], nn.ReLU(), convs[2], fused[6],
                         nn.Flatten(), fused[8])


def _runner(data: bytes, x: Tensor) -> Callable[[], object]:
    session = load_onnx_session(data, threads=THREADS, spin_wait=False)
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def _ops(data: bytes) -> list[str]:
    return [node.op_type for node in onnx.load_from_string(data).graph.node]


def _row(name: str, training: nn.Module, fused: nn.Module, hand: nn.Module | None, x: Tensor,
         rounds: int) -> str:
    """The table row; the hand-written cell is marked = when its graph has the same nodes as
    repconv's, so any difference in that ratio is timing noise."""
    files = {"training": onnx_bytes(training, x), "repconv": onnx_bytes(fused, x)}
    if hand is not None:
        with torch.no_grad():
            assert torch.allclose(hand(x), fused(x), rtol=1e-5, atol=1e-5), name
        files["hand"] = onnx_bytes(hand, x)
    ms = interleaved_ms({label: _runner(data, x) for label, data in files.items()},
                        warmup=10, rounds=rounds)
    ops = {label: _ops(data) for label, data in files.items()}
    hand_cells = "- | -"
    if hand is not None:
        same = " =" if ops["hand"] == ops["repconv"] else ""
        hand_cells = f"{ms['hand']:.3f}{same} | {ms['repconv'] / ms['hand']:.2f}"
    convs = f"{ops['training'].count('Conv')}→{ops['repconv'].count('Conv')}"
    return (f"| {name} | {ms['training']:.3f} | {ms['repconv']:.3f} | {hand_cells} | "
            f"{ms['training'] / ms['repconv']:.2f}x | {convs} | "
            f"{ops['training'].count('BatchNormalization')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime "
          f"{onnxruntime.__version__}, CPU sessions with {THREADS} threads, batch 1, width "
          f"{args.channels}, input {args.size}px, median of {args.rounds} interleaved rounds, "
          f"{HOW}")
    print("\n| network | training ONNX ms | repconv ONNX ms | hand-written ONNX ms | "
          "repconv / hand-written | speed-up training→repconv | Conv nodes training→repconv | "
          "BN nodes in training ONNX |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in BLOCK_NAMES:
        net = randomize_bn(tiny_net(name, channels=args.channels), seed=0)
        x = _input(name, args.size)
        try:  # a fuser bug shows as a row, the other rows still run
            result = repconv.fuse(net, x)
            verification = result.report.verification
            problem = "" if verification.passed else verification.summary()
        except RepconvError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            print(f"| {name} | not measured, fuse failed: {problem[:100]} |", flush=True)
            continue
        print(_row(name, net, result.model, _hand_written(result.model), x, args.rounds),
              flush=True)
    loaded = load_checkpoint(ROOT / "sample_checkpoints" / "repvgg_tiny.pt")
    x = torch.randn(1, 3, args.size, args.size)
    fused = repconv.fuse(loaded.model, x).model
    print(_row("sample repvgg_tiny", loaded.model, fused, RepVGGTinyDeploy(fused), x,
               args.rounds))
    print("\n= : the hand-written network's ONNX graph has the same nodes as repconv's")


if __name__ == "__main__":
    main()
