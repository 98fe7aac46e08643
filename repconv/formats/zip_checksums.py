"""torch.save with its checksums computed on every core.

torch.save computes each record's CRC-32 on one thread as it writes: 0.3 s of its 0.7 s for a
430 MB deploy file here. With torch's CRC option off (`checksums_deferred`) it writes the same
archive with zeros where the checksums go, and a serialization id made from those zeros. The
checksums are computed on threads instead once the archive is whole (`fill_checksums`): each
record's bytes read back in pieces that `crc32_combine` joins, by ISA-L's CRC-32 where the
``isal`` package is installed (11 GB/s on one core here, zlib's 2.2 GB/s; both release the
GIL), unless the file object took each write's CRC-32 as it wrote it (`direct_write`, which
computes it on the block it copies for the disk): a record written in one write then needs no
read-back. Not while torch writes: on this machine (a VM, two cores) the writes took up to
ten times as long in some runs with a thread reading beside them (most likely the slow copies
into fresh page-cache memory that `direct_write` avoids, found later), and the sum of the two,
one after the other, was 0.2 s for 431 MB every time with zlib. They are written where torch
would have put them, and the serialization id is made from them again: the archive is then
byte for byte the one torch.save writes with its own checksums (the tests compare them).

The layout relied on is torch's zip writer's, checked as it is read: every record stored as it
is, followed by a data descriptor, with zeros in both checksum fields; an id of 40 digits whose
second half hashes the records' checksums (``c10::hash_combine`` in writing order). Anything
else raises `UnexpectedLayout` before a byte is changed, and the archive is written again by
torch.save with its own checksums.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

try:  # the same CRC-32 as zlib's, five times as fast on this machine's x86 cores
    from isal.isal_zlib import crc32
except ImportError:  # a platform isal has no wheel for
    from zlib import crc32

_PIECE = 8 << 20  # bytes per thread task; one piece read at a time per thread keeps RSS flat
_THREADED = 1 << 20  # a smaller record is checksummed at once, on the calling thread
_LOCAL, _CENTRAL, _DESCRIPTOR = 0x04034B50, 0x02014B50, 0x08074B50
_END, _END64, _LOCATOR64 = 0x06054B50, 0x06064B50, 0x07064B50
_HAS_DESCRIPTOR = 0x8  # general-purpose flag bit 3
_ID_NAME = "/.data/serialization_id"
_WORD = (1 << 64) - 1  # size_t
_POLY = 0xEDB88320  # CRC-32, reflected
_DEFERRING = threading.Lock()  # one deferral at a time restores the option it found


class UnexpectedLayout(Exception):
    """The archive is not laid out as torch's writer lays it out; nothing was changed."""


class Archive(Protocol):
    """Random access to the bytes of a written archive."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, size: int) -> bytes: ...

    def crc32(self, pool: ThreadPoolExecutor, offset: int, size: int) -> Future[int]: ...

    def known_crc32(self, offset: int, size: int) -> int | None: ...

    def write(self, offset: int, data: bytes) -> None: ...


class SeekableFile(Protocol):
    # the CRC-32 of each write the file object took, by offset, with its length (may be empty)
    checksums: dict[int, tuple[int, int]]

    def write(self, data: bytes | memoryview) -> int: ...

    def flush(self) -> None: ...

    def fileno(self) -> int: ...

    def seek(self, offset: int) -> int: ...

    def truncate(self) -> int: ...


def save(payload: Any, file: SeekableFile | io.BytesIO) -> None:
    """torch.save of ``payload`` into ``file``: an empty BytesIO, or a file open for reading
    and writing at its start (anything else gets a plain torch.save). Its checksums are
    computed afterwards on every core the process may use. Written again with torch's own
    checksums where the archive is not laid out as expected."""
    if not (_at_start(file) and _saved_deferred(payload, file)):
        torch.save(payload, file)


def _saved_deferred(payload: Any, file: SeekableFile | io.BytesIO) -> bool:
    """Save with the checksums deferred, then filled in; False, with ``file`` empty again,
    where this torch cannot defer them or the archive is not laid out as expected."""
    with checksums_deferred() as deferred:
        if not deferred:
            return False
        torch.save(payload, file)
        file.flush()  # every byte in place, readable at its offset
        pool = ThreadPoolExecutor(_threads())
        try:
            if isinstance(file, io.BytesIO):
                with file.getbuffer() as view:
                    fill_checksums(MemoryArchive(view), pool)
            else:
                fill_checksums(FileArchive(file.fileno(), file.checksums), pool)
            return True
        except UnexpectedLayout:
            pass
        finally:  # no thread reads the file once it is cut or closed
            pool.shutdown(wait=True, cancel_futures=True)
    file.seek(0)
    file.truncate()
    return False


def _at_start(file: SeekableFile | io.BytesIO) -> bool:
    """``file`` is empty memory, or a file repconv may read back, written from its start."""
    if isinstance(file, io.BytesIO):
        return file.tell() == 0 and not file.getbuffer().nbytes
    if not hasattr(os, "pread"):  # read back at offsets, which this system does not offer
        return False
    handle = file.fileno()
    try:
        os.pread(handle, 0, 0)  # refused where the file is open for writing only
    except OSError:
        return False
    return os.lseek(handle, 0, os.SEEK_CUR) == 0


def _threads() -> int:
    """As many as torch computes on, and no more than the process may run on at once."""
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    return max(1, min(torch.get_num_threads(), cores))


def _pieces(offset: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(_PIECE, offset + size - start))
            for start in range(offset, offset + size, _PIECE)]


@contextmanager
def checksums_deferred() -> Iterator[bool]:
    """torch.save writes zeros for checksums meanwhile, by torch's own option, restored on
    exit (torch 2.13 keeps it per thread; an older torch may keep it for the whole process, so
    another thread's torch.save meanwhile would also write zeros, which torch.load still
    reads). Yields False where this torch has no such option."""
    if not hasattr(torch.serialization, "set_crc32_options"):
        yield False
        return
    with _DEFERRING:
        before = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            yield True
        finally:
            torch.serialization.set_crc32_options(before)


@dataclass(frozen=True)
class _Record:
    name: str
    data: int  # offset of its bytes
    size: int
    descriptor: int | None  # offset of its data descriptor's checksum (none: empty record)
    entry: int  # offset of its central entry's checksum, in the directory


@dataclass(frozen=True)
class _Directory:
    start: int  # offset in the archive
    data: bytearray
    records: list[_Record]


def fill_checksums(archive: Archive, pool: ThreadPoolExecutor) -> None:
    """Write each record's CRC-32, and the serialization id made from them, into ``archive``
    written by torch.save under `checksums_deferred`."""
    directory = _directory(archive)
    records = directory.records
    named = [r for r in records if r.name.endswith(_ID_NAME)]
    if named and named[0] is not records[-1]:
        raise UnexpectedLayout("the serialization id is not the last record")
    content = records[:-1] if named else records
    checksums = _checksums(archive, content, pool)
    patches = list(zip(content, checksums))
    if named:
        record = named[0]
        serialization_id = archive.read(record.data, record.size)
        expected_tail = f"{_combined([0] * len(content)):020d}".encode()
        if len(serialization_id) != 40 or serialization_id[20:] != expected_tail:
            raise UnexpectedLayout("the serialization id is not torch's 40 digits")
        filled = serialization_id[:20] + f"{_combined(checksums):020d}".encode()
        archive.write(record.data, filled)
        patches.append((record, crc32(filled)))
    for record, checksum in patches:
        if record.descriptor is not None:
            packed = struct.pack("<I", checksum)
            archive.write(record.descriptor, packed)
            directory.data[record.entry:record.entry + 4] = packed
    archive.write(directory.start, bytes(directory.data))


def _checksums(archive: Archive, records: list[_Record], pool: ThreadPoolExecutor) -> list[int]:
    """Each record's CRC-32: a small one's at once, a large one's from those of its pieces,
    computed on ``pool`` (every piece started before any is waited for)."""
    known = {id(r): archive.known_crc32(r.data, r.size) for r in records}
    started = {id(r): [(archive.crc32(pool, offset, size), size)
                       for offset, size in _pieces(r.data, r.size)]
               for r in records if r.size >= _THREADED and known[id(r)] is None}
    checksums = []
    for record in records:
        if (checksum := known[id(record)]) is not None:  # taken as the writer wrote it
            checksums.append(checksum)
            continue
        if id(record) not in started:
            checksums.append(crc32(archive.read(record.data, record.size)))
            continue
        (first, _), *rest = started[id(record)]
        checksum = first.result()
        for piece, size in rest:
            checksum = crc32_combine(checksum, piece.result(), size)
        checksums.append(checksum)
    return checksums


def _combined(checksums: list[int]) -> int:
    """torch's serialization id, second half: ``c10::hash_combine`` over the checksums."""
    seed = 0
    for value in checksums:
        seed ^= (value + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & _WORD
        seed &= _WORD
    return seed


def _directory(archive: Archive) -> _Directory:
    """The archive's central directory and its records, each checked against torch's
    layout."""
    try:
        return _parsed_directory(archive)
    except (struct.error, ValueError) as exc:  # a field points outside the archive
        raise UnexpectedLayout(f"the archive does not parse as torch's ({exc})") from exc


def _parsed_directory(archive: Archive) -> _Directory:
    tail = archive.read(max(0, archive.size - 22), 22)
    if len(tail) != 22 or struct.unpack_from("<I", tail)[0] != _END:
        raise UnexpectedLayout("no end of central directory where torch writes it")
    count, length, start = struct.unpack_from("<HII", tail, 10)
    if archive.size >= 42:
        locator = archive.read(archive.size - 42, 20)
        if struct.unpack_from("<I", locator)[0] == _LOCATOR64:
            end64 = archive.read(struct.unpack_from("<Q", locator, 8)[0], 56)
            if struct.unpack_from("<I", end64)[0] != _END64:
                raise UnexpectedLayout("a zip64 locator points at no zip64 directory end")
            count, length, start = struct.unpack_from("<QQQ", end64, 32)
    directory = bytearray(archive.read(start, length))
    records, position = [], 0
    for _ in range(count):
        (signature, flags, method, checksum, packed, size, name_length, extra_length,
         comment_length, local) = struct.unpack_from("<I4xHH4xIIIHHH8xI", directory, position)
        if signature != _CENTRAL:
            raise UnexpectedLayout("a central directory entry lacks its signature")
        name_at = position + 46
        name = directory[name_at:name_at + name_length].decode("utf-8", "replace")
        extra = bytes(directory[name_at + name_length:name_at + name_length + extra_length])
        size, packed, local = _zip64_values(extra, size, packed, local)
        # an empty record has no data descriptor: its checksum, 0, is already in place
        if method != 0 or packed != size or checksum or not (flags & _HAS_DESCRIPTOR or not size):
            raise UnexpectedLayout(f"record {name} is not stored as torch stores it")
        data, descriptor = _local_record(archive, local, size)
        records.append(_Record(name, data, size, descriptor, position + 16))
        position = name_at + name_length + extra_length + comment_length
    return _Directory(start, directory, records)


def _zip64_values(extra: bytes, size: int, packed: int, local: int) -> tuple[int, int, int]:
    """The sizes and offset a central entry stores as 0xFFFFFFFF, from its zip64 field."""
    wanted = [v == 0xFFFFFFFF for v in (size, packed, local)]
    values = [size, packed, local]
    if not any(wanted):
        return size, packed, local
    position = 0
    while position + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, position)
        if tag == 1:
            field = position + 4
            for index, want in enumerate(wanted):
                if want:
                    values[index] = struct.unpack_from("<Q", extra, field)[0]
                    field += 8
            return values[0], values[1], values[2]
        position += 4 + length
    raise UnexpectedLayout("a large record has no zip64 field")


def _local_record(archive: Archive, local: int, size: int) -> tuple[int, int | None]:
    """Offsets of a record's bytes and of its data descriptor's checksum (none when it is
    empty), both checked."""
    header = archive.read(local, 30)
    signature, checksum, name_length, extra_length = struct.unpack_from("<I10xI8xHH", header)
    if signature != _LOCAL or checksum:
        raise UnexpectedLayout("a local header is not where its central entry says")
    data = local + 30 + name_length + extra_length
    if not size:
        return data, None
    descriptor = archive.read(data + size, 8)
    if len(descriptor) != 8 or struct.unpack_from("<II", descriptor) != (_DESCRIPTOR, 0):
        raise UnexpectedLayout("a record is not followed by an empty data descriptor")
    return data, data + size + 4


def crc32_combine(first: int, second: int, second_length: int) -> int:
    """The CRC-32 of two byte strings one after the other, from theirs and the second's
    length (zlib's ``crc32_combine``, which Python's zlib does not expose)."""
    return _multiply(_x_power(second_length * 8), first) ^ second


def _multiply(a: int, b: int) -> int:
    """``a * b`` modulo the CRC polynomial, both reflected."""
    product, bit = 0, 1 << 31
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return product


@functools.lru_cache(maxsize=64)  # the pieces' lengths: mostly one
def _x_power(n: int) -> int:
    """``x ** n`` modulo the CRC polynomial, reflected, by squaring."""
    result, square = 1 << 31, 1 << 30  # x**0, x**1
    while n:
        if n & 1:
            result = _multiply(square, result)
        square = _multiply(square, square)
        n >>= 1
    return result


class FileArchive:
    """An archive in an open file, read and written at offsets; each piece checksummed on a
    thread of the pool, read back with pread (a mapping of the file would count its pages in
    the process's resident memory: 1009 MB at the peak instead of 676 MB for the 457 MB
    checkpoint of `benchmarks/conversion_cost.py`), unless the writer took the CRC-32 of the
    very bytes (``known``: by offset, with their length)."""

    def __init__(self, handle: int, known: dict[int, tuple[int, int]] | None = None) -> None:
        self.handle = handle
        self.known = known or {}

    @property
    def size(self) -> int:
        return os.fstat(self.handle).st_size

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.handle, size, offset)

    def crc32(self, pool: ThreadPoolExecutor, offset: int, size: int) -> Future[int]:
        return pool.submit(lambda: crc32(self.read(offset, size)))

    def known_crc32(self, offset: int, size: int) -> int | None:
        length, checksum = self.known.get(offset, (-1, 0))
        return checksum if length == size else None

    def write(self, offset: int, data: bytes) -> None:
        os.pwrite(self.handle, data, offset)


class MemoryArchive:
    """An archive held in memory."""

    def __init__(self, data: memoryview) -> None:
        self.data = data  # a view of BytesIO's own buffer
        self.size = len(data)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset:offset + size])

    def crc32(self, pool: ThreadPoolExecutor, offset: int, size: int) -> Future[int]:
        return pool.submit(crc32, self.data[offset:offset + size])

    def known_crc32(self, offset: int, size: int) -> int | None:
        return None

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset:offset + len(data)] = data

