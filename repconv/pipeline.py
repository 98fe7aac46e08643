"""Checkpoint-level operations behind the CLI: fuse a file, verify a deploy file, inspect."""

from __future__ import annotations

import copy
import json
import logging
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
    check_output,
    load_checkpoint,
    load_deploy_with_shape,
    parse_kwargs,
    parse_shape,
    read_file,
    save_deploy,
)
from repconv.errors import InputError, VerificationError
from repconv.fuse import fuse
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

    def inputs(self, *recorded: tuple[int, ...] | None) -> tuple[Tensor, ...]:
        """Example input: --input-shape, else the first shape a file recorded."""
        if self.input_shape is not None:
            shape = parse_shape(self.input_shape)
        else:
            shape = next((s for s in recorded if s), None)
            if shape is None:
                raise InputError("no input shape recorded in the checkpoint; pass --input-shape "
                                 "like 1,3,224,224")
        generator = torch.Generator().manual_seed(self.seed)
        return (torch.randn(shape, generator=generator),)


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
    inputs = _cast_inputs(options.inputs(loaded.input_shape), loaded.model)
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
        if not report.rewrites:
            report.notes.append("nothing to fuse: the model has no Conv-BN pair or linear "
                                "multi-branch block (already fused?)")
    outcome = FuseOutcome(str(in_path), str(out_path) if out_path else None, loaded.found,
                          report, seconds=seconds)
    if not outcome.ok:
        raise VerificationError(
            f"fused model does not match the original: {report.verification.summary()}; "
            "nothing written",
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

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.report.passed, "original": self.original, "deploy": self.deploy,
                **self.report.to_dict()}

    def __rich__(self) -> RenderableType:
        return Group(Text(f"{self.deploy} against {self.original}"), self.report)


def _load_deployed(
    path: Path, original: LoadedCheckpoint, options: Options
) -> tuple[nn.Module, tuple[int, ...] | None]:
    """The deployed model and the input shape its file recorded."""
    if path.suffix == ".pt2":
        if not path.is_file() or path.stat().st_size == 0:
            read_file(path, trust_pickle=False)  # raises the message for a missing/empty file
        logging.disable(logging.WARNING)  # torch logs a traceback of its own before raising
        try:
            return torch.export.load(path).module(), None
        except Exception as exc:  # a damaged archive fails inside torch
            first = str(exc).strip().splitlines()[0][:150] if str(exc).strip() else ""
            raise InputError(f"{path} is not a readable torch.export program ({first}); "
                             "write it again with repconv fuse") from exc
        finally:
            logging.disable(logging.NOTSET)
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


def verify_checkpoints(
    original_path: Path,
    deploy_path: Path,
    options: Options,
    *,
    progress: Progress = lambda _: None,
) -> VerifyOutcome:
    """Compare a deploy file against its training checkpoint on seeded random inputs."""
    progress(f"loading {original_path}")
    original = options.load(original_path)
    progress(f"loading {deploy_path}")
    deployed, recorded = _load_deployed(deploy_path, original, options)
    inputs = _cast_inputs(options.inputs(recorded, original.input_shape), original.model)
    progress("comparing outputs")
    report = verify(original.model, deployed, inputs, rtol=options.rtol, atol=options.atol,
                    seed=options.seed)
    return VerifyOutcome(str(original_path), str(deploy_path), report)
