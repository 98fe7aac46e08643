"""Quantization readiness of a fused model: which convs INT8 will hurt, and why.

Re-parameterized weights are known to quantize badly (QARepVGG): a BN scale |γ|/√(σ²+ε) of
several hundred, usually from an identity branch whose running_var is near zero, makes a few
taps of the fused kernel dwarf the rest, and the summed branches give the channels widely
different ranges. For every conv and linear layer of the fused model this reports the weight
ranges, per tensor and per output channel, the outlier channels, and, through the rewrite
records, the largest BN scale that went into it and the BN it came from.

Then it simulates INT8 with torch's own observers and fake-quant ops, through forward pre-hooks
(each layer's input activation: per tensor, affine, calibrated with ``MinMaxObserver`` on the
float model) and ``functional_call`` (each layer's weight: symmetric, per output channel or per
tensor), so any fused model works, GraphModules included. Errors are scale-relative like
``repconv.verify``: ``max|int8 - float| / max|float|`` over every output leaf and batch. The
calibration batches are also the evaluation batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from torch import Tensor, nn
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.utils._pytree import tree_flatten

from repconv.errors import InputError, one_line
from repconv.fold.calls import eval_mode
from repconv.rewrite.record import RewriteRecord
from repconv.verify.inputs import random_inputs

DEFAULT_TARGET = 1e-2
NEAR_ZERO_VAR = 1e-4  # a running_var below this makes |γ|/√(σ²+ε) approach |γ|/√ε
OUTLIER_FACTOR = 4.0  # an outlier channel's weight range exceeds this many times the median's


@dataclass(frozen=True)
class BnScale:
    """The largest |γ|/√(σ²+ε) of one BatchNorm (``source``: its path in the original model)."""

    source: str
    scale: float
    channel: int


@dataclass(frozen=True)
class NearZeroVariance:
    source: str
    channels: list[int]
    smallest: float


@dataclass(frozen=True)
class LayerReadiness:
    """One conv or linear layer of the fused model. Channel figures are per output channel:
    ``channel_widest``/``channel_narrowest`` are the largest and smallest max|w| of a channel;
    ``channel_ratio`` is None when a channel is all zeros. ``sensitivity``: the whole-model
    error with only this layer in INT8 (per-channel weights)."""

    layer: str
    kind: str
    weight_min: float
    weight_max: float
    channel_widest: float
    channel_narrowest: float
    channel_ratio: float | None
    outlier_channels: list[int]
    largest_bn_scale: BnScale | None
    near_zero_variance: list[NearZeroVariance]
    sensitivity: float


@dataclass(frozen=True)
class QuantReport:
    """``layers`` most sensitive first. ``keep_float``: the most sensitive layers, greedily
    kept in floating point until the INT8 error is at most ``target`` (``error_kept``)."""

    layers: list[LayerReadiness]
    error_per_tensor: float
    error_per_channel: float
    target: float
    keep_float: list[str]
    error_kept: float
    calibration_batches: int

    def verdict(self) -> str:
        head = f"INT8 error {self.error_per_channel:.2e} (per-channel weights)"
        if not self.keep_float:
            return f"{head} meets the target {self.target:.0e} with every layer in INT8"
        kept = ", ".join(self.keep_float)
        return (f"{head} misses the target {self.target:.0e}: keep {len(self.keep_float)} of "
                f"{len(self.layers)} layers in fp16 ({kept}) for an error of "
                f"{self.error_kept:.2e}")

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "verdict": self.verdict()}

    def summary(self) -> str:
        return (f"INT8 simulation on {self.calibration_batches} calibration batch(es): "
                f"whole-model error {self.error_per_tensor:.2e} with per-tensor weights, "
                f"{self.error_per_channel:.2e} with per-channel weights")

    def __rich__(self) -> RenderableType:
        table = Table(title="INT8 readiness, most sensitive layer first", box=box.SIMPLE_HEAD,
                      pad_edge=False, collapse_padding=True)
        for header in ("layer", "INT8 alone", "max|w|", "ch ratio", "outliers", "var≈0"):
            table.add_column(header, justify="left" if header == "layer" else "right",
                             no_wrap=True, overflow="fold")
        table.add_column("largest BN scale (from)", overflow="fold")
        for layer in self.layers:
            bn = layer.largest_bn_scale
            ratio = f"{layer.channel_ratio:.1f}" if layer.channel_ratio is not None else "inf"
            table.add_row(
                layer.layer, f"{layer.sensitivity:.2e}",
                f"{max(-layer.weight_min, layer.weight_max):.3g}", ratio,
                str(len(layer.outlier_channels)),
                str(sum(len(v.channels) for v in layer.near_zero_variance)),
                f"{bn.scale:.3g} ({bn.source})" if bn else "-",
            )
        style = "green" if not self.keep_float else "bold yellow"
        return Group(Text(self.summary()), table, Text(self.verdict(), style=style))


def _output_rows(module: nn.Module, weight: Tensor) -> Tensor:
    """The weight as one row per output channel (a transposed conv stores (in, out/g, ...))."""
    if not isinstance(module, _ConvTransposeNd):
        return weight.reshape(weight.shape[0], -1)
    groups = module.groups
    grouped = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
    return grouped.transpose(1, 2).reshape(groups * weight.shape[1], -1)


def _from_output_rows(module: nn.Module, rows: Tensor, shape: torch.Size) -> Tensor:
    if not isinstance(module, _ConvTransposeNd):
        return rows.reshape(shape)
    groups = module.groups
    grouped = rows.reshape(groups, shape[1], shape[0] // groups, *shape[2:])
    return grouped.transpose(1, 2).reshape(shape)


def _bn_sources(original: nn.Module, records: Iterable[RewriteRecord]) -> dict[str, list[str]]:
    """Fused module path -> paths of the original model's BatchNorms folded into it."""
    sources: dict[str, list[str]] = {}
    for record in records:
        if record.fused_module is None:
            continue
        found = sources.setdefault(record.fused_module, [])
        for path in record.sources:
            try:
                module = original.get_submodule(path)
            except AttributeError:
                continue
            if (isinstance(module, _BatchNorm) and module.running_var is not None
                    and path not in found):
                found.append(path)
    return sources


def _bn_scales(bn: _BatchNorm) -> Tensor:
    variance = bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(variance)
    return gamma.abs() / torch.sqrt(variance + bn.eps)


def _bn_figures(original: nn.Module, paths: list[str], near_zero_var: float,
                ) -> tuple[BnScale | None, list[NearZeroVariance]]:
    largest: BnScale | None = None
    near_zero: list[NearZeroVariance] = []
    for path in paths:
        bn = original.get_submodule(path)
        scales = _bn_scales(bn)
        channel = int(scales.argmax())
        if largest is None or scales[channel] > largest.scale:
            largest = BnScale(path, float(scales[channel]), channel)
        variance = bn.running_var.detach().double()
        low = torch.nonzero(variance < near_zero_var).flatten().tolist()
        if low:
            near_zero.append(NearZeroVariance(path, low, float(variance.min())))
    return largest, near_zero


class _Simulation:
    """Fake-quantized runs of ``model`` with any chosen set of its layers in INT8."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module],
                 batches: list[tuple[Tensor, ...]]) -> None:
        self.model, self.layers, self.batches = model, layers, batches
        observers = {name: MinMaxObserver() for name in layers}
        handles = [layer.register_forward_pre_hook(self._observe(observers[name]))
                   for name, layer in layers.items()]
        try:
            self.reference = [self._leaves(batch, {}) for batch in batches]
        finally:
            for handle in handles:
                handle.remove()
        self.activation_qparams: dict[str, tuple[float, int, int, int]] = {}
        for name, observer in observers.items():
            scale, zero_point = observer.calculate_qparams()
            self.activation_qparams[name] = (float(scale), int(zero_point), observer.quant_min,
                                             observer.quant_max)
        self.weights = {per_channel: {name: _fake_quant_weight(layer, per_channel)
                                      for name, layer in layers.items()}
                        for per_channel in (False, True)}

    @staticmethod
    def _observe(observer: MinMaxObserver) -> Callable[[nn.Module, tuple], None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            observer(args[0].detach().float())

        return hook

    def _fake_quant_input(self, name: str) -> Callable[[nn.Module, tuple], tuple]:
        scale, zero_point, low, high = self.activation_qparams[name]

        def hook(_module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            quantized = torch.fake_quantize_per_tensor_affine(x.float(), scale, zero_point,
                                                              low, high)
            return (quantized.to(x.dtype), *args[1:])

        return hook

    def _leaves(self, batch: tuple[Tensor, ...], weights: dict[str, Tensor]) -> list[Tensor]:
        leaves, _ = tree_flatten(functional_call(self.model, weights, batch))
        return [leaf.double() for leaf in leaves
                if isinstance(leaf, Tensor) and leaf.is_floating_point()]

    def error(self, quantized: Iterable[str], *, per_channel: bool = True) -> float:
        """Scale-relative error of the model with the ``quantized`` layers in INT8."""
        names = list(quantized)
        weights = {f"{name}.weight": self.weights[per_channel][name] for name in names}
        handles = [self.layers[name].register_forward_pre_hook(self._fake_quant_input(name))
                   for name in names]
        worst = 0.0
        try:
            for batch, expected in zip(self.batches, self.reference):
                for want, got in zip(expected, self._leaves(batch, weights)):
                    scale = max(float(want.abs().max()), torch.finfo(torch.float64).tiny)
                    worst = max(worst, float((got - want).abs().max()) / scale)
        finally:
            for handle in handles:
                handle.remove()
        return worst


def _fake_quant_weight(layer: nn.Module, per_channel: bool) -> Tensor:
    """The layer's weight rounded to symmetric INT8, per output channel or per tensor."""
    weight = layer.weight.detach()
    rows = _output_rows(layer, weight).float()
    if per_channel:
        observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8,
                                            qscheme=torch.per_channel_symmetric)
        observer(rows)
        scale, zero_point = observer.calculate_qparams()
        quantized = torch.fake_quantize_per_channel_affine(
            rows, scale.float(), zero_point.to(torch.int32), 0, observer.quant_min,
            observer.quant_max)
    else:
        tensor_observer = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
        tensor_observer(rows)
        scale, zero_point = tensor_observer.calculate_qparams()
        quantized = torch.fake_quantize_per_tensor_affine(
            rows, float(scale), int(zero_point), tensor_observer.quant_min,
            tensor_observer.quant_max)
    return _from_output_rows(layer, quantized, weight.shape).to(weight.dtype)


def _layer_readiness(name: str, layer: nn.Module, sensitivity: float,
                     bn_figures: tuple[BnScale | None, list[NearZeroVariance]],
                     outlier_factor: float) -> LayerReadiness:
    weight = layer.weight.detach().double()
    channel_max = _output_rows(layer, weight).abs().amax(dim=1)
    widest, narrowest = float(channel_max.max()), float(channel_max.min())
    median = float(channel_max.median())
    largest_bn_scale, near_zero_variance = bn_figures
    return LayerReadiness(
        layer=name, kind=type(layer).__name__,
        weight_min=float(weight.min()), weight_max=float(weight.max()),
        channel_widest=widest, channel_narrowest=narrowest,
        channel_ratio=widest / narrowest if narrowest > 0 else None,
        outlier_channels=torch.nonzero(channel_max > outlier_factor * median).flatten().tolist(),
        largest_bn_scale=largest_bn_scale, near_zero_variance=near_zero_variance,
        sensitivity=sensitivity,
    )


def requested_target(quant: bool, target: float | None) -> float | None:
    """The error target of --quant (None: no report), checked."""
    if target is not None and not quant:
        raise InputError("--quant-target is used only with --quant; pass --quant too")
    if not quant:
        return None
    target = DEFAULT_TARGET if target is None else target
    check_target(target)
    return target


def check_target(target: float) -> None:
    if not (target > 0 and target < float("inf")):
        raise InputError(f"the quantization error target must be a number > 0, not {target}; "
                         "pass --quant-target like 1e-2")


def calibration_batches(example: tuple[Tensor, ...], samples: Mapping[str, tuple[Tensor, ...]],
                        seed: int, count: int = 3) -> list[tuple[Tensor, ...]]:
    """What the INT8 simulation calibrates on: the user's sample inputs when given (--inputs),
    else ``count`` seeded random inputs shaped like ``example``, the first being the one the
    verification compares first."""
    if samples:
        return list(samples.values())
    return [random_inputs(example, seed + index) for index in range(count)]


def _batches(inputs: Sequence[Tensor | tuple[Tensor, ...]]) -> list[tuple[Tensor, ...]]:
    batches = [x if isinstance(x, tuple) else (x,) for x in inputs]
    if not batches:
        raise InputError("the quantization report needs at least one calibration input")
    return batches


def quant_report(
    original: nn.Module,
    fused: nn.Module,
    rewrites: Sequence[RewriteRecord],
    calibration_inputs: Sequence[Tensor | tuple[Tensor, ...]],
    *,
    target: float = DEFAULT_TARGET,
    near_zero_var: float = NEAR_ZERO_VAR,
    outlier_factor: float = OUTLIER_FACTOR,
) -> QuantReport:
    """Quantization readiness of ``fused`` (made from ``original`` by ``rewrites``, i.e.
    ``FuseResult.report.rewrites``), calibrated and evaluated on ``calibration_inputs`` (each a
    tensor or a tuple of the model's inputs)."""
    check_target(target)
    batches = _batches(calibration_inputs)
    layers = {name: module for name, module in fused.named_modules()
              if isinstance(module, (_ConvNd, nn.Linear))}
    if not layers:
        raise InputError("the fused model has no conv or linear layer to quantize")
    bn_sources = _bn_sources(original, rewrites)
    with eval_mode(fused), torch.no_grad():
        try:
            simulation = _Simulation(fused, layers, batches)
        except RuntimeError as exc:  # the model's own code failing on the given inputs
            raise InputError(f"the fused model fails on the calibration inputs: "
                             f"{one_line(exc)}") from exc
        sensitivity = {name: simulation.error([name]) for name in layers}
        ranked = sorted(layers, key=lambda name: -sensitivity[name])
        error_per_channel = simulation.error(layers)
        keep_float: list[str] = []
        error_kept = error_per_channel
        while error_kept > target and len(keep_float) < len(ranked):
            keep_float.append(ranked[len(keep_float)])
            error_kept = simulation.error(name for name in ranked if name not in keep_float)
        error_per_tensor = simulation.error(layers, per_channel=False)
    readiness = [
        _layer_readiness(name, layers[name], sensitivity[name],
                         _bn_figures(original, bn_sources.get(name, []), near_zero_var),
                         outlier_factor)
        for name in ranked
    ]
    return QuantReport(readiness, error_per_tensor, error_per_channel, target, keep_float,
                       error_kept, len(batches))
