"""Checkpoints read mapped (`repconv.formats.mapped`): a torch archive's tensors are the file's
own pages; a compressed archive is read as before; a file changed while repconv reads it is
refused with nothing written; the pages of tensors a conversion freed leave the process."""

from __future__ import annotations

import mmap
import zipfile
from pathlib import Path

import pytest
import torch
from helpers.cli_support import assert_process_refused, repconv_process, snapshot
from helpers.reference_blocks import randomize_bn
from helpers.tensors import randn
from torch import Tensor

from repconv.formats.checkpoint import load_checkpoint
from repconv.formats.mapped import drop_pages, mappable
from repconv.samples import repvgg_tiny


def _mapping_of(tensor: Tensor) -> str | None:
    """The file the mapping holding ``tensor``'s bytes maps (None: anonymous memory)."""
    address = tensor.untyped_storage().data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(v, 16) for v in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
    return None


def _mapped_rss_kb(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path``."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def _checkpoint(folder: Path, width: int = 16) -> Path:
    torch.manual_seed(0)
    path = folder / "train.pt"
    torch.save({"state_dict": randomize_bn(repvgg_tiny(width=width), seed=1).state_dict(),
                "arch": "repconv.samples:repvgg_tiny", "arch_kwargs": {"width": width},
                "input_shape": [1, 3, 32, 32]}, path)
    return path


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_a_torch_archive_is_read_on_the_files_own_pages(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    loaded = load_checkpoint(path)
    assert loaded.mapped and loaded.stamp is not None
    saved = torch.load(path, weights_only=True)["state_dict"]
    state = loaded.model.state_dict()
    assert state.keys() == saved.keys()
    for key, weight in state.items():
        assert torch.equal(weight, saved[key])
        if weight.numel():
            assert _mapping_of(weight) == str(path.resolve()), key


def test_a_compressed_archive_is_read_into_memory_as_before(tmp_path: Path) -> None:
    stored = _checkpoint(tmp_path)
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(stored) as source, zipfile.ZipFile(deflated, "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info), zipfile.ZIP_DEFLATED)
    assert mappable(stored) and not mappable(deflated)
    loaded = load_checkpoint(deflated)
    assert not loaded.mapped
    want = load_checkpoint(stored).model.state_dict()
    got = loaded.model.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_shared_mapping_default_is_never_used(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)
    try:
        assert not mappable(path)  # a change to a tensor would reach the file
    finally:
        torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE)
    assert mappable(path)
    assert not mappable(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("not an archive")
    assert not mappable(tmp_path / "text.pt")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_dropped_pages_leave_the_process(tmp_path: Path) -> None:
    path = tmp_path / "big.pt"
    torch.save({"a": randn(1 << 20, seed=0), "b": randn(1 << 20, seed=1)}, path)  # 4 MiB each
    tensors = torch.load(path, weights_only=True, mmap=True)
    assert float(tensors["a"].sum() + tensors["b"].sum()) != 0.0  # read every page
    before = _mapped_rss_kb(path)
    assert before >= 8 * 1024 - 8
    drop_pages([tensors["a"]])
    after = _mapped_rss_kb(path)
    assert before - after >= 4 * 1024 - 8  # all of a's pages but the two it may share
    assert torch.equal(tensors["b"], randn(1 << 20, seed=1))  # its neighbour is untouched


CHANGING_MODEL = '''
import os
import torch
from repconv.samples import repvgg_tiny

class Changing(torch.nn.Module):
    """Writes to IN from its forward, as another process writing the file meanwhile would."""

    def __init__(self):
        super().__init__()
        self.net = repvgg_tiny(width=8)

    def forward(self, x):
        os.utime("train.pt", ns=(1, 1))
        return self.net(x)
'''


@pytest.mark.parametrize("command", ["fuse", "verify"])
def test_a_file_changed_while_it_is_read_is_refused(tmp_path: Path, command: str) -> None:
    (tmp_path / "changing_models.py").write_text(CHANGING_MODEL)
    torch.manual_seed(0)
    state = {"net." + k: v for k, v in repvgg_tiny(width=8).state_dict().items()}
    torch.save(state, tmp_path / "train.pt")
    args = ["--model", "changing_models:Changing", "--input-shape", "1,3,16,16"]
    if command == "verify":  # a deploy file made from the file before it changes
        torch.save(state, tmp_path / "steady.pt")
        steady = tmp_path / "steady_models.py"
        steady.write_text(CHANGING_MODEL.replace('os.utime("train.pt", ns=(1, 1))', "pass"))
        made = repconv_process("fuse", "steady.pt", "deploy.pt", "--model",
                               "steady_models:Changing", "--input-shape", "1,3,16,16",
                               cwd=tmp_path)
        assert made.returncode == 0, made.stderr
        argv = ["verify", "train.pt", "deploy.pt", *args]
    else:
        argv = ["fuse", "train.pt", "deploy.pt", *args]
    before = snapshot(tmp_path)
    proc = repconv_process(*argv, cwd=tmp_path)
    assert_process_refused(proc, ["train.pt changed while repconv read it",
                                  "run again once the file is complete"])
    after = snapshot(tmp_path)
    after.pop(str(tmp_path / "train.pt"))  # only its time changed, by the model
    before.pop(str(tmp_path / "train.pt"))
    assert {k: v for k, v in after.items() if "__pycache__" not in k} == {
        k: v for k, v in before.items() if "__pycache__" not in k}


TRUNCATING_MODEL = CHANGING_MODEL.replace('os.utime("train.pt", ns=(1, 1))',
                                          'os.truncate("train.pt", 0)')


def test_a_file_cut_short_while_it_is_read_writes_nothing(tmp_path: Path) -> None:
    """The mapped tensors past the new end cannot be read: the process ends (SIGBUS, or the
    stamp's refusal where nothing reads them again), and OUT is never written."""
    (tmp_path / "cutting_models.py").write_text(TRUNCATING_MODEL)
    torch.manual_seed(0)
    torch.save({"net." + k: v for k, v in repvgg_tiny(width=8).state_dict().items()},
               tmp_path / "train.pt")
    proc = repconv_process("fuse", "train.pt", "deploy.pt", "--model", "cutting_models:Changing",
                           "--input-shape", "1,3,16,16", cwd=tmp_path)
    assert proc.returncode != 0
    assert not (tmp_path / "deploy.pt").exists()
    assert not list(tmp_path.glob(".deploy.pt.*"))


CHDIR_MODEL = '''
import os
from repconv.samples import repvgg_tiny

def build():
    os.chdir("elsewhere")  # research code that moves to its own folder
    return repvgg_tiny(width=8)
'''


def test_a_model_that_changes_directory_is_not_refused(tmp_path: Path) -> None:
    """The stamp holds IN's absolute path: IN given relative still names the same file after
    the model's code moved the working directory."""
    (tmp_path / "chdir_models.py").write_text(CHDIR_MODEL)
    (tmp_path / "elsewhere").mkdir()
    torch.manual_seed(0)
    torch.save(repvgg_tiny(width=8).state_dict(), tmp_path / "train.pt")
    proc = repconv_process("fuse", "train.pt", str(tmp_path / "deploy.pt"), "--model",
                           "chdir_models:build", "--input-shape", "1,3,16,16", cwd=tmp_path,
                           env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "deploy.pt").is_file()
