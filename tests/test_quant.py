"""Quantization readiness: the QARepVGG failure is found and named, benign models pass, and the
figures agree with a direct computation written out here."""

from __future__ import annotations

import copy
import json
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from helpers.reference_blocks import randomize_bn, tiny_net, tiny_net_example_input
from rich.console import Console
from torch import Tensor, nn

import repconv
from repconv.errors import InputError
from repconv.measure.quant import (
    BnScale,
    LayerReadiness,
    NearZeroVariance,
    QuantReport,
    quant_report,
)
from repconv.rewrite.record import RewriteRecord
from repconv.verify.inputs import random_inputs

DEAD_CHANNEL = 5
TINY_VAR = 1e-6
IDENTITY_BN = "3.rbr_identity"  # the identity branch of tiny_net's first RepVGG block


def _repvgg_with_dead_channel(tamper: bool = True) -> nn.Sequential:
    """tiny_net of RepVGG blocks whose stem channel DEAD_CHANNEL is constant, with the first
    block's identity BN holding the statistics training would give that channel: its constant as
    running_mean, and a near-zero running_var. The float model is well behaved (that branch's
    output is 0 for every input), but the fused kernel's identity tap is |γ|/√(1e-6 + 1e-5) ≈
    300x larger than every other weight: the QARepVGG failure."""
    torch.manual_seed(0)  # the convs' initial weights
    net = randomize_bn(tiny_net("RepVGGBlock", channels=16), seed=0)
    with torch.no_grad():
        net[0].weight[DEAD_CHANNEL] = 0
        constant = float(net[1](torch.zeros(1, 16, 1, 1))[0, DEAD_CHANNEL].relu())
        assert constant > 0.1, "the dead channel's constant must survive the stem's ReLU"
        if tamper:
            net[3].rbr_identity.running_mean[DEAD_CHANNEL] = constant
            net[3].rbr_identity.running_var[DEAD_CHANNEL] = TINY_VAR
    return net


def _fuse_and_report(net: nn.Module, example: Tensor, **options: float) -> QuantReport:
    result = repconv.fuse(net, example)
    batches = [random_inputs((example,), seed) for seed in range(3)]
    return quant_report(net, result.model, result.report.rewrites, batches, **options)


def _layer(report: QuantReport, name: str) -> LayerReadiness:
    return next(layer for layer in report.layers if layer.layer == name)


def _fused_from(rewrites: list[RewriteRecord], source: str) -> str:
    """The fused conv that the module at ``source`` went into."""
    return next(record.fused_module for record in rewrites
                if source in record.sources and record.fused_module is not None)


class Case(NamedTuple):
    net: nn.Module
    fused: nn.Module
    rewrites: list[RewriteRecord]
    batches: list[tuple[Tensor, ...]]
    report: QuantReport

    @property
    def identity_layer(self) -> str:
        return _fused_from(self.rewrites, IDENTITY_BN)


@pytest.fixture(scope="module")
def dead_channel_case() -> Case:
    net = _repvgg_with_dead_channel()
    example = tiny_net_example_input("RepVGGBlock", batch=4)
    result = repconv.fuse(net, example)
    batches = [random_inputs((example,), seed) for seed in range(3)]
    report = quant_report(net, result.model, result.report.rewrites, batches)
    return Case(net, result.model, result.report.rewrites, batches, report)


def test_identity_bn_with_tiny_variance_ranks_first_and_is_named(dead_channel_case: Case,
                                                                  ) -> None:
    net, report = dead_channel_case.net, dead_channel_case.report
    first, second = report.layers[0], report.layers[1]
    assert first.layer == dead_channel_case.identity_layer
    assert first.sensitivity > 3 * second.sensitivity
    identity = net[3].rbr_identity
    by_hand = abs(float(identity.weight.detach()[DEAD_CHANNEL])) / (TINY_VAR + identity.eps) ** 0.5
    assert first.largest_bn_scale == BnScale(IDENTITY_BN, pytest.approx(by_hand, rel=1e-9),
                                             DEAD_CHANNEL)
    assert by_hand > 100  # the QARepVGG regime: several hundred
    assert first.near_zero_variance == [
        NearZeroVariance(IDENTITY_BN, [DEAD_CHANNEL], pytest.approx(TINY_VAR, rel=1e-6))]
    assert first.outlier_channels == [DEAD_CHANNEL]
    assert report.error_per_channel > report.target
    assert report.keep_float[0] == first.layer
    assert report.error_kept <= report.target


def test_without_the_tiny_variance_the_block_is_benign() -> None:
    """The control: the same network with the identity BN's random statistics."""
    net = _repvgg_with_dead_channel(tamper=False)
    example = tiny_net_example_input("RepVGGBlock", batch=4)
    rewrites = repconv.fuse(net, example).report.rewrites
    control = _fuse_and_report(net, example)
    layer = _fused_from(rewrites, IDENTITY_BN)
    tampered = _fuse_and_report(_repvgg_with_dead_channel(), example)
    assert control.layers[0].layer != layer
    benign = _layer(control, layer)
    assert benign.sensitivity * 10 < _layer(tampered, layer).sensitivity
    assert benign.largest_bn_scale is not None and benign.largest_bn_scale.scale < 5
    assert benign.near_zero_variance == []


def _int8_symmetric_rows(weight: Tensor) -> Tensor:
    step = weight.abs().amax(dim=1, keepdim=True) / 127.5
    return torch.clamp(torch.round(weight / step), -128, 127) * step


def _uint8_affine(x: Tensor, low: float, high: float) -> Tensor:
    low, high = min(low, 0.0), max(high, 0.0)
    step = (high - low) / 255
    zero_point = min(max(0 - round(low / step), 0), 255)
    return (torch.clamp(torch.round(x / step) + zero_point, 0, 255) - zero_point) * step


def test_figures_match_a_direct_computation(dead_channel_case: Case) -> None:
    fused, batches, report = (dead_channel_case.fused, dead_channel_case.batches,
                              dead_channel_case.report)
    name = dead_channel_case.identity_layer
    conv = fused.get_submodule(name)
    figures = _layer(report, name)
    weight = conv.weight.detach().double()
    channel_max = weight.flatten(1).abs().amax(dim=1)
    assert figures.weight_min == float(weight.min())
    assert figures.weight_max == float(weight.max())
    assert figures.channel_widest == float(channel_max.max())
    assert figures.channel_narrowest == float(channel_max.min())
    assert figures.channel_ratio == pytest.approx(float(channel_max.max() / channel_max.min()))

    # the layer alone in INT8, by the textbook formulas: input range from the float model
    seen: list[Tensor] = []
    handle = conv.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        expected = [fused(*batch) for batch in batches]
    handle.remove()
    low = min(float(x.min()) for x in seen)
    high = max(float(x.max()) for x in seen)
    quantized = copy.deepcopy(fused)
    layer = quantized.get_submodule(name)
    with torch.no_grad():
        layer.weight.copy_(_int8_symmetric_rows(layer.weight.flatten(1)).view_as(layer.weight))
    layer.register_forward_pre_hook(lambda _m, args: (_uint8_affine(args[0], low, high),))
    with torch.no_grad():
        error = max(float((quantized(*batch) - want).abs().max() / want.abs().max())
                    for batch, want in zip(batches, expected))
    assert figures.sensitivity == pytest.approx(error, rel=1e-4)


def _plain_conv_bn(channels: int = 16) -> nn.Sequential:
    torch.manual_seed(0)  # the convs' initial weights
    layers: list[nn.Module] = []
    cin = 3
    for index, cout in enumerate((channels, channels, 2 * channels)):
        layers += [nn.Conv2d(cin, cout, 3, stride=2 if index == 2 else 1, padding=1, bias=False),
                   nn.BatchNorm2d(cout), nn.ReLU()]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return randomize_bn(nn.Sequential(*layers), seed=0)


def test_plain_conv_bn_with_benign_statistics_quantizes_well() -> None:
    """Four quantized layers, each rounding its input and its weight to 8 bits: one rounding
    moves an element by at most half a step, 1/510 of its tensor's range (0.2 %). Eight such
    roundings, adding up in quadrature as independent errors do, stay under 1 % of the output's
    scale: the bound is the default target, 1e-2 (measured: 5.9e-3). The dead-channel RepVGG
    above reaches 5e-2 through one layer."""
    net = _plain_conv_bn()
    report = _fuse_and_report(net, torch.randn(4, 3, 32, 32, generator=torch.Generator()
                                               .manual_seed(0)))
    assert report.error_per_channel < 1e-2
    assert report.keep_float == []
    assert report.error_kept == report.error_per_channel
    assert "meets the target 1e-02 with every layer in INT8" in report.verdict()
    for conv, bn in (("0", "1"), ("3", "4"), ("6", "7")):
        figures = _layer(report, conv)
        module = net.get_submodule(bn)
        by_hand = module.weight.detach().double().abs() / torch.sqrt(
            module.running_var.double() + module.eps)
        assert figures.largest_bn_scale == BnScale(bn, pytest.approx(float(by_hand.max())),
                                                   int(by_hand.argmax()))
        assert figures.near_zero_variance == []
    assert _layer(report, "11").largest_bn_scale is None  # the Linear had no BN


def test_target_decides_what_stays_in_float(dead_channel_case: Case) -> None:
    net, fused, records, batches, _ = dead_channel_case
    weights = {name: value.clone() for name, value in fused.state_dict().items()}
    strict = quant_report(net, fused, records, batches, target=1e-12)
    assert strict.keep_float == [layer.layer for layer in strict.layers]
    assert strict.error_kept == 0.0  # nothing quantized: exactly the float model
    lenient = quant_report(net, fused, records, batches, target=1.0)
    assert lenient.keep_float == [] and lenient.error_kept == lenient.error_per_channel
    # the simulation leaves the fused model as it was: same weights, no hooks
    assert all(torch.equal(weights[name], value) for name, value in fused.state_dict().items())
    assert not any(module._forward_pre_hooks for module in fused.modules())


class _BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass whose forward calls F.batch_norm."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                   self.bias, False, 0.0, self.eps))


def test_functional_batch_norm_subclass_is_named() -> None:
    net = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False),
                                     _BatchNormAct(8)), seed=1)
    with torch.no_grad():
        net[1].running_var[2] = 1e-5
    report = _fuse_and_report(net, torch.randn(2, 3, 16, 16))
    figures = _layer(report, "0")
    assert figures.largest_bn_scale is not None
    assert (figures.largest_bn_scale.source, figures.largest_bn_scale.channel) == ("1", 2)
    assert figures.near_zero_variance[0].channels == [2]


def test_grouped_transposed_conv_channels_are_output_channels() -> None:
    net = randomize_bn(nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False),
                                     nn.BatchNorm2d(6)), seed=2)
    report = _fuse_and_report(net, torch.randn(2, 4, 8, 8))
    fused = repconv.fuse(net, torch.randn(2, 4, 8, 8)).model
    weight = next(m for m in fused.modules() if isinstance(m, nn.ConvTranspose2d)).weight.detach()
    # (in, out/groups, k, k): output channel g*3 + j reads weight[2g:2g+2, j]
    channel_max = torch.stack([weight[2 * g:2 * g + 2, j].abs().max()
                               for g in range(2) for j in range(3)]).double()
    figures = report.layers[0]
    assert figures.channel_widest == pytest.approx(float(channel_max.max()))
    assert figures.channel_narrowest == pytest.approx(float(channel_max.min()))
    assert report.error_per_channel < 1e-2


def test_fp16_model_is_simulated_against_its_fp16_outputs() -> None:
    """fp16 itself rounds at ~5e-4 of the scale; INT8 at ~4e-3 per rounding."""
    net = randomize_bn(tiny_net("RepVGGBlock"), seed=3).half()
    report = _fuse_and_report(net, tiny_net_example_input("RepVGGBlock", batch=2).half())
    assert 1e-3 < report.error_per_channel < 5e-2
    assert 1e-3 < report.layers[0].sensitivity <= report.error_per_tensor


def test_bad_options_are_input_errors(dead_channel_case: Case) -> None:
    net, fused, _, batches, _ = dead_channel_case
    with pytest.raises(InputError, match="target must be a number > 0"):
        quant_report(net, fused, [], batches, target=0.0)
    with pytest.raises(InputError, match="at least one calibration input"):
        quant_report(net, fused, [], [])
    with pytest.raises(InputError, match="no conv or linear layer"):
        quant_report(nn.ReLU(), nn.ReLU(), [], batches)


EXPECTED_AT_100 = """\
INT8 simulation on 3 calibration batch(es): whole-model error 1.73e-01 with per-tensor weights,
5.54e-02 with per-channel weights
                      INT8 readiness, most sensitive layer first

 layer         INT8 alone  max|w|  ch ratio  outliers  var≈0  largest BN scale (from)
 ────────────────────────────────────────────────────────────────────────────────────
 3.fused_conv    5.74e-02     178     361.8         1      1  179 (3.rbr_identity)
 8               1.23e-02   0.177       1.0         0      0  -
 0               2.15e-04   0.449       inf         0      0  2.47 (1)

INT8 error 5.54e-02 (per-channel weights) misses the target 1e-02: keep 2 of 3 layers in fp16
(3.fused_conv, 8) for an error of 3.68e-03"""


def _fixed_report() -> QuantReport:
    def layer(name: str, sensitivity: float, low: float, high: float, ratio: float | None,
              outliers: list[int], bn: BnScale | None,
              near_zero: list[NearZeroVariance]) -> LayerReadiness:
        return LayerReadiness(name, "Conv2d", low, high, high, 0.5, ratio, outliers, bn,
                              near_zero, sensitivity)

    return QuantReport(
        layers=[
            layer("3.fused_conv", 5.74e-2, -178.2, 12.0, 361.8, [5],
                  BnScale("3.rbr_identity", 179.0, 5),
                  [NearZeroVariance("3.rbr_identity", [5], 1e-6)]),
            layer("8", 1.23e-2, -0.1, 0.177, 1.0, [], None, []),
            layer("0", 2.15e-4, -0.449, 0.3, None, [], BnScale("1", 2.47, 0), []),
        ],
        error_per_tensor=1.73e-1, error_per_channel=5.54e-2, target=1e-2,
        keep_float=["3.fused_conv", "8"], error_kept=3.68e-3, calibration_batches=3)


def test_renders_at_fixed_width_and_serialises() -> None:
    report = _fixed_report()
    console = Console(width=100, record=True, color_system=None)
    console.print(report)
    rendered = "\n".join(line.rstrip() for line in console.export_text().splitlines())
    assert rendered == "\n".join(line.rstrip() for line in EXPECTED_AT_100.splitlines())
    document = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert document["verdict"] == report.verdict()
    assert document["layers"][0]["largest_bn_scale"] == {
        "source": "3.rbr_identity", "scale": 179.0, "channel": 5}
    assert document["layers"][2]["channel_ratio"] is None
