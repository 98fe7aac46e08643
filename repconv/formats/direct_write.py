"""Writing a deploy file around the page cache (Linux's O_DIRECT), each write's CRC-32 taken on
the way.

repconv waits for OUT to be on disk before it gives it its name, so the bytes reach the disk
within the write either way; the page cache only adds a copy into memory the kernel must first
find. On this project's VM that copy was the slow part: 431 MB written through the cache took
0.1 to 1.1 s from one process to the next, nearly all of it in the kernel's copy into freshly
allocated cache pages (the host takes free guest memory back, and a page taken back costs a
fault there when it is used again), then 0.19 s of fsync; written around the cache, 0.21 to
0.23 s every time, fsync included (docs/benchmarks.md).

The stream is copied into page-aligned blocks of `BLOCK` bytes; each full block is written at
its offset by one of two threads while the next one fills, the last one padded to the
alignment and the file cut back to its length. Each write's CRC-32 is computed on the block it
was just copied into, still in the CPU's cache, so the archive's checksums need no read-back
(`zip_checksums`). Where the file system refuses O_DIRECT or its alignment (some FUSE and
network file systems, tmpfs before Linux 6.6) `direct_writer` returns None and the caller
writes through the cache. The file is then not in the cache: a read right after (`repconv
verify`) reads it from the disk.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from repconv.formats.zip_checksums import crc32

BLOCK = 4 << 20  # bytes per write to the disk (2, 4 and 8 MB measured alike; 16 MB slower)
_ALIGN = 4096  # offsets, lengths and memory of direct writes: the largest sector size in use
_WRITERS = 2  # blocks written at once, each by a thread of its own; one more fills meanwhile
_UNSUPPORTED = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}  # a direct write refused


def direct_writer(handle: int) -> DirectWriter | None:
    """A writer around the page cache for the file open at ``handle`` (empty, open for reading
    and writing); None where its file system or this system does not offer that."""
    if not hasattr(os, "O_DIRECT") or not hasattr(os, "pwrite"):
        return None
    try:
        _set_direct(handle, True)
    except OSError:
        return None
    try:  # one empty sector: a file system may take the flag, yet not this alignment
        os.pwrite(handle, mmap.mmap(-1, _ALIGN), 0)  # (page-aligned memory, freed unclosed)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:  # a full disk, say: the write fails as it would anyway
            raise
        _set_direct(handle, False)
        return None
    return DirectWriter(handle)


def _set_direct(handle: int, on: bool) -> None:
    flags = fcntl.fcntl(handle, fcntl.F_GETFL)
    fcntl.fcntl(handle, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)


class DirectWriter:
    """A file object over ``handle`` (O_DIRECT already set) for torch.save and the other
    writers: ``write`` until ``flush``, which puts the last bytes in place and turns O_DIRECT
    off, so that what comes after (the archive's checksums, written in place) goes through the
    cache. ``checksums`` holds each write's CRC-32 by its offset, with its length."""

    def __init__(self, handle: int) -> None:
        self.handle = handle
        self.failure: BaseException | None = None  # torch's writer wraps what write raises
        self.written = 0  # bytes of the stream so far
        self.checksums: dict[int, tuple[int, int]] = {}  # offset: (length, CRC-32)
        self._direct = True
        self._stopping = False  # set when the write is abandoned: the threads stop early
        self._pool = ThreadPoolExecutor(_WRITERS, thread_name_prefix="repconv-write")
        self._blocks = [memoryview(mmap.mmap(-1, BLOCK)) for _ in range(_WRITERS + 1)]
        self._in_flight: deque[tuple[Future[None], int]] = deque()  # writes and their blocks
        self._current = 0  # the block being filled, whose bytes go at ...
        self._start = 0  # ... this offset, and ...
        self._filled = 0  # ... how many it holds

    def write(self, data: bytes | memoryview) -> int:
        if self.failure is not None:
            raise self.failure
        view = memoryview(data).cast("B")
        size, offset, checksum = len(view), self.written, 0
        try:
            if self._direct:
                while view:
                    taken = min(len(view), BLOCK - self._filled)
                    piece = self._blocks[self._current][self._filled:self._filled + taken]
                    piece[:] = view[:taken]
                    checksum = crc32(piece, checksum)  # while the copy is in the CPU's cache
                    self._filled += taken
                    view = view[taken:]
                    if self._filled == BLOCK:
                        self._send()
            else:  # after flush: in place, through the cache
                checksum = crc32(view)
                while view:
                    view = view[os.pwrite(self.handle, view, offset + size - len(view)):]
        except BaseException as exc:  # a full disk, Ctrl-C or SIGTERM: kept for the caller
            self.failure = exc
            raise
        self.written += size
        if size:
            self.checksums[offset] = (size, checksum)
        return size

    def _send(self) -> None:
        """Start writing the current block (its bytes padded to the alignment) at its offset
        on a thread, then go on filling a block that no thread is writing."""
        length = -(-self._filled // _ALIGN) * _ALIGN
        block = self._blocks[self._current]
        block[self._filled:length] = bytes(length - self._filled)
        self._in_flight.append(
            (self._pool.submit(self._write_block, block[:length], self._start), self._current))
        self._start += self._filled
        self._filled = 0
        while len(self._in_flight) > _WRITERS:  # every other block is being written
            self._in_flight.popleft()[0].result()
        busy = {index for _, index in self._in_flight}
        self._current = next(i for i in range(len(self._blocks)) if i not in busy)

    def _write_block(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view) and not self._stopping:
            done += os.pwrite(self.handle, view[done:], offset + done)

    def flush(self) -> None:
        """Put every byte written so far in the file, at its length, and turn O_DIRECT off."""
        if self.failure is not None:  # a block that failed is a hole: never a whole file
            raise self.failure
        if not self._direct:
            return
        try:
            if self._filled:
                self._send()
            while self._in_flight:
                self._in_flight.popleft()[0].result()
            _set_direct(self.handle, False)
            os.ftruncate(self.handle, self.written)  # the last block's padding goes
        except BaseException as exc:
            self.failure = exc
            raise
        self._direct = False

    def settle(self) -> None:
        """Stop and wait for the threads, before the file is closed: no write reaches a
        descriptor that is by then another file's."""
        self._stopping = True
        self._pool.shutdown(wait=True, cancel_futures=True)

    def fileno(self) -> int:
        return self.handle

    def seek(self, offset: int) -> int:
        """Write from ``offset`` on (to write the file again), through the cache."""
        self.flush()
        self.written = offset
        self.checksums = {k: v for k, v in self.checksums.items() if k + v[0] <= offset}
        return offset

    def truncate(self) -> int:
        """Cut the file where the next write goes."""
        self.flush()
        os.ftruncate(self.handle, self.written)
        return self.written
