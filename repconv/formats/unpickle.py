"""Reading a pickled checkpoint without running anything from it: torch's weights-only
allow-list for what is real, an inert placeholder for every other class or function it names.

Ordinary training checkpoints hold objects next to the weights (a yacs ``CfgNode``, an
``argparse.Namespace``, dataclasses, numpy scalars and arrays, enums). torch's weights-only
loader refuses the whole file for them. This unpickler (a ``pickle_module`` for ``torch.load``,
which still loads the tensors) gives each such object back as a `Placeholder` recording its
class name and the data it was pickled with, and the weights beside it are found as in any
state_dict. A pickled ``nn.Module`` comes back as a placeholder too: using it as the
architecture needs the real classes, which only ``--trust-pickle`` imports.

Safety: pickle runs code only through its opcodes that call or import. Each is handled here:
- GLOBAL, STACK_GLOBAL: never import. A name on torch's weights-only allow-list
  (``torch._weights_only_unpickler._get_allowed_globals``: tensor rebuild functions, dtypes,
  ``OrderedDict``, ``set``...) gives torch's own object; any other name gives a fresh placeholder
  class (``os.system``, ``builtins.eval`` and ``getattr`` included).
- REDUCE, NEWOBJ, NEWOBJ_EX: on a placeholder class they make an inert instance holding the
  arguments (no ``__new__``/``__init__`` of anything else runs); on torch's allow-list they do
  what torch's weights-only unpickler does; anything else (a placeholder *instance* a previous
  call returned, a class object) is refused.
- BUILD: a placeholder keeps the state as data; Tensor, Parameter, OrderedDict and allow-listed
  types are built as torch's weights-only unpickler builds them; anything else is refused.
- APPEND(S), SETITEM(S), ADDITEMS: only on lists, dicts, sets and placeholders.
- INST, OBJ (protocols 0-1), EXT1/2/4 (the copyreg registry), NEXT_BUFFER, READONLY_BUFFER:
  refused.
- PERSID, BINPERSID: torch.load's own storage loader.
Placeholder classes define no methods an allow-listed function could reach (calling the class
makes another inert instance; instances are not callable and have fixed slots).
"""

from __future__ import annotations

import _compat_pickle
import pickle
import sys
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, ClassVar

import torch
from torch import _weights_only_unpickler

_REFUSED = ("INST", "OBJ", "EXT1", "EXT2", "EXT4", "NEXT_BUFFER", "READONLY_BUFFER")
# opcodes that call nothing: pushing constants, building tuples, lists, dicts and sets of basic
# values, the memo, framing, and torch's persistent ids
_PLAIN = ("MARK", "STOP", "POP", "POP_MARK", "DUP", "FLOAT", "INT", "BININT", "BININT1",
          "LONG", "BININT2", "NONE", "PERSID", "BINPERSID", "STRING", "BINSTRING",
          "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "DICT", "EMPTY_DICT", "GET", "BINGET",
          "LONG_BINGET", "LIST", "EMPTY_LIST", "PUT", "BINPUT", "LONG_BINPUT", "TUPLE",
          "EMPTY_TUPLE", "BINFLOAT", "PROTO", "TUPLE1", "TUPLE2", "TUPLE3", "NEWTRUE",
          "NEWFALSE", "LONG1", "LONG4", "BINBYTES", "SHORT_BINBYTES", "SHORT_BINUNICODE",
          "BINUNICODE8", "BINBYTES8", "EMPTY_SET", "FROZENSET", "MEMOIZE", "FRAME",
          "BYTEARRAY8")
_DICTS = (dict, OrderedDict, Counter)


class Placeholder:
    """An object of a class repconv does not load, kept as data: the class's name, the
    arguments it was pickled with, its state and its items (a dict or list subclass's)."""

    __slots__ = ("args", "items", "state")
    qualified_name: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        # reached only where an allow-listed torch function calls a class it was given
        return _inert(cls, (*args, *kwargs.items()))

    def __repr__(self) -> str:
        return f"<{type(self).qualified_name} (not loaded)>"


def _inert(cls: type[Placeholder], args: tuple[Any, ...]) -> Placeholder:
    instance = object.__new__(cls)
    instance.args, instance.items, instance.state = args, [], None
    return instance


def _allowed() -> dict[str, Any]:
    """torch's own weights-only allow-list (name -> object)."""
    return _weights_only_unpickler._get_allowed_globals()


def _is_allowed(value: Any) -> bool:
    return any(value is allowed for allowed in _allowed().values())


class Unpickler(pickle._Unpickler):  # the Python implementation: every opcode is visible
    """A pickle reader that imports nothing and calls only torch's allow-list (see module)."""

    dispatch: ClassVar[dict[int, Any]] = {}

    def __init__(self, file: IO[bytes], **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.placeholders: dict[str, type[Placeholder]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # Python 2 names, as pickle maps them
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"[:200]  # names from the file end up in messages
        allowed = _allowed().get(full)
        if allowed is not None:
            return allowed
        if full not in self.placeholders:
            self.placeholders[full] = type("Placeholder", (Placeholder,), {
                "__slots__": (), "qualified_name": full, "__module__": __name__})
        return self.placeholders[full]

    def _global(self) -> None:
        module = self.readline()[:-1].decode("utf-8")
        name = self.readline()[:-1].decode("utf-8")
        self.append(self.find_class(module, name))

    def _stack_global(self) -> None:
        name, module = self.stack.pop(), self.stack.pop()
        if type(name) is not str or type(module) is not str:
            raise pickle.UnpicklingError("STACK_GLOBAL requires str")
        self.append(self.find_class(module, name))

    def _call(self, target: Any, args: Any, kwargs: dict[str, Any], opcode: str) -> Any:
        if type(args) is not tuple or type(kwargs) is not dict:
            raise pickle.UnpicklingError(f"{opcode} needs a tuple of arguments")
        if isinstance(target, type) and issubclass(target, Placeholder):
            return _inert(target, (*args, *kwargs.items()))
        if not _is_allowed(target) or kwargs:
            raise pickle.UnpicklingError(f"{opcode} of {_name(target)} is not allowed")
        if opcode == "REDUCE":
            return target(*args)
        if target is torch.nn.Parameter:
            return torch.nn.Parameter(*args)
        if not isinstance(target, type):
            raise pickle.UnpicklingError(f"NEWOBJ of {_name(target)}, which is not a class")
        return target.__new__(target, *args)

    def _reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args, {}, "REDUCE")

    def _newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._call(cls, args, {}, "NEWOBJ"))

    def _newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._call(cls, args, kwargs, "NEWOBJ_EX"))

    def _build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        kind = type(inst)
        if isinstance(inst, Placeholder):
            inst.state = state
        elif kind is torch.Tensor:
            inst.set_(*state)
        elif kind is torch.nn.Parameter:
            inst.__setstate__(state)
        elif kind is OrderedDict:
            inst.__dict__.update(state)
        elif _is_allowed(kind) and isinstance(kind, type):
            # as torch's weights-only unpickler builds allow-listed types
            if hasattr(inst, "__setstate__"):
                inst.__setstate__(state)
            else:
                slots = None
                if isinstance(state, tuple) and len(state) == 2:
                    state, slots = state
                if state:
                    inst.__dict__.update(state)
                for key, value in (slots or {}).items():
                    setattr(inst, key, value)
        else:
            raise pickle.UnpicklingError(f"BUILD of {_name(inst)} is not allowed")

    def _target(self, allowed: tuple[type, ...], opcode: str) -> Any:
        target = self.stack[-1]
        if type(target) not in allowed and not isinstance(target, Placeholder):
            raise pickle.UnpicklingError(f"{opcode} on {_name(target)} is not allowed")
        return target

    def _append(self) -> None:
        item = self.stack.pop()
        self._add_items(self._target((list,), "APPEND"), [item])

    def _appends(self) -> None:
        items = self.pop_mark()
        self._add_items(self._target((list,), "APPENDS"), items)

    @staticmethod
    def _add_items(target: Any, items: list[Any]) -> None:
        if isinstance(target, Placeholder):
            target.items.extend(items)
        else:
            target.extend(items)

    def _setitem(self) -> None:
        value, key = self.stack.pop(), self.stack.pop()
        self._set_items(self._target(_DICTS, "SETITEM"), [key, value])

    def _setitems(self) -> None:
        items = self.pop_mark()
        self._set_items(self._target(_DICTS, "SETITEMS"), items)

    @staticmethod
    def _set_items(target: Any, items: list[Any]) -> None:
        pairs = list(zip(items[::2], items[1::2]))
        if isinstance(target, Placeholder):
            target.items.extend(pairs)
        else:
            for key, value in pairs:
                target[key] = value

    def _additems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not set:
            raise pickle.UnpicklingError(f"ADDITEMS on {_name(target)} is not allowed")
        target.update(items)

    def _refuse(self) -> None:
        raise pickle.UnpicklingError("the pickle uses an opcode repconv does not read "
                                     "(old protocol, copyreg extension or out-of-band buffer)")


def _opcode(name: str) -> int:
    return getattr(pickle, name)[0]


Unpickler.dispatch = {
    **{_opcode(name): pickle._Unpickler.dispatch[_opcode(name)] for name in _PLAIN},
    **{_opcode(name): Unpickler._refuse for name in _REFUSED},
    _opcode("GLOBAL"): Unpickler._global,
    _opcode("STACK_GLOBAL"): Unpickler._stack_global,
    _opcode("REDUCE"): Unpickler._reduce,
    _opcode("NEWOBJ"): Unpickler._newobj,
    _opcode("NEWOBJ_EX"): Unpickler._newobj_ex,
    _opcode("BUILD"): Unpickler._build,
    _opcode("APPEND"): Unpickler._append,
    _opcode("APPENDS"): Unpickler._appends,
    _opcode("SETITEM"): Unpickler._setitem,
    _opcode("SETITEMS"): Unpickler._setitems,
    _opcode("ADDITEMS"): Unpickler._additems,
}


def load(file: IO[bytes], **kwargs: Any) -> Any:
    """``pickle.load`` with this module's Unpickler (what torch.load's pickle_module offers)."""
    return Unpickler(file, **kwargs).load()


def read_inert(path: Path) -> Any:
    """The object a torch.save zip file holds, every object outside torch's weights-only
    allow-list as a `Placeholder`: nothing imported, constructed or run."""
    with open(path, "rb") as handle:  # one open file: what is checked is what is read
        if not zipfile.is_zipfile(handle):
            raise pickle.UnpicklingError("it is in torch's legacy (pre-1.6) format")
        handle.seek(0)
        with zipfile.ZipFile(handle) as archive:
            if any(n.rpartition("/")[2] == "constants.pkl" for n in archive.namelist()):
                # torch.load hands a TorchScript archive to torch.jit.load
                raise pickle.UnpicklingError("it is a TorchScript archive")
        handle.seek(0)
        return torch.load(handle, map_location="cpu", weights_only=False,
                          pickle_module=sys.modules[__name__])


def _name(value: Any) -> str:
    if isinstance(value, Placeholder):
        return f"an instance of {type(value).qualified_name}"
    if isinstance(value, type) and issubclass(value, Placeholder):
        return value.qualified_name
    return type(value).__name__ if not isinstance(value, type) else value.__qualname__


# ------------------------------------------------------------------ reading what came back


def is_pickled_module(value: Any) -> bool:
    """Whether ``value`` is the placeholder of a pickled ``nn.Module``: its state is a module's
    ``__dict__`` (parameters, buffers, submodules)."""
    state = value.state if isinstance(value, Placeholder) else None
    return isinstance(state, dict) and {"_parameters", "_buffers", "_modules"} <= state.keys()


def placeholders(tree: Any, limit: int = 10_000) -> Iterator[tuple[str, Placeholder]]:
    """Every placeholder in ``tree`` (containers and placeholders' own data walked, each object
    once), with the path it was found at (``['ema']``, ``['args'].state``...)."""
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("", tree)]
    while stack and len(seen) < limit:
        path, value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        children: list[tuple[str, Any]] = []
        if isinstance(value, Placeholder):
            yield path, value
            children = [(f"{path}.args", value.args), (f"{path}.items", value.items),
                        (f"{path}.state", value.state)]
        elif isinstance(value, dict):
            children = [(f"{path}[{k!r}]", v) for k, v in value.items()]
        elif isinstance(value, (list, tuple, set, frozenset)):
            children = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        stack.extend(reversed(children))


def module_state_dict(module: Placeholder, limit: int = 1_000_000) -> dict[str, torch.Tensor]:
    """The state_dict a pickled module's placeholder holds: its parameters and persistent
    buffers, and its submodules' (placeholders too), by dotted name."""
    found: dict[str, torch.Tensor] = {}
    stack: list[tuple[str, Any]] = [("", module)]
    seen: set[int] = set()
    while stack and len(found) < limit:
        prefix, node = stack.pop()
        if not is_pickled_module(node) or id(node) in seen:
            continue
        seen.add(id(node))
        state = node.state
        transient = state.get("_non_persistent_buffers_set")
        transient = transient if isinstance(transient, set) else set()
        for key in ("_parameters", "_buffers"):
            for name, tensor in _entries(state.get(key)):
                if isinstance(tensor, torch.Tensor) and name not in transient:
                    found[f"{prefix}{name}"] = tensor
        stack.extend((f"{prefix}{name}.", child) for name, child in _entries(state["_modules"]))
    return found


def _entries(value: Any) -> list[tuple[str, Any]]:
    """A module's dict of parameters, buffers or children (data from the file: checked)."""
    if not isinstance(value, dict):
        return []
    return [(name, item) for name, item in value.items() if isinstance(name, str)]
