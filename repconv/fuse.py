"""`fuse`: trace, find linear regions, check each, rewrite each where it runs, verify."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from repconv.driver.report import FuseReport, ModelCounts
from repconv.driver.scope import FuseProgress, as_inputs, fuse_pass
from repconv.driver.sizes import size_passes
from repconv.fold.calls import eval_mode
from repconv.fold.convert import Release
from repconv.rewrite import plan as plan_record
from repconv.rewrite.own_forward import adopt_own_forwards
from repconv.rewrite.surgery import run_chains_as_sequential
from repconv.verify.outputs import verify


@dataclass
class FuseResult:
    model: nn.Module
    report: FuseReport
    plan: list[dict[str, Any]] = field(default_factory=list)
    # fused conv's path in ``model`` -> the original ops it replaced, as a module of the conv's
    # input (sharing the original weights): what per-rewrite checks compare each fused conv to
    originals: dict[str, nn.Module] = field(default_factory=dict)
    # input shapes across the size decisions the forward takes: fused there too, to verify at
    sizes: list[list[tuple[int, ...]]] = field(default_factory=list)


def _recorded(release: Release, released: set[int]) -> Release:
    """``release``, noting what it was handed (by id) in ``released``."""

    def hand_over(tensors: list[Tensor]) -> None:
        released.update(map(id, tensors))
        release(tensors)

    return hand_over


def fuse(
    model: nn.Module,
    example_inputs: Tensor | tuple[Tensor, ...],
    *,
    check: bool = True,
    rtol: float | None = None,
    atol: float = 0.0,
    seed: int = 0,
    progress: FuseProgress | None = None,
    unshare: bool = True,
    release: Release | None = None,
) -> FuseResult:
    """Fold every Conv-BN pair and linear multi-branch block of ``model`` into single convs.

    ``model`` itself is left as it was; the result holds a fused copy in eval mode and a report
    of what was rewritten, what was not and why, and (with ``check``) the verification.
    ``progress(stage, done, total)`` is called as tracing and each region's check advance.
    ``unshare``: a layer called at several sites, each followed by its own BatchNorm (a
    detection head applied to every pyramid level), folds into a fused copy per site: the same
    ops, no BatchNorm, more parameters (the report says how many); False keeps it shared.
    Where the forward decides on the input's size, the model is also fused at sizes across
    those decisions (``FuseResult.sizes``), and checked there.
    ``release`` (only without ``check``) is called with the tensors of ``model`` that the fused
    model no longer reads, as each region is applied: a caller that owns ``model`` and reads
    nothing more from it may free them (the per-rewrite `originals` are then not kept; a model
    fused again at other sizes releases nothing).
    """
    if check and release is not None:
        raise ValueError("release frees tensors the verification reads: pass check=False")
    inputs = as_inputs(example_inputs)
    progress = progress or (lambda _stage, _done, _total: None)
    before = ModelCounts.of(model)  # before ``release`` empties any tensor
    released: set[int] = set()
    main = fuse_pass(model, inputs, seed, progress, unshare,
                     None if release is None else _recorded(release, released))
    sizes = size_passes(model, main, inputs, seed, progress, unshare)
    assert not any(id(t) in released for t in (*main.model.parameters(), *main.model.buffers())), (
        "a tensor handed to release is still in the fused model")
    report = main.report
    training = [name or "the model" for name, m in model.named_modules() if m.training]
    if training:
        report.notes.append(
            f"{len(training)} module(s) were in train mode (first: {training[0]}); fused and "
            "verified the eval-mode model, which is what a deployed model runs")
    main.steps = run_chains_as_sequential(main.model, main.steps, main.one_tensor_calls)
    adopted = adopt_own_forwards(main.model)
    if adopted:
        report.notes.append(
            f"{len(adopted)} module(s) run their class's own deploy forward, which computes the "
            f"same without the BatchNorm slots (first: {adopted[0]})")
    report.before = before
    report.after = ModelCounts.of(main.model)
    if main.unshared:
        growth = report.after.parameters - report.before.parameters
        layers = ", ".join(f"{path} ({sites} sites)" for path, sites in main.unshared.items())
        report.notes.append(
            f"unshared {len(main.unshared)} layer(s) called at several sites, each site with "
            f"its own BatchNorm, into a fused copy per site: {layers}; parameters "
            f"{'+' if growth >= 0 else ''}{growth:,} (keep them shared with --keep-shared)")
    if check:
        with eval_mode(model):
            report.verification = verify(model, main.model, inputs, rtol=rtol, atol=atol,
                                         seed=seed, extra_shapes=sizes)
    return FuseResult(main.model, report, plan_record.to_json(main.steps), main.originals,
                      sizes)
