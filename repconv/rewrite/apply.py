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
keeping its plain attributes, and calls its untouched children as the modules they were.
Everything is recorded as `plan` steps, which `surgery.replay` applies to a freshly built model.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from repconv.errors import TraceError
from repconv.fold import algebra
from repconv.fold.algebra import Affine
from repconv.fold.graph import (
    CallRecord,
    alias_base,
    mutated_input,
    tensor_dtype,
    tensor_shape,
)
from repconv.fold.region import CONV_LABELS, Region
from repconv.fold.rules.base import describe
from repconv.rewrite.align import Alignment, AlignmentError, trace_and_align
from repconv.rewrite.attributes import carry_attributes, own_attributes
from repconv.rewrite.paths import (
    common_path,
    frame_of,
    inside,
    inside_nodes,
    join_path,
    relative,
    stack,
)
from repconv.rewrite.plan import FrameRewrite, ModuleSpec, ModuleSwap, NodeEdit, Step, WeightFold
from repconv.rewrite.surgery import fused_conv_name, insert_fused, set_module, vacate, wrap

_JSON_SCALARS = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class _Edit:
    """Users of ``sink`` read ``module(root)`` (or ``root``) computed where ``first`` ran."""

    root: fx.Node
    first: fx.Node
    sink: fx.Node
    members: tuple[fx.Node, ...]
    module: nn.Module | None
    region: Region


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


def _called_once(frame: str, node: fx.Node, calls: Mapping[str, CallRecord], scope: str) -> str:
    """``frame``, or the innermost module around it called once: an edit of one call of a
    module called at several sites (a shared head conv's, unshared) is made in the forward that
    makes those calls, each site on its own."""
    outer = [p for p in stack(node) if inside(frame, p)]
    for path in reversed([frame, *outer] if frame not in outer else outer):
        record = calls.get(join_path(scope, path))
        if path == "" or (record is not None and record.count == 1):
            return path
    return ""


def _touched(edits: list[_Edit], frame: str, *, absolute: bool = False) -> set[str]:
    """Module paths, relative to ``frame`` (or as they are), that run a member of these
    edits."""
    touched: set[str] = set()
    for edit in edits:
        for member in edit.members:
            for path in stack(member):
                if inside(path, frame) and path != frame:
                    touched.add(path if absolute else relative(path, frame))
    return touched


def input_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes computing tensors from the graph's inputs: the work a module's call does (its
    constants and metadata reads aside)."""
    dependent: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    return {n for n in dependent if n.op != "placeholder" and tensor_shape(n) is not None}


def _owned(gm: fx.GraphModule, path: str, dependent: set[fx.Node]) -> set[fx.Node]:
    """The tensors module ``path`` computes from the inputs."""
    return {n for n in gm.graph.nodes if n in dependent and path in stack(n)}


def _inlined(gm: fx.GraphModule, edits: list[_Edit], frame: str,
             dependent: set[fx.Node]) -> set[str]:
    """Children of ``frame`` (relative paths) a frame rewrite must trace through: those that
    run part of an edit. A child whose every tensor is a member of one edit, its input and
    output outside, stays one call (the edit removes it whole), so a child torch.fx cannot
    trace (DBB's in-place border write) does not stop its parent's rewrite."""
    whole: set[str] = set()
    for edit in edits:
        members = set(edit.members)
        for path in {p for m in edit.members for p in stack(m) if inside(p, frame) and p != frame}:
            owned = _owned(gm, path, dependent)
            if owned and owned <= members and not {edit.root, edit.sink} & owned:
                whole.add(path)
    return {relative(path, frame) for path in _touched(edits, frame, absolute=True)
            if not any(inside(path, w) for w in whole)}


def _whole_owner(gm: fx.GraphModule, member: fx.Node, members: set[fx.Node],
                 calls: Mapping[str, CallRecord], scope: str,
                 dependent: set[fx.Node]) -> str | None:
    """The innermost module, called once, whose every tensor is a member of the region: an
    op in its own forward (a border pad inside DBB's ``BNAndPadLayer``, YOLOv7's ``x +
    implicit``) is then rewritten by swapping that module, with no need to trace its forward."""
    for path in reversed(stack(member)):
        record = calls.get(join_path(scope, path))
        if record is None or record.count != 1 or not record.single_tensor:
            continue
        owned = _owned(gm, path, dependent)
        if owned and owned <= members:
            return path
    return None


_FUNCTIONAL_CONVS = (F.conv1d, F.conv2d, F.conv3d)


def _argument(node: fx.Node, index: int, name: str, default: Any) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _weight_owner(gm: fx.GraphModule, scope_module: nn.Module, slot: fx.Node,
                  fused: nn.Module) -> str | None:
    """The conv module whose own forward runs ``slot`` as ``F.convNd(x, self.weight,
    self.bias, ...)``, when the fused conv has that call's geometry: the fold then goes into the
    module's weight and bias, and its forward (timm's ``Conv2dSame`` padding per input size)
    runs as it was."""
    if slot.op != "call_function" or slot.target not in _FUNCTIONAL_CONVS:
        return None
    owner = frame_of(slot)
    weight, bias = _argument(slot, 1, "weight", None), _argument(slot, 2, "bias", None)
    if not owner or not isinstance(weight, fx.Node) or weight.target != f"{owner}.weight":
        return None
    if bias is not None and (not isinstance(bias, fx.Node) or bias.target != f"{owner}.bias"):
        return None
    module = scope_module.get_submodule(owner)
    if not isinstance(module, nn.modules.conv._ConvNd) or not isinstance(
            fused, nn.modules.conv._ConvNd) or module.transposed or fused.transposed:
        return None
    nd = len(module.kernel_size)

    def geometry(value: Any) -> tuple[int, ...]:
        return tuple(value) if isinstance(value, (list, tuple)) else (value,) * nd

    call = tuple(geometry(_argument(slot, i, name, default)) for i, name, default in (
        (3, "stride", 1), (4, "padding", 0), (5, "dilation", 1)))
    same = (fused.weight.shape == module.weight.shape and fused.padding_mode == "zeros"
            and call == (fused.stride, fused.padding, fused.dilation)
            and _argument(slot, 6, "groups", 1) == fused.groups)
    return owner if same else None


def _outside_reader(gm: fx.GraphModule, path: str, swapped: list[str]) -> fx.Node | None:
    """A read of module ``path``'s tensors (``bn.weight``) by code that is not swapped with it:
    after the swap it would read the replacement, or nothing."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and inside(str(node.target), path) and node.users and not any(
                inside(p, unit) for p in stack(node) for unit in swapped):
            return node
    return None


def fused_module(gm: fx.GraphModule, region: Region, affine: Affine) -> nn.Module:
    """The conv computing ``affine`` (``region`` folded) in the region's dtype, on the device
    of ``gm``'s weights."""
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    return algebra.to_module(affine, tensor_dtype(region.sink) or torch.float32, device)


def _chain_slot(gm: fx.GraphModule, region: Region) -> int:
    """Which op of a chain becomes the fused conv (the others become identities): its first
    conv, so the conv module keeps its name, unless the chain's input is changed in place
    before that conv runs (then the first op, which read it first)."""
    first_conv = next((i for i, label in enumerate(region.labels) if label in CONV_LABELS), 0)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    start, end = order[region.members[0]], order[region.members[first_conv]]
    base = alias_base(region.root, gm)
    changed = any(start < order[u] < end and mutated_input(u, gm) is base
                  for u in gm.graph.nodes)
    return 0 if changed else first_conv


def _whole_module(gm: fx.GraphModule, scope_module: nn.Module, region: Region,
                  fused: nn.Module, calls: Mapping[str, CallRecord], scope: str) -> str | None:
    """The module (path in ``gm``) whose whole forward is this region, which the fused conv
    can replace as timm's own ``fuse()`` methods do (LeViT's ``LinearNorm``, RepViT's
    ``RepVggDw``, ``Conv2d_BN`` sequences): no Identity or wrapper left behind, no call of its
    forward. Only a module called once that runs nothing else, and whose own attributes do not
    clash with the fused layer's (they are carried over)."""
    nodes = [*region.members, *region.tail]
    path = common_path([frame_of(n) for n in nodes])
    record = calls.get(join_path(scope, path))
    if not path or record is None or record.count != 1 or not record.single_tensor:
        return None  # the conv put in its place must take the call it took
    module = scope_module.get_submodule(path)
    if any(hasattr(fused, name) for name in own_attributes(module)):
        return None
    if set(inside_nodes(gm, path)) != set(nodes):
        return None
    last = nodes[-1]
    if any(u not in nodes for n in nodes[:-1] for u in n.users):
        return None
    root, out = tensor_shape(region.root), tensor_shape(last)
    if root is None or out is None:
        return None
    # what the fused conv returns on the module's input: a linear layer keeps the token dims
    expected = ((*root[:-1], region.affine.out_channels) if region.affine.nd == 0
                else tuple(tensor_shape(region.sink) or ()))
    return path if tuple(out) == tuple(expected) else None


def _plan_edits(
    gm: fx.GraphModule, scope_module: nn.Module, scope: str, regions: list[Region],
    fused_modules: Mapping[int, nn.Module], calls: Mapping[str, CallRecord],
    call_sites: Mapping[str, int],
) -> tuple[dict[str, list[_Edit]], list[tuple[str, nn.Module | None, Region]],
           list[tuple[str, nn.Module, Region]], dict[int, str]]:
    """Split regions into forward edits by frame, module swaps and weight folds."""
    dependent = input_dependent(gm)
    frames: dict[str, list[_Edit]] = defaultdict(list)
    swaps: list[tuple[str, nn.Module | None, Region]] = []
    folds: list[tuple[str, nn.Module, Region]] = []
    refusals: dict[int, str] = {}
    for region in regions:
        fused = fused_modules.get(id(region))
        whole = _whole_module(gm, scope_module, region, fused, calls, scope)
        if whole is not None:
            swaps.append((whole, fused, region))
            continue
        if not region.chain:
            frame = _called_once(common_path([frame_of(m) for m in region.members]),
                                 region.members[0], calls, scope)
            frames[frame].append(_Edit(region.root, region.members[0], region.sink,
                                       region.members, fused, region))
            continue
        at = _chain_slot(gm, region)
        folded_into = _weight_owner(gm, scope_module, region.members[at], fused)
        if folded_into is not None:
            folds.append((folded_into, fused, region))
        members = {*region.members, *region.tail}
        owners = {m: _whole_owner(gm, m, members, calls, scope, dependent)
                  for m in region.members if m.op != "call_module"}
        swapped = {path for path in owners.values() if path is not None and not (
            any(inside(p, path) for p in stack(region.members[at]))
            and any(hasattr(fused, a) for a in own_attributes(scope_module.get_submodule(path))))}
        for path in sorted(swapped):
            slot = any(inside(p, path) for p in stack(region.members[at]))
            swaps.append((path, fused if slot else None, region))
        for i, (member, source) in enumerate(zip(region.members, region.sources)):
            if any(inside(p, owner) for p in stack(member) for owner in swapped):
                continue  # its module is swapped whole
            if i == at and folded_into is not None:
                continue  # its module holds the fused weights
            if i != at and region.passthrough[i]:
                continue  # it already passes its input on: rewriting its module gains nothing
            module = fused if i == at else None
            if member.op == "call_module" and call_sites.get(str(member.target), 0) == 1:
                swaps.append((str(member.target), module, region))
            else:
                frame = _called_once(frame_of(member), member, calls, scope)
                sites = call_sites.get(str(member.target), 0) if member.op == "call_module" else 0
                if sites > 1 and not scope and not frame:
                    refusals[id(region)] = (
                        f"{member.target} is shared by {sites} call sites in the model's own "
                        "forward: a copy for each would rewrite that forward, its class and "
                        "methods")
                frames[frame].append(_Edit(source, member, member, (member,), module, region))
    # a frame whose edits reach into another frame's module traces it inline: one rewrite
    changed = True
    while changed:
        changed = False
        for outer in sorted(frames, key=len):
            touched = _touched(frames[outer], outer)
            for inner in [f for f in frames if f != outer and inside(f, outer)]:
                if relative(inner, outer) in touched:
                    frames[outer] += frames.pop(inner)
                    changed = True
            if changed:
                break
    return frames, swaps, folds, refusals


def apply(
    scope_module: nn.Module,
    scope: str,
    gm: fx.GraphModule,
    regions: list[Region],
    fused_modules: Mapping[int, nn.Module],
    calls: Mapping[str, CallRecord],
    scope_concrete: dict[str, Any],
) -> Applied:
    """Rewrite each region of ``gm`` (the trace of ``scope_module``, at path ``scope`` in the
    model) where it runs, as its conv in ``fused_modules`` (by ``id(region)``); ``calls`` holds
    each module's recorded calls, by model path."""
    applied = Applied(scope_module)
    call_sites: dict[str, int] = defaultdict(int)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            call_sites[str(node.target)] += 1
    dead = dead_children(gm, calls, scope)
    applied.removed = [r for r in regions
                       if any(inside(p, d) for m in r.members for p in stack(m) for d in dead)]
    live = [r for r in regions if r not in applied.removed]
    frames, swaps, folds, refusals = _plan_edits(gm, scope_module, scope, live, fused_modules,
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
            inlined = _inlined(gm, edits, frame, dependent)
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
        reader = _outside_reader(gm, path, unit)
        if reader is not None:
            refused[id(region)] = (f"{join_path(scope, path)}'s tensors are read elsewhere "
                                   f"({describe(reader)}): it cannot be swapped")
    for group in {r.group for r in live if r.group and id(r) in refused}:
        why = next(refused[id(r)] for r in live if r.group == group and id(r) in refused)
        refused.update((id(r), why) for r in live if r.group == group)
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
