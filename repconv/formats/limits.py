"""Bounds on what a file or an option may make repconv allocate (docs/design.md rule 0.4:
every input is untrusted). A shape, a compressed archive or a tensor that repeats one value
through zero strides can ask for gigabytes from a file of kilobytes: each is refused, in one
line, before the allocation.

- Memory: the limit of one forward pass is ``--max-memory`` (``8GB``, ``512MiB``, bytes), else
  the memory the system reports available (``MemAvailable`` in /proc/meminfo, or psutil's);
  `repconv.verify.footprint` estimates what a forward takes.
- Files: the data a file unpacks to may be at most ``MAX_EXPANSION`` times its size (plus
  ``EXPANSION_SLACK``): torch writes its zip archives uncompressed, and a tensor's bytes are in
  the file once, so only a deflated archive (a 1.9 MB file inflating to 2.2 GB) or views that
  repeat memory (``torch.zeros(1).expand(10**8)``, 1.6 KB on disk) go past it.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_flatten

from repconv.errors import InputError

MAX_EXPANSION = 32
EXPANSION_SLACK = 64 << 20
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, option: str = "--max-memory") -> int:
    """"8GB" -> 8 * 2**30 (K, M, G, T are powers of 1024; B and iB optional), at least 1 MiB."""
    match = _SIZE.match(text)
    if match is None:
        raise InputError(f"{option} {text[:40]!r} is not a size; write it like 8GB or 512MB")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size < 1 << 20:
        raise InputError(f"{option} {text[:40]!r} is below 1MB; write it like 8GB or 512MB")
    return size


def human(size: float) -> str:
    """1536 -> "1.5 KB" (powers of 1024, as parse_size reads them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def available_memory() -> int | None:
    """What the system can give without swapping: MemAvailable, else psutil's figure (when
    psutil is installed), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil  # optional: only where /proc/meminfo is not there
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def check_archive(path: Path, what: str = "") -> None:
    """A zip archive (torch.save's format) whose entries inflate far beyond the file's size is
    refused before anything is read from it."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # the reader says what is wrong with it
    _check_expansion(unpacked, path, what, "its compressed records unpack to")


def check_tensor_bytes(value: Any, path: Path, what: str = "") -> None:
    """Tensors read from ``path`` must not hold far more elements than the file has bytes for
    (a zero-stride view of one value over 10**8 elements costs nothing until it is used).
    ``what`` prefixes the path in the message ("--inputs ")."""
    tensors = [leaf for leaf in tree_flatten(value)[0] if isinstance(leaf, Tensor)]
    held = sum(t.numel() * t.element_size() for t in tensors)
    _check_expansion(held, path, what, "its tensors hold")


def _check_expansion(size: int, path: Path, what: str, holds: str) -> None:
    on_disk = path.stat().st_size
    if size > MAX_EXPANSION * on_disk + EXPANSION_SLACK:
        raise InputError(f"{what}{path} is {human(on_disk)} but {holds} {human(size)}, more "
                         f"than {MAX_EXPANSION}x its size: save plain tensors (.contiguous(), "
                         "torch.save without compression)")
