"""`repconv verify` and `repconv bench` on a deploy file: load it in whatever format it is, and
compare or time it against its training checkpoint."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from repconv.errors import InputError
from repconv.fold.slot import real_batchnorms
from repconv.formats.checkpoint import LoadedCheckpoint
from repconv.formats.decode import check_readable
from repconv.formats.deploy import load_deploy_with_shape
from repconv.formats.kinds import FileKind, kind_of
from repconv.formats.mapped import FileStamp
from repconv.formats.onnx_deploy import (
    load_onnx_deploy,
    runtime_name,
)
from repconv.formats.onnx_io import AsExported, OnnxModule
from repconv.formats.pt2 import load_program, read_record
from repconv.fuse import fuse
from repconv.measure.bench import BenchReport, Form, bench
from repconv.pipeline.options import Options, cast_inputs
from repconv.pipeline.outcomes import VerifyOutcome
from repconv.progress import Progress, no_progress
from repconv.verify.inputs import VARIATIONS


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
    deploy_stamp = FileStamp.of(deploy_path) if deploy_path.is_file() else None
    deployed = _load_deployed(deploy_path, original, options)
    if real_batchnorms(deployed.model) > real_batchnorms(original.model):
        raise InputError(f"DEPLOY {deploy_path} has more BatchNorms than ORIGINAL "
                         f"{original_path}, and fusing never adds one: are the arguments "
                         "swapped? Give the training checkpoint first")
    samples = options.samples(original.model)
    inputs, source = options.inputs(samples, ORIGINAL=original.input_shape,
                                    DEPLOY=deployed.input_shape)
    inputs = cast_inputs(inputs, original.model)
    budget = options.memory()
    options.check_memory(original.model, inputs, samples, budget)
    progress(f"fusing {original_path} in memory, for the per-rewrite table")
    reference = fuse(original.model, inputs, check=False, seed=options.seed)
    compared = (AsExported(original.model) if kind_of(deploy_path) is FileKind.ONNX
                else original.model)
    report = options.verify(compared, deployed.model, inputs, samples, progress,
                            reference=reference, vary=deployed.vary, lenient=deployed.lenient,
                            weights=deployed.weights, memory=budget)
    for stamp, role in ((original.stamp, "ORIGINAL"), (deploy_stamp, "DEPLOY")):
        if stamp is not None:  # a result is the files', as they were read
            stamp.check(role)
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
    inputs = cast_inputs(options.inputs({}, **recorded)[0], loaded.model)
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
