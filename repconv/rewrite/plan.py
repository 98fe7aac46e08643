"""The deploy plan: the record of every rewrite, stored in deploy files and replayed on load.

A deploy file is untrusted input (docs/design.md "7. Trust"). Its plan is parsed into these
typed records before anything uses it: module paths are plain attribute paths (identifiers and
indices, no dunder parts), modules come from a closed list of conv and linear types whose
arguments are checked for type and range, and (when the weights are at hand) against the
weights' shapes, so the plan can neither reach outside the model nor allocate more than the file
holds.

Four kinds of step, applied in order:
- ``ModuleSwap``: the module at ``path`` becomes a fused conv (``spec``) or an ``nn.Identity``
  (``spec`` None). The parent's own forward is untouched.
- ``WeightFold``: the module at ``path`` (a conv whose own forward repconv leaves as it is, like
  timm's ``Conv2dSame``) holds fused weights; ``bias_added``: it had no bias and now has one.
- ``FlagCases``: the module at ``scope``, called with non-tensor arguments ``flags`` that change
  with the input size, becomes a dispatcher (rewrite/cases.py) running, for each call, the case
  (a ``FrameRewrite``) made for its values, or (``fallback``) the module as it was.
- ``FrameRewrite``: the module at ``scope`` is traced (``leaves`` kept as calls, ``concrete``
  arguments held at their values) and each ``NodeEdit`` makes the users of node ``sink`` read a
  fused conv of node ``root`` computed where node ``first`` ran (or ``root`` itself).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from repconv.errors import InputError, brief
from repconv.fold.algebra import uninitialised

PLAN_VERSION = 3
# plans this repconv reads: 3 added WeightFold and FlagCases steps to 2's
READABLE_PLAN_VERSIONS = (2, 3)
_PART = re.compile(r"^(?!__)[A-Za-z_][A-Za-z0-9_]*$|^[0-9]+$")
_NODE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_CHANNELS = 1 << 20
_MAX_KERNEL = 1 << 12
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}
_CONVS: dict[str, tuple[type[nn.Module], int]] = {
    "Conv1d": (nn.Conv1d, 1), "Conv2d": (nn.Conv2d, 2), "Conv3d": (nn.Conv3d, 3),
    "ConvTranspose1d": (nn.ConvTranspose1d, 1), "ConvTranspose2d": (nn.ConvTranspose2d, 2),
    "ConvTranspose3d": (nn.ConvTranspose3d, 3),
}
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
JSONScalar = None | bool | int | float | str


def _damaged(what: str) -> InputError:
    return InputError(f"deploy plan is damaged: {what}; write the deploy file again with "
                      "repconv fuse")


def check_path(path: object, *, empty_ok: bool = False) -> str:
    """A plain attribute path ("stages.0.conv"), never a dunder or private hop."""
    if not isinstance(path, str) or len(path) > 1000:
        raise _damaged(f"module path {brief(path)} is not a string")
    if path == "" and empty_ok:
        return path
    if not all(_PART.match(part) for part in path.split(".")):
        raise _damaged(f"module path {brief(path)} is not a plain attribute path")
    return path


def _int(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _damaged(f"{what} {brief(value)} is not a whole number in [{low}, {high}]")
    return value


def _ints(value: object, what: str, nd: int, low: int, high: int) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != nd:
        raise _damaged(f"{what} {brief(value)} is not a list of {nd} numbers")
    return tuple(_int(v, what, low, high) for v in value)


@dataclass(frozen=True)
class ModuleSpec:
    """An empty fused conv or linear layer: its type, dtype and constructor arguments."""

    type: str
    dtype: str
    args: dict[str, Any]

    @classmethod
    def of(cls, module: nn.Module) -> ModuleSpec:
        dtype = str(module.weight.dtype).removeprefix("torch.")
        if isinstance(module, nn.Linear):
            return cls("Linear", dtype, {"in_features": module.in_features,
                                         "out_features": module.out_features})
        args: dict[str, Any] = {
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel_size": list(module.kernel_size),
            "stride": list(module.stride),
            "padding": list(module.padding),
            "dilation": list(module.dilation),
            "groups": module.groups,
            "padding_mode": module.padding_mode,
        }
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            args["output_padding"] = list(module.output_padding)
        return cls(type(module).__name__, dtype, args)

    @classmethod
    def parse(cls, data: object) -> ModuleSpec:
        if not isinstance(data, Mapping):
            raise _damaged(f"module spec {brief(data)} is not a record")
        kind, dtype = data.get("type"), data.get("dtype")
        if dtype not in _DTYPES:
            raise _damaged(f"dtype {brief(dtype)} is not a floating dtype")
        raw = data.get("args")
        if not isinstance(raw, Mapping):
            raise _damaged(f"module spec {brief(kind)} has no argument record")
        if kind == "Linear":
            expected = {"in_features", "out_features"}
            if set(raw) != expected:
                raise _damaged(f"Linear takes {sorted(expected)}, not {sorted(raw)}")
            args = {k: _int(raw[k], k, 1, 1 << 24) for k in sorted(expected)}
            return cls("Linear", str(dtype), args)
        if kind not in _CONVS:
            raise _damaged(f"module type {brief(kind)} is not one repconv writes")
        nd = _CONVS[kind][1]
        expected = {"in_channels", "out_channels", "kernel_size", "stride", "padding",
                    "dilation", "groups", "padding_mode"}
        if kind.startswith("ConvTranspose"):
            expected.add("output_padding")
        if set(raw) != expected:
            raise _damaged(f"{kind} takes {sorted(expected)}, not {sorted(raw)}")
        args = {
            "in_channels": _int(raw["in_channels"], "in_channels", 1, _MAX_CHANNELS),
            "out_channels": _int(raw["out_channels"], "out_channels", 1, _MAX_CHANNELS),
            "kernel_size": list(_ints(raw["kernel_size"], "kernel_size", nd, 1, _MAX_KERNEL)),
            "stride": list(_ints(raw["stride"], "stride", nd, 1, _MAX_KERNEL)),
            "padding": list(_ints(raw["padding"], "padding", nd, 0, _MAX_KERNEL)),
            "dilation": list(_ints(raw["dilation"], "dilation", nd, 1, _MAX_KERNEL)),
            "groups": _int(raw["groups"], "groups", 1, _MAX_CHANNELS),
            "padding_mode": raw["padding_mode"],
        }
        if args["padding_mode"] not in _PADDING_MODES:
            raise _damaged(f"padding_mode {brief(args['padding_mode'])} is not a torch padding "
                           "mode")
        if args["in_channels"] % args["groups"] or args["out_channels"] % args["groups"]:
            raise _damaged(f"groups {args['groups']} does not divide the channels")
        if "output_padding" in expected:
            args["output_padding"] = list(_ints(raw["output_padding"], "output_padding", nd, 0,
                                                _MAX_KERNEL))
        return cls(str(kind), str(dtype), args)

    def weight_shape(self) -> tuple[int, ...]:
        a = self.args
        if self.type == "Linear":
            return (a["out_features"], a["in_features"])
        if self.type.startswith("ConvTranspose"):
            return (a["in_channels"], a["out_channels"] // a["groups"], *a["kernel_size"])
        return (a["out_channels"], a["in_channels"] // a["groups"], *a["kernel_size"])

    def build(self) -> nn.Module:
        kind = nn.Linear if self.type == "Linear" else _CONVS[self.type][0]
        # empty weights: load_state_dict fills them
        return uninitialised(kind, **self.args, dtype=_DTYPES[self.dtype])

    def check_weights(self, path: str, weights: Mapping[str, Tensor]) -> None:
        """The file's weights for ``path`` must have the shape this spec builds, so the spec
        allocates no more than the file holds."""
        weight = weights.get(f"{path}.weight")
        expected = self.weight_shape()
        if not isinstance(weight, Tensor) or tuple(weight.shape) != expected:
            got = None if not isinstance(weight, Tensor) else list(weight.shape)
            raise _damaged(f"{path} is a {self.type} with weight {list(expected)}, but the "
                           f"file's {path}.weight is {got}")


@dataclass(frozen=True)
class NodeEdit:
    root: str
    first: str
    sink: str
    members: tuple[str, ...]  # their metadata reads (x.shape, x.ndim) move to the fused value
    module: str | None
    spec: ModuleSpec | None


@dataclass(frozen=True)
class FrameRewrite:
    scope: str
    leaves: tuple[str, ...]
    concrete: dict[str, JSONScalar]
    edits: tuple[NodeEdit, ...]
    sequential: bool = False  # runs as an nn.Sequential of its children (`chain`)


@dataclass(frozen=True)
class ModuleSwap:
    path: str
    spec: ModuleSpec | None  # None: nn.Identity


@dataclass(frozen=True)
class WeightFold:
    path: str
    bias_added: bool


@dataclass(frozen=True)
class FlagCases:
    scope: str
    flags: tuple[str, ...]  # the arguments a case is chosen by
    cases: tuple[FrameRewrite, ...]  # each with the flags' values in its ``concrete``
    fallback: bool  # other values run the module as it was


Step = FrameRewrite | ModuleSwap | WeightFold | FlagCases
_KINDS = {FrameRewrite: "frame", ModuleSwap: "swap", WeightFold: "weights", FlagCases: "cases"}
_MAX_CASES = 64


def to_json(steps: list[Step]) -> list[dict[str, Any]]:
    """The plan as plain JSON data (lists, not tuples), as a deploy file stores it."""
    data = [{"kind": _KINDS[type(s)], **asdict(s)} for s in steps]
    return json.loads(json.dumps(data))


def _scalar(value: object, what: str) -> JSONScalar:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    raise _damaged(f"{what} {brief(value)} is not a plain value")


def _spec_or_none(data: object) -> ModuleSpec | None:
    return None if data is None else ModuleSpec.parse(data)


def _edit(data: object) -> NodeEdit:
    if not isinstance(data, Mapping):
        raise _damaged(f"edit {brief(data)} is not a record")
    names = [data.get(k) for k in ("root", "first", "sink")]
    if not all(isinstance(n, str) and _NODE.match(n) for n in names):
        raise _damaged(f"edit names nodes {brief(names)}")
    members = data.get("members")
    if not isinstance(members, list) or not all(
            isinstance(n, str) and _NODE.match(n) for n in members):
        raise _damaged(f"edit members {brief(members)} are not node names")
    module = data.get("module")
    spec = _spec_or_none(data.get("spec"))
    if (module is None) != (spec is None):
        raise _damaged("an edit has a module without a spec, or a spec without a module")
    return NodeEdit(*names, tuple(members), None if module is None else check_path(module), spec)


def parse(data: object, weights: Mapping[str, Tensor] | None = None) -> list[Step]:
    """The validated plan; InputError naming the first problem otherwise. With ``weights``,
    every fused module's spec is checked against the weight the file holds for it."""
    if not isinstance(data, list):
        raise _damaged("the plan is not a list of steps")
    steps: list[Step] = []
    for raw in data:
        if not isinstance(raw, Mapping) or raw.get("kind") not in _KINDS.values():
            raise _damaged(f"step {brief(raw)} is not a frame rewrite, a module swap, a "
                           "weight fold or flag cases")
        if raw["kind"] == "weights":
            bias_added = raw.get("bias_added")
            if not isinstance(bias_added, bool):
                raise _damaged(f"weight fold {brief(raw)} lacks bias_added")
            step: Step = WeightFold(check_path(raw.get("path")), bias_added)
        elif raw["kind"] == "swap":
            step = ModuleSwap(check_path(raw.get("path")), _spec_or_none(raw.get("spec")))
        elif raw["kind"] == "cases":
            step = _flag_cases(raw)
        else:
            step = _frame_rewrite(raw)
        steps.append(step)
    if weights is not None:
        _check_weights(steps, weights)
    return steps


def _check_weights(steps: list[Step], weights: Mapping[str, Tensor]) -> None:
    """Each module a step builds must have the shape of the file's weights for it (under the
    case of a dispatched module that holds it), so a plan allocates no more than the file
    holds."""
    cases = {s.scope: len(s.cases) for s in steps if isinstance(s, FlagCases)}

    def places(path: str) -> list[str]:
        scope = next((c for c in cases if path.startswith(c + ".")), None)
        if scope is None:
            return [path]
        return [f"{scope}.case_{i}{path[len(scope):]}" for i in range(cases[scope])]

    def check(spec: ModuleSpec, path: str) -> None:
        for place in places(path):
            try:
                spec.check_weights(place, weights)
                return
            except InputError as exc:
                problem = exc
        raise problem

    for step in steps:
        if isinstance(step, ModuleSwap) and step.spec is not None:
            check(step.spec, step.path)
        elif isinstance(step, WeightFold) and step.bias_added and not any(
                isinstance(weights.get(f"{place}.bias"), Tensor) for place in places(step.path)):
            raise _damaged(f"{step.path} gains a bias, but the file holds no {step.path}.bias")
        elif isinstance(step, FrameRewrite):
            for edit in step.edits:
                if edit.spec is not None and edit.module is not None:
                    check(edit.spec, f"{step.scope}.{edit.module}" if step.scope else edit.module)
        elif isinstance(step, FlagCases):
            for index, case in enumerate(step.cases):
                for edit in case.edits:
                    if edit.spec is not None and edit.module is not None:
                        edit.spec.check_weights(f"{step.scope}.case_{index}.{edit.module}",
                                                weights)


def _flag_cases(raw: Mapping[str, Any]) -> FlagCases:
    flags, cases, fallback = raw.get("flags"), raw.get("cases"), raw.get("fallback")
    if (not isinstance(flags, list) or not flags or not isinstance(cases, list)
            or not 0 < len(cases) <= _MAX_CASES or not isinstance(fallback, bool)):
        raise _damaged("a flag-cases step lacks its flags, cases or fallback")
    scope = check_path(raw.get("scope"))
    parsed = tuple(_frame_rewrite(case) for case in cases)
    names = tuple(check_path(flag) for flag in flags)
    if any(case.scope != scope or not set(names) <= set(case.concrete) or case.sequential
           for case in parsed):
        raise _damaged(f"a case of {scope} is not a rewrite of it holding {list(names)}")
    return FlagCases(scope, names, parsed, fallback)


def _frame_rewrite(raw: object) -> FrameRewrite:
    if not isinstance(raw, Mapping):
        raise _damaged(f"frame rewrite {brief(raw)} is not a record")
    leaves, concrete, edits = raw.get("leaves"), raw.get("concrete"), raw.get("edits")
    sequential = raw.get("sequential", False)  # absent from plans written before it
    if not isinstance(leaves, list) or not isinstance(concrete, Mapping) or not (
            isinstance(edits, list)):
        raise _damaged("a frame rewrite lacks its leaves, arguments or edits")
    if not isinstance(sequential, bool):
        raise _damaged(f"a frame rewrite's sequential is {brief(sequential)}, not true or false")
    return FrameRewrite(
        check_path(raw.get("scope"), empty_ok=True),
        tuple(check_path(leaf) for leaf in leaves),
        {check_path(k): _scalar(v, k) for k, v in concrete.items()},
        tuple(_edit(e) for e in edits),
        sequential,
    )
