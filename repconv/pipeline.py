"""Checkpoint-level operations behind the CLI: fuse a file, verify a deploy file, inspect."""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Group, RenderableType
from rich.text import Text
from torch import Tensor, nn

from repconv.checkpoint import (
    LoadedCheckpoint,
    check_readable,
    load_checkpoint,
    load_deploy_with_shape,
)
from repconv.errors import InputError, VerificationError
from repconv.fuse import fuse
from repconv.metadata import check_seed, parse_kwargs, parse_shape
from repconv.output import check_output, save_deploy
from repconv.pt2 import load_program
from repconv.report import FuseReport, ModelCounts
from repconv.verify import VerifyReport, verify

Progress = Callable[[str], None]


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

    def load(self, path: Path) -> LoadedCheckpoint:
        if self.model_kwargs is not None and self.model is None:
            raise InputError("--model-kwargs is used only with --model; pass --model too")
        return load_checkpoint(
            path,
            model_reference=self.model,
            model_kwargs=parse_kwargs(self.model_kwargs),
            trust_pickle=self.trust_pickle,
        )

    def inputs(self, **recorded: tuple[int, ...] | None) -> tuple[tuple[Tensor, ...], str]:
        """Example input and where its shape came from: --input-shape, else the first shape a
        file recorded (keyword order: the caller's precedence). Recorded shapes were validated
        when their file was read."""
        if self.input_shape is not None:
            shape, source = parse_shape(self.input_shape), "--input-shape"
        else:
            source, shape = next(((k, s) for k, s in recorded.items() if s), ("", None))
            if shape is None:
                raise InputError("no input shape recorded in the checkpoint; pass --input-shape "
                                 "like 1,3,224,224")
        generator = torch.Generator().manual_seed(check_seed(self.seed))
        return (torch.randn(shape, generator=generator),), source


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
            **self.report.to_dict(),
        }

    def __rich__(self) -> RenderableType:
        lines: list[RenderableType] = [Text(f"{self.input}: {', '.join(self.loaded)}")]
        lines.append(self.report)
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
    progress: Progress = lambda _: None,
) -> FuseOutcome:
    """Load IN, fuse, verify (``check``) and, when ``out_path`` is given and verification
    passes, write OUT. Raises VerificationError (nothing written) when the fused model does not
    match; ``out_path=None, check=False`` is `repconv inspect`: it only reports."""
    seconds: dict[str, float] = {}
    if out_path is not None:
        check_output(in_path, out_path)
    start = time.perf_counter()
    progress(f"loading {in_path}")
    loaded = options.load(in_path)
    seconds["load"] = time.perf_counter() - start
    inputs, _ = options.inputs(checkpoint=loaded.input_shape)
    inputs = _cast_inputs(inputs, loaded.model)
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
        result = fuse(loaded.model, inputs, check=check, rtol=options.rtol, atol=options.atol,
                      seed=options.seed)
        seconds["fuse_and_verify"] = time.perf_counter() - start
        report, plan, fused_model = result.report, result.plan, result.model
        norms = _unfoldable_norms(loaded.model)
        if not report.rewrites:
            report.notes.append(f"nothing to fuse: {norms}" if norms else
                                "nothing to fuse: the model has no Conv-BN pair or linear "
                                "multi-branch block (already fused?)")
        elif norms:
            report.notes.append(norms)
    outcome = FuseOutcome(str(in_path), str(out_path) if out_path else None, loaded.found,
                          report, seconds=seconds)
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


@dataclass
class VerifyOutcome:
    original: str
    deploy: str
    report: VerifyReport
    input_shape_from: str

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.report.passed, "original": self.original, "deploy": self.deploy,
                "input_shape_from": self.input_shape_from, **self.report.to_dict()}

    def __rich__(self) -> RenderableType:
        return Group(Text(f"{self.deploy} against {self.original} (input shape from "
                          f"{self.input_shape_from})"), self.report)


def _load_deployed(
    path: Path, original: LoadedCheckpoint, options: Options
) -> tuple[nn.Module, tuple[int, ...] | None]:
    """The deployed model and the input shape its file recorded."""
    if path.suffix == ".pt2":
        check_readable(path)
        return load_program(path, trust_pickle=options.trust_pickle), None
    if original.pickled and path.suffix == ".safetensors" and options.model is None:
        # A pickled original is its own fresh training model: replay the plan onto a copy.
        # (Its .pt deploy files are pickled modules, loaded below like any pickled input.)
        return load_deploy_with_shape(copy.deepcopy(original.model), path)
    if options.model is None and original.architecture is not None:
        arch = original.architecture
        options = replace(options, model=arch.reference, model_kwargs=json.dumps(arch.kwargs))
    loaded = options.load(path)
    if loaded.deploy_plan is None and not loaded.pickled:
        raise InputError(f"{path} is not a repconv deploy file; give the file repconv fuse wrote")
    return loaded.model, loaded.input_shape


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
    progress: Progress = lambda _: None,
) -> VerifyOutcome:
    """Compare a deploy file against its training checkpoint on seeded random inputs. The input
    shape is --input-shape, else ORIGINAL's recorded one, else DEPLOY's: the file under test
    does not choose its own test."""
    progress(f"loading {original_path}")
    original = options.load(original_path)
    _check_original(original_path, deploy_path, original)
    progress(f"loading {deploy_path}")
    deployed, recorded = _load_deployed(deploy_path, original, options)
    if _batchnorms(deployed) > _batchnorms(original.model):
        raise InputError(f"DEPLOY {deploy_path} has more BatchNorms than ORIGINAL "
                         f"{original_path}, and fusing never adds one: are the arguments "
                         "swapped? Give the training checkpoint first")
    inputs, source = options.inputs(ORIGINAL=original.input_shape, DEPLOY=recorded)
    inputs = _cast_inputs(inputs, original.model)
    progress("comparing outputs")
    report = verify(original.model, deployed, inputs, rtol=options.rtol, atol=options.atol,
                    seed=options.seed)
    return VerifyOutcome(str(original_path), str(deploy_path), report, source)
