"""Files that ask for far more than they hold (issue 17): lists nested 10,000 deep, a deflated
torch archive inflating to gigabytes, a zero-stride tensor of 10**8 elements in 1.6 KB."""

from __future__ import annotations

import collections
import contextlib
import io
import pickle
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

DEPTH = 10_000


@contextlib.contextmanager
def deep_recursion() -> Iterator[None]:
    """Pickling or building a 10,000-deep list needs more than Python's default limit."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(4 * DEPTH)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def nested(depth: int = DEPTH, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def save_deep(obj: Any, path: Path) -> Path:
    with deep_recursion():
        torch.save(obj, path)
    return path


class _Storage:
    """Stands for a storage while pickling: torch's persistent id names its record."""


class _Tensor:
    def __init__(self, elements: int) -> None:
        self.elements = elements

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return torch._utils._rebuild_tensor_v2, (_Storage(), 0, (self.elements,), (1,), False,
                                                 collections.OrderedDict())


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, elements: int) -> None:
        super().__init__(file, protocol=2)
        self.elements = elements

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, "0", "cpu", self.elements)
        return None


def deflated_checkpoint(path: Path, elements: int) -> Path:
    """A torch.save archive of ``{"state_dict": {"weight": zeros(elements)}}`` whose data
    record is deflated: a few MB on disk, ``4 * elements`` bytes once read. Written by hand
    (the zeros are never held in memory)."""
    pickled = io.BytesIO()
    _Pickler(pickled, elements).dump({"state_dict": {"weight": _Tensor(elements)}})
    template = io.BytesIO()
    torch.save({"weight": torch.zeros(1)}, template)
    chunk = bytes(1 << 22)
    with zipfile.ZipFile(io.BytesIO(template.getvalue())) as source, \
            zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for info in source.infolist():
            name = info.filename.partition("/")[2]
            if name == "data.pkl":
                archive.writestr(info.filename, pickled.getvalue())
            elif name == "data/0":
                with archive.open(info.filename, "w", force_zip64=True) as record:
                    for _ in range(4 * elements // len(chunk)):
                        record.write(chunk)
                    record.write(bytes(4 * elements % len(chunk)))
            else:
                archive.writestr(info.filename, source.read(info))
    return path


def expanded_inputs(path: Path, elements: int = 100_000_000) -> Path:
    """One value viewed as ``elements`` (stride 0): torch.save stores the one value."""
    torch.save(torch.zeros(1).expand(1, 1, elements // 10_000, 10_000), path)
    return path
