"""Fusing one scope of a model: capture its forward, find its linear regions, fold and check
each, and apply them where their ops run; a scope that does not capture is fused child by
child. `ScopeFuser` keeps what a fuse pass produces: the report, the plan steps and, for the
per-rewrite table, the ops each fused conv replaced."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_flatten, tree_map

from repconv.driver.report import FuseReport
from repconv.errors import TraceError
from repconv.fold import local_check as region_check
from repconv.fold import regions as region_analysis
from repconv.fold.calls import (
    BoundCall,
    CallMemo,
    bind_call,
    copies,
    copy_sharing_tensors,
    record_calls,
)
from repconv.fold.capture import Capture, capture
from repconv.fold.convert import Converted, Converter, Release
from repconv.fold.graph import UNDERSTOOD_MODULES, eager_differs
from repconv.fold.reasons import Skip, is_norm, kind_of
from repconv.fold.region import Region
from repconv.fold.rules.base import describe
from repconv.rewrite import apply as rewrite
from repconv.rewrite import plan as plan_record
from repconv.rewrite.paths import frame_of, join_path, module_path
from repconv.rewrite.record import RewriteRecord

FuseProgress = Callable[[str, int, int], None]
# an untraceable module is run once per child to find results it discards: only for few
MAX_DISCARD_CHECKS = 32


def as_inputs(example_inputs: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _nan_like(value: Any) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point():
        return torch.full_like(value, float("nan"))
    return value


def _poisons(output: Any) -> bool:
    """Whether `_poison` can reach anything in ``output``: a floating tensor that pytree
    sees (an ImageList or other object hides its tensors from it)."""
    return any(isinstance(t, Tensor) and t.is_floating_point() and t.numel()
               for t in tree_flatten(output)[0])


def _poison(_module: nn.Module, _args: tuple, output: Any) -> Any:
    """A forward hook making a module's output NaN: what reads it shows it."""
    return tree_map(_nan_like, output)


class ScopeFuser:
    def __init__(self, model: nn.Module, inputs: tuple[Tensor, ...], check_seed: int,
                 progress: FuseProgress, unshare: bool = True,
                 release: Release | None = None) -> None:
        self.progress = progress
        self.release = release  # given the original's tensors no fused op reads any more
        self.unshare = unshare
        self.unshared: dict[str, int] = {}  # layers folded into a copy per call site
        self.report = FuseReport()
        self.steps: list[plan_record.Step] = []
        self.originals: dict[str, nn.Module] = {}
        self.check_seed = check_seed
        self.model, self.inputs = model, inputs
        # every module's inputs are kept only when a part does not trace and its children are
        # fused one by one: they are all the model's activations
        # the layers' outputs, for proving the model's trace faithful without a second forward
        self.memo: CallMemo | None = CallMemo()
        self.calls, self.output = record_calls(model, copies(inputs), keep_tensors=False,
                                               memo=self.memo)
        # by path: every call, in this pass and those at other sizes, passed one tensor
        self.one_tensor_calls = {path: record.single_tensor
                                 for path, record in self.calls.items() if record.count}
        self.calls_have_tensors = False
        self.root_capture: Capture | None = None  # the model's own, when captured with values

    def fuse_scope(self, module: nn.Module, scope: str, args: tuple, kwargs: dict,
                   output: object) -> nn.Module:
        """Fuse ``module`` (at ``scope`` in the model, called as ``module(*args, **kwargs)``,
        which returned ``output``); returns it, or what replaces it when its own forward was
        rewritten."""
        bound = bind_call(module, args, kwargs)
        self.progress(f"tracing {scope or 'the model'}", 0, 1)
        try:
            captured = self._capture(module, scope, bound, output)
        except TraceError as exc:
            return self._fuse_children(module, scope, str(exc))
        self._note_capture(captured, scope)
        if self.root_capture is not None and self.root_capture.size_guards:
            self.release = None  # the model is fused again at other sizes: it must stay whole
        gm = captured.module
        self._fuse_inside_kept_calls(gm, scope, captured.opaque)
        analysis = region_analysis.analyse(gm, keep_own_forward=module is self.model,
                                          unshare=self.unshare)
        where = f"{scope}: " if scope else ""
        self.report.skipped += [replace(s, where=where + s.where) for s in analysis.skips]
        self.report.cuts += [replace(s, where=where + s.where) for s in analysis.cuts]
        return self._apply_regions(module, scope, gm, analysis.regions, bound)

    def _capture(self, module: nn.Module, scope: str, bound: BoundCall | None,
                 output: object) -> Capture:
        """`capture`, or TraceError where the module cannot be captured. The eager forward's
        layer outputs serve the first capture only: the activations the memo holds go once it
        is proven or refused, before a refused scope is fused child by child."""
        memo, self.memo = self.memo, None
        try:
            differs = eager_differs(module)
            if differs:
                raise TraceError(differs)
            if bound is None:
                raise TraceError("its forward takes *args/**kwargs")
            return capture(module, bound, output, memo.recall(scope) if memo else None)
        finally:
            if memo is not None:
                memo.clear()

    def _apply_regions(self, module: nn.Module, scope: str, gm: fx.GraphModule,
                       regions: list[Region], bound: BoundCall, *, retry: bool = True,
                       ) -> nn.Module:
        """Fold, check and apply ``regions`` of ``module``'s graph ``gm``; a chain refused only
        because a member runs in a forward that cannot be rewritten is tried again as its
        stretches around those members. Returns the module, or what replaces it."""
        where = f"{scope}: " if scope else ""
        if not regions:
            return module
        # each region is folded once, checked and cast as it is applied (`Converter.settle`)
        converter = Converter(gm, regions, self.check_seed, lambda done, total: self.progress(
            f"folding and checking regions of {scope or 'the model'}", done, total),
            release=self.release, model=self.model, scope=scope)
        applied = rewrite.apply(module, scope, gm, regions, converter.convs, self.calls,
                                bound.concrete, settle=converter.settle)
        refused = {id(region): why for region, why in applied.refused}
        removed = {id(region) for region in applied.removed}
        stretches: list[Region] = []
        for region in regions:
            if id(region) in removed:
                continue
            if id(region) in refused:
                cut = {m for m in region.members if m.op != "call_module"
                       and frame_of(m) in applied.unrewritable}
                pieces = [] if not (retry and region.chain and cut and not region.group) else [
                    p for p in region_analysis.split_chain(region, cut)
                    if p.convs and len(p.members) > 1]
                stretches += pieces
                if not pieces:
                    self.report.skipped += _left(region, where, refused[id(region)])
                continue
            self._record(region, converter.converted[id(region)], scope, gm, applied)
        self.report.notes += applied.notes
        self.steps += applied.steps
        self.unshared.update(applied.unshared)
        if stretches:
            return self._apply_regions(applied.module, scope, gm, stretches, bound, retry=False)
        return applied.module

    def _record(self, region: Region, converted: Converted, scope: str, gm: fx.GraphModule,
                applied: rewrite.Applied) -> None:
        if region.absorbed:
            return  # its map is in the records of its group's other regions
        self.report.rewrites.append(RewriteRecord(
            scope=scope,
            module=describe(region.members[0]),
            kind=replace(region, identity=converted.identity).kind,
            ops=list(region.labels),
            kernel_size=list(region.affine.kernel_size),
            groups=region.affine.groups,
            macs_before=region.macs_before,
            macs_after=region.macs_after,
            local_error=converted.error,
            replaced=describe(region.sink),
            fused_module=applied.placed.get(id(region)),
            sources=[join_path(scope, module_path(m)) for m in region.members],
        ))
        if id(region) in applied.placed and self.release is None:
            self.originals[applied.placed[id(region)]] = region_check.region_module(gm, region)

    def _note_capture(self, captured: Capture, scope: str) -> None:
        """What the report says of a capture beyond torch.fx; the model's own input-size
        guards are kept to capture and verify at other sizes."""
        if captured.route == "symbolic":
            return
        sizes = len(captured.size_guards)
        decided = f", deciding {sizes} time(s) on sizes" if sizes else ""
        opaque = (f"; kept as opaque calls: {', '.join(captured.opaque)} (first: "
                  f"{next(iter(captured.opaque.values()))})" if captured.opaque else "")
        self.report.notes.append(
            f"{scope or 'the model'} captured with values{decided} (torch.fx stopped: "
            f"{captured.symbolic_failure}){opaque}")
        if not scope:
            self.root_capture = captured

    def _fuse_inside_kept_calls(self, gm: fx.GraphModule, scope: str,
                                opaque: dict[str, str]) -> None:
        """A module kept as a call because calling it runs more than its class's forward (a
        hook), or because it stopped the capture (``opaque``: its path and why), stays as it
        is; its children are fused in place, as for one that does not trace."""
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            child = gm.get_submodule(node.target)
            why = eager_differs(child) or opaque.get(str(node.target))
            if why and list(child.children()):
                self._fuse_children(child, join_path(scope, str(node.target)), why)

    def _fuse_children(self, module: nn.Module, scope: str, why: str) -> nn.Module:
        if not list(module.children()):
            self.report.skipped.append(Skip(scope or "model", f"does not trace: {why}",
                                            _module_kind(module)))
            return module
        self.report.notes.append(
            f"{scope or 'the model'} does not trace as a whole ({why}); its eager forward "
            "is kept and each part that traces is fused in place, child by child (what it computes "
            "and discards is still computed)"
        )
        if not self.calls_have_tensors:
            self.calls, _ = record_calls(self.model, copies(self.inputs), keep_tensors=True)
            self.calls_have_tensors = True
        for name in self._discarded_children(module, scope):
            self.report.notes.append(
                f"{name}: computed by the eager forward of {scope or 'the model'} and then "
                "discarded (the model's outputs do not depend on it on the example input); it "
                "still runs, since that forward cannot be rewritten")
        self._fuse_called(module, scope, why)
        return module

    def _discarded_children(self, module: nn.Module, scope: str) -> list[str]:
        """Children whose result ``module``'s own outputs ignore: each is tried by making its
        output NaN and running ``module`` once on its recorded call. Only where that is cheap:
        a module with few children, called once."""
        record = self.calls.get(scope)
        if scope and (record is None or record.count != 1):
            return []
        args, kwargs = (record.args, record.kwargs) if scope else (self.inputs, {})
        children = [(name, child) for name, child in module.named_children()
                    if self.calls.get(join_path(scope, name)) is not None]
        if len(children) > MAX_DISCARD_CHECKS:
            return []

        def outputs() -> list[Tensor]:
            with torch.no_grad():
                result = module(*copies(args), **copies(kwargs))
            return [t for t in tree_flatten(result)[0] if isinstance(t, Tensor)]

        baseline = outputs()
        if not any(t.numel() for t in baseline):
            return []  # empty outputs (no detection kept) stay empty whatever a child does
        discarded = []
        for name, child in children:
            record = self.calls.get(join_path(scope, name))
            if record is None or not _poisons(record.output):
                continue  # NaN would not reach what it returns: nothing to prove
            handle = child.register_forward_hook(_poison)
            try:
                poisoned = outputs()
            except Exception:  # a NaN the forward chokes on: it reads the child
                continue
            finally:
                handle.remove()
            if len(poisoned) == len(baseline) and all(
                    torch.equal(a, b) for a, b in zip(poisoned, baseline)):
                discarded.append(join_path(scope, name))
        return discarded

    def _fuse_called(self, container: nn.Module, scope: str, why: str) -> None:
        """Fuse each child of ``container`` that was called; walk into children that were not
        (ModuleList, ModuleDict) to reach the blocks inside them."""
        for name, child in container.named_children():
            path = join_path(scope, name)
            record = self.calls.get(path)
            if record is not None and record.count and isinstance(child, UNDERSTOOD_MODULES):
                # a lone conv or BatchNorm folds with nothing: what stopped its parent is why
                self.report.skipped.append(Skip(path, f"{scope or 'the model'} does not trace "
                                                f"({why}), and a lone {type(child).__name__} "
                                                "folds with nothing", _module_kind(child)))
            elif record is not None and record.count:
                fused = self.fuse_scope(child, path, record.args, record.kwargs, record.output)
                if fused is not child:
                    setattr(container, name, fused)
            elif list(child.children()):
                self._fuse_called(child, path, why)
            else:
                self.report.skipped.append(Skip(path, "never called on the example input",
                                                _module_kind(child)))


def _module_kind(module: nn.Module) -> str:
    return "batchnorm" if isinstance(module, nn.modules.batchnorm._BatchNorm) else "op"


def _left(region: Region, where: str, reason: str) -> list[Skip]:
    """What a region not applied leaves, each with ``reason``: its BatchNorms, the merge of its
    branches, or else its last op."""
    left = [Skip(where + describe(m), reason, "batchnorm")
            for m, label in zip(region.members, region.labels) if is_norm(label)]
    if region.kind == "multi-branch":
        left.append(Skip(where + describe(region.sink), reason, "merge"))
    return left or [Skip(where + describe(region.sink), reason, kind_of(region.sink))]




def eval_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` sharing every tensor with it: rewrites only ever put new
    modules and parameters in the copy."""
    return copy_sharing_tensors(model).eval()


def fuse_pass(model: nn.Module, inputs: tuple[Tensor, ...], seed: int, progress: FuseProgress,
              unshare: bool, release: Release | None = None) -> ScopeFuser:
    """One pass over ``model`` (left as it was, unless ``release`` frees what the fused copy
    no longer reads) on ``inputs``: the fuser, its ``model`` the fused copy."""
    fuser = ScopeFuser(eval_copy(model), inputs, seed, progress, unshare, release)
    fuser.model = fuser.fuse_scope(fuser.model, "", inputs, {}, fuser.output).eval()
    for record in fuser.calls.values():  # the recorded activations are no longer needed
        record.args, record.kwargs, record.output = (), {}, None
    return fuser
