"""Tracing a module into a torch.fx graph with shapes, and reading constants out of it."""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import types
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from torch.utils._pytree import tree_flatten

from repconv.errors import TraceError, one_line
from repconv.fold.calls import Recall, holds_tensor

# Modules whose own forward repconv understands. A subclass that keeps the inherited forward is a
# leaf like its base; one that overrides forward (a fused BatchNorm+activation, say) is traced
# through, and its F.batch_norm / F.conv2d calls are recognised as functional ops.
UNDERSTOOD_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.Linear,
)


def runs_identity(module: nn.Module) -> bool:
    """Its instance-level ``forward`` is a plain ``nn.Identity`` or its bound forward (the
    BatchNorm slot left in place of a folded one, `repconv.fold.slot`): calling it returns its
    input exactly."""
    forward = vars(module).get("forward")
    if isinstance(forward, types.MethodType) and forward.__func__ is nn.Identity.forward:
        forward = forward.__self__
    return (isinstance(forward, nn.Identity) and type(forward).forward is nn.Identity.forward
            and eager_differs(forward) is None)


def _callable_name(value: object) -> str:
    return getattr(value, "__qualname__", None) or type(value).__qualname__


def eager_differs(module: nn.Module) -> str | None:
    """Why calling ``module`` runs more or other code than its class's ``forward`` (forward
    hooks or pre-hooks, its own or global ones, a ``forward`` or ``__call__`` of its own), or
    None. Tracing reads only the class's ``forward``: such a module is never folded through,
    since its fused form would drop what else runs. An instance ``forward`` that is an
    ``nn.Identity`` (`runs_identity`) does not differ: it is exactly the identity."""
    pre = [*module._forward_pre_hooks.values(), *_global_hooks("pre")]
    post = [*module._forward_hooks.values(), *_global_hooks("post")]
    if pre or post:
        kind = "forward pre-hook" if pre else "forward hook"
        return (f"has a {kind} ({_callable_name((pre or post)[0])}), which its folded form "
                "would not run")
    forward = vars(module).get("forward")
    if forward is not None and not runs_identity(module):
        return (f"its forward is replaced on the instance ({_callable_name(forward)}); folding "
                "reads its class's forward")
    # a GraphModule's generated class calls its forward through fx's own __call__
    if type(module).__call__ is not nn.Module.__call__ and not isinstance(module, fx.GraphModule):
        return f"its class {type(module).__name__} defines its own __call__"
    return None


def _global_hooks(kind: str) -> list[object]:
    """Hooks registered with ``torch.nn.modules.module.register_module_forward_(pre_)hook``:
    they run around every module's call."""
    hooks = _global_forward_pre_hooks if kind == "pre" else _global_forward_hooks
    return list(hooks.values())


def _keeps_inherited_forward(module: nn.Module) -> bool:
    return any(
        isinstance(module, base) and type(module).forward is base.forward
        for base in UNDERSTOOD_MODULES
    )


class Tracer(fx.Tracer):
    """torch.fx's tracer with repconv's leaves (``leaves`` by path, and the modules whose own
    forward repconv understands), modules named by the path they are called through (a module
    shared by several parents, like a detector's one activation, is named where each call
    runs), and the module whose forward stopped a trace remembered in ``failed_in``."""

    def __init__(self, leaves: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.leaves = leaves
        self.tensor_names: dict[int, str] = {}
        self.failed_in = ""
        # each module's first call: its arguments as graph values (a list of tensors stays a
        # list of nodes), so a module's own trace can be matched to this one by structure
        self.module_calls: dict[str, tuple[Any, Any]] = {}

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        if isinstance(root, nn.Module):
            # fx finds a parameter's name by scanning every parameter on each access: one
            # index instead keeps tracing linear in the model's size
            named = [*root.named_parameters(), *root.named_buffers()]
            self.tensor_names = {id(t): n for n, t in reversed(named)}
        return super().trace(root, concrete_args)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if not isinstance(attr_val, Tensor):
            return attr_val
        name = self.tensor_names.get(id(attr_val))
        if name is None:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaves or runs_identity(m) or eager_differs(m):
            return True  # kept as a call: what runs is not the class's forward
        if isinstance(m, UNDERSTOOD_MODULES):
            return _keeps_inherited_forward(m)
        return super().is_leaf_module(m, module_qualified_name)

    def path_of_module(self, mod: nn.Module) -> str:
        caller = self.scope.module_path
        owner = self._module_at(caller) if caller else None
        if owner is not None:
            for name, child in owner.named_modules(remove_duplicate=False):
                if child is mod and name:
                    return f"{caller}.{name}"
        return super().path_of_module(mod)

    def _module_at(self, path: str) -> nn.Module | None:
        try:
            return self.root.get_submodule(path)
        except AttributeError:
            return None

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        path = self.path_of_module(m)
        if path not in self.module_calls and not holds_tensor((args, kwargs)):
            # an argument fx cannot hold: the frame's inputs are then matched by order
            with contextlib.suppress(NotImplementedError):
                self.module_calls[path] = (self.create_arg(args), self.create_arg(kwargs))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if not self.failed_in:
                self.failed_in = self.path_of_module(m)
            raise


def graph_module(module: nn.Module, graph: fx.Graph, tracer: Tracer | None = None,
                 ) -> fx.GraphModule:
    """``graph`` of ``module``'s forward as a GraphModule under the module's class name, in a
    form that pickles with torch alone (with ``tracer``'s record of module calls in its
    ``meta["module_calls"]``)."""
    # a fused model unpickles with torch alone: fx re-traces it with its own tracer
    graph._tracer_cls = None
    for node in graph.nodes:
        if isinstance(node.type, str):
            # `from __future__ import annotations` leaves types as strings, which pickling
            # the GraphModule cannot handle; the type is only a code-generation hint.
            node.type = None
    _keep_parameter_names(module, graph)
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    if tracer is not None:
        gm.meta["module_calls"] = tracer.module_calls
    return gm


def _keep_parameter_names(module: nn.Module, graph: fx.Graph) -> None:
    """fx names the placeholder of an argument held fixed ``flag_1``: the forward it generates
    would refuse ``flag=`` by keyword. Each placeholder takes its parameter's name back."""
    try:
        names = set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):  # a forward without a signature: nothing to keep
        return
    taken = {str(n.target) for n in graph.nodes if n.op == "placeholder"}
    for node in graph.nodes:
        target = str(node.target)
        base = target.rsplit("_", 1)[0]
        if (node.op == "placeholder" and target not in names and base in names
                and base not in taken and target.rsplit("_", 1)[-1].isdigit()):
            node.target = base
            node._rename(base)
            taken.add(base)


def trace(
    module: nn.Module,
    leaves: frozenset[str] = frozenset(),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Symbolically trace ``module``, keeping the submodules named in ``leaves`` as calls and
    holding ``concrete_args`` (non-tensor arguments) at the given values; TraceError says why
    it does not trace (and in which module)."""
    tracer = Tracer(leaves)
    try:
        with warnings.catch_warnings():  # fx's advice on held arguments: the report says it
            warnings.simplefilter("ignore", UserWarning)
            graph = tracer.trace(module, concrete_args=concrete_args or None)
    except Exception as exc:  # tracing runs user code: any failure means "does not trace"
        raise TraceError(f"{type(exc).__name__}: {one_line(exc, 300)}"[:300],
                         failed_in=tracer.failed_in) from exc
    return graph_module(module, graph, tracer)


class _ShapeRecorder(fx.Interpreter):
    """torch.fx's ShapeProp without its fake-tensor and memory-format queries, whose first use
    imports sympy (0.4 s of every conversion): each node's tensors' shape and dtype go to
    ``node.meta["tensor_meta"]``. A module call ``recall`` answers is not run again."""

    def __init__(self, gm: fx.GraphModule, recall: Recall | None) -> None:
        super().__init__(gm)
        self.recall = recall

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        found = None if self.recall is None else self.recall(str(target), args, kwargs)
        return super().call_module(target, args, kwargs) if found is None else found

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        tensors = [t for t in tree_flatten(result)[0] if isinstance(t, Tensor)]
        if tensors:
            n.meta["tensor_meta"] = map_aggregate(
                result, lambda v: _tensor_metadata(v) if isinstance(v, Tensor) else v)
        n.meta["type"] = type(result)
        return result


def _tensor_metadata(tensor: Tensor) -> TensorMetadata:
    formats = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)
    layout = next((f for f in formats if not tensor.is_sparse and tensor.is_contiguous(
        memory_format=f)), None)
    return _extract_tensor_metadata(tensor, include_contiguity=False)._replace(
        memory_format=layout)


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple[Any, ...],
                     recall: Recall | None = None) -> object:
    """Run ``gm`` once, recording each node's output shape and dtype in ``node.meta``; returns
    its output. ``recall`` gives the outputs of module calls already made on the same
    arguments."""
    try:
        with torch.no_grad():
            return _ShapeRecorder(gm, recall).run(*example_inputs)
    except Exception as exc:  # the traced code failed on the example input
        reason = one_line(exc.__cause__ or exc, 300, last=True)
        raise TraceError(f"the traced forward fails on the example input: {reason}") from exc


def _positional_inplace(node: fx.Node) -> bool:
    """``F.relu(x, True)``: an ``inplace`` parameter given by position."""
    target = node.target
    # a bound method's function is looked up, not the method: the cache keeps no instance
    function = getattr(target, "__func__", target)
    bound = function is not target
    try:
        index = _inplace_position(function)
    except TypeError:  # an unhashable callable: its signature is read each time
        index = _inplace_position.__wrapped__(function)
    if index is None or index < bound:
        return False
    index -= bound  # the instance is not among the node's arguments
    return len(node.args) > index and node.args[index] is True


@functools.lru_cache(maxsize=1024)  # every call of F.relu, operator.add, ... in every trace
def _inplace_position(function: object) -> int | None:
    """Where ``function`` takes an ``inplace`` parameter by position; None where it takes
    none."""
    try:
        params = list(inspect.signature(function).parameters)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # builtins without a signature take no inplace flag
        return None
    return params.index("inplace") if "inplace" in params else None


# Ops whose result may share storage with their first argument (views, and reshapes that
# may be views): a change made in place through the result changes that argument too.
_ALIASING = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "narrow", "select",
    "getitem", "__getitem__", "transpose", "permute", "t", "unsqueeze", "squeeze", "expand",
    "expand_as", "as_strided", "movedim", "moveaxis", "swapaxes", "swapdims", "unfold",
    "diagonal", "split", "split_with_sizes", "tensor_split", "chunk", "unbind", "detach",
    "contiguous", "view_as_real", "view_as_complex", "real", "imag",
})
_ALIASING_ATTRIBUTES = frozenset({"T", "mT", "H", "mH", "data", "real", "imag"})


def _changes_first_argument(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (node.kwargs.get("inplace") is True or _positional_inplace(node)
                or node.target is operator.setitem
                or (name.endswith("_") and not name.endswith("__")))
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    return False


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _ALIASING_ATTRIBUTES
    if node.op == "call_method":
        return str(node.target) in _ALIASING
    return node.op == "call_function" and getattr(node.target, "__name__", "") in _ALIASING


def alias_base(node: fx.Node, gm: fx.GraphModule) -> fx.Node:
    """The value whose storage ``node`` may share: back through views (``x[:, :2]``,
    ``x.view(...)``, ``x.narrow(...)``) and in-place ops (which return their input) to the
    first value that is none of those."""
    while node.args and isinstance(node.args[0], fx.Node) and (
            _is_view(node) or _changes_first_argument(node, gm)):
        node = node.args[0]
    return node


def mutated_input(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The value whose tensor ``node`` changes in place (``x.add_(y)``, ``F.relu(x, inplace=True)``,
    ``x[i] = v``, ``nn.ReLU(inplace=True)``), or None. A change through a view or alias
    (``x[:, :2].clamp_()``) is a change of the value it views (`alias_base`). fx records such
    ops as ordinary nodes, so their effect on later readers is invisible to the graph's data
    flow."""
    target = node.args[0] if node.args else None
    if not isinstance(target, fx.Node) or not _changes_first_argument(node, gm):
        return None
    return alias_base(target, gm)


def erase_dead_code(gm: fx.GraphModule) -> None:
    """Erase nodes nobody uses, except those that change a tensor in place (fx's own dead-code
    elimination counts ``x.sub_(m)`` as pure and would drop it)."""
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("placeholder", "output") or node.users:
            continue
        if node.is_impure() or mutated_input(node, gm) is not None:
            continue
        gm.graph.erase_node(node)


# Reads of a tensor's metadata, not its values. Within a linear region every value has the same
# rank, dtype and device; its shape may differ (padding, strides), so shape reads are kept apart.
_RANK_ATTRIBUTES = frozenset({"ndim", "dtype", "device", "is_cuda", "layout"})
_RANK_METHODS = frozenset({"dim", "ndimension", "is_floating_point", "get_device"})
_SHAPE_ATTRIBUTES = frozenset({"shape"})
_SHAPE_METHODS = frozenset({"size", "numel"})


def metadata_read(node: fx.Node) -> str | None:
    """"rank" or "shape" when ``node`` reads only the metadata of its first argument (so it is
    not a data user of it), else None."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        attribute = node.args[1]
        if attribute in _RANK_ATTRIBUTES:
            return "rank"
        return "shape" if attribute in _SHAPE_ATTRIBUTES else None
    if node.op == "call_method":
        if node.target in _RANK_METHODS:
            return "rank"
        return "shape" if node.target in _SHAPE_METHODS else None
    if node.op == "call_function" and node.target in (torch.numel, torch.Tensor.dim):
        return "shape"
    return None


def data_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values (metadata reads excluded)."""
    return [user for user in node.users
            if not (metadata_read(user) and user.args and user.args[0] is node)]


def tensor_shape(node: fx.Node) -> torch.Size | None:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None)


def tensor_dtype(node: fx.Node) -> torch.dtype | None:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "dtype", None)


_RANDOM_OPS = frozenset({
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm",
    "bernoulli", "multinomial", "normal", "poisson", "empty", "empty_like", "uniform_",
    "normal_", "random_", "bernoulli_", "exponential_", "cauchy_", "geometric_", "log_normal_",
})


@dataclass
class GraphContext:
    """What rules may read about a traced graph. Reading never mutates the graph."""

    module: fx.GraphModule
    unshare: bool = True  # a layer called at several sites may fold into a copy per site
    _constants: dict[fx.Node, Any] = field(default_factory=dict)
    call_sites: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        for node in self.module.graph.nodes:
            if node.op in ("call_module", "get_attr"):
                self.call_sites[node.target] += 1

    def uses(self, target: str) -> int:
        """How many nodes call or read ``target`` or anything inside it (``conv`` and
        ``conv.weight`` are both uses of the conv)."""
        prefix = target + "."
        return sum(n for name, n in self.call_sites.items()
                   if name == target or name.startswith(prefix))

    def submodule(self, node: fx.Node) -> nn.Module:
        """The module a call_module node runs: an ``nn.Identity`` set as its instance forward
        (`runs_identity`) stands for it."""
        module = self.module.get_submodule(node.target)
        return vars(module)["forward"] if runs_identity(module) else module

    def constant(self, value: Any) -> Any:
        """The value of ``value`` if it depends on no input (a get_attr, a literal, or ops on
        those); None when it depends on an input."""
        if not isinstance(value, fx.Node):
            if isinstance(value, (list, tuple)):
                items = [self.constant(v) for v in value]
                return None if any(i is None for i in items) else type(value)(items)
            return value
        if value in self._constants:
            return self._constants[value]
        result = self._evaluate(value)
        self._constants[value] = result
        return result

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            owner, _, name = node.target.rpartition(".")
            return getattr(self.module.get_submodule(owner), name)
        if node.op not in ("call_function", "call_method"):
            return None
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if name in _RANDOM_OPS:
            return None  # a fresh value on every call: not a constant to fold

        args = [self.constant(a) for a in node.args]
        kwargs = {k: self.constant(v) for k, v in node.kwargs.items()}
        if any(a is None for a in args) or any(v is None for v in kwargs.values()):
            return None
        with torch.no_grad():
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            return getattr(args[0], node.target)(*args[1:], **kwargs)

    def is_constant(self, value: Any) -> bool:
        return self.constant(value) is not None

    def is_tensor_input(self, value: Any) -> bool:
        """An fx node whose value is a tensor that depends on the graph's input."""
        return (
            isinstance(value, fx.Node)
            and tensor_shape(value) is not None
            and not self.is_constant(value)
        )


