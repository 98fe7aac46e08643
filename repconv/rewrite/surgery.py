"""Changing modules in place: a fused conv inserted into a module's traced forward, the
forward wrapped back under the module's own class (or run as a chain of its children,
`chain`), modules swapped (carrying their plain attributes) or vacated (`repconv.fold.slot`),
and a recorded plan replayed on a freshly built model."""

from __future__ import annotations

import copy
import dataclasses
import operator
from collections.abc import Mapping

import torch
from torch import Tensor, fx, nn

from repconv.errors import InputError, TraceError, one_line
from repconv.fold.graph import erase_dead_code, metadata_read, trace
from repconv.fold.slot import vacated
from repconv.rewrite import plan as plan_record
from repconv.rewrite.attributes import carry_attributes, carry_into_graph_module
from repconv.rewrite.cases import CaseDispatch, dispatcher
from repconv.rewrite.chain import as_sequential
from repconv.rewrite.own_forward import adopt_own_forwards
from repconv.rewrite.plan import FlagCases, FrameRewrite, ModuleSwap, Step, WeightFold


def insert_fused(
    gm: fx.GraphModule, root: fx.Node, first: fx.Node, sink: fx.Node,
    members: tuple[fx.Node, ...], name: str | None,
) -> fx.Node:
    """Make ``sink``'s users, and the metadata reads of the members, read the fused conv of
    ``root`` (or ``root`` itself), computed where the region's first op ran: an in-place
    change of ``root`` after that point must not be seen."""
    if name is None:
        fused = root
    else:
        with gm.graph.inserting_before(first):
            fused = gm.graph.call_module(name, (root,))
    sink.replace_all_uses_with(fused)
    for member in members:
        for user in list(member.users):
            if not metadata_read(user):
                continue
            checks = _assertion_chain(user)
            if checks is None:
                user.replace_input_with(member, fused)
            else:
                # an assert on the metadata of an op that no longer runs (timm asserts x.ndim
                # before each BatchNorm): the fused conv checks its own input
                for node in reversed(checks):
                    gm.graph.erase_node(node)
    return fused


_CHECK_OPS = (operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
              operator.and_, operator.or_, operator.not_, torch._assert)


def _assertion_chain(read: fx.Node) -> list[fx.Node] | None:
    """``read`` and everything downstream of it, in graph order, when all of it only compares
    metadata with constants and ends in ``torch._assert``; else None."""
    chain, frontier = [read], [read]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user.op != "call_function" or user.target not in _CHECK_OPS:
                return None
            if any(i not in chain and i is not user for i in user.all_input_nodes):
                return None
            if user not in chain:
                chain.append(user)
                frontier.append(user)
    if not any(n.target is torch._assert for n in chain):
        return None
    order = {n: i for i, n in enumerate(read.graph.nodes)}
    return sorted(chain, key=order.__getitem__)


def free_name(gm: nn.Module, wanted: str) -> str:
    """``wanted`` if no attribute has that name yet, else a numbered variant."""
    name, n = wanted.replace(".", "_"), 1
    candidate = name
    while hasattr(gm, candidate):
        n += 1
        candidate = f"{name}_{n}"
    return candidate


def fused_conv_name(gm: fx.GraphModule) -> str:
    """The fused conv's attribute name at the frame's top level."""
    return free_name(gm, "fused_conv")


def wrap(original: nn.Module, fgm: fx.GraphModule) -> fx.GraphModule:
    """The rewritten forward under the original's class name, keeping its plain attributes
    (a parent may route through ``child.f``), also through ``copy.deepcopy`` and pickling."""
    erase_dead_code(fgm)
    fgm.delete_all_unused_submodules()
    fgm.graph.lint()
    fgm.recompile()
    carry_into_graph_module(original, fgm)
    fgm.train(original.training)
    return fgm


def set_module(owner: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    target = owner.get_submodule(parent) if parent else owner
    setattr(target, name, module)


def vacate(owner: nn.Module, path: str) -> None:
    """Put `repconv.fold.slot.vacated` in place of the module at ``path``, which a fold made
    redundant (`apply` and `replay` both, so a replayed plan builds the same slot)."""
    set_module(owner, path, vacated(owner.get_submodule(path)))


def replay(model: nn.Module, steps: list[Step]) -> nn.Module:
    """Rebuild the structure `apply` wrote, with empty weights, on a freshly built model."""
    # a dispatcher's fallback is the module as it was, before any step changed its children
    as_built = {step.scope: copy.deepcopy(_resolve(model, step.scope)) for step in steps
                if isinstance(step, FlagCases) and step.fallback}
    for step in steps:
        if isinstance(step, WeightFold):
            conv = _resolve(model, step.path)
            if step.bias_added:  # filled by the file's weights, like every other tensor
                conv.bias = nn.Parameter(torch.empty(conv.weight.shape[0],
                                                     dtype=conv.weight.dtype))
            continue
        if isinstance(step, ModuleSwap):
            replaced = _resolve(model, step.path)
            if step.spec is None:
                vacate(model, step.path)
                continue
            replacement = step.spec.build()
            carry_attributes(replaced, replacement)
            set_module(model, step.path, replacement)
            continue
        frame_module = _resolve(model, step.scope)
        if isinstance(step, FlagCases):
            cases = [(tuple(case.concrete[f] for f in step.flags),
                      _replay_frame(frame_module, case)) for case in step.cases]
            wrapped = dispatcher(frame_module, step.flags, cases, as_built.get(step.scope))
        else:
            wrapped = _replay_frame(frame_module, step)
            if step.sequential:
                wrapped = _as_sequential(wrapped, step.scope)
        if step.scope:
            set_module(model, step.scope, wrapped)
        else:
            model = wrapped
    return model


def _replay_frame(frame_module: nn.Module, step: FrameRewrite) -> fx.GraphModule:
    """``frame_module``'s forward traced as recorded, with the recorded edits made in it."""
    try:
        fgm = trace(frame_module, frozenset(step.leaves), dict(step.concrete))
    except TraceError as exc:
        raise InputError(f"deploy plan rewrites {step.scope or 'the model'}, which does not "
                         f"trace in this model ({exc}); build the architecture the deploy "
                         "file was made from") from exc
    nodes = {node.name: node for node in fgm.graph.nodes}
    for edit in step.edits:
        found = [nodes.get(n) for n in (edit.root, edit.first, edit.sink)]
        if any(n is None for n in found):
            raise InputError(f"deploy plan refers to nodes {edit.root!r}/{edit.sink!r}, "
                             f"which {step.scope or 'the model'} does not have; build the "
                             "architecture the deploy file was made from")
        root, first, sink = found
        _check_region(fgm, root, first, sink, step.scope)
        if edit.module is not None and edit.spec is not None:
            fgm.add_module(edit.module, edit.spec.build())
        members = tuple(nodes[m] for m in edit.members if m in nodes)
        nodes[sink.name] = insert_fused(fgm, root, first, sink, members, edit.module)
    try:
        return wrap(frame_module, fgm)
    except RuntimeError as exc:  # graph.lint(): the edits do not make a graph
        raise InputError(f"deploy plan's edits of {step.scope or 'the model'} do not make a "
                         f"valid forward ({one_line(exc, 120)}); the deploy file is damaged: "
                         "write it again with repconv fuse") from exc


def _as_sequential(gm: fx.GraphModule, scope: str) -> nn.Module:
    sequential = as_sequential(gm) if scope else None
    if sequential is None:
        raise InputError(f"deploy plan runs {scope or 'the model'} as a chain of its children, "
                         "which its rewritten forward is not; the deploy file is damaged: write "
                         "it again with repconv fuse")
    return sequential


def _check_region(gm: fx.GraphModule, root: fx.Node, first: fx.Node, sink: fx.Node,
                  scope: str) -> None:
    """A recorded edit must name a region as `apply` writes one: its root a value, its first
    op and sink ops, in that order in the graph (root before first, first not after sink)."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    ops = ("call_module", "call_function", "call_method")
    if (root.op == "output" or first.op not in ops or sink.op not in ops
            or not order[root] < order[first] <= order[sink]):
        raise InputError(f"deploy plan edits {scope or 'the model'} from {root.name!r} "
                         f"({root.op}) through {first.name!r} ({first.op}) to {sink.name!r} "
                         f"({sink.op}), which is not a region of its forward; the deploy file "
                         "is damaged: write it again with repconv fuse")


def _resolve(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError as exc:
        raise InputError(f"deploy plan names module {path!r}, which this model does not have; "
                         "build the architecture the deploy file was made from") from exc


def run_chains_as_sequential(model: nn.Module, steps: list[Step],
                             one_tensor_calls: Mapping[str, bool]) -> list[Step]:
    """Put an ``nn.Sequential`` (`chain`) in the place of each module a frame rewrite left as
    a chain of child calls and that every recorded call (``one_tensor_calls`` by path, over
    all fuse passes) passed one tensor; ``steps`` with those rewrites marked ``sequential``."""
    marked: list[Step] = []
    for step in steps:
        if isinstance(step, FrameRewrite) and step.scope and one_tensor_calls.get(step.scope):
            try:
                module: nn.Module | None = model.get_submodule(step.scope)
            except AttributeError:  # gone: a later step replaced what held it
                module = None
            sequential = (as_sequential(module) if isinstance(module, fx.GraphModule)
                          and not isinstance(module, CaseDispatch) else None)
            if sequential is not None:
                set_module(model, step.scope, sequential)
                step = dataclasses.replace(step, sequential=True)
        marked.append(step)
    return marked


def replay_plan(
    model: nn.Module, plan: object, weights: dict[str, Tensor] | None = None
) -> nn.Module:
    """Apply a recorded plan (validated first; with ``weights``, against them too) to a freshly
    built model: the same structure, empty weights. The modules that ran their class's own
    deploy forward when fused take it again, on the same proof (nothing of it is in the file)."""
    steps = plan_record.parse(plan, weights)
    replayed = replay(model.eval(), steps).eval()
    adopt_own_forwards(replayed)
    return replayed
