"""Fusing across size decisions: a forward that decides on the input's size (``big=x.shape[-1]
> 96``) runs other modules, or calls them with other held arguments, on the other side of the
decision. A capture holds for the example's side only (a capture specialized to one size is a
bug), so the model is fused again at sizes across each size threshold its capture recorded, and
the passes are merged into the main one:

- what the example never ran (a branch taken only for large inputs) is folded as that pass
  folded it;
- a module whose rewrite holds an argument that takes other values there becomes a dispatcher
  (rewrite/cases.py): the rewrite each pass made for its value, and the module as it was for
  any value no pass saw.

The sizes are also where the fused model is verified, so every case runs in the check.
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor, nn

from repconv.driver.scope import FuseProgress, ScopeFuser, eval_copy, fuse_pass
from repconv.errors import TraceError
from repconv.fold.calls import CallRecord, record_calls
from repconv.fold.capture import crossing_sizes
from repconv.rewrite.cases import case_name, covers_every_value, dispatcher
from repconv.rewrite.paths import inside
from repconv.rewrite.plan import FlagCases, FrameRewrite, ModuleSwap, Step, WeightFold
from repconv.rewrite.surgery import set_module
from repconv.verify.inputs import random_inputs

# passes beyond the main one: each is a whole fuse of the model at another size
MAX_SIZE_PASSES = 2

Calls = dict[str, CallRecord]


def size_passes(model: nn.Module, main: ScopeFuser, inputs: tuple[Tensor, ...], seed: int,
                progress: FuseProgress, unshare: bool) -> list[list[tuple[int, ...]]]:
    """Fuse ``model`` again at sizes across the size thresholds of ``main``'s capture where
    the model runs other modules or calls them otherwise, merging each pass into ``main``.
    Returns the input shapes across the thresholds at which the model runs (to verify at)."""
    if main.root_capture is None or not main.root_capture.size_guards:
        return []
    if not all(isinstance(x, Tensor) for x in inputs):
        return []  # guards index tensor inputs; a list of images is verified as it is given
    shapes = [tuple(x.shape) for x in inputs]
    seen = {_signature(main.calls)}
    checked: list[list[tuple[int, ...]]] = []
    runner = eval_copy(model)
    for candidate in crossing_sizes(main.root_capture, shapes):
        other_inputs = random_inputs(inputs, seed, candidate)
        try:
            calls, _ = record_calls(runner, other_inputs, keep_tensors=False)
        except TraceError:
            continue  # the model does not run at this size: nothing to fold or check there
        checked.append(candidate)
        for path, record in calls.items():
            if record.count:
                main.one_tensor_calls[path] = (main.one_tensor_calls.get(path, True)
                                               and record.single_tensor)
        signature = _signature(calls)
        if signature in seen or len(seen) > MAX_SIZE_PASSES:
            continue
        seen.add(signature)
        progress(f"fusing again at {'x'.join(map(str, candidate[0]))}", 0, 1)
        merge(main, fuse_pass(model, other_inputs, seed, progress, unshare), model)
    return checked


def _signature(calls: Calls) -> frozenset[tuple[str, str]]:
    """Which modules ran, with which held arguments."""
    return frozenset((path, repr(sorted((record.constants or {}).items())))
                     for path, record in calls.items() if record.count)


def _called(calls: Calls) -> set[str]:
    return {path for path, record in calls.items() if record.count}


def _target(step: Step) -> str:
    return step.scope if isinstance(step, (FrameRewrite, FlagCases)) else step.path


def merge(main: ScopeFuser, other: ScopeFuser, model: nn.Module) -> None:
    """Merge pass ``other`` (another input size) into ``main``: dispatchers for rewrites whose
    held arguments differ, and ``other``'s folds of what ``main`` never ran."""
    ran, ran_there = _called(main.calls), _called(other.calls)
    differ = sorted(path for path in ran & ran_there
                    if (main.calls[path].constants or {}) != (other.calls[path].constants or {}))
    frames = {s.scope: s for s in main.steps if isinstance(s, FrameRewrite)}
    frames_there = {s.scope: s for s in other.steps if isinstance(s, FrameRewrite)}
    dispatched: list[FlagCases] = []
    for path in differ:
        if any(inside(path, d.scope) for d in dispatched):
            continue  # inside a module already dispatched: its cases hold it
        rewrites = [(pass_, frames.get(path) if pass_ is main else frames_there.get(path))
                    for pass_ in (main, other)]
        made = [(pass_, rewrite) for pass_, rewrite in rewrites if rewrite is not None]
        if not made:
            continue
        mine, theirs = main.calls[path].constants or {}, other.calls[path].constants or {}
        flags = tuple(sorted(k for k in {*mine, *theirs} if mine.get(k) != theirs.get(k)))
        cases = [(tuple(rewrite.concrete.get(f) for f in flags), pass_.model.get_submodule(path))
                 for pass_, rewrite in made]
        fallback = not covers_every_value([values for values, _ in cases])
        original = model.get_submodule(path)
        set_module(main.model, path, dispatcher(
            original, flags, cases, eval_copy(original) if fallback else None))
        dispatched.append(FlagCases(path, flags, tuple(r for _, r in made), fallback))
        for index, (pass_, _) in enumerate(made):
            _move_records(main, pass_, path, f"{path}.{case_name(index)}")
    # what the main pass never ran, outside forwards it rewrote as they ran at its size
    rewritten = [scope for scope in frames if not any(d.scope == scope for d in dispatched)]
    steps_there = [s for s in other.steps if _target(s) not in ran
                   and not any(inside(_target(s), scope) for scope in rewritten)
                   and not isinstance(s, FlagCases)]
    for step in steps_there:
        path = _target(step)
        if not any(inside(path, d.scope) for d in dispatched) and isinstance(
                step, (ModuleSwap, WeightFold, FrameRewrite)):
            set_module(main.model, path, other.model.get_submodule(path))
            _move_records(main, other, path, path)
    kept = [s for s in main.steps if not (isinstance(s, FrameRewrite)
                                          and any(s.scope == d.scope for d in dispatched))]
    main.steps = [*kept, *steps_there, *dispatched]
    main.report.skipped = [s for s in main.report.skipped
                           if not (s.reason.startswith("never called") and s.where in ran_there)]
    main.report.skipped += [s for s in other.report.skipped if s.where.split(" ")[0] not in ran]
    if dispatched:
        main.report.notes.append(
            "decides on the input size: " + "; ".join(
                f"{d.scope} runs the rewrite made for its {', '.join(d.flags)} "
                f"({len(d.cases)} case(s){', else as it was' if d.fallback else ''})"
                for d in dispatched))


def _move_records(main: ScopeFuser, source: ScopeFuser, path: str, to: str) -> None:
    """``source``'s rewrite records (and the replaced ops of the per-rewrite table) for what
    lies inside ``path``, now at ``to`` in ``main``'s model."""
    def moved(where: str | None) -> str | None:
        if where is None or not inside(where, path):
            return where
        return to + where[len(path):]

    if source is not main:
        main.report.rewrites += [r for r in source.report.rewrites
                                 if r.fused_module and inside(r.fused_module, path)]
    main.report.rewrites = [replace(r, fused_module=moved(r.fused_module))
                            if r.fused_module and inside(r.fused_module, path) else r
                            for r in main.report.rewrites]
    originals = {moved(k) or k: v for k, v in source.originals.items() if inside(k, path)}
    if source is main:
        main.originals = {k: v for k, v in main.originals.items() if not inside(k, path)}
    main.originals.update(originals)

