"""Validation of the small values users and files give repconv: shapes, kwargs, seeds and the
deploy-format version. Files are untrusted (docs/design.md "7. Trust"): a recorded value is
checked as strictly as the option that would give it, and a bad one is an InputError, never a
traceback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from repconv.errors import InputError, brief
from repconv.rewrite.plan import PLAN_VERSION, READABLE_PLAN_VERSIONS

DEPLOY_MARKER = "repconv_deploy"
DEPLOY_VERSION = PLAN_VERSION  # the deploy record is the plan: one version for both
# Verification inputs are random tensors held in memory several times over (input, copies for
# each model, activations): cap them where a typo cannot take the machine down.
MAX_INPUT_ELEMENTS = 100_000_000
MAX_INPUT_DIMS = 8
MAX_LISTED_SHAPES = 32  # --shapes entries: each is a verification run
# How deep lists and dicts from a file may nest: optimizer states and configs nest a few
# levels; Python's repr, pickle and json recurse once per level, up to about 1000.
MAX_NESTING = 100
# Seeds are 32-bit, as in most training scripts; the trials use seed, seed + 1, ...
MAX_SEED = 2**32 - 1


def shape_problem(shape: Any) -> str | None:
    """Why ``shape`` is not a usable input shape, or None when it is."""
    if not isinstance(shape, (list, tuple)) or not shape:
        return "it is not a list of dimensions"
    if any(isinstance(n, bool) or not isinstance(n, int) for n in shape):
        return "its dimensions must be whole numbers"
    if any(n <= 0 for n in shape):
        return "every dimension must be at least 1"
    if len(shape) > MAX_INPUT_DIMS:
        return f"it has {len(shape)} dimensions (at most {MAX_INPUT_DIMS})"
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        return f"it has {math.prod(shape):,} elements (at most {MAX_INPUT_ELEMENTS:,})"
    return None


def _shape_in(text: str) -> tuple[Any, str | None]:
    """"1,3,224,224" (or "1x3x224x224") read as a list of ints, and what makes it unusable."""
    try:
        shape: Any = [int(part) for part in text.replace("x", ",").split(",")]
    except ValueError:
        shape = None
    return shape, shape_problem(shape)


def parse_shape(text: str) -> tuple[int, ...]:
    """"1,3,224,224" -> (1, 3, 224, 224), refusing anything but a positive, bounded shape."""
    shape, problem = _shape_in(text)
    if problem is not None:
        raise InputError(f"--input-shape {text!r} is not a usable shape ({problem}); write it "
                         "like 1,3,224,224")
    return tuple(shape)


def parse_shapes(text: str) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """--shapes "1,3,64,64;2,3,101,101": the sizes to verify at, one per ';' (a model with
    several tensor inputs gives one shape per input, joined by '+')."""
    entries = [entry for entry in text.split(";") if entry.strip()]
    if not entries or len(entries) > MAX_LISTED_SHAPES:
        raise InputError(f"--shapes lists {len(entries)} sizes; give 1 to {MAX_LISTED_SHAPES} "
                         "shapes separated by ';', like 1,3,64,64;2,3,101,101")
    runs = []
    for entry in entries:
        shapes = []
        for part in entry.split("+"):
            shape, problem = _shape_in(part)
            if problem is not None:
                raise InputError(f"--shapes entry {part.strip()[:40]!r} is not a usable shape "
                                 f"({problem}); write the sizes like 1,3,64,64;2,3,101,101")
            shapes.append(tuple(shape))
        runs.append(tuple(shapes))
    return tuple(runs)


def recorded_shape(value: Any, source: str) -> tuple[int, ...] | None:
    """The ``input_shape`` a file records (a list, or JSON text in safetensors metadata)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = _json_or_text(value)
    check_nesting(value, f"{source}'s input_shape")
    problem = shape_problem(value)
    if problem is not None:
        raise InputError(f"{source} records input_shape {brief(value, 60)}, which is not a "
                         f"usable shape ({problem}); the file is damaged: write it again, or "
                         "remove the entry")
    return tuple(value)


def _json_or_text(text: str) -> Any:
    """Safetensors metadata holds JSON text; text that is not JSON (or nests too deep for the
    parser) is reported as it is."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text


def check_nesting(value: Any, source: str) -> None:
    """Lists, tuples, sets and dicts read from a file nest at most MAX_NESTING deep (and hold
    no cycle): deeper, they break Python's own recursion (repr, pickling, JSON) far from
    here. Walked without recursion; each container once per depth it is reached at."""
    deepest: dict[int, int] = {}
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children = [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple, set, frozenset)):
            children = list(item)
        else:
            continue
        if depth >= MAX_NESTING:
            raise InputError(f"{source} holds lists or dicts nested more than {MAX_NESTING} "
                             "deep (or holding themselves); the file is damaged or hostile: "
                             "write it again")
        if deepest.get(id(item), -1) >= depth:
            continue
        deepest[id(item)] = depth
        stack.extend((child, depth + 1) for child in children)


def parse_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--model-kwargs is not valid JSON ({exc.msg} at char {exc.pos}); "
                         "write it like '{\"width\": 32}'") from exc
    if not isinstance(value, dict):
        raise InputError("--model-kwargs must be a JSON object, like '{\"width\": 32}'")
    return value


def recorded_kwargs(value: Any, source: str) -> dict[str, Any]:
    """The ``arch_kwargs`` a file records: a dict with string keys (JSON text in safetensors)."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        value = _json_or_text(value)
    check_nesting(value, f"{source}'s arch_kwargs")
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InputError(f"{source} records arch_kwargs {brief(value, 60)}, which is not an "
                         "object of keyword arguments like {\"width\": 32}; the file is damaged")
    return dict(value)


def check_deploy_version(value: Any, source: str) -> None:
    """The deploy-format marker must name the one version this repconv reads."""
    number: Any = value
    if isinstance(value, str) and value.isdigit():
        number = int(value)  # safetensors metadata holds text
    if isinstance(number, bool) or not isinstance(number, int):
        raise InputError(f"{source} has {DEPLOY_MARKER} {brief(value, 40)}, which is not a "
                         f"deploy-format version; the file is damaged: write it again with "
                         "repconv fuse")
    if number > DEPLOY_VERSION:
        raise InputError(f"{source} is in deploy format {number}, newer than the format "
                         f"{DEPLOY_VERSION} this repconv reads; upgrade repconv")
    if number not in READABLE_PLAN_VERSIONS:
        raise InputError(f"{source} is in deploy format {number}; this repconv reads formats "
                         f"{', '.join(map(str, READABLE_PLAN_VERSIONS))} only: write it again "
                         "with repconv fuse")


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise InputError(f"--seed {seed!r} is out of range; give a whole number from 0 to "
                         f"{MAX_SEED}")
    return seed


def recorded_plan(container: Mapping[str, Any], path: Path) -> list[dict[str, Any]] | None:
    """The recorded rewrite plan of a deploy file (None for a training checkpoint). Its
    entries are validated where they are replayed."""
    if DEPLOY_MARKER not in container:
        return None
    check_deploy_version(container[DEPLOY_MARKER], str(path))
    plan = container.get("plan")
    if isinstance(plan, str):
        plan = _json_or_text(plan)
        check_nesting(plan, f"{path}'s rewrite plan")
    if not isinstance(plan, list):
        raise InputError(f"{path} has no readable rewrite plan; the deploy file is damaged: "
                         "write it again with repconv fuse")
    return plan
