"""Writing deploy checkpoints.

OUT is checked before any work starts (suffix, folder, writability, what it is now). The file
is serialised to a file object, so no temp name is recorded inside it and the same input gives
the same bytes, into a file in OUT's folder that has no name until it is whole (Linux's
O_TMPFILE; elsewhere a temp name, which any failure, Ctrl-C or SIGTERM removes), then renamed
into place: there is never a partial OUT, even after SIGKILL. The file object writes around the
page cache where the file system allows it (`direct_write`), through it otherwise.

An existing OUT is replaced only when it is a regular file with a write permission bit; a
symbolic link or a read-only file is refused rather than silently replaced.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import stat
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from repconv.errors import DeployCheckError, InputError, one_line
from repconv.fold.calls import copies, eval_mode
from repconv.formats import zip_checksums
from repconv.formats.checkpoint import LoadedCheckpoint
from repconv.formats.direct_write import DirectWriter, direct_writer
from repconv.formats.kinds import FileKind, kind_of
from repconv.formats.metadata import DEPLOY_MARKER, DEPLOY_VERSION
from repconv.formats.pt2 import export_bytes
from repconv.formats.syscalls import start_writeback
from repconv.formats.unpickle import placeholders
from repconv.formats.zip_record import with_record

# Entries of a training checkpoint that only resume training; a deploy file drops them unless
# --keep-extra. Everything else keeps its key and place.
TRAINING_ONLY_KEYS = frozenset({
    "optimizer", "optimizer_state_dict", "optimizers", "optimizer_states", "scheduler",
    "lr_scheduler", "lr_schedulers", "scaler", "grad_scaler", "amp",
})
_CHUNK = 1 << 20  # written in pieces, so a signal is handled between them
_WRITEBACK = 32 << 20  # bytes written between the starts of their writeback


def check_output(in_path: Path, out: Path) -> None:
    """Refuse an OUT that cannot or should not be written, before any work is done."""
    if kind_of(out) is None:
        raise InputError(f"OUT {out} must end in .pt, .pth, .safetensors, .pt2 or .onnx (it "
                         "picks the format)")
    if out.is_symlink():
        raise InputError(f"OUT {out} is a symbolic link (to {os.readlink(out)}); repconv does "
                         "not write through links: give the target's path, or remove the link")
    folder = out.parent
    if not folder.exists():
        raise InputError(f"folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise InputError(f"OUT's folder {folder} is a file, not a folder; choose another OUT")
    if out.exists():
        if in_path.exists() and os.path.samefile(out, in_path):
            raise InputError("OUT is the same file as IN; repconv never overwrites its input")
        if out.is_dir():
            raise InputError(f"OUT {out} is a directory; give a file name")
        mode = out.stat().st_mode
        if not stat.S_ISREG(mode):
            raise InputError(f"OUT {out} exists and is not a regular file; choose another OUT")
        if not mode & 0o222:
            raise InputError(f"OUT {out} is read-only; make it writable (chmod u+w) or remove "
                             "it to have repconv replace it")
    try:  # root ignores permission bits: only a real attempt tells
        handle, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"cannot write in folder {folder} ({exc.strerror or exc}); choose "
                         "another OUT or make the folder writable") from exc


class _FdWriter:
    """A file object over a descriptor whose every write goes through ``os.write`` in pieces,
    so a signal is handled between them: torch.save streams into it, with no copy in memory.
    Where the file system takes no O_DIRECT writes (`direct_write`)."""

    def __init__(self, handle: int) -> None:
        self.handle = handle
        self.failure: BaseException | None = None  # torch's writer wraps what write raises
        self.checksums: dict[int, tuple[int, int]] = {}  # none: the archive's are read back
        self.written = self.flushed = 0  # bytes in the file; bytes whose writeback has started
        # starting writeback waits on the disk's queue: a thread of its own waits instead
        self._writeback = ThreadPoolExecutor(1, thread_name_prefix="repconv-writeback")

    def write(self, data: bytes | memoryview) -> int:
        if self.failure is not None:
            raise self.failure
        view = memoryview(data).cast("B")
        size = len(view)
        try:
            while view:
                done = os.write(self.handle, view[:_CHUNK])
                view = view[done:]
                self.written += done
                if self.written - self.flushed >= _WRITEBACK:
                    self._start_writeback()
        except BaseException as exc:  # a full disk, Ctrl-C or SIGTERM: kept for the caller
            self.failure = exc
            raise
        return size

    def _start_writeback(self) -> None:
        """Have the kernel start writing what is written so far, so the fsync before the
        rename waits for the tail alone, not the whole file."""
        self._writeback.submit(start_writeback, self.handle, self.flushed,
                               self.written - self.flushed)
        self.flushed = self.written

    def settle(self) -> None:
        """Wait for the writeback started so far to be under way; before the file is closed,
        so that no call reaches a descriptor that is by then another file's (the fsync
        meanwhile writes whatever is still dirty)."""
        self._writeback.shutdown(wait=True)

    def flush(self) -> None:
        """Every write is already in the file."""

    def fileno(self) -> int:
        return self.handle

    def seek(self, offset: int) -> int:
        """Write from ``offset`` on (to write the file again)."""
        self.written = self.flushed = os.lseek(self.handle, offset, os.SEEK_SET)
        return self.written

    def truncate(self) -> int:
        """Cut the file where the next write goes."""
        os.ftruncate(self.handle, self.written)
        return self.written


Writer = DirectWriter | _FdWriter  # what `write_atomically` hands its writing function


def write_atomically(out: Path, data: bytes | Callable[[Writer], None], *,
                     before_replace: Callable[[], None] | None = None) -> None:
    """``data`` (bytes, or a function writing them to the file object it gets) into ``out``:
    written to a file in its folder that has no name until it is whole (`_open_file`), synced,
    then renamed into place. ``before_replace`` runs once the bytes are on disk: what it raises
    leaves OUT as it was."""
    handle, temp = _open_file(out)
    try:
        writer: Writer | None = None
        try:
            writer = direct_writer(handle) or _FdWriter(handle)
            try:
                if callable(data):
                    data(writer)
                else:
                    writer.write(data)
                writer.flush()
            except BaseException as exc:
                if writer.failure is not None and writer.failure is not exc:
                    raise writer.failure from exc
                raise
            os.fchmod(handle, 0o666 & ~_umask())  # made 0600; deploy files are shared
            os.fsync(handle)
            if before_replace is not None:
                before_replace()
            if temp is None:
                temp = _name_file(handle, out)
        finally:
            if writer is not None:
                writer.settle()
            os.close(handle)
        os.replace(temp, out)
    except BaseException as exc:
        if temp is not None:
            temp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise InputError(f"cannot write {out} ({exc.strerror or exc}); nothing written: free "
                             "space on that disk or choose another OUT") from exc
        raise


def _open_file(out: Path) -> tuple[int, Path | None]:
    """A new file in OUT's folder: unnamed where the system makes one (Linux's O_TMPFILE), so
    a process that dies while writing it, even by SIGKILL or SIGBUS, leaves nothing; else a
    temp name, removed on any failure the process lives through."""
    if hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd"):
        try:
            return os.open(out.parent, os.O_TMPFILE | os.O_RDWR, 0o600), None
        except OSError:  # a filesystem without unnamed files
            pass
    handle, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    return handle, Path(name)


def _name_file(handle: int, out: Path) -> Path:
    """A temp name in OUT's folder for the unnamed file ``handle``, to be renamed over OUT (the
    one moment a dying process could leave it behind)."""
    descriptors = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        while True:
            temp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
            try:  # linkat(AT_SYMLINK_FOLLOW) through /proc: plain link() would not follow
                os.link(str(handle), temp, src_dir_fd=descriptors, follow_symlinks=True)
                return temp
            except FileExistsError:
                continue
    finally:
        os.close(descriptors)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _torch_save(payload: Any) -> Callable[[Writer], None]:
    """torch.save streamed into the file (a file object, not a name: no name is recorded), its
    checksums computed on every core (`zip_checksums`)."""
    return lambda file: zip_checksums.save(payload, file)


def _safetensors_writer(state: dict[str, Tensor],
                        metadata: dict[str, str]) -> Callable[[Writer], None]:
    """safetensors with the header's keys sorted: the library writes its metadata in hash
    order, which changes from process to process."""

    def write(file: Writer) -> None:
        data = safetensors_bytes(state, metadata=metadata)
        length = int.from_bytes(data[:8], "little")
        header = json.dumps(json.loads(data[8:8 + length]), sort_keys=True,
                            separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the tensor data stays 8-byte aligned
        file.write(len(header).to_bytes(8, "little") + header)
        file.write(memoryview(data)[8 + length:])

    return write


def _owns_storage(tensor: Tensor) -> bool:
    return (tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())


def _plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state_dict with every tensor owning exactly its storage (a view of a bigger one
    would save all of it); tensors that already do are not copied."""
    return {k: v.detach() if _owns_storage(v) else v.detach().contiguous().clone()
            for k, v in model.state_dict().items()}


def _pickled_payload(fused: nn.Module, loaded: LoadedCheckpoint, keep_extra: bool) -> Any:
    """IN's layout with the fused module in the slot it came from, in IN's key order. Entries
    that only resume training, and other copies of the model (the live model beside an EMA),
    go unless ``keep_extra``."""
    if loaded.slot is None:
        return fused
    payload: dict[str, Any] = {}
    for key, value in loaded.extra.items():
        if key == loaded.slot:
            payload[key] = fused
        elif keep_extra:
            payload[key] = value
        elif key in TRAINING_ONLY_KEYS:
            continue
        else:
            payload[key] = None if isinstance(value, nn.Module) else value
    return payload


def _check_loads_back(data: bytes, slot: str | None, fused: nn.Module,
                      example_inputs: tuple[Tensor, ...]) -> None:
    """The pickled deploy model, unpickled as a deploy step loads it, computes on the example
    input what the fused model computes: a module whose pickling torch rebuilds by tracing its
    code again could otherwise be written and never load. These are repconv's own bytes."""
    try:
        payload = torch.load(io.BytesIO(data), weights_only=False)
        model = payload[slot] if slot is not None else payload
        with torch.no_grad(), eval_mode(model, fused):
            pairs = list(zip(tree_flatten(fused(*copies(example_inputs)))[0],
                             tree_flatten(model(*copies(example_inputs)))[0], strict=True))
    except Exception as exc:  # whatever stops it, the file would not serve
        raise DeployCheckError(
            f"the pickled deploy model does not load back ({type(exc).__name__}: "
            f"{one_line(exc, 160)}); nothing written. This is a bug in repconv: please report "
            "it; a .safetensors OUT holds the same fused weights") from exc
    for want, got in pairs:
        if isinstance(want, Tensor) and not torch.allclose(
                want.float(), got.float(), rtol=1e-5, atol=1e-6, equal_nan=True):
            raise DeployCheckError(
                "the pickled deploy model computes otherwise once loaded back; nothing "
                "written. This is a bug in repconv: please report it; a .safetensors OUT "
                "holds the same fused weights")


def save_deploy(
    out: Path,
    fused: nn.Module,
    plan: list[dict[str, Any]],
    loaded: LoadedCheckpoint,
    input_shape: tuple[int, ...],
    example_inputs: tuple[Tensor, ...],
    *,
    keep_extra: bool = False,
    before_replace: Callable[[], None] | None = None,
) -> str:
    """Write the deploy checkpoint in the format OUT's suffix names; returns a description.
    (An ``.onnx`` OUT is exported and verified first: ``repconv.formats.onnx_deploy``.)
    ``before_replace``: as `write_atomically`'s."""
    kind = kind_of(out)
    if kind is FileKind.ONNX:
        raise ValueError("an .onnx OUT is written from its verified bytes, not by save_deploy")
    arch = loaded.architecture
    meta = {
        DEPLOY_MARKER: DEPLOY_VERSION,
        "arch": arch.reference if arch else "",
        "arch_kwargs": arch.kwargs if arch else {},
        "input_shape": list(input_shape),
        "plan": plan,
    }
    if kind is FileKind.PT2:
        exported = export_bytes(fused, example_inputs, {
            DEPLOY_MARKER: DEPLOY_VERSION, "input_shape": list(input_shape)})
        write_atomically(out, exported.data, before_replace=before_replace)
        return exported.describe()
    if kind is FileKind.SAFETENSORS:
        metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
        write_atomically(out, _safetensors_writer(_plain_state_dict(fused), metadata),
                         before_replace=before_replace)
        return "safetensors weights with the rewrite plan in metadata"
    if loaded.pickled:
        archive = io.BytesIO()
        zip_checksums.save(_pickled_payload(fused, loaded, keep_extra), archive)
        _check_loads_back(archive.getvalue(), loaded.slot, fused, example_inputs)
        write_atomically(out, with_record(archive.getvalue(), {
            DEPLOY_MARKER: DEPLOY_VERSION, "input_shape": list(input_shape)}),
                         before_replace=before_replace)
        where = f" under {loaded.slot!r}, in IN's layout" if loaded.slot else ""
        return f"pickled fused module{where}, with the input shape recorded"
    payload = {**meta, "state_dict": _plain_state_dict(fused)}
    if keep_extra:
        # objects read as inert placeholders are not the user's objects: they stay out
        kept = {k: v for k, v in loaded.extra.items() if next(placeholders(v), None) is None}
        payload = {**kept, **payload}
    write_atomically(out, _torch_save(payload), before_replace=before_replace)
    return "fused state_dict with the rewrite plan (loads with weights_only=True)"
