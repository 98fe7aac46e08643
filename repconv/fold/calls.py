"""Running a model on real inputs: in eval mode, on a copy sharing its tensors, and recording
how each submodule is called (how often, with which held arguments, and, when asked, its
first inputs and output)."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map

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


# The layers whose outputs a faithfulness run takes from the eager forward instead of computing
# them again: the ones that cost (a BatchNorm or an activation costs little to run again).
_RECALLED = (nn.modules.conv._ConvNd, nn.Linear)


def _autocast_state() -> tuple[tuple[bool, torch.dtype], ...]:
    """Whether autocast is on, and to which dtype, per device type: fx does not record an
    autocast context, so a layer may run in another dtype in the graph than in the eager
    forward on the same arguments."""
    return tuple((torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
                 for device in ("cpu", "cuda"))


def _versions(module: nn.Module) -> tuple[int, ...] | None:
    """The version counters of the layer's own tensors (None: one has none, an inference
    tensor)."""
    try:
        return tuple(t._version for t in (*module.parameters(), *module.buffers()))
    except RuntimeError:
        return None


@dataclass
class _LayerCall:
    """One eager call of a layer: private copies of its arguments as given (before any
    pre-hook) and of its output (after every hook), the autocast state and its own tensors'
    versions then."""

    module: nn.Module
    spec: TreeSpec
    leaves: list[Any]
    autocast: tuple[tuple[bool, torch.dtype], ...]
    versions: tuple[int, ...] | None
    output: Tensor | None = None

    def returns_for(self, args: tuple, kwargs: dict) -> Tensor | None:
        """The recorded output, taken (each call's once), when the layer is called with
        exactly the recorded arguments (tensors of the same dtype, shape, strides and values),
        under the same autocast state, its own tensors unchanged since."""
        if (self.output is None or self.versions is None
                or _versions(self.module) != self.versions or _autocast_state() != self.autocast):
            return None
        leaves, spec = tree_flatten((args, dict(kwargs)))  # fx gives an immutable_dict
        if spec != self.spec or len(leaves) != len(self.leaves):
            return None
        for given, recorded in zip(leaves, self.leaves):
            if isinstance(given, Tensor) != isinstance(recorded, Tensor):
                return None
            if not isinstance(given, Tensor):
                if type(given) is not type(recorded) or not _equal(given, recorded):
                    return None
            elif (given.dtype != recorded.dtype or given.shape != recorded.shape
                  or given.stride() != recorded.stride() or given.device != recorded.device
                  or not torch.equal(given, recorded)):
                return None
        output, self.output = self.output, None  # the graph's now: what it does in place stays
        return output


def _equal(a: object, b: object) -> bool:
    try:
        return bool(a == b)
    except Exception:  # an argument of a user's type may compare in any way
        return False


def _private(value: Any) -> Any:
    """A copy no later code of the forward can change, in place or through ``.data``."""
    return value.clone(memory_format=torch.preserve_format) if isinstance(value, Tensor) else value


# a module call's output taken from a run that already made it (`CallMemo.recall`), by the
# call's target and arguments; None: run it
Recall = Callable[[str, tuple, dict], Tensor | None]


class CallMemo:
    """The convs' and linear layers' calls in one eager forward, by path, in order. A traced
    graph run to prove it faithful (`repconv.fold.capture`) takes a layer's recorded output where
    it calls the layer exactly as the eager forward did (the same arguments, the same autocast
    state, the layer's own tensors not changed in place since), instead of running it again:
    the proof then costs the graph's own ops, not a second forward. The arguments and output
    are copied as the call is made, so what the forward does to its tensors afterwards cannot
    make a call look alike. A layer's own tensors changed through ``.data`` (which counts no
    version) are not seen; any other call runs."""

    def __init__(self) -> None:
        self.calls: dict[str, list[_LayerCall]] = defaultdict(list)

    def hooks(self, path: str, module: nn.Module) -> list[Any]:
        if not isinstance(module, _RECALLED):
            return []

        def before(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            leaves, spec = tree_flatten((args, dict(kwargs)))
            self.calls[path].append(_LayerCall(module, spec, [_private(v) for v in leaves],
                                               _autocast_state(), _versions(module)))

        def after(_m: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> None:
            if self.calls[path] and isinstance(output, Tensor):
                self.calls[path][-1].output = _private(output)

        return [module.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
                module.register_forward_hook(after, with_kwargs=True)]

    def recall(self, scope: str) -> Recall:
        """For one run of the graph of the module at ``scope``: a call's recorded output, by
        the graph's module target, its arguments and the call's rank among that target's
        calls."""
        seen: dict[str, int] = defaultdict(int)

        def recalled(target: str, args: tuple, kwargs: dict) -> Tensor | None:
            path = f"{scope}.{target}" if scope else target
            rank = seen[path]
            seen[path] += 1
            calls = self.calls.get(path, [])
            return calls[rank].returns_for(args, kwargs) if rank < len(calls) else None

        return recalled

    def clear(self) -> None:
        """Let the recorded activations go."""
        self.calls.clear()


def record_calls(
    model: nn.Module, inputs: tuple[Tensor, ...], keep_tensors: bool,
    memo: CallMemo | None = None,
) -> tuple[dict[str, CallRecord], object]:
    """Every submodule's calls in one forward of ``model`` on ``inputs``, by qualified name
    (with ``keep_tensors``, each one's first arguments and output too), and the model's
    output; ``memo`` records the layers' calls."""
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
        if memo is not None:
            handles += memo.hooks(name, child)
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


def forward_signature(module: nn.Module) -> inspect.Signature:
    """``inspect.signature(module.forward)``, read once per forward function: a model's many
    modules of one class share it."""
    forward = module.forward
    function = getattr(forward, "__func__", None)
    if function is None or getattr(forward, "__self__", None) is not module:
        return inspect.signature(forward)
    return _method_signature(function)


@functools.cache
def _method_signature(function: Callable[..., Any]) -> inspect.Signature:
    """The signature of ``function`` bound to an instance: without its first parameter (as
    inspect does, which keeps a leading ``*args``)."""
    signature = inspect.signature(function)
    parameters = list(signature.parameters.values())
    if parameters and parameters[0].kind is not inspect.Parameter.VAR_POSITIONAL:
        parameters = parameters[1:]
    return signature.replace(parameters=parameters)


def bind_call(module: nn.Module, args: tuple, kwargs: dict) -> BoundCall | None:
    """None when ``forward`` takes ``*args``/``**kwargs`` (fx cannot hold those fixed)."""
    signature = forward_signature(module)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        return None if kwargs or len(args) != 1 else BoundCall({}, args)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    concrete = {k: v for k, v in bound.arguments.items() if not holds_tensor(v)}
    return BoundCall(concrete, tuple(bound.arguments.values()))
