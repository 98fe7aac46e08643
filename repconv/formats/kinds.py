"""Which format a file is in, by its suffix: the one dispatch every reader and writer uses."""

from __future__ import annotations

from enum import Enum
from pathlib import Path


class FileKind(Enum):
    """The formats repconv reads and writes."""

    TORCH = "torch.save (.pt, .pth)"
    SAFETENSORS = "safetensors (.safetensors)"
    PT2 = "torch.export program (.pt2)"
    ONNX = "ONNX (.onnx)"


SUFFIXES: dict[str, FileKind] = {
    ".pt": FileKind.TORCH,
    ".pth": FileKind.TORCH,
    ".safetensors": FileKind.SAFETENSORS,
    ".pt2": FileKind.PT2,
    ".onnx": FileKind.ONNX,
}


def kind_of(path: Path) -> FileKind | None:
    """The format ``path``'s suffix names; None for a suffix repconv does not know."""
    return SUFFIXES.get(path.suffix)
