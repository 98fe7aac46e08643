"""Reading a checkpoint by mapping it: a torch zip archive whose records are stored as they are
(torch.save never compresses) is read with ``torch.load(mmap=True)``, so its tensors are the
file's own pages, read as they are first used, not copied into fresh memory first (a third of
a plain load+save's time on a 480 MB checkpoint). The mapping is private: nothing repconv does
to a tensor reaches the file.

What mapping changes, and how each is kept safe:
- The tensors read the file for as long as they live: a file changed in place meanwhile would
  change them. `FileStamp` records the file (device, inode, size, modification time) before it
  is read; a command checks it again before it writes, once the bytes it wrote are on disk
  (what it wrote may have been read from the file), and before it reports; it refuses (exit 2)
  where the file changed. A file cut shorter meanwhile ends the process with SIGBUS where a
  tensor reads past its new end, and OUT, unnamed until whole (`formats.write`), goes with it.
- A record offset or size outside the file gives a tensor torch refuses to make (its storage
  slice is clamped to the file), as a read error.
- The pages a process has read count in its resident memory until they are unmapped: `drop_pages`
  lets the kernel take back those of tensors nothing reads any more.
"""

from __future__ import annotations

import mmap
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor
from torch.serialization import get_default_mmap_options

from repconv.errors import InputError
from repconv.formats.syscalls import release_pages


def mappable(path: Path) -> bool:
    """A torch zip archive whose every record is stored uncompressed (a compressed record's
    bytes are not its tensor's), mapped privately by torch's default."""
    if get_default_mmap_options() != mmap.MAP_PRIVATE:
        return False  # a shared mapping would write changes to tensors into the file
    try:
        with zipfile.ZipFile(path) as archive:
            return all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False  # not an archive (or a damaged one): read as before, which says why


@dataclass(frozen=True)
class FileStamp:
    """What identifies a file's contents without reading them again."""

    path: Path  # absolute: user code may change the working directory meanwhile
    device: int
    inode: int
    size: int
    modified_ns: int
    given: Path = field(compare=False)  # as the user named it, for the message

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        status = path.stat()
        return cls(path.absolute(), status.st_dev, status.st_ino, status.st_size,
                   status.st_mtime_ns, path)

    def check(self, role: str) -> None:
        """InputError where the file was written or replaced since the stamp (``role``: how
        the message names it, "IN", "DEPLOY")."""
        try:
            now = FileStamp.of(self.path)
        except OSError:
            now = None
        if now != self:
            raise InputError(f"{role} {self.given} changed while repconv read it (another "
                             "process wrote or replaced it), so the result would not be the "
                             "file's; nothing written: run again once the file is complete")


def drop_pages(tensors: list[Tensor]) -> None:
    """Unmap the whole pages inside each tensor's storage (Linux): read from a mapped file,
    they leave the process's resident memory; a tensor's own memory is given back as if freed.
    Only for tensors nothing reads again."""
    page = mmap.PAGESIZE
    for tensor in tensors:
        if tensor.device.type != "cpu":
            continue
        storage = tensor.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        # the pages it shares with a neighbour's bytes stay
        first, last = -(-start // page) * page, end // page * page
        if last > first:
            release_pages(first, last - first)
