"""Deploy speed: latency of each block family's network before and after `repconv.fuse`, and
against a hand-written deploy architecture with the same weights (each block one plain conv,
where the family's deploy form is one conv), and the same for the fused RepVGG sample.

Every figure is a ratio of two latencies measured in the same run (median of 20 interleaved
rounds after warm-up; 100 for the sample), so it does not depend on how fast this machine is.
Run: `make bench` or
`python benchmarks/deploy_speed.py [--device cuda] [--batch 16] [--channels 32]`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

from _timing import HOW, interleaved_ms  # noqa: E402
from helpers.reference_blocks import BLOCK_NAMES, randomize_bn, tiny_net  # noqa: E402

import repconv  # noqa: E402
from repconv.formats.checkpoint import load_checkpoint  # noqa: E402


class RepVGGTinyDeploy(nn.Module):
    """What a hand-written RepVGG deploy model is: one 3x3 conv + ReLU per block."""

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
        self.body = nn.Sequential(*(layer for c in convs for layer in (c, nn.ReLU())))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  next(m for m in fused.modules() if isinstance(m, nn.Linear)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def hand_written(fused: nn.Sequential, x: torch.Tensor) -> nn.Sequential | None:
    """What a deploy architecture written for a block family is: the same layers with every
    block one plain conv holding the fused weights. None where a fused block is more than one
    conv (the ResNet blocks keep their residual: their deploy form is the fused model)."""
    layers = []
    for layer in fused:
        convs = [m for m in layer.modules() if isinstance(m, nn.modules.conv._ConvNd)]
        if len(convs) > 1:
            return None
        layers.append(convs[0] if convs else layer)
    hand = nn.Sequential(*layers).eval()
    with torch.inference_mode():
        same = torch.allclose(hand(x), fused(x), rtol=1e-5, atol=1e-5)
    return hand if same else None


def _input(name: str, batch: int, size: int) -> torch.Tensor:
    if name == "Branchy1d":
        return torch.randn(batch, 3, size * size // 4)
    if name == "Branchy3d":
        return torch.randn(batch, 3, size // 4, size // 4, size // 4)
    return torch.randn(batch, 3, size, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, width {args.channels}, input {args.size}px; {HOW}")
    print("\n| network | unfused ms | fused ms | hand-written ms | speed-up | fused / hand | "
          "BN before→after | convs before→after |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in BLOCK_NAMES:
        net = randomize_bn(tiny_net(name, channels=args.channels), seed=0).eval()
        x = _input(name, args.batch, args.size)
        result = repconv.fuse(net, x)
        assert result.report.verification.passed, name
        hand = hand_written(result.model, x)
        models = {"unfused": net, "fused": result.model, **({"hand": hand} if hand else {})}
        models = {key: model.to(device) for key, model in models.items()}
        with torch.inference_mode():
            ms = interleaved_ms(models, x.to(device), rounds=20, sync=sync)
        unfused_ms, fused_ms = ms["unfused"], ms["fused"]
        hand_ms = f"{ms['hand']:.2f}" if hand else "—"
        ratio = f"{fused_ms / ms['hand']:.2f}" if hand else "—"
        before, after = result.report.before, result.report.after
        print(f"| {name} | {unfused_ms:.2f} | {fused_ms:.2f} | {hand_ms} | "
              f"{unfused_ms / fused_ms:.2f}x | {ratio} | {before.batchnorms}→{after.batchnorms} "
              f"| {before.convs}→{after.convs} |")
    loaded = load_checkpoint(ROOT / "sample_checkpoints" / "repvgg_tiny.pt")
    x = torch.randn(args.batch, 3, args.size, args.size)
    fused = repconv.fuse(loaded.model, x).model
    hand = RepVGGTinyDeploy(fused)
    with torch.inference_mode():
        assert torch.allclose(hand(x), fused(x), rtol=1e-5, atol=1e-5)
        model, fused, hand = loaded.model.to(device), fused.to(device), hand.to(device)
        x = x.to(device)
        # fused vs hand-written differ by a few percent: more rounds to resolve that
        ms = interleaved_ms({"unfused": model, "fused": fused, "hand": hand}, x, rounds=100,
                            sync=sync)
        unfused_ms, fused_ms, hand_ms = ms["unfused"], ms["fused"], ms["hand"]
    print(f"\nsample repvgg_tiny: unfused {unfused_ms:.2f} ms, repconv-fused {fused_ms:.2f} ms, "
          f"hand-written deploy {hand_ms:.2f} ms")
    print(f"  speed-up from fusing: {unfused_ms / fused_ms:.2f}x; fused / hand-written "
          f"latency: {fused_ms / hand_ms:.2f}")


if __name__ == "__main__":
    main()
