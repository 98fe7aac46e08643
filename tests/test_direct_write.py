"""The writer around the page cache (`formats.direct_write`): the file holds exactly the bytes
written, whatever the sizes of the writes against its blocks; each write's CRC-32 is zlib's; a
failed write on one of its threads reaches the caller; O_DIRECT is off once it is flushed; and
a file system without O_DIRECT gets the writer through the cache."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from repconv.errors import InputError
from repconv.formats import direct_write, write
from repconv.formats.direct_write import DirectWriter, direct_writer

BLOCK = 8192  # two sectors of 4096: writes cross many blocks


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(direct_write, "BLOCK", BLOCK)


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    path = tmp_path / "out.bin"
    handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    yield handle, path
    os.close(handle)


def _writer(handle: int) -> DirectWriter:
    writer = direct_writer(handle)
    if writer is None:
        pytest.skip("this file system takes no O_DIRECT")
    return writer


@pytest.mark.usefixtures("small_blocks")
def test_the_file_holds_every_write_in_order_with_its_checksum(
        opened: tuple[int, Path]) -> None:
    handle, path = opened
    rng = random.Random(0)
    sizes = [0, 1, 4095, 4096, 4097, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17, 5, 0, 70000]
    sizes += [rng.randrange(1, 3 * BLOCK) for _ in range(40)]
    writes = [rng.randbytes(size) for size in sizes]
    writer = _writer(handle)
    try:
        offset = 0
        for data in writes:
            assert writer.write(memoryview(data)) == len(data)
            offset += len(data)
        writer.flush()
    finally:
        writer.settle()
    assert path.read_bytes() == b"".join(writes)
    assert os.fstat(handle).st_size == offset  # the last block's padding is cut off
    offset = 0
    for data in writes:
        if data:
            assert writer.checksums[offset] == (len(data), zlib.crc32(data))
        offset += len(data)
    assert not fcntl.fcntl(handle, fcntl.F_GETFL) & os.O_DIRECT


@pytest.mark.usefixtures("small_blocks")
def test_written_again_from_the_start_after_a_seek(opened: tuple[int, Path]) -> None:
    """What torch.save's fallback does (seek to 0, cut, write again): the second content
    alone, its checksums counted from 0."""
    handle, path = opened
    writer = _writer(handle)
    try:
        writer.write(os.urandom(5 * BLOCK + 3))
        writer.seek(0)
        writer.truncate()
        again = os.urandom(BLOCK + 9)
        writer.write(again)
        writer.flush()
    finally:
        writer.settle()
    assert path.read_bytes() == again
    assert writer.checksums == {0: (len(again), zlib.crc32(again))}


@pytest.mark.usefixtures("small_blocks")
def test_a_write_failing_on_a_thread_reaches_the_caller(
        opened: tuple[int, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    handle, _ = opened
    real_pwrite = os.pwrite

    def full_disk(fd: int, data: memoryview, offset: int) -> int:
        if fd == handle and offset == 2 * BLOCK:  # this block alone: the others go through
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    writer = _writer(handle)
    try:
        with pytest.raises(OSError) as raised:
            for _ in range(20):
                writer.write(os.urandom(BLOCK))
            writer.flush()
        assert raised.value.errno == errno.ENOSPC
        with pytest.raises(OSError):  # the writer stays failed
            writer.write(b"more")
        with pytest.raises(OSError):  # and a flush never passes over the hole
            writer.flush()
    finally:
        started = time.monotonic()
        writer.settle()
        assert time.monotonic() - started < 5


def test_a_file_system_without_o_direct_is_written_through_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(_handle: int, _on: bool) -> None:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(direct_write, "_set_direct", refused)
    handle = os.open(tmp_path, os.O_TMPFILE | os.O_RDWR, 0o600) if hasattr(
        os, "O_TMPFILE") else os.open(tmp_path / "probe", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert direct_writer(handle) is None
    finally:
        os.close(handle)
    data = os.urandom(3 << 20)
    write.write_atomically(tmp_path / "out.bin", data)
    assert (tmp_path / "out.bin").read_bytes() == data


@pytest.mark.parametrize("at", ["the first sector", "a later block"])
def test_a_full_disk_in_write_atomically_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: str) -> None:
    """The failure, at the writer's first sector or on one of its threads later, becomes the
    one-line refusal; no file is left, and no descriptor open."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc/self/fd to tell the file by")
    real_pwrite = os.pwrite

    def into_folder(fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path))
        except OSError:
            return False

    def full_disk(fd: int, data: memoryview, offset: int) -> int:
        if into_folder(fd) and (at == "the first sector" or offset >= 8 << 20):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(InputError, match=r"No space left on device.*nothing written"):
        write.write_atomically(tmp_path / "out.bin", os.urandom(20 << 20))
    assert list(tmp_path.iterdir()) == []
    assert not [fd for fd in os.listdir("/proc/self/fd") if into_folder(int(fd))]


@pytest.mark.parametrize("error", [errno.EINVAL, errno.ENOSPC])
def test_the_alignment_is_tried_first(opened: tuple[int, Path], error: int,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that takes the flag but refuses the alignment gets the writer through
    the cache (O_DIRECT off again); a full disk fails there as it would have later."""
    handle, _ = opened

    def refuse(fd: int, data: memoryview, offset: int) -> int:
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "pwrite", refuse)
    if error == errno.EINVAL:
        assert direct_writer(handle) is None
        assert not fcntl.fcntl(handle, fcntl.F_GETFL) & os.O_DIRECT
    else:
        with pytest.raises(OSError, match="No space left"):
            direct_writer(handle)
