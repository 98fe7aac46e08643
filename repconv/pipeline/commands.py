"""Checkpoint-level operations behind the CLI: fuse a file, verify a deploy file, inspect."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repconv.driver.report import FuseReport, ModelCounts
from repconv.errors import InputError, StrictError, VerificationError
from repconv.fold.slot import real_batchnorms
from repconv.formats.checkpoint import LoadedCheckpoint, load_checkpoint
from repconv.formats.decode import check_readable
from repconv.formats.deploy import load_deploy_with_shape
from repconv.formats.inputs import load_inputs
from repconv.formats.kinds import FileKind, kind_of
from repconv.formats.limits import available_memory
from repconv.formats.metadata import check_seed
from repconv.formats.onnx_deploy import (
    check_onnx_output,
    export_deploy,
    load_onnx_deploy,
    onnx_variations,
    runtime_name,
    weights_of,
)
from repconv.formats.onnx_io import AsExported, OnnxExport, OnnxModule
from repconv.formats.pt2 import load_program, read_record
from repconv.formats.write import check_output, save_deploy, write_atomically
from repconv.fuse import FuseResult, fuse
from repconv.measure.bench import BenchReport, Form, bench
from repconv.measure.quant import calibration_batches, check_target, quant_report
from repconv.pipeline.outcomes import FuseOutcome, VerifyOutcome
from repconv.pipeline.precision import (
    LOW_PRECISION,
    DeployDtype,
    model_dtype,
    precision_cost,
    to_dtype,
)
from repconv.progress import Progress, no_progress
from repconv.verify.footprint import MemoryBudget
from repconv.verify.inputs import VARIATIONS, leaf_shapes
from repconv.verify.outputs import verify
from repconv.verify.report import VerifyReport
from repconv.verify.rewrites import RewriteCheck


@dataclass(frozen=True)
class Options:
    """What every command shares: how to build the model and what to feed it."""

    model: str | None = None  # "package.module:callable"
    model_kwargs: dict[str, Any] | None = None
    input_shape: tuple[int, ...] | None = None
    rtol: float | None = None
    atol: float = 0.0
    seed: int = 0
    trust_pickle: bool = False
    inputs_file: Path | None = None  # --inputs: sample data compared first
    rewrite_rtol: float | None = None
    unshare: bool = True  # a layer called at several sites folds into a copy per site
    strict: bool = False  # fail (StrictError) when a BatchNorm next to a conv is left unfused
    # --shapes: the sizes verification runs at besides the example (default: varied sizes)
    shapes: tuple[tuple[tuple[int, ...], ...], ...] | None = None
    max_memory: int | None = None  # --max-memory, bytes (default: the memory available)

    def memory(self) -> MemoryBudget | None:
        """The limit a forward is held to: --max-memory, else what the system has available."""
        if self.max_memory is not None:
            return MemoryBudget(self.max_memory, "--max-memory")
        available = available_memory()
        return None if available is None else MemoryBudget(available, "the memory available")

    def check_memory(self, model: nn.Module, inputs: tuple[Tensor, ...],
                     samples: dict[str, tuple[Tensor, ...]], budget: MemoryBudget | None) -> None:
        """Refuse, before its first forward, an input the model would run out of memory on."""
        for label, given in (("example", inputs), *samples.items()):
            problem = budget.problem(model, given) if budget is not None else None
            if problem:
                raise InputError(f"running the model on the {label} input of shape "
                                 f"{leaf_shapes(given)} {problem}")

    def load(self, path: Path) -> LoadedCheckpoint:
        if self.model_kwargs is not None and self.model is None:
            raise InputError("--model-kwargs is used only with --model; pass --model too")
        return load_checkpoint(
            path,
            model_reference=self.model,
            model_kwargs=self.model_kwargs or {},
            trust_pickle=self.trust_pickle,
        )

    def samples(self, model: nn.Module) -> dict[str, tuple[Tensor, ...]]:
        """The --inputs tensors, in the model's dtype, under the label the report shows."""
        if self.inputs_file is None:
            return {}
        return {"--inputs": _cast_inputs(load_inputs(self.inputs_file), model)}

    def inputs(self, samples: dict[str, tuple[Tensor, ...]],
               **recorded: tuple[int, ...] | None) -> tuple[tuple[Tensor, ...], str]:
        """Example input and where its shape came from: --input-shape, else the first shape a
        file recorded (keyword order: the caller's precedence), else the --inputs tensors'.
        Recorded shapes were validated when their file was read."""
        given = next(iter(samples.values()), None)
        if self.input_shape is not None:
            shapes, source = [self.input_shape], "--input-shape"
        else:
            source, shape = next(((k, s) for k, s in recorded.items() if s), ("", None))
            shapes = [shape] if shape is not None else None
            if given is not None and (shapes is None or len(given) > 1):
                shapes, source = [tuple(x.shape) for x in given], "--inputs"
            if shapes is None:
                raise InputError("no input shape recorded in the checkpoint; pass --input-shape "
                                 "like 1,3,224,224 (or --inputs with sample data)")
        generator = torch.Generator().manual_seed(check_seed(self.seed))
        return tuple(torch.randn(shape, generator=generator) for shape in shapes), source

    def verify(self, original: nn.Module, deployed: nn.Module, inputs: tuple[Tensor, ...],
               samples: dict[str, tuple[Tensor, ...]], progress: Progress, *,
               reference: FuseResult | None = None, vary: tuple[str, ...] = VARIATIONS,
               lenient: tuple[str, ...] = (), weights: nn.Module | None = None,
               memory: MemoryBudget | None = None,
               extra_shapes: Sequence[Sequence[Sequence[int]]] = ()) -> VerifyReport:
        """The global verification: every output on every input and, with ``reference`` (the
        original fused in memory), each of its rewrites against the deployed model's conv (its
        weights from ``weights``' state_dict when given: an ONNX file's). ``extra_shapes``:
        sizes to cover too (across the guards a capture saw), skipped where the original does
        not run; ``memory``: the limit each input is held to."""
        rewrites = None if reference is None else RewriteCheck(
            reference.model, reference.originals, reference.report.rewrites,
            deployed if weights is None else weights)
        return verify(original, deployed, inputs, rtol=self.rtol, atol=self.atol, seed=self.seed,
                      trials=1, vary=vary, shapes=self.shapes, upcast=True, samples=samples,
                      extra_shapes=extra_shapes, rewrites=rewrites,
                      rewrite_rtol=self.rewrite_rtol, lenient=lenient, memory=memory,
                      progress=progress)


def _cast_inputs(inputs: tuple[Tensor, ...], model: nn.Module) -> tuple[Tensor, ...]:
    dtype = model_dtype(model)
    return tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)


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
    inputs = _cast_inputs(inputs, loaded.model)
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
        result = fuse(loaded.model, inputs, check=False, seed=options.seed, progress=progress,
                      unshare=options.unshare, release=_free if owned else None)
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
    if out_path is not None:
        progress(f"writing {out_path}")
        start = time.perf_counter()
        if onnx_data is not None and opset is not None:
            write_atomically(out_path, onnx_data.data)
            outcome.written = onnx_data.describe(opset)
        else:
            outcome.written = save_deploy(
                out_path, fused_model, plan, loaded, tuple(inputs[0].shape), inputs,
                keep_extra=keep_extra,
            )
        seconds["write"] = time.perf_counter() - start
    return outcome


def _free(tensors: list[Tensor]) -> None:
    """Empty each tensor (a later use fails on its shape): its memory goes with the last view
    of it, which `fuse` drops as it hands it over."""
    with torch.no_grad():
        for tensor in tensors:
            tensor.set_()


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


@dataclass(frozen=True)
class _Deployed:
    model: nn.Module
    input_shape: tuple[int, ...] | None  # what its file recorded
    vary: tuple[str, ...] = VARIATIONS  # the sizes it accepts besides the recorded one
    note: str = ""
    lenient: tuple[str, ...] = ()  # variations it may refuse: torch.export bounds sizes
    weights: nn.Module | None = None  # where its weights are, when not in ``model`` (ONNX)


def _pt2_variations(path: Path, dynamic: list[list[int]] | None) -> tuple[tuple[str, ...], str]:
    if dynamic is None:
        return (), (f"{path} records no dynamic dimensions (written by an older repconv, "
                    "which exported one fixed shape): compared at that shape only; fuse it "
                    "again for a dynamic batch")
    dims = set(dynamic[0]) if dynamic else set()
    vary = tuple(v for v, ok in (("batch", 0 in dims), ("spatial", bool(dims - {0}))) if ok)
    static = [v for v in VARIATIONS if v not in vary]
    note = (f"{path} was exported with a static {' and '.join(static)} size (the model fixes "
            "it): not compared at other sizes there") if static else ""
    return vary, note


def _load_deployed(path: Path, original: LoadedCheckpoint, options: Options, *,
                   timing: bool = False) -> _Deployed:
    """The deployed model, the input shape its file recorded and the sizes it accepts
    (``timing``: an ONNX Runtime session set up to be timed beside torch, without weights)."""
    kind = kind_of(path)
    if kind is FileKind.ONNX:
        onnx = load_onnx_deploy(path, threads=torch.get_num_threads() if timing else None,
                                spin_wait=not timing, with_weights=not timing)
        return _Deployed(onnx.module, onnx.input_shape, onnx.vary, onnx.note,
                         weights=onnx.weights)
    if kind is FileKind.PT2:
        check_readable(path)
        record = read_record(path)
        vary, note = _pt2_variations(path, record.dynamic)
        return _Deployed(load_program(path, trust_pickle=options.trust_pickle),
                         record.input_shape, vary, note, lenient=("spatial",))
    if original.pickled and kind is FileKind.SAFETENSORS and options.model is None:
        # A pickled original is its own fresh training model: replay the plan onto a copy.
        # (Its .pt deploy files are pickled modules, loaded below like any pickled input.)
        return _Deployed(*load_deploy_with_shape(copy.deepcopy(original.model), path))
    if options.model is None and original.architecture is not None:
        arch = original.architecture
        options = replace(options, model=arch.reference, model_kwargs=arch.kwargs)
    loaded = options.load(path)
    if loaded.deploy_plan is None and not loaded.pickled:
        raise InputError(f"{path} is not a repconv deploy file; give the file repconv fuse wrote")
    return _Deployed(loaded.model, loaded.input_shape)


def _check_original(original_path: Path, deploy_path: Path, original: LoadedCheckpoint) -> None:
    """Swapped or repeated CI arguments must not pass: a deploy file compared with itself or
    with another deploy file checks nothing about the training checkpoint."""
    if deploy_path.exists() and os.path.samefile(original_path, deploy_path):
        raise InputError("ORIGINAL and DEPLOY are the same file; give the training checkpoint "
                         "first, then the deploy file repconv fuse wrote from it")
    if original.deploy_plan is not None:
        raise InputError(f"ORIGINAL {original_path} is a repconv deploy file; give the training "
                         "checkpoint it was fused from first (are the arguments swapped?)")


def verify_checkpoints(
    original_path: Path,
    deploy_path: Path,
    options: Options,
    *,
    progress: Progress = no_progress,
) -> VerifyOutcome:
    """Compare a deploy file against its training checkpoint: outputs on seeded random inputs
    (and --inputs), and each fused conv against the ops it replaced. The input shape is
    --input-shape, else ORIGINAL's recorded one, else DEPLOY's: the file under test does not
    choose its own test."""
    progress(f"loading {original_path}")
    original = options.load(original_path)
    _check_original(original_path, deploy_path, original)
    progress(f"loading {deploy_path}")
    deployed = _load_deployed(deploy_path, original, options)
    if real_batchnorms(deployed.model) > real_batchnorms(original.model):
        raise InputError(f"DEPLOY {deploy_path} has more BatchNorms than ORIGINAL "
                         f"{original_path}, and fusing never adds one: are the arguments "
                         "swapped? Give the training checkpoint first")
    samples = options.samples(original.model)
    inputs, source = options.inputs(samples, ORIGINAL=original.input_shape,
                                    DEPLOY=deployed.input_shape)
    inputs = _cast_inputs(inputs, original.model)
    budget = options.memory()
    options.check_memory(original.model, inputs, samples, budget)
    progress(f"fusing {original_path} in memory, for the per-rewrite table")
    reference = fuse(original.model, inputs, check=False, seed=options.seed)
    compared = (AsExported(original.model) if kind_of(deploy_path) is FileKind.ONNX
                else original.model)
    report = options.verify(compared, deployed.model, inputs, samples, progress,
                            reference=reference, vary=deployed.vary, lenient=deployed.lenient,
                            weights=deployed.weights, memory=budget)
    return VerifyOutcome(str(original_path), str(deploy_path), report, source,
                         [deployed.note] if deployed.note else [])


def bench_checkpoint(
    in_path: Path,
    out_path: Path | None,
    options: Options,
    *,
    seconds: float = 10.0,
    threads: int | None = None,
    progress: Progress = no_progress,
) -> BenchReport:
    """Latency and cost of IN's model against its fused form: OUT as loaded from the file when
    given (a .pt2 included), else IN fused in memory."""
    if threads is not None:
        if threads < 1:
            raise InputError(f"--threads {threads} must be at least 1")
        torch.set_num_threads(threads)
    progress(f"loading {in_path}")
    loaded = options.load(in_path)
    if loaded.deploy_plan is not None:
        raise InputError(f"IN {in_path} is a repconv deploy file; give the training checkpoint "
                         "as IN and the deploy file as OUT")
    deployed = None
    if out_path is not None:
        check_readable(out_path)
        progress(f"loading {out_path}")
        deployed = _load_deployed(out_path, loaded, options, timing=True)
    recorded = {"IN": loaded.input_shape, "OUT": deployed.input_shape if deployed else None}
    inputs = _cast_inputs(options.inputs({}, **recorded)[0], loaded.model)
    options.check_memory(loaded.model, inputs, {}, options.memory())
    if deployed is not None and out_path is not None:
        fused, name = deployed.model, out_path.name
    else:
        progress("tracing and fusing")
        fused, name = fuse(loaded.model, inputs, check=False).model, "fused"
    # an ONNX Runtime session is timed like the others; its ops and memory are not torch's
    deployed_form = (Form(name, fused, None, runtime_name()) if isinstance(fused, OnnxModule)
                     else Form(name, fused, fused))
    forms = [Form("original", loaded.model, loaded.model), deployed_form]
    return bench(forms, inputs, input_path=str(in_path),
                 deploy_path=str(out_path) if out_path else None, seconds=seconds,
                 progress=progress)
