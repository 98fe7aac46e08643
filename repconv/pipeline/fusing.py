"""`repconv fuse` and `repconv inspect` on a file: load IN, fuse, verify, write OUT."""

from __future__ import annotations

import copy
import time
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from repconv.driver.report import FuseReport, ModelCounts
from repconv.errors import StrictError, VerificationError
from repconv.formats.mapped import drop_pages
from repconv.formats.onnx_deploy import (
    check_onnx_output,
    export_deploy,
    onnx_variations,
    weights_of,
)
from repconv.formats.onnx_io import AsExported, OnnxExport, OnnxModule
from repconv.formats.write import check_output, save_deploy, write_atomically
from repconv.fuse import FuseResult, fuse
from repconv.measure.quant import calibration_batches, check_target, quant_report
from repconv.pipeline.options import Options, cast_inputs
from repconv.pipeline.outcomes import FuseOutcome
from repconv.pipeline.precision import (
    LOW_PRECISION,
    DeployDtype,
    model_dtype,
    precision_cost,
    to_dtype,
)
from repconv.progress import Progress, no_progress
from repconv.verify.footprint import MemoryBudget
from repconv.verify.report import VerifyReport

# Norms that normalise each sample with statistics of that sample, computed at run time: no
# fixed per-channel map that a conv could absorb.
_PER_SAMPLE_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.RMSNorm)


def _unfoldable_norms(model: nn.Module) -> str | None:
    """What a user with GroupNorm/LayerNorm/InstanceNorm models should hear instead of
    'nothing to fuse'."""
    per_sample: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        running = getattr(module, "track_running_stats", False)
        if isinstance(module, _PER_SAMPLE_NORMS) or (
            isinstance(module, nn.modules.instancenorm._InstanceNorm) and not running
        ):
            per_sample.setdefault(type(module).__name__, []).append(name)
    if not per_sample:
        return None
    listed = "; ".join(
        f"{len(names)} {kind} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        for kind, names in per_sample.items()
    )
    return (f"{listed} cannot fold into a conv: these norms normalise each sample with the mean "
            "and variance of that sample, computed at run time, so unlike an eval BatchNorm "
            "they are not a fixed per-channel scale and shift")


def fuse_checkpoint(
    in_path: Path,
    out_path: Path | None,
    options: Options,
    *,
    keep_extra: bool = False,
    check: bool = True,
    progress: Progress = no_progress,
    opset: int | None = None,
    quant_target: float | None = None,
    dtype: DeployDtype | None = None,
) -> FuseOutcome:
    """Load IN, fuse, verify (``check``; the local check of each rewrite always runs) and, when
    ``out_path`` is given and verification passes, write OUT. Raises VerificationError (nothing
    written) when the fused model does not match; ``out_path=None, check=False`` is `repconv
    inspect`: it only reports. An ``.onnx`` OUT is exported (at ``opset``) and that file's
    bytes, run in ONNX Runtime, are what is verified. ``quant_target``: add the INT8 readiness
    report for that error target. ``dtype``: the deploy dtype (default: the model's); the model
    is converted before it is fused and verified, and a float16/bfloat16 deploy's cost against
    a float32 one is reported."""
    seconds: dict[str, float] = {}
    if out_path is not None:
        check_output(in_path, out_path)
        opset = check_onnx_output(out_path, opset)
    if quant_target is not None:
        check_target(quant_target)
    start = time.perf_counter()
    progress(f"loading {in_path}")
    loaded = options.load(in_path)
    stored = loaded.model
    loaded.model = to_dtype(stored, dtype)
    samples = options.samples(loaded.model)
    inputs, _ = options.inputs(samples, checkpoint=loaded.input_shape)
    inputs = cast_inputs(inputs, loaded.model)
    budget = options.memory()
    options.check_memory(loaded.model, inputs, samples, budget)
    seconds["load"] = time.perf_counter() - start
    result: FuseResult | None = None
    if loaded.deploy_plan is not None:
        # Already fused: pass it through unchanged, so a pipeline step stays idempotent.
        counts = ModelCounts.of(loaded.model)
        report = FuseReport(before=counts, after=counts, notes=[
            f"{in_path} is already a repconv deploy file ({len(loaded.deploy_plan)} recorded "
            "rewrites): nothing more to fuse; verify it against its training checkpoint with "
            "repconv verify"])
        plan = loaded.deploy_plan
        fused_model = loaded.model
    else:
        progress("tracing and fusing")
        start = time.perf_counter()
        # with nothing after the fuse reading the loaded model (no verification, no INT8 report,
        # no entries of IN written beside it), its folded tensors are freed as their conv is made
        owned = not check and quant_target is None and not loaded.pickled and not keep_extra
        release = (_free_mapped if loaded.mapped else _free) if owned else None
        result = fuse(loaded.model, inputs, check=False, seed=options.seed, progress=progress,
                      unshare=options.unshare, release=release)
        seconds["fuse"] = time.perf_counter() - start
        report, plan, fused_model = result.report, result.plan, result.model
        _note_norms(report, loaded.model)
        left = report.unfolded_batchnorms()
        if options.strict and left:
            raise StrictError(
                f"--strict: {len(left)} BatchNorm(s) next to a conv left unfused (first "
                f"{left[0].where}: {left[0].reason}); nothing written",
                FuseOutcome(str(in_path), str(out_path) if out_path else None, loaded.found,
                            report, seconds=seconds))
        if check and model_dtype(fused_model) in LOW_PRECISION and report.rewrites:
            progress("fusing in float32, to measure what the stored dtype costs")
            start = time.perf_counter()
            upcast = copy.deepcopy(stored).float()
            float32 = fuse(upcast, tuple(x.float() for x in inputs), check=False).model
            report.notes.append(precision_cost(stored, fused_model, float32, inputs))
            seconds["precision"] = time.perf_counter() - start
    onnx_data: OnnxExport | None = None
    if opset is not None:
        progress("exporting to ONNX")
        start = time.perf_counter()
        onnx_data = export_deploy(fused_model, inputs, opset)
        seconds["export"] = time.perf_counter() - start
    if check and (result is not None or onnx_data is not None):
        start = time.perf_counter()
        # each rewrite was checked before it was applied: the table is verify's, for files; an
        # ONNX file is itself what is verified, with its weights in the per-rewrite table
        report.verification = _verify_fused(options, loaded.model, fused_model, onnx_data,
                                            inputs, samples, result, progress, budget)
        seconds["verify"] = time.perf_counter() - start
    outcome = FuseOutcome(str(in_path), str(out_path) if out_path else None, loaded.found,
                          report, seconds=seconds,
                          verification_skipped=not check and out_path is not None)
    if not outcome.ok:
        raise VerificationError(
            f"{report.verification.summary()}; nothing written",
            outcome,
        )
    if quant_target is not None:
        progress("simulating INT8")
        start = time.perf_counter()
        outcome.quant = quant_report(loaded.model, fused_model, report.rewrites,
                                     calibration_batches(inputs, samples, options.seed),
                                     target=quant_target)
        seconds["quant"] = time.perf_counter() - start
    # IN as read: checked before the write, and again once OUT's bytes are on disk (tensors
    # read mapped are read from IN while they are written)
    check_in = partial(loaded.stamp.check, "IN") if loaded.stamp is not None else None
    if check_in is not None:
        check_in()
    if out_path is not None:
        progress(f"writing {out_path}")
        start = time.perf_counter()
        if onnx_data is not None and opset is not None:
            write_atomically(out_path, onnx_data.data, before_replace=check_in)
            outcome.written = onnx_data.describe(opset)
        else:
            outcome.written = save_deploy(
                out_path, fused_model, plan, loaded, tuple(inputs[0].shape), inputs,
                keep_extra=keep_extra, before_replace=check_in,
            )
        seconds["write"] = time.perf_counter() - start
    return outcome


def _free(tensors: list[Tensor]) -> None:
    """Empty each tensor (a later use fails on its shape): its memory goes with the last view
    of it, which `fuse` drops as it hands it over."""
    with torch.no_grad():
        for tensor in tensors:
            tensor.set_()


def _free_mapped(tensors: list[Tensor]) -> None:
    """`_free` for tensors read mapped: their pages go now, the file's mapping as a whole only
    with its last tensor."""
    drop_pages(tensors)
    _free(tensors)


def _verify_fused(options: Options, original: nn.Module, fused: nn.Module,
                  onnx_data: OnnxExport | None, inputs: tuple[Tensor, ...],
                  samples: dict[str, tuple[Tensor, ...]], result: FuseResult | None,
                  progress: Progress, budget: MemoryBudget | None) -> VerifyReport:
    # where the model decides on sizes, both sides of each decision
    sizes = result.sizes if result is not None else []
    if onnx_data is None:
        return options.verify(original, fused, inputs, samples, progress, memory=budget,
                              extra_shapes=sizes)
    # an ONNX file runs at the sizes it was exported for; the original as it runs while
    # exported (a forward may return another structure then)
    sizes = [s for s in sizes if _fits_export(s, inputs, onnx_data.dynamic_batch)]
    return options.verify(AsExported(original), OnnxModule(onnx_data.data), inputs, samples,
                          progress, reference=result, vary=onnx_variations(onnx_data),
                          weights=weights_of(onnx_data.data), memory=budget,
                          extra_shapes=sizes)


def _fits_export(shapes: list[tuple[int, ...]], inputs: tuple[Tensor, ...],
                 dynamic_batch: bool) -> bool:
    """Whether an exported file (a fixed size but for a dynamic batch) takes inputs of
    ``shapes``."""
    return all(tuple(s[1:]) == tuple(x.shape[1:]) and (dynamic_batch or s[0] == x.shape[0])
               for s, x in zip(shapes, inputs))


def _note_norms(report: FuseReport, model: nn.Module) -> None:
    norms = _unfoldable_norms(model)
    if not report.rewrites:
        report.notes.append(f"nothing to fuse: {norms}" if norms else
                            "nothing to fuse: the model has no Conv-BN pair or linear "
                            "multi-branch block (already fused?)")
    elif norms:
        report.notes.append(norms)


