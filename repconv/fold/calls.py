"""Running a model on real inputs: in eval mode, on a copy sharing its tensors, and recording
how each submodule is called (how often, with which held arguments, and, when asked, its
first inputs and output)."""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from repconv.errors import TraceError, brief, one_line


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Run models in eval mode, then restore every submodule's own training flag."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    for module, _ in saved:  # flags, not .eval(): torch.export modules refuse eval()
        module.training = False
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


def copy_sharing_tensors(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``'s modules that shares every tensor with it (parameters, buffers
    and tensors kept as plain attributes: legacy weight_norm's computed ``weight`` cannot be
    deep-copied, and its pre-hook computes the copy's own at each call). State a forward
    caches on its modules then goes to the copy."""
    tensors = [*model.parameters(), *model.buffers(),
               *(v for m in model.modules() for v in vars(m).values() if isinstance(v, Tensor))]
    return copy.deepcopy(model, memo={id(t): t for t in tensors})


def copies(values: Any) -> Any:
    """Every tensor cloned: a forward may change its input in place."""
    return tree_map(lambda v: v.clone() if isinstance(v, Tensor) else v, values)


def run_model(module: nn.Module, example_inputs: tuple[Any, ...]) -> object:
    """Call ``module`` on the example input; a failure (wrong shape, say) is a TraceError that
    names the model's own complaint."""
    try:
        with torch.no_grad():
            return module(*example_inputs)
    except Exception as exc:  # the model's own code failed on the example input
        shapes = [list(x.shape) for x in tree_flatten(example_inputs)[0]
                  if isinstance(x, Tensor)]
        raise TraceError(f"the model fails on an input of shape {brief(shapes, 120)}: "
                         f"{one_line(exc, 300, last=True)}; check the example input "
                         "(--input-shape, --inputs)") from exc


@dataclass
class CallRecord:
    """How a module was called in one eager forward: how often, its first arguments (tensors
    kept only when asked), and each call's non-tensor arguments."""

    count: int = 0
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: Any = None
    flags: list[str] = field(default_factory=list)
    # every call passed exactly one argument, a tensor: what a conv or nn.Identity put in the
    # module's place can take
    single_tensor: bool = True
    # the first call's non-tensor arguments by parameter name (None: forward takes *args), what
    # a trace of the module's forward holds fixed
    constants: dict[str, Any] | None = None


def _clone(value: Any) -> Any:
    return value.clone() if isinstance(value, Tensor) else value


def holds_tensor(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(holds_tensor(v) for v in value.values())
    return False


def record_calls(
    model: nn.Module, inputs: tuple[Tensor, ...], keep_tensors: bool
) -> tuple[dict[str, CallRecord], object]:
    """Every submodule's calls in one forward of ``model`` on ``inputs``, by qualified name
    (with ``keep_tensors``, each one's first arguments and output too), and the model's
    output."""
    records: dict[str, CallRecord] = {}
    handles = []

    def keep_output(module: nn.Module, _args: tuple, output: Any, name: str) -> None:
        if records[name].count == 1 and records[name].output is None:
            records[name].output = tree_map(_clone, output)
    for name, child in model.named_modules():
        if not name:
            continue

        def hook(_m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            record = records.setdefault(name, CallRecord())
            record.count += 1
            flags = {k: v for k, v in kwargs.items() if not holds_tensor(v)}
            positional = [v if not holds_tensor(v) else "<tensor>" for v in args]
            record.flags.append(repr((positional, sorted(flags.items()))))
            record.single_tensor &= not kwargs and len(args) == 1 and isinstance(args[0], Tensor)
            if record.count == 1:
                bound = bind_call(_m, args, kwargs)
                record.constants = None if bound is None else bound.concrete
            if record.count == 1 and keep_tensors:
                # copies: a forward may change its input (a list of tensors, say) in place later
                record.args, record.kwargs = tree_map(_clone, (args, dict(kwargs)))

        handles.append(child.register_forward_pre_hook(hook, with_kwargs=True))
        if keep_tensors:
            handles.append(child.register_forward_hook(
                lambda m, a, o, name=name: keep_output(m, a, o, name)))
    try:
        output = run_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return records, output


@dataclass(frozen=True)
class BoundCall:
    """A call bound to ``forward``'s parameters: the non-tensor ones to hold at their values
    while tracing, and every argument in parameter order (how a traced module is called)."""

    concrete: dict[str, Any]
    positional: tuple[Any, ...]


def bind_call(module: nn.Module, args: tuple, kwargs: dict) -> BoundCall | None:
    """None when ``forward`` takes ``*args``/``**kwargs`` (fx cannot hold those fixed)."""
    signature = inspect.signature(module.forward)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        return None if kwargs or len(args) != 1 else BoundCall({}, args)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    concrete = {k: v for k, v in bound.arguments.items() if not holds_tensor(v)}
    return BoundCall(concrete, tuple(bound.arguments.values()))
