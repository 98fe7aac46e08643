"""Where each checked region lands (docs/design.md, "4. Where rewrites land"): swapped modules,
weight folds and edits of module forwards, planned from the scope's graph before anything
changes. `apply` carries the plan out."""



from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import fx, nn

from repconv.fold.calls import CallRecord
from repconv.fold.graph import alias_base, mutated_input, tensor_shape
from repconv.fold.region import CONV_LABELS, Region
from repconv.rewrite.attributes import own_attributes
from repconv.rewrite.paths import (
    common_path,
    frame_of,
    inside,
    inside_nodes,
    join_path,
    relative,
    stack,
)


@dataclass(frozen=True)
class Edit:
    """Users of ``sink`` read ``module(root)`` (or ``root``) computed where ``first`` ran."""

    root: fx.Node
    first: fx.Node
    sink: fx.Node
    members: tuple[fx.Node, ...]
    module: nn.Module | None
    region: Region


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


def _touched(edits: list[Edit], frame: str, *, absolute: bool = False) -> set[str]:
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


def inlined_children(gm: fx.GraphModule, edits: list[Edit], frame: str,
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


def outside_reader(gm: fx.GraphModule, path: str, swapped: list[str]) -> fx.Node | None:
    """A read of module ``path``'s tensors (``bn.weight``) by code that is not swapped with it:
    after the swap it would read the replacement, or nothing."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and inside(str(node.target), path) and node.users and not any(
                inside(p, unit) for p in stack(node) for unit in swapped):
            return node
    return None


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


def plan_edits(
    gm: fx.GraphModule, scope_module: nn.Module, scope: str, regions: list[Region],
    fused_modules: Mapping[int, nn.Module], calls: Mapping[str, CallRecord],
    call_sites: Mapping[str, int],
) -> tuple[dict[str, list[Edit]], list[tuple[str, nn.Module | None, Region]],
           list[tuple[str, nn.Module, Region]], dict[int, str]]:
    """Split regions into forward edits by frame, module swaps and weight folds."""
    dependent = input_dependent(gm)
    frames: dict[str, list[Edit]] = defaultdict(list)
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
            frames[frame].append(Edit(region.root, region.members[0], region.sink,
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
                frames[frame].append(Edit(source, member, member, (member,), module, region))
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


