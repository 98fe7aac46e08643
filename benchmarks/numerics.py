"""Numerical error, in two tables measured in one run.

1. Folding error: repconv folds in float64 and rounds the fused weights once to the
   checkpoint's dtype; hand-written deploy code (RepVGG's ``get_equivalent_kernel_bias``, a
   Conv-BN fold) computes in the checkpoint's own dtype. Both fused models run in float64
   against the original run in float64, so the figure is the folding error alone.
2. Tolerances: the scale-relative error `repconv verify` measures on correctly fused models
   (every block family of tests/helpers/reference_blocks.py, 2 seeds, at the example shape, batch 2
   and another size) and on tampered ones (one fused conv's weights x1.02, each conv in turn,
   at the example shape), for the outputs (scale-relative) and for the per-rewrite table
   (relative to the sum of |w * x| + |b| at each element), with both models run upcast to
   float32 (what the CLI does) and in the model's dtype, and how many clean models fail and
   tampered ones are caught with the default tolerances.

3. Noise-relative bar (float32 comparisons): on deep conv-BN networks whose float32 noise
   reaches 1e-4 ("noisy", tests/test_verify_tolerance.py's builder) the fused model's error
   against the original run in float64, over the original's own float32 noise, and whether
   one fused conv's weights x1.0001 are caught.
4. `--zoo [NAMES]` (in .venv-zoo, timm, no weights downloaded): the same on timm models, fused
   at 128 px batch 1 with `repconv.fuse(check=False)`, verified as the CLI does (batch 2 and
   96 px too, fp16/bf16 upcast, per-rewrite table), with the extra time of the float64 runs;
   then every fused conv in turn tampered (weights x1.0001 fp32, x1.01 fp16, x1.02 bf16), and
   how many are caught, by the outputs and in all (outputs or the conv's own row).

Run: `make bench` or `python benchmarks/numerics.py` (`--zoo` for 4 alone).
"""

from __future__ import annotations

import copy
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from helpers.noisy_models import deep_conv_bn  # noqa: E402
from helpers.reference_blocks import BLOCK_NAMES, randomize_bn, tiny_net  # noqa: E402

import repconv  # noqa: E402
from repconv.formats.checkpoint import load_checkpoint  # noqa: E402
from repconv.samples import RepVGGBlock, RepVGGTiny  # noqa: E402
from repconv.verify.inputs import VARIATIONS  # noqa: E402
from repconv.verify.outputs import (  # noqa: E402
    DEFAULT_RTOL,
    NOISE_FACTOR,
    REWRITE_RTOL,
    UPCAST_RTOL,
    verify,
)
from repconv.verify.report import VerifyReport  # noqa: E402
from repconv.verify.rewrites import RewriteCheck  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _bn_fold(weight: Tensor, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """RepVGG's ``_fuse_bn_tensor``, in the tensors' own dtype."""
    t = bn.weight / (bn.running_var + bn.eps).sqrt()
    return weight * t.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * t


def _repvgg_fold(block: RepVGGBlock) -> tuple[Tensor, Tensor]:
    """RepVGG's ``get_equivalent_kernel_bias``, in the block's dtype."""
    k3, b3 = _bn_fold(block.rbr_dense.conv.weight, block.rbr_dense.bn)
    k1, b1 = _bn_fold(block.rbr_1x1.conv.weight, block.rbr_1x1.bn)
    kernel, bias = k3 + nn.functional.pad(k1, [1, 1, 1, 1]), b3 + b1
    if block.rbr_identity is not None:
        identity = torch.zeros_like(k3)
        identity[torch.arange(k3.shape[0]), torch.arange(k3.shape[0]), 1, 1] = 1
        ki, bi = _bn_fold(identity, block.rbr_identity)
        kernel, bias = kernel + ki, bias + bi
    return kernel, bias


def _own_dtype_fold(original: nn.Module, result: repconv.FuseResult) -> nn.Module:
    """The fused model with every fused conv's weights folded in the checkpoint's dtype."""
    model = copy.deepcopy(result.model)
    for record in result.report.rewrites:
        conv = model.get_submodule(record.fused_module)
        owner = original.get_submodule(record.fused_module.rpartition(".")[0])
        if isinstance(owner, RepVGGBlock):
            weight, bias = _repvgg_fold(owner)
        else:
            weight, bias = _bn_fold(original.get_submodule(record.sources[0]).weight,
                                    original.get_submodule(record.sources[1]))
        conv.weight.data, conv.bias.data = weight.detach(), bias.detach()
    return model


def _rel(expected: Tensor, got: Tensor) -> float:
    return float((expected - got).abs().max() / expected.abs().max())


def _folding_models() -> list[tuple[str, nn.Module]]:
    models = [(name, load_checkpoint(ROOT / "sample_checkpoints" / f"{name}.pt").model)
              for name in ("repvgg_tiny", "resnet_tiny")]
    for seed in range(2):
        torch.manual_seed(seed)
        models.append((f"RepVGG w64 seed {seed}", randomize_bn(RepVGGTiny(width=64), seed)))
    return models


def folding_table() -> None:
    print("| dtype | network | float64 fold, cast once | fold in own dtype | own / float64 |")
    print("|---|---|---:|---:|---:|")
    x64 = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64)
    for label, dtype in DTYPES.items():
        for name, model in _folding_models():
            original = copy.deepcopy(model).to(dtype).eval()
            x = x64.to(dtype)
            result = repconv.fuse(original, x, check=False)
            own = _own_dtype_fold(original, result)
            with torch.no_grad():
                reference = copy.deepcopy(original).double()(x.double())
                ours = _rel(reference, copy.deepcopy(result.model).double()(x.double()))
                theirs = _rel(reference, own.double()(x.double()))
            print(f"| {label} | {name} | {ours:.2e} | {theirs:.2e} | "
                  f"{theirs / max(ours, 1e-300):.1f}x |")


@dataclass
class _Tally:
    """What verify found on clean and on tampered models, with its default tolerances."""

    clean_outputs: list[float] = field(default_factory=list)
    clean_rewrites: list[float] = field(default_factory=list)
    false_failures: int = 0
    tampered_outputs: list[float] = field(default_factory=list)
    tampered_rewrites: list[float] = field(default_factory=list)
    detected: int = 0
    ratios: list[float] = field(default_factory=list)  # clean: error vs float64 / noise

    def add_clean(self, report: VerifyReport) -> None:
        outputs = [o for run in report.runs for o in run.outputs]
        self.clean_outputs.append(max(o.reference_error for o in outputs))
        self.ratios += [o.reference_error / o.noise for o in outputs if o.noise]
        self.clean_rewrites += [r.magnitude_error for r in report.rewrite_errors]
        self.false_failures += not report.passed


def _spread(values: list[float]) -> str:
    """median and max (or — when there are none)."""
    return f"{statistics.median(values):.2f}, {max(values):.2f}" if values else "—"


def _verify(original: nn.Module, result: repconv.FuseResult, deployed: nn.Module, x: Tensor,
            upcast: bool, vary: tuple[str, ...]) -> VerifyReport:
    return verify(original, deployed, x, trials=1, vary=vary, upcast=upcast,
                  rewrites=RewriteCheck(result.model, result.originals, result.report.rewrites,
                                        deployed))


def _measure(dtype: torch.dtype) -> dict[bool, _Tally]:
    """upcast -> tally, over every block family (2 seeds) and every fused conv tampered."""
    tallies = {True: _Tally(), False: _Tally()}
    for name in BLOCK_NAMES:
        for seed in range(2):
            original = randomize_bn(tiny_net(name, channels=16), seed).to(dtype)
            nd = original[0].weight.ndim - 2
            x = torch.randn((1, 3, *{1: (32,), 2: (32, 32), 3: (16, 16, 16)}[nd]),
                            generator=torch.Generator().manual_seed(seed),
                            dtype=torch.float64).to(dtype)
            result = repconv.fuse(original, x, check=False)
            for upcast, tally in tallies.items():
                tally.add_clean(_verify(original, result, result.model, x, upcast, VARIATIONS))
                # tampered, at the example shape (enough to see a change); natively the clean
                # rows already rule the comparison out
                for path in result.originals if upcast else ():
                    broken = copy.deepcopy(result.model)
                    with torch.no_grad():
                        broken.get_submodule(path).weight.mul_(1.02)
                    report = _verify(original, result, broken, x, upcast, ())
                    tally.tampered_outputs.append(report.max_rel_error)
                    tally.tampered_rewrites += [r.magnitude_error for r in report.rewrite_errors
                                                if r.fused_module == path]
                    tally.detected += not report.passed
    return tallies


def tolerance_table() -> None:
    print("| dtype | compared in | clean: outputs max | clean: error/noise median, max | rtol | "
          "clean: rewrites max | rewrite rtol | clean models failed | tampered: outputs min | "
          "tampered: rewrite min, median | tampered detected |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, dtype in DTYPES.items():
        for upcast, tally in _measure(dtype).items():
            if dtype == torch.float32 and not upcast:
                continue  # the same comparison: float32 runs in float32 either way
            rtol = (UPCAST_RTOL if upcast else DEFAULT_RTOL)[dtype]
            tampered = tally.tampered_rewrites
            caught = (f"{min(tally.tampered_outputs):.1e} | {min(tampered):.1e}, "
                      f"{statistics.median(tampered):.1e} | {tally.detected} of {len(tampered)}"
                      ) if tampered else "— | — | —"
            print(f"| {label} | {'float32' if upcast else label} | "
                  f"{max(tally.clean_outputs):.1e} | {_spread(tally.ratios)} | {rtol:.0e} | "
                  f"{max(tally.clean_rewrites):.1e} | {REWRITE_RTOL[dtype]:.0e} | "
                  f"{tally.false_failures} of {len(BLOCK_NAMES) * 2} | {caught} |")


def _tampered(result: repconv.FuseResult, path: str, factor: float) -> nn.Module:
    broken = copy.deepcopy(result.model)
    with torch.no_grad():
        broken.get_submodule(path).weight.mul_(factor)
    return broken


def noisy_table() -> None:
    """Deep conv-BN networks (tests/helpers/noisy_models.py) at growing float32 noise."""
    print("| offset | seeds | noise min, max | error vs float64 / noise: median, max | "
          "passed (old fixed 1e-5) | x1.0001 conv: error / allowed, min | x1.0001 caught |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for offset in (0.0, 10.0, 100.0, 1000.0):
        noise, ratios, passed, old, margins = [], [], 0, 0, []
        for seed in range(4):
            model = deep_conv_bn(depth=8, offset=offset, seed=seed)
            x = torch.randn(1, 3, 40, 40, generator=torch.Generator().manual_seed(seed + 100))
            result = repconv.fuse(model, x, check=False)
            report = _verify(model, result, result.model, x, True, VARIATIONS)
            outputs = [o for run in report.runs for o in run.outputs]
            noise += [o.noise for o in outputs]
            ratios += [o.reference_error / o.noise for o in outputs]
            passed += report.passed
            old += all(o.max_rel_error <= DEFAULT_RTOL[torch.float32] for o in outputs)
            middle = list(result.originals)[len(result.originals) // 2]
            broken = _verify(model, result, _tampered(result, middle, 1.0001), x, True, ())
            margins.append(max(o.margin for run in broken.runs for o in run.outputs))
        print(f"| {offset:g} | 4 | {min(noise):.1e}, {max(noise):.1e} | {_spread(ratios)} | "
              f"{passed} of 4 ({old} of 4) | {min(margins):.1f} | "
              f"{sum(m > 1 for m in margins)} of 4 |")


ZOO_NOISE = ("resnet50", "inception_v3", "cspdarknet53", "dla34", "selecsls42b", "dpn48b",
             "mobilenetv2_050", "efficientvit_m0", "resnet18", "repvgg_a0", "mobileone_s0")


def zoo_table(names: list[str]) -> None:
    """timm models verified as `repconv fuse` does; needs .venv-zoo (benchmarks/zoo_models)."""
    sys.path[:0] = [str(ROOT / "benchmarks")]
    from zoo_models import ZOO, build, seeded_input

    specs = {spec.name: spec for spec in ZOO}
    print("| model | dtype | noise (max over 3 inputs) | error vs float64 | ratio | allowed | "
          "old: error vs fp32, passed | passed | rewrites passed | verify s | float64 s | "
          "tampered caught: outputs, in all |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        model = build(specs[name], 128)
        for label, dtype in DTYPES.items():
            original = copy.deepcopy(model).to(dtype)
            x = seeded_input((1, 3, 128, 128), seed=1).to(dtype)
            result = repconv.fuse(original, x, check=False)
            report = _verify(original, result, result.model, x, True, VARIATIONS)
            outputs = [o for run in report.runs for o in run.outputs]
            old = all(o.max_rel_error <= DEFAULT_RTOL[torch.float32] for o in outputs)
            noise = max((o.noise for o in outputs if o.noise is not None), default=None)
            rewrites = [r for r in report.rewrite_errors if not r.problem]
            old_cell = f"{report.max_rel_error:.1e}, {'yes' if old else 'NO'}" if (
                dtype == torch.float32) else "—"
            # the ratio to the noise the bar scales: the float32 noise, x the dtype's unit
            scaled = (report.noise or 1) * report.noise_unit_ratio
            caught = _tampered_caught(original, result, x, TAMPER[dtype])
            print(f"| {name} | {label} | {noise or 0:.1e} | {report.reference_error:.1e} | "
                  f"{report.reference_error / scaled:.2f} | "
                  f"{report.tolerance or 0:.1e} | {old_cell} | "
                  f"{'yes' if report.passed else 'NO'} | "
                  f"{sum(r.passed for r in rewrites)} of {len(rewrites)} | "
                  f"{sum(report.seconds.values()):.2f} | "
                  f"{report.seconds.get('float64_reference', 0):.2f} | {caught} |", flush=True)
            del original, result


TAMPER = {torch.float32: 1.0001, torch.float16: 1.01, torch.bfloat16: 1.02}


def _tampered_caught(original: nn.Module, result: repconv.FuseResult, x: Tensor,
                     factor: float) -> str:
    """Every fused conv's weights x ``factor`` in turn: how many fail the outputs, how many fail
    verification (outputs or the per-rewrite table), of how many."""
    outputs = caught = 0
    for path in result.originals:
        report = _verify(original, result, _tampered(result, path, factor), x, True, ())
        outputs += not all(o.passed for run in report.runs for o in run.outputs)
        caught += not report.passed
    return f"{outputs}, {caught} of {len(result.originals)}"


def main() -> None:
    torch.manual_seed(0)
    if sys.argv[1:2] == ["--zoo"]:
        zoo_table(sys.argv[2].split(",") if len(sys.argv) > 2 else list(ZOO_NOISE))
        return
    print("Folding error: output error against the original run in float64, both fused "
          "models run in float64 (4x3x32x32 input)\n")
    folding_table()
    print(f"\nVerification error: {len(BLOCK_NAMES)} block families x 2 seeds, width 16; "
          "tampered = one fused conv's weights x1.02 (each conv in turn); error/noise: the "
          "fused model's error against the original run in float64 over the original's own "
          "float32 noise (float32 comparisons)\n")
    tolerance_table()
    print(f"\nNoise-relative bar (allowed: max(1e-5, {NOISE_FACTOR:g} x noise)): deep conv-BN "
          "networks, 8 layers, a constant offset after each BN but the last; x1.0001 = the "
          "middle fused conv's weights\n")
    noisy_table()


if __name__ == "__main__":
    main()
