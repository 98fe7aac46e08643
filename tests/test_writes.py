"""Writing OUT, where the behaviour depends on the real process: an unwritable folder, a full
disk, SIGTERM in the middle of a write, links and read-only files in OUT's place, and deploy
files that are byte-identical from run to run.

Faults that the machine cannot produce on demand are injected into a real `python -m repconv`
process by a wrapper that replaces ``os.write`` and ``os.pwrite`` (the calls every deploy write
goes through: pwrite from the threads that write around the page cache, and for the checksums;
write where the file system takes no O_DIRECT). Where the machine allows it (root with mount
namespaces), the full disk is a real 32 KiB tmpfs.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers.cli_support import (
    assert_process_refused,
    assert_refused,
    invoke,
    json_document,
    one_error_line,
    repconv_process,
    run_process,
    sha256,
    snapshot,
)

from repconv.rewrite.plan import PLAN_VERSION

FORMATS = (".pt", ".safetensors", ".pt2")
WRITE_HOOK = """
import errno, os, runpy, signal, sys, threading, time

mode, folder = sys.argv[1], os.path.abspath(sys.argv[2])
real_write, real_pwrite = os.write, os.pwrite
began = threading.Event()

def into_folder(fd):
    # only writes to a file in OUT's folder (named or not yet: an unnamed file's link reads
    # "FOLDER/#inode (deleted)"); torch writes temp files of its own elsewhere
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith(folder + os.sep)
    except OSError:
        return False

def begin():
    if began.is_set():
        return
    began.set()
    open(os.environ["HOOK_BEGAN"], "w").close()  # the test may act now
    if mode == "sigkill":  # the process dies mid-write, with no cleanup at all
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "truncate-in":  # another process cuts IN short while OUT is written
        os.truncate(os.environ["HOOK_IN"], 0)
    if mode == "rewrite-in":  # another process writes IN in place, the same size
        with open(os.environ["HOOK_IN"], "r+b") as handle:
            handle.seek(os.path.getsize(os.environ["HOOK_IN"]) // 2)
            handle.write(bytes(4096))

def hooked(fd, data):
    if not into_folder(fd):
        return real_write(fd, data)
    begin()
    if mode == "enospc":  # some bytes reach the disk, then it is full
        real_write(fd, bytes(data[:1000]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if mode == "slow":  # a write that takes seconds, to be interrupted
        time.sleep(0.05)
        return real_write(fd, bytes(data[:4096]))
    return real_write(fd, data)

def hooked_pwrite(fd, data, offset):
    if not into_folder(fd):
        return real_pwrite(fd, data, offset)
    begin()
    # a direct write takes whole sectors from aligned memory: the view's first 4096 bytes
    head = memoryview(data)[:4096]
    if mode == "enospc" and not (offset == 0 and len(data) == 4096 and not any(head)):
        # (the writer's first write, one empty sector, tries the alignment: it goes through)
        if len(head) == 4096:
            real_pwrite(fd, head, offset)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if mode == "slow":
        time.sleep(0.05)
        return real_pwrite(fd, head, offset)
    return real_pwrite(fd, data, offset)

os.write, os.pwrite = hooked, hooked_pwrite
if os.environ.get("HOOK_CACHED"):  # as on a file system that takes no O_DIRECT
    import repconv.formats.write
    repconv.formats.write.direct_writer = lambda handle: None
sys.argv = ["repconv", *sys.argv[3:]]
runpy.run_module("repconv", run_name="__main__", alter_sys=True)
"""


def hooked_repconv(tmp_path: Path, mode: str, out: Path, *args: object) -> list[str]:
    """`python -m repconv fuse ... OUT ...` whose writes into OUT's folder fail, crawl or meet
    another event (`WRITE_HOOK`); run it with `hook_env`."""
    hook = tmp_path / "write_hook.py"
    hook.write_text(WRITE_HOOK)
    return [sys.executable, str(hook), mode, str(out.parent), *map(str, args)]


def hook_env(tmp_path: Path, **more: str) -> dict[str, str]:
    """The hook's settings: the file it creates when the first write into OUT's folder begins,
    and ``HOOK_IN``, IN for the modes that change it."""
    return {"HOOK_BEGAN": str(tmp_path / "write_began"), **more}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------ OUT checked first


def test_out_under_a_file_is_refused_before_loading(repvgg_ckpt: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("IN was loaded before OUT was checked")

    monkeypatch.setattr("repconv.pipeline.options.load_checkpoint", never)
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("a file")
    before = snapshot(tmp_path)
    result = invoke("fuse", repvgg_ckpt, not_a_folder / "deploy.pt")
    assert_refused(result, before, snapshot(tmp_path), ["notes.txt", "is a file, not a folder"])


@pytest.fixture
def unwritable_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder this process really cannot create files in (root ignores permission bits)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    elif shutil.which("chattr") and run_process(["chattr", "+i", folder], tmp_path).returncode == 0:
        undo = ["chattr", "-i", str(folder)]
    else:
        pytest.skip("root without chattr: no way to make a folder unwritable here")
    try:
        probe = folder / "probe"
        with pytest.raises(OSError):
            probe.write_bytes(b"")
        yield folder
    finally:
        run_process(undo, tmp_path)


def test_unwritable_folder_is_refused_in_the_real_process(repvgg_ckpt: Path, tmp_path: Path,
                                                          unwritable_folder: Path) -> None:
    started = time.monotonic()
    proc = repconv_process("fuse", repvgg_ckpt, unwritable_folder / "deploy.pt", "--json",
                           cwd=tmp_path)
    assert_process_refused(proc, ["cannot write in folder", "locked"], as_json=True)
    assert leftovers(unwritable_folder) == []
    assert time.monotonic() - started < 60


# ------------------------------------------------------------------------ full disk


@pytest.fixture(params=["around the cache", "through the cache"])
def cache(request: pytest.FixtureRequest) -> dict[str, str]:
    """The hook's setting for the writer: O_DIRECT where the file system takes it, or the
    writer for those that do not."""
    return {} if request.param == "around the cache" else {"HOOK_CACHED": "1"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_full_disk_leaves_no_partial_out(repvgg_ckpt: Path, tmp_path: Path, fmt: str,
                                         cache: dict[str, str]) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / f"deploy{fmt}"
    proc = run_process(hooked_repconv(tmp_path, "enospc", out, "fuse", repvgg_ckpt, out,
                                      "--json"), tmp_path, env=hook_env(tmp_path, **cache))
    assert_process_refused(proc, ["cannot write", "No space left on device", "nothing written"],
                           as_json=True)
    assert leftovers(out_dir) == []


def _can_mount_tmpfs(tmp_path: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = run_process(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=32k tmpfs "
                         f"{tmp_path}"], tmp_path, timeout=30)
    return probe.returncode == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_real_full_disk_leaves_no_partial_out(repvgg_ckpt: Path, tmp_path: Path,
                                              fmt: str) -> None:
    """A 32 KiB tmpfs, mounted in a private mount namespace so it vanishes with the process."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (needs root and mount namespaces)")
    script = (f"mount -t tmpfs -o size=32k tmpfs {disk} && "
              f"{sys.executable} -m repconv fuse {repvgg_ckpt} {disk}/deploy{fmt}; "
              f"code=$?; echo LISTING; ls -A {disk}; exit $code")
    proc = run_process(["unshare", "-m", "sh", "-c", script], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "No space left on device" in one_error_line(proc.stderr)
    assert proc.stdout.split("LISTING", 1)[1].split() == []  # no OUT, no temp file


# ------------------------------------------------------------------------ SIGTERM


@pytest.mark.parametrize("fmt", [".pt", ".pt2"])
def test_sigterm_during_the_write_leaves_nothing(repvgg_ckpt: Path, tmp_path: Path,
                                                 fmt: str, cache: dict[str, str]) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / f"deploy{fmt}"
    process = subprocess.Popen(
        hooked_repconv(tmp_path, "slow", out, "fuse", repvgg_ckpt, out, "--json"),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **hook_env(tmp_path, **cache)})
    deadline = time.monotonic() + 90
    while not (tmp_path / "write_began").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the write never started"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    message = one_error_line(stderr)
    assert message == "terminated by SIGTERM: nothing written"
    assert json_document(stdout) == {"schema_version": 1, "ok": False, "error": message,
                                     "exit_code": 143}
    assert leftovers(out_dir) == []


def test_a_process_killed_mid_write_leaves_nothing(repvgg_ckpt: Path, tmp_path: Path) -> None:
    """OUT's bytes go to a file that has no name until it is whole: SIGKILL (no cleanup runs)
    leaves no OUT and no temp file."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "deploy.pt"
    proc = run_process(hooked_repconv(tmp_path, "sigkill", out, "fuse", repvgg_ckpt, out),
                       tmp_path, env=hook_env(tmp_path))
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "write_began").exists()
    assert leftovers(out_dir) == []


def test_in_written_in_place_while_out_is_written_is_refused(repvgg_ckpt: Path,
                                                              tmp_path: Path) -> None:
    """IN is read mapped, so the layers that were not fused are read from it while OUT is
    written: IN changed then is refused after the write, before OUT takes the name."""
    train = tmp_path / "train.pt"
    shutil.copyfile(repvgg_ckpt, train)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "deploy.pt"
    out.write_bytes(b"the previous deploy file")
    proc = run_process(hooked_repconv(tmp_path, "rewrite-in", out, "fuse", train, out),
                       tmp_path, env=hook_env(tmp_path, HOOK_IN=str(train)))
    assert_process_refused(proc, ["train.pt changed while repconv read it", "nothing written"])
    assert leftovers(out_dir) == ["deploy.pt"]
    assert out.read_bytes() == b"the previous deploy file"


def test_in_cut_short_while_out_is_written_leaves_nothing(repvgg_ckpt: Path,
                                                          tmp_path: Path) -> None:
    """The mapped tensors past IN's new end cannot be read: the process ends (SIGBUS) and its
    unnamed OUT goes with it."""
    train = tmp_path / "train.pt"
    shutil.copyfile(repvgg_ckpt, train)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "deploy.pt"
    proc = run_process(hooked_repconv(tmp_path, "truncate-in", out, "fuse", train, out),
                       tmp_path, env=hook_env(tmp_path, HOOK_IN=str(train)))
    assert proc.returncode != 0
    assert leftovers(out_dir) == []


# ------------------------------------------------------------------------ what is in OUT's place


def test_read_only_out_is_refused(repvgg_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy.pt"
    out.write_bytes(b"an older deploy file")
    out.chmod(0o444)
    before = snapshot(tmp_path)
    result = invoke("fuse", repvgg_ckpt, out)
    assert_refused(result, before, snapshot(tmp_path), ["read-only", "chmod u+w"])
    assert stat.S_IMODE(out.stat().st_mode) == 0o444


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_symlink_out_is_refused(repvgg_ckpt: Path, tmp_path: Path, dangling: bool) -> None:
    target = tmp_path / "real" / "deploy.pt"
    target.parent.mkdir()
    if not dangling:
        target.write_bytes(b"the link's target")
    link = tmp_path / "latest.pt"
    link.symlink_to(target)
    before = snapshot(tmp_path)
    result = invoke("fuse", repvgg_ckpt, link)
    assert_refused(result, before, snapshot(tmp_path), ["symbolic link", str(target)])
    assert link.is_symlink() and os.readlink(link) == str(target)


def test_existing_regular_out_is_replaced(repvgg_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy.pt"
    out.write_bytes(b"an older deploy file")
    result = invoke("fuse", repvgg_ckpt, out)
    assert result.exit_code == 0, result.output
    assert torch.load(out, weights_only=True)["repconv_deploy"] == PLAN_VERSION
    assert leftovers(tmp_path) == ["deploy.pt"]


# ------------------------------------------------------------------------ byte-identical


@pytest.mark.parametrize("fmt", FORMATS)
def test_deploy_files_are_byte_identical(repvgg_ckpt: Path, tmp_path: Path, fmt: str) -> None:
    """Two runs (this process and a fresh one), different OUT names: the same bytes. The temp
    file's random name must not reach the archive, and torch must not warn about it."""
    first, second = tmp_path / "a" / f"deploy{fmt}", tmp_path / "b" / f"other_name{fmt}"
    first.parent.mkdir()
    second.parent.mkdir()
    assert invoke("fuse", repvgg_ckpt, first).exit_code == 0
    proc = repconv_process("fuse", repvgg_ckpt, second, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json_document(proc.stdout)["ok"] is True
    assert sha256(first) == sha256(second)
    assert first.stat().st_size > 10_000
    assert "warn" not in proc.stderr.lower() and ".tmp" not in proc.stderr


def test_writeback_starts_while_the_file_is_written(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the file system takes no O_DIRECT, the write goes through the page cache, and the
    fsync before the rename waits for the tail of the file only: the kernel is told to
    start writing each 32 MiB as it is written, over the whole file, in order, by a thread of
    its own (the call waits on the disk's queue, the writes go on)."""
    import threading

    from repconv.formats import syscalls, write

    advised: list[tuple[int, int]] = []
    callers: set[str] = set()

    def advise(handle: int, offset: int, length: int) -> None:
        advised.append((offset, length))
        callers.add(threading.current_thread().name)
        syscalls.start_writeback(handle, offset, length)

    monkeypatch.setattr(write, "start_writeback", advise)
    monkeypatch.setattr(write, "direct_writer", lambda _handle: None)  # a tmpfs, say
    data = os.urandom(1 << 20) * 100  # 100 MiB
    out = tmp_path / "big.bin"
    write.write_atomically(out, data)
    assert out.read_bytes() == data
    assert [offset for offset, _ in advised] == [0, 32 << 20, 64 << 20]
    assert len(callers) == 1 and threading.main_thread().name not in callers
    assert all(length == 32 << 20 for _, length in advised)
