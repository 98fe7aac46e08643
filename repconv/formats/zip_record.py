"""repconv's record inside a pickled deploy file: the verification input shape, kept as one small
JSON entry of torch.save's zip archive, beside the pickle. A pickled deploy file keeps IN's
layout (a bare module, or the trainer's dict) exactly, and ``torch.load`` ignores entries it
does not know, so the record changes nothing for the user's own loader.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

RECORD_NAME = "repconv.json"
_MAX_RECORD_BYTES = 4096
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the same input gives the same bytes


def with_record(archive: bytes, record: dict[str, Any]) -> bytes:
    """torch.save's ``archive`` with ``record`` added as a stored entry in its top folder."""
    names = zipfile.ZipFile(io.BytesIO(archive)).namelist()
    folder = names[0].partition("/")[0] if names else "archive"
    buffer = io.BytesIO(archive)
    with zipfile.ZipFile(buffer, "a") as handle:
        info = zipfile.ZipInfo(f"{folder}/{RECORD_NAME}", date_time=_FIXED_TIME)
        handle.writestr(info, json.dumps(record, sort_keys=True), zipfile.ZIP_STORED)
    return buffer.getvalue()


def read_record(path: Path) -> dict[str, Any]:
    """The record a pickled deploy file holds (``{}`` when it has none). Its values are data
    from the file, validated by the caller."""
    try:
        with zipfile.ZipFile(path) as handle:
            entry = next((i for i in handle.infolist()
                          if i.filename.count("/") == 1 and i.filename.endswith(f"/{RECORD_NAME}")),
                         None)
            if entry is None or entry.file_size > _MAX_RECORD_BYTES:
                return {}
            value = json.loads(handle.read(entry))
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError):
        return {}  # torch.load read the file already: a damaged record is no record
    return value if isinstance(value, dict) else {}
