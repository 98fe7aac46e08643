"""torch.save with its checksums computed on every core (`formats.zip_checksums`): the archive
must be byte for byte the one torch.save writes with its own checksums, in memory and in a
file, whatever the pieces; torch's process-wide option comes back as it was; an archive not
laid out as torch lays it out is left unchanged and written again by torch itself."""

from __future__ import annotations

import io
import os
import random
import struct
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

from repconv.formats import direct_write, zip_checksums
from repconv.formats.direct_write import DirectWriter, direct_writer
from repconv.formats.write import _FdWriter
from repconv.formats.zip_checksums import (
    FileArchive,
    MemoryArchive,
    UnexpectedLayout,
    crc32_combine,
    fill_checksums,
)


def _payloads() -> list[object]:
    generator = torch.Generator().manual_seed(0)
    return [
        {"weight": torch.randn(300, 70, generator=generator), "step": 3, "name": "x"},
        nn.Conv2d(3, 8, 3),
        {"empty": torch.empty(0), "ints": torch.arange(5000), "half": torch.ones(9).half()},
        {},
    ]


def _torch_bytes(payload: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _saved_to_file(payload: object, folder: Path, direct: bool) -> bytes:
    """Through the writer around the page cache (in blocks of 8 KiB, so that records cross
    them), or the one through it."""
    path = folder / "archive.pt"
    handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    writer = (direct_writer(handle) if direct else None) or _FdWriter(handle)
    assert isinstance(writer, DirectWriter) is direct, "this file system takes no O_DIRECT"
    try:
        zip_checksums.save(payload, writer)
        writer.flush()
    finally:
        writer.settle()
        os.close(handle)
    return path.read_bytes()


@pytest.fixture(params=[True, False], ids=["around the cache", "through the cache"])
def direct(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setattr(direct_write, "BLOCK", 8192)
    return bool(request.param)


@pytest.fixture
def fast_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Fails the test where an archive took the fallback (whose bytes are torch's as well)."""
    outcomes: list[str] = []
    parse = zip_checksums._directory

    def watched(archive: zip_checksums.Archive) -> object:
        try:
            directory = parse(archive)
        except UnexpectedLayout as exc:
            outcomes.append(f"fallback: {exc}")
            raise
        outcomes.append("filled")
        return directory

    monkeypatch.setattr(zip_checksums, "_directory", watched)
    yield outcomes
    assert outcomes and set(outcomes) == {"filled"}, outcomes


@pytest.fixture(params=[None, 1000], ids=["default pieces", "pieces of 1000 bytes"])
def pieces(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small pieces split every record in several, checksummed on the threads and joined."""
    if request.param is not None:
        monkeypatch.setattr(zip_checksums, "_PIECE", request.param)
        monkeypatch.setattr(zip_checksums, "_THREADED", request.param // 2)


def test_crc32_combine_joins_checksums_as_zlib_computes_the_whole() -> None:
    rng = random.Random(0)
    for _ in range(200):
        first = rng.randbytes(rng.randrange(0, 3000))
        second = rng.randbytes(rng.choice([0, 1, rng.randrange(2, 5000)]))
        assert crc32_combine(zlib.crc32(first), zlib.crc32(second), len(second)) == \
            zlib.crc32(first + second)


def test_the_checksum_in_use_is_zlibs_crc32() -> None:
    """ISA-L's where installed: every length around its vector widths, any alignment, and a
    large buffer given as a memoryview (as pieces of a tensor are)."""
    rng = random.Random(1)
    data = rng.randbytes(1 << 16)
    for length in [*range(0, 260), 1000, 4095, 4096, 4097, 65535]:
        start = rng.randrange(0, 64)
        piece = data[start:start + length]
        assert zip_checksums.crc32(piece) == zlib.crc32(piece)
    large = memoryview(torch.randn(3_000_001).numpy()).cast("B")
    assert zip_checksums.crc32(large) == zlib.crc32(large)


@pytest.mark.usefixtures("pieces", "fast_path")
def test_archive_in_memory_is_torchs_own_byte_for_byte() -> None:
    for payload in _payloads():
        buffer = io.BytesIO()
        zip_checksums.save(payload, buffer)
        assert buffer.getvalue() == _torch_bytes(payload)
        assert zipfile.ZipFile(buffer).testzip() is None  # every checksum reads back


@pytest.mark.usefixtures("pieces", "fast_path")
def test_archive_in_a_file_is_torchs_own_byte_for_byte(tmp_path: Path, direct: bool) -> None:
    for payload in _payloads():
        written = _saved_to_file(payload, tmp_path, direct)
        assert written == _torch_bytes(payload)
        assert zipfile.ZipFile(io.BytesIO(written)).testzip() is None


@pytest.mark.usefixtures("fast_path")
def test_the_checksums_a_direct_write_took_are_not_read_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each record's bytes came in one write, whose CRC-32 the writer took on the way: the
    archive's checksums need none of the file read back (here, reading it back fails)."""
    def unreadable(*_args: object) -> object:
        raise AssertionError("a record was read back")

    monkeypatch.setattr(FileArchive, "crc32", unreadable)
    monkeypatch.setattr(zip_checksums, "_THREADED", 1)  # every record would be read on a thread
    payload = _payloads()[0]
    assert _saved_to_file(payload, tmp_path, direct=True) == _torch_bytes(payload)


def test_the_checksums_are_not_torchs_zeros() -> None:
    """The deferred save does write zeros: what the test above compares is filled in."""
    payload = _payloads()[0]
    buffer = io.BytesIO()
    with zip_checksums.checksums_deferred() as deferred:
        torch.save(payload, buffer)
    assert deferred
    assert {i.CRC for i in zipfile.ZipFile(buffer).infolist()} == {0}
    assert buffer.getvalue() != _torch_bytes(payload)


@pytest.mark.parametrize("before", [True, False])
def test_torchs_option_comes_back_as_it_was(before: bool) -> None:
    torch.serialization.set_crc32_options(before)
    try:
        zip_checksums.save(_payloads()[0], io.BytesIO())
        assert torch.serialization.get_crc32_options() is before

        class Unpicklable:
            def __reduce__(self) -> tuple[object, ...]:
                raise RuntimeError("cannot pickle this")

        with pytest.raises(RuntimeError, match="cannot pickle this"):
            zip_checksums.save({"bad": Unpicklable()}, io.BytesIO())
        assert torch.serialization.get_crc32_options() is before
    finally:
        torch.serialization.set_crc32_options(True)


def test_an_archive_torch_checksummed_is_not_torchs_deferred_layout() -> None:
    """Checksums already there: refused before any byte changes."""
    data = bytearray(_torch_bytes(_payloads()[0]))
    before = bytes(data)
    with ThreadPoolExecutor(1) as pool, pytest.raises(UnexpectedLayout):
        fill_checksums(MemoryArchive(memoryview(data)), pool)
    assert bytes(data) == before


@pytest.mark.parametrize("damage", ["descriptor", "end", "compressed", "directory"])
def test_a_layout_torch_does_not_write_is_refused_unchanged(damage: str) -> None:
    buffer = io.BytesIO()
    with zip_checksums.checksums_deferred():
        torch.save(_payloads()[0], buffer)
    data = bytearray(buffer.getvalue())
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).infolist()[0]
    if damage == "descriptor":  # a record whose data descriptor is missing
        start = bytes(data).index(b"PK\x07\x08")
        data[start:start + 4] = b"XXXX"
    elif damage == "end":  # bytes after the end of the central directory
        data += b"trailing"
    elif damage == "compressed":  # a record marked deflated
        central = bytes(data).index(b"PK\x01\x02")
        data[central + 10:central + 12] = struct.pack("<H", 8)
    else:  # the directory's offset (zip64 end record) points past the end
        end64 = bytes(data).rindex(b"PK\x06\x06")
        data[end64 + 48:end64 + 56] = struct.pack("<Q", len(data) - 10)
    before = bytes(data)
    with ThreadPoolExecutor(2) as pool, pytest.raises(UnexpectedLayout):
        fill_checksums(MemoryArchive(memoryview(data)), pool)
    assert bytes(data) == before, info.filename


@pytest.mark.parametrize("target", ["memory", "file", "file around the cache"])
def test_an_unexpected_layout_is_written_again_by_torch(
        target: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A torch whose writer lays archives out otherwise still gets a whole, checksummed
    archive: its own."""
    def other_layout(archive: object) -> object:
        raise UnexpectedLayout("another layout")

    monkeypatch.setattr(zip_checksums, "_directory", other_layout)
    payload = _payloads()[0]
    if target == "memory":
        buffer = io.BytesIO()
        zip_checksums.save(payload, buffer)
        written = buffer.getvalue()
    else:
        written = _saved_to_file(payload, tmp_path, direct=target != "file")
    assert written == _torch_bytes(payload)


def test_what_is_not_an_empty_start_gets_a_plain_save(tmp_path: Path) -> None:
    """Memory holding data already, a file open for writing only: torch.save as it is."""
    payload = _payloads()[0]
    buffer = io.BytesIO()
    buffer.write(b"prefix")
    zip_checksums.save(payload, buffer)
    plain = io.BytesIO()
    plain.write(b"prefix")
    torch.save(payload, plain)
    assert buffer.getvalue() == plain.getvalue()
    path = tmp_path / "write-only.pt"
    with path.open("wb") as file:
        zip_checksums.save(payload, file)  # type: ignore[arg-type]  # no seek(0) / truncate()
    assert path.read_bytes() == _torch_bytes(payload)


def test_a_file_archive_checksums_the_ranges_it_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "bytes"
    data = random.Random(1).randbytes(3 * 65536 + 5)
    path.write_bytes(data)
    handle = os.open(path, os.O_RDONLY)
    try:
        archive = FileArchive(handle)
        with ThreadPoolExecutor(2) as pool:
            piece = archive.crc32(pool, 65537, 2 * 65536)
            assert piece.result() == zlib.crc32(data[65537:65537 + 2 * 65536])
            assert archive.crc32(pool, 3, 70000).result() == zlib.crc32(data[3:70003])
        assert archive.size == len(data)
    finally:
        os.close(handle)


def test_zip64_fields_give_the_sizes_and_offset_a_central_entry_leaves_out() -> None:
    extra = (struct.pack("<HH", 0x7075, 3) + b"abc"  # another field first
             + struct.pack("<HHQQ", 1, 16, 5 << 32, 7 << 32))
    assert zip_checksums._zip64_values(extra, 0xFFFFFFFF, 12, 0xFFFFFFFF) == \
        (5 << 32, 12, 7 << 32)
    assert zip_checksums._zip64_values(b"", 10, 10, 99) == (10, 10, 99)
    with pytest.raises(UnexpectedLayout, match="zip64"):
        zip_checksums._zip64_values(b"", 0xFFFFFFFF, 10, 99)
