"""The timm model zoo repconv is measured on: which models, how each is built with realistic
BatchNorm statistics, and the comparison of its three forms — the training model, timm's
hand-written deploy form (``reparameterize_model``) and repconv's fused model.

Shared by ``benchmarks/zoo.py`` (the full list, with latency) and ``tests/zoo`` (the CI subset,
op counts and errors only). Needs timm (``make zoo-env``); never downloads weights.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import timm
import torch
from timm.utils.model import reparameterize_model
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import repconv
from repconv.measure.opcount import OpCounts, count_ops

ERROR_BAR = 1e-4  # float32, scale-relative: max|fused - training| / max|training|
NOISE_FACTOR = 10.0  # ...or this many times the training model's own float32 rounding
TRAINING, HAND_WRITTEN, REPCONV = "training", "hand-written", "repconv"
T = TypeVar("T")


@dataclass(frozen=True)
class ZooModel:
    name: str
    family: str
    hand_written: bool  # timm ships reparameterize / fuse / switch_to_deploy hooks for it
    fixed_size: bool = False  # attention biases tied to the input size: built with img_size


def _reparameterizable(family: str, *names: str) -> list[ZooModel]:
    return [ZooModel(name, family, hand_written=True) for name in names]


def _conv_bn(family: str, *names: str) -> list[ZooModel]:
    return [ZooModel(name, family, hand_written=False) for name in names]


ZOO: tuple[ZooModel, ...] = (
    *_reparameterizable("repvgg", "repvgg_a0"),
    *_reparameterizable("mobileone", "mobileone_s0"),
    *_reparameterizable("fastvit", "fastvit_t8", "fastvit_sa12", "fastvit_mci0"),
    *_reparameterizable("repvit", "repvit_m0_9"),
    *_reparameterizable("repghostnet", "repghostnet_050"),
    ZooModel("levit_128s", "levit", hand_written=True, fixed_size=True),
    ZooModel("levit_conv_128s", "levit", hand_written=True, fixed_size=True),
    *_reparameterizable("efficientvit_msra", "efficientvit_m0"),
    *_reparameterizable("efficientvim", "efficientvim_m1"),
    *_reparameterizable("iformer", "iformer_t"),
    *_reparameterizable("lcnetv2", "lcnetv2_small"),
    *_reparameterizable("nextvit", "nextvit_small"),
    *_reparameterizable("shvit", "shvit_s1"),
    *_reparameterizable("tiny_vit", "tiny_vit_5m_224"),
    *_reparameterizable("ghostnetv3", "ghostnetv3_050"),
    *_conv_bn("efficientvit_mit", "efficientvit_b0"),
    *_conv_bn("resnet", "resnet18", "resnet18d", "resnet50", "seresnet18", "skresnet18"),
    *_conv_bn("resnest", "resnest14d"),
    *_conv_bn("efficientnet", "efficientnet_b0", "tf_efficientnet_b0", "efficientnet_lite0",
              "tinynet_e", "mixnet_s"),
    *_conv_bn("mobilenet", "mobilenetv3_small_050", "mobilenetv3_large_100", "mobilenetv2_050",
              "mobilenetv4_conv_small"),
    *_conv_bn("nas", "semnasnet_050", "hardcorenas_a"),
    *_conv_bn("regnet", "regnetx_002", "regnety_002", "regnetz_005"),
    *_conv_bn("cspnet", "cspdarknet53", "cs3darknet_focus_s"),
    *_conv_bn("dla", "dla34"),
    *_conv_bn("hrnet", "hrnet_w18_small"),
    *_conv_bn("ghostnet", "ghostnet_050"),
    *_conv_bn("rexnet", "rexnet_100"),
    *_conv_bn("lcnet", "lcnet_050"),
    ZooModel("efficientformerv2_s0", "efficientformerv2", hand_written=False, fixed_size=True),
    *_conv_bn("mobilevit", "mobilevit_xxs", "mobilevitv2_050"),
    *_conv_bn("densenet", "densenet121"),
    *_conv_bn("selecsls", "selecsls42b"),
    *_conv_bn("vovnet", "ese_vovnet19b_dw"),
    *_conv_bn("hgnet", "hgnetv2_b0"),
    *_conv_bn("dpn", "dpn48b"),
    *_conv_bn("inception", "inception_v3"),
    *_conv_bn("starnet", "starnet_s050"),
    *_conv_bn("fasternet", "fasternet_t0"),
    *_conv_bn("byobnet", "gernet_s"),
)
BY_NAME: dict[str, ZooModel] = {model.name: model for model in ZOO}

# The CI subset (tests/zoo): hand-written re-parameterization styles that fuse in seconds
# (RepVGG, MobileOne, RepMixer, RepViT, RepGhost, SHViT, LCNetV2, EfficientViM; LeViT's
# Linear+BN1d on tokens does not fold yet, see results_zoo.md),
# timm's BatchNormAct2d (efficientnet, mobilenetv3) and a plain ResNet.
SUBSET: tuple[str, ...] = (
    "repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m0_9", "repghostnet_050", "shvit_s1",
    "lcnetv2_small", "efficientvim_m1", "efficientnet_b0", "mobilenetv3_small_050", "resnet18",
    # an opaque call (LiteMLA's autocast) whose children hold conv+BN pairs
    "efficientvit_b0",
)

# Input sizes (px): the full zoo fuses at 128 and also checks 160; the CI subset 96 and 128.
ZOO_SIZES = (128, 160)
SUBSET_SIZES = (96, 128)


def seeded_input(shape: tuple[int, ...], seed: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def give_realistic_statistics(
    model: nn.Module, size: int, *, batches: int = 4, batch_size: int = 4, seed: int = 0
) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics, so that a
    wrong fold shows in the output; leaves ``model`` in eval mode.

    A freshly built BN (weight 1, bias 0, mean 0, var 1) is almost the identity and hides
    mistakes. Affine weights become U(0.5, 1.5) and biases N(0, 0.3) first; then a few
    train-mode forwards on random data accumulate the running statistics as a cumulative
    average (momentum None), so each BN's statistics match the activations its perturbed
    predecessors produce. Layer scales (timm's ``LayerScale``/``LayerScale2d``, initialised at
    1e-5) become U(0.5, 1.5) too: at their initial value a wrong fold inside the scaled branch
    would stay under the error bar.
    """
    generator = torch.Generator().manual_seed(seed)
    batchnorms = [m for m in model.modules()
                  if isinstance(m, _BatchNorm) and m.track_running_stats]
    momenta = [bn.momentum for bn in batchnorms]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BatchNorm) and module.affine:
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.3, generator=generator)
            elif type(module).__name__.startswith("LayerScale"):
                for scale in module.parameters(recurse=False):
                    scale.uniform_(0.5, 1.5, generator=generator)
        for bn in batchnorms:
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        for _ in range(batches):
            model(torch.randn(batch_size, 3, size, size, generator=generator))
    for bn, momentum in zip(batchnorms, momenta):
        bn.momentum = momentum
    model.eval()


def build(spec: ZooModel, size: int, seed: int = 0) -> nn.Module:
    """``spec``'s timm model, randomly initialised from ``seed`` (no download: the same weights
    every run), with realistic BN statistics, in eval mode."""
    kwargs = {"img_size": size} if spec.fixed_size else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(spec.name, pretrained=False, **kwargs)
    give_realistic_statistics(model, size, seed=seed)
    return model


def _leaves(output: object) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):
        return [leaf for value in output.values() for leaf in _leaves(value)]
    if isinstance(output, (tuple, list)):
        return [leaf for value in output for leaf in _leaves(value)]
    return []


def relative_error(expected: object, got: object) -> float:
    """max over output tensors of max|got - expected| / max|expected|, in float64; inf when the
    outputs differ in structure or shape, or hold NaN."""
    expected_leaves, got_leaves = _leaves(expected), _leaves(got)
    if len(expected_leaves) != len(got_leaves) or not expected_leaves:
        return math.inf
    worst = 0.0
    for a, b in zip(expected_leaves, got_leaves):
        if a.shape != b.shape:
            return math.inf
        a64, b64 = a.detach().double(), b.detach().double()
        error = float((a64 - b64).abs().max() / a64.abs().max().clamp_min(1e-300))
        worst = max(worst, error if error == error else math.inf)
    return worst


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200]


@dataclass
class Comparison:
    """One model's three forms, compared. Each error map goes from a check ("128px b2") to a
    scale-relative error against the float32 training model there, None where the training
    model itself does not run: ``errors`` repconv's, ``hand_written_errors`` timm's, and
    ``float32_noise`` the float64 training model's (how far float32 rounding alone moves the
    output: no fold can be held to less)."""

    name: str
    family: str
    size: int
    forms: dict[str, nn.Module] = field(default_factory=dict)
    ops: dict[str, OpCounts] = field(default_factory=dict)
    errors: dict[str, float | None] = field(default_factory=dict)
    hand_written_errors: dict[str, float | None] = field(default_factory=dict)
    float32_noise: dict[str, float | None] = field(default_factory=dict)
    fuse_seconds: float | None = None
    repconv_verified: bool | None = None  # what repconv.fuse's own verification said
    problems: list[str] = field(default_factory=list)  # exceptions and notes, by stage

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.name,
            "family": self.family,
            "size": self.size,
            "ops": {form: counts.to_dict() for form, counts in self.ops.items()},
            "errors": self.errors,
            "hand_written_errors": self.hand_written_errors,
            "float32_noise": self.float32_noise,
            "fuse_seconds": self.fuse_seconds,
            "repconv_verified": self.repconv_verified,
            "problems": self.problems,
        }


def _attempt(comparison: Comparison, stage: str, step: Callable[[], T]) -> T | None:
    """``step()``, or None with the exception recorded under ``stage``."""
    try:
        return step()
    except Exception as exc:  # a failing model must not stop the zoo
        comparison.problems.append(f"{stage}: {_one_line(exc)}")
        return None


def _run(model: nn.Module, x: Tensor) -> object:
    with torch.no_grad():
        return model(x.clone())  # a fresh copy each time: a model may change its input in place


def _steady_state_ops(model: nn.Module, x: Tensor) -> OpCounts:
    """The ops of a second call: what a first call does once (fill timm's eval-mode attention
    bias caches) is not per-inference work."""
    _run(model, x)
    return count_ops(lambda: model(x.clone()))


def _error_of(comparison: Comparison, form: str, model: nn.Module, inputs: Tensor,
              expected: object) -> float:
    """``model``'s error against ``expected`` on ``inputs``; inf (recorded) if it raises."""
    got = _attempt(comparison, form, lambda: _run(model, inputs))
    return math.inf if got is None else relative_error(expected, got)


def _repconv_form(comparison: Comparison, model: nn.Module, x: Tensor) -> nn.Module | None:
    """``repconv.fuse(model, x).model``, timed, noting when repconv's own verification fails."""
    start = time.perf_counter()
    result = _attempt(comparison, "repconv.fuse", lambda: repconv.fuse(model, x))
    if result is None:
        return None
    comparison.fuse_seconds = time.perf_counter() - start
    verification = result.report.verification
    comparison.repconv_verified = None if verification is None else verification.passed
    if verification is not None and not verification.passed:
        comparison.problems.append(
            f"repconv.fuse: its own verification failed (scale-relative error "
            f"{verification.max_rel_error:.1e}) {verification.problem}".strip())
    return result.model


def compare(spec: ZooModel, sizes: tuple[int, int]) -> Comparison:
    """Build ``spec`` at ``sizes[0]``, make both deploy forms, count the ops each executes and
    measure the errors at the fuse input, at batch 2 and at ``sizes[1]`` px."""
    size, other_size = sizes
    comparison = Comparison(spec.name, spec.family, size)
    model = _attempt(comparison, "build", lambda: build(spec, size))
    if model is None:
        return comparison
    x = seeded_input((1, 3, size, size), seed=1)
    comparison.forms[TRAINING] = model
    hand_written = _attempt(comparison, HAND_WRITTEN,
                            lambda: reparameterize_model(copy.deepcopy(model), inplace=True))
    if hand_written is not None:
        comparison.forms[HAND_WRITTEN] = hand_written.eval()
    fused = _repconv_form(comparison, model, x)
    if fused is not None:
        comparison.forms[REPCONV] = fused
    for form, module in comparison.forms.items():
        counts = _attempt(comparison, f"{form} op count",
                          lambda module=module: _steady_state_ops(module, x))
        if counts is not None:
            comparison.ops[form] = counts
    model64 = copy.deepcopy(model).double()
    checks = {f"{size}px b1": x, f"{size}px b2": seeded_input((2, 3, size, size), seed=2),
              f"{other_size}px b1": seeded_input((1, 3, other_size, other_size), seed=3)}
    for check, inputs in checks.items():
        expected = _attempt(comparison, f"training model at {check}",
                            lambda inputs=inputs: _run(model, inputs))
        if expected is None:
            comparison.errors[check] = comparison.hand_written_errors[check] = None
            comparison.float32_noise[check] = None
            continue
        expected64 = _attempt(comparison, f"float64 training model at {check}",
                              lambda inputs=inputs: _run(model64, inputs.double()))
        if expected64 is not None:
            comparison.float32_noise[check] = relative_error(expected64, expected)
        if hand_written is not None:
            comparison.hand_written_errors[check] = _error_of(
                comparison, f"{HAND_WRITTEN} at {check}", hand_written, inputs, expected)
        if fused is not None:
            comparison.errors[check] = _error_of(
                comparison, f"repconv at {check}", fused, inputs, expected)
    return comparison


def correctness_failures(comparison: Comparison) -> list[str]:
    """The bars ``comparison`` fails, latency aside: 'BN ops' (repconv leaves more BatchNorm
    ops than the hand-written form), 'conv ops' (runs more convs), 'error' (over ERROR_BAR, or
    NOISE_FACTOR x the model's own float32 rounding, at some size where the model runs);
    'build', 'repconv fails' and 'no hand-written form' when there is nothing to compare
    (``problems`` says why)."""
    ops = comparison.ops
    if not ops:
        return ["build"]
    failures = []
    if REPCONV not in ops:
        failures.append("repconv fails")
    elif HAND_WRITTEN not in ops:
        failures.append("no hand-written form")
    else:
        if ops[REPCONV].batchnorms > ops[HAND_WRITTEN].batchnorms:
            failures.append("BN ops")
        if ops[REPCONV].convs > ops[HAND_WRITTEN].convs:
            failures.append("conv ops")
    checked = [(error, comparison.float32_noise.get(check))
               for check, error in comparison.errors.items() if error is not None]
    # the bar is ERROR_BAR, or NOISE_FACTOR times the model's own float32 rounding where that
    # is larger (attention models with random weights round to 1e-4 by themselves)
    if not checked or any(error > max(ERROR_BAR, NOISE_FACTOR * (noise or 0.0))
                          for error, noise in checked):
        failures.append("error")
    return failures
