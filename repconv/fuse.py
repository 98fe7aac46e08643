"""`fuse`: trace, find linear regions, check and rewrite each, verify the whole model."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import Tensor, fx, nn

from repconv import rewrite
from repconv.errors import TraceError
from repconv.graph import propagate_shapes, run_model, trace
from repconv.report import FuseReport, ModelCounts, RewriteRecord, SkipRecord
from repconv.rules.base import describe
from repconv.verify import eval_mode, verify


@dataclass
class FuseResult:
    model: nn.Module
    report: FuseReport
    plan: list[dict[str, object]] = field(default_factory=list)


def _as_inputs(example_inputs: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _recorded_inputs(module: nn.Module, inputs: tuple[Tensor, ...]) -> dict[str, tuple | None]:
    """The positional inputs every descendant is first called with, by qualified name (None:
    called with keyword arguments). Containers such as ModuleList are never called themselves."""
    seen: dict[str, tuple | None] = {}
    handles = []
    for name, child in module.named_modules():
        if not name:
            continue

        def hook(_m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            seen.setdefault(name, None if kwargs else args)

        handles.append(child.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        run_model(module, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _join(scope: str, name: str) -> str:
    return f"{scope}.{name}" if scope else name


class _Fuser:
    def __init__(self, check_seed: int) -> None:
        self.report = FuseReport()
        self.plan: list[dict[str, object]] = []
        self.check_seed = check_seed

    def fuse_scope(self, module: nn.Module, scope: str, inputs: tuple) -> nn.Module:
        try:
            gm = trace(module)
        except TraceError as exc:
            return self._fuse_children(module, scope, inputs, str(exc))
        propagate_shapes(gm, inputs)
        analysis = rewrite.analyse(gm)
        where = f"{scope}: " if scope else ""
        self.report.skipped += [SkipRecord(where + s.where, s.reason) for s in analysis.skips]
        accepted = []
        for region in analysis.regions:
            error = rewrite.local_error(gm, region, self.check_seed)
            if error > rewrite.LOCAL_TOLERANCE:
                self.report.skipped.append(SkipRecord(
                    where + describe(region.sink),
                    f"local check failed: fused conv differs by {error:.1e} (scale-relative)",
                ))
                continue
            accepted.append((region, error))
        if not accepted:
            return module
        entries = rewrite.apply(gm, [region for region, _ in accepted])
        for (region, error), entry in zip(accepted, entries):
            entry["scope"] = scope
            self.report.rewrites.append(RewriteRecord(
                scope=scope,
                module=entry["module"],
                kind=region.kind,
                ops=list(region.labels),
                kernel_size=list(region.affine.kernel_size),
                groups=region.affine.groups,
                macs_before=region.macs_before,
                macs_after=region.macs_after,
                local_error=error,
                replaced=describe(region.sink),
            ))
        self.plan += entries
        return gm

    def _fuse_children(self, module: nn.Module, scope: str, inputs: tuple, why: str) -> nn.Module:
        if not list(module.children()):
            self.report.skipped.append(SkipRecord(scope or "model", f"does not trace: {why}"))
            return module
        self.report.notes.append(
            f"{scope or 'the model'} does not trace as a whole ({why}); fused child by child"
        )
        self._fuse_recorded(module, scope, "", _recorded_inputs(module, inputs))
        return module

    def _fuse_recorded(
        self, container: nn.Module, scope: str, prefix: str, recorded: dict[str, tuple | None]
    ) -> None:
        """Fuse each child of ``container`` that was called; walk into children that were not
        (ModuleList, ModuleDict) to reach the blocks inside them."""
        for name, child in container.named_children():
            key = f"{prefix}{name}"
            path = _join(scope, key)
            if key in recorded and recorded[key] is None:
                self.report.skipped.append(
                    SkipRecord(path, "called with keyword arguments, which repconv cannot trace"))
            elif key in recorded:
                setattr(container, name, self.fuse_scope(child, path, recorded[key]))
            elif list(child.children()):
                self._fuse_recorded(child, scope, f"{key}.", recorded)
            else:
                self.report.skipped.append(SkipRecord(path, "never called on the example input"))


def fuse(
    model: nn.Module,
    example_inputs: Tensor | tuple[Tensor, ...],
    *,
    check: bool = True,
    rtol: float | None = None,
    atol: float = 0.0,
    seed: int = 0,
) -> FuseResult:
    """Fold every Conv-BN pair and linear multi-branch block of ``model`` into single convs.

    ``model`` itself is left as it was; the result holds a fused copy in eval mode and a report
    of what was rewritten, what was not and why, and (with ``check``) the verification.
    """
    inputs = _as_inputs(example_inputs)
    work = copy.deepcopy(model).eval()
    fuser = _Fuser(check_seed=seed)
    training = [name or "the model" for name, m in model.named_modules() if m.training]
    if training:
        fuser.report.notes.append(
            f"{len(training)} module(s) were in train mode (first: {training[0]}); fused and "
            "verified the eval-mode model, which is what a deployed model runs")
    fused = fuser.fuse_scope(work, "", inputs).eval()
    fuser.report.before = ModelCounts.of(model)
    fuser.report.after = ModelCounts.of(fused)
    if check:
        with eval_mode(model):
            fuser.report.verification = verify(model, fused, inputs, rtol=rtol, atol=atol,
                                               seed=seed)
    return FuseResult(fused, fuser.report, fuser.plan)


def replay_plan(model: nn.Module, plan: list[dict[str, object]]) -> nn.Module:
    """Apply a recorded plan to a freshly built model: the same structure, empty weights."""
    by_scope: dict[str, list[dict[str, object]]] = {}
    for entry in plan:
        by_scope.setdefault(str(entry.get("scope", "")), []).append(entry)
    model = model.eval()
    for scope, entries in by_scope.items():
        target = model.get_submodule(scope) if scope else model
        gm: fx.GraphModule = trace(target)
        rewrite.replay(gm, entries)
        if scope:
            parent, _, name = scope.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, gm)
        else:
            model = gm
    return model.eval()
