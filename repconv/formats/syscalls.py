"""The two Linux calls repconv makes that Python's os module lacks, through the C library;
each is a hint whose absence changes speed or memory, never a result."""

from __future__ import annotations

import ctypes
import functools
import os
import sys

_MADV_DONTNEED = 4
_SYNC_FILE_RANGE_WRITE = 2


def release_pages(start: int, length: int) -> None:
    """Let the kernel take back the pages at ``start`` (page-aligned; madvise DONTNEED): a
    private file mapping's pages leave resident memory, an anonymous one's are freed."""
    libc = _libc()
    if libc is not None:
        libc.madvise(start, length, _MADV_DONTNEED)


def start_writeback(handle: int, offset: int, length: int) -> None:
    """Have the kernel start writing a file's range to disk now, keeping its pages cached (a
    later read of them is not a disk read); elsewhere the nearest hint there is."""
    libc = _libc()
    if libc is not None:
        libc.sync_file_range(handle, offset, length, _SYNC_FILE_RANGE_WRITE)
    elif hasattr(os, "posix_fadvise"):
        os.posix_fadvise(handle, offset, length, os.POSIX_FADV_DONTNEED)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                     ctypes.c_uint]
    libc.sync_file_range.restype = ctypes.c_int
    return libc
