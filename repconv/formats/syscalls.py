"""The two Linux calls repconv makes that Python's os module lacks, through the C library;
each is a hint whose absence changes speed or memory, never a result."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from typing import Any

_MADV_DONTNEED = 4
_SYNC_FILE_RANGE_WRITE = 2


def release_pages(start: int, length: int) -> None:
    """Let the kernel take back the pages at ``start`` (page-aligned; madvise DONTNEED): a
    private file mapping's pages leave resident memory, an anonymous one's are freed."""
    madvise = _libc_function("madvise")
    if madvise is not None:
        madvise(start, length, _MADV_DONTNEED)


def start_writeback(handle: int, offset: int, length: int) -> None:
    """Have the kernel start writing a file's range to disk now, keeping its pages cached (a
    later read of them is not a disk read); elsewhere the nearest hint there is."""
    sync_file_range = _libc_function("sync_file_range")
    if sync_file_range is not None:
        sync_file_range(handle, offset, length, _SYNC_FILE_RANGE_WRITE)
    elif hasattr(os, "posix_fadvise"):
        os.posix_fadvise(handle, offset, length, os.POSIX_FADV_DONTNEED)


_SIGNATURES = {
    "madvise": [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int],
    "sync_file_range": [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint],
}


@functools.cache
def _libc_function(name: str) -> Any:
    """The C library's function ``name`` (Linux), typed; None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), name, None)
    if function is not None:
        function.argtypes = _SIGNATURES[name]
        function.restype = ctypes.c_int
    return function
