"""Apply folded regions where their ops run.

The fused model stays the user's model (docs/design.md "4. Where rewrites land"). A region is
applied at the smallest scope that can hold it:
- A module whose whole forward is the region (a RepVGG block, LeViT's ``LinearNorm``) is
  replaced by the fused conv, which carries the module's plain attributes.
- A chain (each op reads the one before it) is rewritten op by op where each op runs. An op that
  is a module call swaps that module: the first for the fused conv, the rest for an identity
  (`surgery.vacate`: a BatchNorm stays a BatchNorm that runs nothing), and no forward
  changes. An op inside some module's forward (timm's ``BatchNormAct2d`` calling
  ``F.batch_norm``) is edited in that module's forward alone.
- Branches that merge (sums, concats) are rewritten in the forward of the deepest module that
  runs all of them (a RepVGG block's forward, not the whole network's).
A module whose forward is rewritten becomes a ``GraphModule`` under its own name and class name,
keeping its plain attributes, and calls its untouched children as the modules they were (once
every pass is done, one whose forward is a chain of child calls runs as an ``nn.Sequential``:
`chain`).
Everything is recorded as `plan` steps, which `surgery.replay` applies to a freshly built model.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from repconv.errors import TraceError
from repconv.fold.calls import CallRecord
from repconv.fold.graph import mutated_input
from repconv.fold.region import Region
from repconv.fold.rules.base import describe
from repconv.rewrite.align import Alignment, AlignmentError, trace_and_align
from repconv.rewrite.attributes import carry_attributes
from repconv.rewrite.paths import (
    inside,
    inside_nodes,
    join_path,
    stack,
)
from repconv.rewrite.placement import (
    inlined_children,
    input_dependent,
    outside_reader,
    plan_edits,
)
from repconv.rewrite.plan import FrameRewrite, ModuleSpec, ModuleSwap, NodeEdit, Step, WeightFold
from repconv.rewrite.surgery import fused_conv_name, insert_fused, set_module, vacate, wrap


@dataclass
class Applied:
    """What `apply` did: the scope module (replaced if its own forward was rewritten), the plan
    steps, the regions that could not be placed with the reason, and notes for the report."""

    module: nn.Module
    steps: list[Step] = field(default_factory=list)
    refused: list[tuple[Region, str]] = field(default_factory=list)
    removed: list[Region] = field(default_factory=list)  # inside a child whose result is unused
    placed: dict[int, str] = field(default_factory=dict)  # id(region) -> fused conv's path
    notes: list[str] = field(default_factory=list)
    unrewritable: set[str] = field(default_factory=set)  # frames whose forward did not trace
    unshared: dict[str, int] = field(default_factory=dict)  # layer -> sites given a copy each


def apply(
    scope_module: nn.Module,
    scope: str,
    gm: fx.GraphModule,
    regions: list[Region],
    fused_modules: Mapping[int, nn.Module],
    calls: Mapping[str, CallRecord],
    scope_concrete: dict[str, Any],
    settle: Callable[[list[Region]], dict[int, str]] | None = None,
) -> Applied:
    """Rewrite each region of ``gm`` (the trace of ``scope_module``, at path ``scope`` in the
    model) where it runs, as its conv in ``fused_modules`` (by ``id(region)``); ``calls`` holds
    each module's recorded calls, by model path. ``settle`` is given the regions that will be
    placed once that is known, before anything is rewritten (it may fill their convs, and
    refuse some: reasons by ``id(region)``)."""
    applied = Applied(scope_module)
    call_sites: dict[str, int] = defaultdict(int)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            call_sites[str(node.target)] += 1
    dead = dead_children(gm, calls, scope)
    applied.removed = [r for r in regions
                       if any(inside(p, d) for m in r.members for p in stack(m) for d in dead)]
    live = [r for r in regions if r not in applied.removed]
    frames, swaps, folds, refusals = plan_edits(gm, scope_module, scope, live, fused_modules,
                                                 calls, call_sites)
    # phase 1: trace and align every frame; a region any part of which cannot be placed is
    # applied nowhere (half a chain applied would fold its BN twice)
    refused: dict[int, str] = dict(refusals)
    traced: dict[str, tuple[fx.GraphModule, Alignment, dict[str, Any]]] = {}
    dependent = input_dependent(gm)
    for frame in sorted(frames, key=lambda f: (f.count("."), f) if f else (-1, "")):
        if frame not in frames:
            continue  # merged into an enclosing frame that inlines it
        edits = frames[frame]
        frame_path = join_path(scope, frame)
        try:
            inlined = inlined_children(gm, edits, frame, dependent)
            traced[frame] = trace_and_align(gm, scope_module, frame, frame_path, inlined, calls,
                                            scope_concrete)
            if traced[frame][1].values.keys() >= set(inside_nodes(gm, frame)):
                # every child inlined: a deeper frame's rewrite happens here, in this trace
                for inner in [f for f in frames if f != frame and inside(f, frame)]:
                    edits += frames.pop(inner)
        except (TraceError, AlignmentError) as exc:
            applied.unrewritable.add(frame)
            why = f"{frame_path or 'the model'}'s forward could not be rewritten alone ({exc})"
            refused.update((id(edit.region), why) for edit in edits)
            continue
        fgm, mapping, _ = traced[frame]
        for edit in edits:
            if mapping.values.get(edit.root) is None or mapping.where(edit.first) is None:
                refused[id(edit.region)] = ("its input is not visible in "
                                            f"{frame_path or 'the model'}'s own forward")
    units = [(path, region, [p for p, _, r in swaps if r is region]) for path, _, region in swaps]
    units += [(path, region, [path]) for path, _, region in folds]  # its own forward reads them
    for path, region, unit in units:
        reader = outside_reader(gm, path, unit)
        if reader is not None:
            refused[id(region)] = (f"{join_path(scope, path)}'s tensors are read elsewhere "
                                   f"({describe(reader)}): it cannot be swapped")
    for group in {r.group for r in live if r.group and id(r) in refused}:
        why = next(refused[id(r)] for r in live if r.group == group and id(r) in refused)
        refused.update((id(r), why) for r in live if r.group == group)
    if settle is not None:
        refused.update(settle([r for r in live if id(r) not in refused]))
    applied.refused = [(r, refused[id(r)]) for r in live if id(r) in refused]
    # a layer called at several sites and folded in several regions: each got a copy
    copies: dict[str, int] = defaultdict(int)
    for region in live:
        if id(region) not in refused:
            for target in {str(m.target) for m in region.members if m.op == "call_module"}:
                copies[target] += call_sites.get(target, 0) > 1
    applied.unshared = {join_path(scope, target): call_sites[target]
                        for target, count in copies.items() if count > 1}
    # phase 2: rewrite
    built: list[tuple[str, fx.GraphModule]] = []
    for frame, (fgm, mapping, concrete) in traced.items():
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        edits = sorted((e for e in frames[frame] if id(e.region) not in refused),
                       key=lambda e: order[e.sink])
        if not edits:
            continue
        replaced: dict[fx.Node, fx.Node] = {}  # a sink rewritten earlier may be a later root
        frame_path = join_path(scope, frame)
        leaves_used = sorted(str(n.target) for n in fgm.graph.nodes if n.op == "call_module")
        recorded: list[NodeEdit] = []
        for edit in edits:
            root, first, sink = (mapping.values[edit.root], mapping.where(edit.first),
                                 mapping.values[edit.sink])
            assert root is not None and first is not None and sink is not None, "checked above"
            members = tuple(dict.fromkeys(n for n in map(mapping.where, edit.members) if n))
            fused_root = replaced.get(root, root)
            name = None
            if edit.module is not None:
                name = fused_conv_name(fgm)
                fgm.add_module(name, edit.module)
                applied.placed[id(edit.region)] = join_path(frame_path, name)
            recorded.append(NodeEdit(root.name, first.name, sink.name,
                                     tuple(m.name for m in members), name,
                                     None if edit.module is None else ModuleSpec.of(edit.module)))
            replaced[sink] = insert_fused(fgm, fused_root, first, sink, members, name)
        frame_module = scope_module.get_submodule(frame) if frame else scope_module
        built.append((frame, wrap(frame_module, fgm)))
        applied.steps.append(FrameRewrite(frame_path, tuple(leaves_used), concrete,
                                          tuple(recorded)))
    for frame, fgm in built:
        if frame:
            set_module(applied.module, frame, fgm)
        else:
            applied.module = fgm
            if not scope:
                applied.notes.append(
                    f"the model's own forward holds branches that fold, so it was rewritten: "
                    f"the fused model is a GraphModule named {type(fgm).__name__}, with the "
                    "original's attributes but not its other methods")
    for path in dead:
        parent = path.rpartition(".")[0]
        try:
            applied.module.get_submodule(parent)
        except AttributeError:
            continue  # a rewritten forward dropped it already
        vacate(applied.module, path)
        applied.steps.append(ModuleSwap(join_path(scope, path), None))
        applied.notes.append(f"{join_path(scope, path)}: its result is computed and never used; "
                             "replaced by an identity")
    for path, fused, region in folds:
        if id(region) in refused:
            continue
        conv = applied.module.get_submodule(path)
        added = conv.bias is None
        with torch.no_grad():  # new parameters: the user's model shares the old ones
            conv.weight = nn.Parameter(fused.weight.detach().clone(), conv.weight.requires_grad)
            conv.bias = nn.Parameter(fused.bias.detach().clone(), conv.weight.requires_grad)
        applied.steps.append(WeightFold(join_path(scope, path), added))
    for path, module, region in swaps:
        if id(region) in refused:
            continue
        if module is None:
            vacate(applied.module, path)
        else:
            carry_attributes(applied.module.get_submodule(path), module)
            set_module(applied.module, path, module)
        spec = None if module is None else ModuleSpec.of(module)
        applied.steps.append(ModuleSwap(join_path(scope, path), spec))
        if module is not None:
            applied.placed[id(region)] = join_path(scope, path)
    return applied


def _live(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes the graph's output needs, with everything impure or changing a tensor in place
    (and what those read)."""
    roots = [n for n in gm.graph.nodes if n.op == "output" or n.is_impure()
             or mutated_input(n, gm) is not None]
    live: set[fx.Node] = set()
    while roots:
        node = roots.pop()
        if node not in live:
            live.add(node)
            roots.extend(node.all_input_nodes)
    return live


def dead_children(gm: fx.GraphModule, calls: Mapping[str, CallRecord], scope: str) -> list[str]:
    """Submodules (paths relative to the traced scope) called once, none of whose ops the
    outputs need, even through ops of their parent that are themselves unused: work the forward
    computes and throws away (an end-to-end head's one-to-many branch)."""
    groups: dict[str, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        for path in stack(node):
            groups[path].append(node)
    live = _live(gm)
    dead: list[str] = []
    for path, nodes in sorted(groups.items()):
        record = calls.get(join_path(scope, path))
        if record is None or record.count != 1 or any(inside(path, d) for d in dead):
            continue
        if not any(n in live or n.op == "placeholder" for n in nodes):
            dead.append(path)
    return dead
