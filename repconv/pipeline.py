"""Checkpoint-level operations behind the CLI: fuse a file, verify a deploy file, inspect."""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Group, RenderableType
from rich.text import Text
from torch import Tensor, nn

from repconv.bench import BenchReport, Form, bench
from repconv.checkpoint import (
    LoadedCheckpoint,
    check_readable,
    load_checkpoint,
    load_deploy_with_shape,
)
from repconv.errors import InputError, VerificationError
from repconv.fuse import FuseResult, fuse
from repconv.input_files import load_inputs
from repconv.metadata import check_seed, parse_kwargs, parse_shape
from repconv.output import check_output, save_deploy
from repconv.progress import Progress, no_progress
from repconv.pt2 import load_program, read_record
from repconv.report import FuseReport, ModelCounts
from repconv.rewrite_check import RewriteCheck
from repconv.verify import VARIATIONS, VerifyReport, verify


@dataclass(frozen=True)
class Options:
    """What every command shares: how to build the model and what to feed it."""

    model: str | None = None
    model_kwargs: str | None = None
    input_shape: str | None = None
    rtol: float | None = None
    atol: float = 0.0
    seed: int = 0
    trust_pickle: bool = False
    inputs_file: Path | None = None  # --inputs: sample data compared first
    rewrite_rtol: float | None = None

    def load(self, path: Path) -> LoadedCheckpoint:
        if self.model_kwargs is not None and self.model is None:
            raise InputError("--model-kwargs is used only with --model; pass --model too")
        return load_checkpoint(
            path,
            model_reference=self.model,
            model_kwargs=parse_kwargs(self.model_kwargs),
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
            shapes, source = [parse_shape(self.input_shape)], "--input-shape"
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
               lenient: tuple[str, ...] = ()) -> VerifyReport:
        """The global verification: every output on every input and, with ``reference`` (the
        original fused in memory), each of its rewrites against the deployed model's conv."""
        rewrites = None if reference is None else RewriteCheck(
            reference.model, reference.originals, reference.report.rewrites, deployed)
        return verify(original, deployed, inputs, rtol=self.rtol, atol=self.atol, seed=self.seed,
                      trials=1, vary=vary, upcast=True, samples=samples, rewrites=rewrites,
                      rewrite_rtol=self.rewrite_rtol, lenient=lenient, progress=progress)


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _cast_inputs(inputs: tuple[Tensor, ...], model: nn.Module) -> tuple[Tensor, ...]:
    dtype = _model_dtype(model)
    return tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)


@dataclass
class FuseOutcome:
    """The result of ``repconv fuse``: what was loaded, rewritten, verified and written."""

    input: str
    output: str | None
    loaded: list[str]
    report: FuseReport
    written: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    verification_skipped: bool = False  # --skip-verify

    @property
    def ok(self) -> bool:
        return self.report.verification is None or self.report.verification.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "input": self.input,
            "output": self.output,
            "loaded": self.loaded,
            "written": self.written,
            "seconds": self.seconds,
            "verification_skipped": self.verification_skipped,
            **self.report.to_dict(),
        }

    def __rich__(self) -> RenderableType:
        lines: list[RenderableType] = [Text(f"{self.input}: {', '.join(self.loaded)}")]
        lines.append(self.report)
        if self.verification_skipped:
            lines.append(Text("verification skipped (--skip-verify): the fused model was not "
                              "compared with the original as a whole; each rewrite was checked "
                              "on its own", style="yellow"))
        if self.written:
            lines.append(Text(f"wrote {self.output} ({self.written})", style="bold green"))
        elif self.output:
            lines.append(Text(f"nothing written to {self.output}", style="bold red"))
        return Group(*lines)


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
) -> FuseOutcome:
    """Load IN, fuse, verify (``check``; the local check of each rewrite always runs) and, when
    ``out_path`` is given and verification passes, write OUT. Raises VerificationError (nothing
    written) when the fused model does not match; ``out_path=None, check=False`` is `repconv
    inspect`: it only reports."""
    seconds: dict[str, float] = {}
    if out_path is not None:
        check_output(in_path, out_path)
    start = time.perf_counter()
    progress(f"loading {in_path}")
    loaded = options.load(in_path)
    samples = options.samples(loaded.model)
    inputs, _ = options.inputs(samples, checkpoint=loaded.input_shape)
    inputs = _cast_inputs(inputs, loaded.model)
    seconds["load"] = time.perf_counter() - start
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
        result = fuse(loaded.model, inputs, check=False, seed=options.seed, progress=progress)
        seconds["fuse"] = time.perf_counter() - start
        report, plan, fused_model = result.report, result.plan, result.model
        _note_norms(report, loaded.model)
        if check:
            start = time.perf_counter()
            # each rewrite was checked before it was applied: the table is verify's, for files
            report.verification = options.verify(loaded.model, fused_model, inputs, samples,
                                                 progress)
            seconds["verify"] = time.perf_counter() - start
    outcome = FuseOutcome(str(in_path), str(out_path) if out_path else None, loaded.found,
                          report, seconds=seconds,
                          verification_skipped=not check and out_path is not None)
    if not outcome.ok:
        raise VerificationError(
            f"{report.verification.summary()}; nothing written",
            outcome,
        )
    if out_path is not None:
        progress(f"writing {out_path}")
        start = time.perf_counter()
        outcome.written = save_deploy(
            out_path, fused_model, plan, loaded, tuple(inputs[0].shape), inputs,
            keep_extra=keep_extra,
        )
        seconds["write"] = time.perf_counter() - start
    return outcome


def _note_norms(report: FuseReport, model: nn.Module) -> None:
    norms = _unfoldable_norms(model)
    if not report.rewrites:
        report.notes.append(f"nothing to fuse: {norms}" if norms else
                            "nothing to fuse: the model has no Conv-BN pair or linear "
                            "multi-branch block (already fused?)")
    elif norms:
        report.notes.append(norms)


@dataclass
class VerifyOutcome:
    original: str
    deploy: str
    report: VerifyReport
    input_shape_from: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.report.passed, "original": self.original, "deploy": self.deploy,
                "input_shape_from": self.input_shape_from, "notes": self.notes,
                **self.report.to_dict()}

    def __rich__(self) -> RenderableType:
        return Group(Text(f"{self.deploy} against {self.original} (input shape from "
                          f"{self.input_shape_from})"),
                     *(Text(f"note: {note}", style="yellow") for note in self.notes), self.report)


@dataclass(frozen=True)
class _Deployed:
    model: nn.Module
    input_shape: tuple[int, ...] | None  # what its file recorded
    vary: tuple[str, ...] = VARIATIONS  # the sizes it accepts besides the recorded one
    note: str = ""
    lenient: tuple[str, ...] = ()  # variations it may refuse: torch.export bounds sizes


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


def _load_deployed(path: Path, original: LoadedCheckpoint, options: Options) -> _Deployed:
    """The deployed model, the input shape its file recorded and the sizes it accepts."""
    if path.suffix == ".pt2":
        check_readable(path)
        record = read_record(path)
        vary, note = _pt2_variations(path, record.dynamic)
        return _Deployed(load_program(path, trust_pickle=options.trust_pickle),
                         record.input_shape, vary, note, lenient=("spatial",))
    if original.pickled and path.suffix == ".safetensors" and options.model is None:
        # A pickled original is its own fresh training model: replay the plan onto a copy.
        # (Its .pt deploy files are pickled modules, loaded below like any pickled input.)
        return _Deployed(*load_deploy_with_shape(copy.deepcopy(original.model), path))
    if options.model is None and original.architecture is not None:
        arch = original.architecture
        options = replace(options, model=arch.reference, model_kwargs=json.dumps(arch.kwargs))
    loaded = options.load(path)
    if loaded.deploy_plan is None and not loaded.pickled:
        raise InputError(f"{path} is not a repconv deploy file; give the file repconv fuse wrote")
    return _Deployed(loaded.model, loaded.input_shape)


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


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
    if _batchnorms(deployed.model) > _batchnorms(original.model):
        raise InputError(f"DEPLOY {deploy_path} has more BatchNorms than ORIGINAL "
                         f"{original_path}, and fusing never adds one: are the arguments "
                         "swapped? Give the training checkpoint first")
    samples = options.samples(original.model)
    inputs, source = options.inputs(samples, ORIGINAL=original.input_shape,
                                    DEPLOY=deployed.input_shape)
    inputs = _cast_inputs(inputs, original.model)
    progress(f"fusing {original_path} in memory, for the per-rewrite table")
    reference = fuse(original.model, inputs, check=False, seed=options.seed)
    report = options.verify(original.model, deployed.model, inputs, samples, progress,
                            reference=reference, vary=deployed.vary, lenient=deployed.lenient)
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
    if out_path is not None:
        check_readable(out_path)
        progress(f"loading {out_path}")
        deployed = _load_deployed(out_path, loaded, options)
        inputs, _ = options.inputs({}, IN=loaded.input_shape, OUT=deployed.input_shape)
        fused, name = deployed.model, out_path.name
    else:
        inputs, _ = options.inputs({}, IN=loaded.input_shape)
        progress("tracing and fusing")
        fused = fuse(loaded.model, _cast_inputs(inputs, loaded.model), check=False).model
        name = "fused"
    inputs = _cast_inputs(inputs, loaded.model)
    forms = [Form("original", loaded.model, loaded.model), Form(name, fused, fused)]
    return bench(forms, inputs, input_path=str(in_path),
                 deploy_path=str(out_path) if out_path else None, seconds=seconds,
                 progress=progress)
