"""Building the model a checkpoint's weights go into: ``--model package.module:callable``
(imported from the current folder too), or an architecture the file records, then filled with
the weights without paying for nn.init's random fills."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from repconv.errors import ModelBuildError
from repconv.formats.lazy_init import random_init_skipped
from repconv.formats.state_dict import load_weights
from repconv.rewrite.surgery import replay_plan


@dataclass(frozen=True)
class Architecture:
    """How to build the model: ``reference`` is "module:callable", called with ``kwargs``."""

    reference: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        return build_model(self.reference, self.kwargs)


@contextmanager
def _cwd_on_path() -> Iterator[None]:
    """Let --model name a module in the directory the user runs repconv from."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            sys.path.remove(cwd)


def build_model(reference: str, kwargs: Mapping[str, Any]) -> nn.Module:
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise ModelBuildError(f"--model {reference!r} must look like package.module:callable")
    try:
        with _cwd_on_path():
            target: Any = importlib.import_module(module_name)
    except Exception as exc:  # importing runs the user's module: report any failure
        raise ModelBuildError(f"cannot import {module_name!r} for --model: "
                              f"{type(exc).__name__}: {exc}; check the module path") from exc
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ModelBuildError(f"{module_name!r} has no attribute {part!r} (from --model "
                                  f"{reference!r})")
        target = getattr(target, part)
    if not callable(target):
        raise ModelBuildError(f"--model {reference!r} is not callable")
    try:
        model = target(**kwargs)
    except Exception as exc:  # the user's constructor failed
        raise ModelBuildError(f"{reference}(**{dict(kwargs)}) failed: {type(exc).__name__}: "
                              f"{exc}; check --model-kwargs") from exc
    if not isinstance(model, nn.Module):
        raise ModelBuildError(f"{reference} returned {type(model).__name__}, not a torch "
                              "nn.Module")
    return model


def build_and_load(architecture: Architecture, weights: Mapping[str, Tensor],
                    deploy_plan: list[dict[str, Any]] | None, found: list[str]) -> nn.Module:
    """The model with the checkpoint's weights, built without nn.init's random fills (the
    weights overwrite them); built again the ordinary way should a tensor they were to fill be
    left in the model, so the result is always what a plain build and load gives."""
    for skip in (True, False):
        with random_init_skipped(enabled=skip) as left_unfilled:
            model = architecture.build()
        if deploy_plan is not None:
            model = replay_plan(model, deploy_plan, dict(weights))
        load_weights(model, weights, found if skip else [])
        if not left_unfilled(model):
            break
    return model
