"""A module's plain attributes (a detector's ``m.f``, ``m.i``), which a rewrite carries to
whatever takes the module's place, since a parent's forward may read them."""

from __future__ import annotations

from typing import Any

from torch import nn


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
