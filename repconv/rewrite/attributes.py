"""A module's plain attributes (a detector's ``m.f``, ``m.i``), which a rewrite carries to
whatever takes the module's place, since a parent's forward may read them."""

from __future__ import annotations

from typing import Any

from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY


def own_attributes(module: nn.Module) -> dict[str, Any]:
    """The plain attributes a module's class or its builder set (``legacy``, a detector's
    ``f`` and ``i``), which a parent's forward may read."""
    return {name: value for name, value in vars(module).items()
            if not name.startswith("_") and name != "training"}


def carry_attributes(old: nn.Module, new: nn.Module) -> None:
    """A fused layer that replaces a whole module keeps that module's plain attributes (those
    the layer does not have itself), so a parent routing through ``child.f`` still runs."""
    for name, value in own_attributes(old).items():
        if not hasattr(new, name):
            setattr(new, name, value)


class RewrittenModule(fx.GraphModule):
    """The class under each GraphModule repconv puts in a module's place. torch's
    ``copy.deepcopy`` makes a GraphModule's class anew under the first class of its own in its
    hierarchy: this one, so its pickling (`_reduce_keeping_meta`) survives the copy a framework
    makes before it saves (an EMA)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _reduce_keeping_meta(self)


def carry_into_graph_module(old: nn.Module, gm: fx.GraphModule) -> None:
    """A GraphModule in ``old``'s place keeps its plain attributes (instance attributes
    shadow class ones: a detector's ``m.type`` shadows Module.type), also through
    ``copy.deepcopy``, which copies a fixed list of attributes and then those torch's own key in
    ``meta`` names, and through pickling, whose rebuild starts from a fresh ``meta``. It is
    called like any module: fx wraps each call in two more Python frames for its error
    messages, which a small deploy model pays on every forward (2-3% of a DBB ResNet-18's)."""
    own = vars(gm)
    carried = {key: value for key, value in own_attributes(old).items() if key not in own}
    for key, value in carried.items():
        setattr(gm, key, value)
    if not isinstance(gm, RewrittenModule):  # fx made it: its class goes under RewrittenModule
        gm.__class__ = type(type(gm).__name__, (RewrittenModule,),
                            {"forward": type(gm).forward})
    type(gm).__call__ = nn.Module.__call__
    # what fx's own __call__ calls, restored by deepcopy and unpickling (which make that again)
    gm._wrapped_call = nn.Module.__call__
    gm.meta[_USER_PRESERVED_ATTRIBUTES_KEY] = {**carried, "_wrapped_call": nn.Module.__call__}


def _preserved(gm: fx.GraphModule) -> dict[str, Any]:
    """The attributes ``gm``'s ``meta`` names to keep, with their current values."""
    return {key: vars(gm)[key] for key in gm.meta.get(_USER_PRESERVED_ATTRIBUTES_KEY, {})
            if key in vars(gm)}


def carried_attributes(gm: fx.GraphModule) -> dict[str, Any]:
    """The plain attributes `carry_into_graph_module` gave ``gm`` from the module it replaced
    (not the call it keeps)."""
    return {key: value for key, value in _preserved(gm).items() if not key.startswith("_")}


def _reduce_keeping_meta(gm: fx.GraphModule) -> tuple[Any, ...]:
    """torch's own pickling of a GraphModule, plus its ``meta`` and the attributes it names
    (values current at pickling), set on load by nn.Module.__setstate__: torch's rebuild skips
    names the class has. Torch alone unpickles it."""
    rebuild, args = fx.GraphModule.__reduce__(gm)
    return rebuild, args, preserved_state(gm)


def preserved_state(gm: fx.GraphModule) -> dict[str, Any]:
    """What a pickled GraphModule sets on load beside its graph: its ``meta`` and the carried
    attributes it names."""
    preserved = _preserved(gm)
    return {**preserved, "meta": {**gm.meta, _USER_PRESERVED_ATTRIBUTES_KEY: preserved}}
