"""The command line as scripts and CI pipelines use it (docs/design.md
"8. Command-line contract").

Most tests run the Typer app in-process with ``typer.testing.CliRunner``: its ``Result`` keeps
``stdout`` and ``stderr`` apart (``output`` mixes both). A few run ``python -m repconv`` and the
``repconv`` console script as real subprocesses to prove the entry points work and that stdout
under ``--json`` holds one JSON document and nothing else.

Bad input, case by case, is in test_cli_bad_input.py; hostile files in test_hostile_inputs.py;
writes that depend on the real process in test_writes.py.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from helpers.cli_support import (
    CONSOLE_SCRIPT,
    RUNNER,
    SHAPE8,
    assert_no_traceback,
    error_line,
    interrupt_deploy_writes,
    invoke,
    run_process,
    sha256,
    snapshot,
    width8_state_dict,
)
from helpers.measure import count_bns
from helpers.reference_blocks import randomize_bn
from torch import nn

from repconv import __version__
from repconv.cli import app
from repconv.rewrite.plan import PLAN_VERSION
from repconv.samples import RepVGGBlock, repvgg_tiny, resnet_tiny

# ---------------------------------------------------------------------------------- helpers


def counts(model: nn.Module) -> tuple[int, int]:
    """(RepVGG blocks, BatchNorms) of a model: the rewrites and BNs a fuse must report."""
    blocks = sum(isinstance(m, RepVGGBlock) for m in model.modules())
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    return blocks, bns


REPVGG_BLOCKS, REPVGG_BNS = counts(repvgg_tiny())
_, RESNET_BNS = counts(resnet_tiny())


# ---------------------------------------------------------------------------------- fixtures


@dataclass
class Deploys:
    repvgg: Path
    resnet: Path
    repvgg_json: dict
    repvgg_stderr: str
    repvgg_stdout: str


@pytest.fixture(scope="module")
def deploys(tmp_path_factory: pytest.TempPathFactory, repvgg_ckpt: Path,
            resnet_ckpt: Path) -> Deploys:
    """Deploy files fused once per module (read only: tests that alter one copy it)."""
    folder = tmp_path_factory.mktemp("deploys")
    result = invoke("fuse", repvgg_ckpt, folder / "repvgg.pt", "--json")
    assert result.exit_code == 0, result.output
    other = invoke("fuse", resnet_ckpt, folder / "resnet.pt")
    assert other.exit_code == 0, other.output
    return Deploys(folder / "repvgg.pt", folder / "resnet.pt", json.loads(result.stdout),
                   result.stderr, result.stdout)


# ---------------------------------------------------------------------------------- fuse


def test_fuse_human_summary(repvgg_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy.pt"
    result = invoke("fuse", repvgg_ckpt, out)
    assert_no_traceback(result)
    assert result.exit_code == 0, result.output
    text = result.stdout
    match = re.search(r"(\d+) rewrites: (\d+) multi-branch", text)
    assert match, text
    assert int(match[1]) == int(match[2]) == REPVGG_BLOCKS
    assert re.search(rf"batchnorms\s+{REPVGG_BNS}\s+0\b", text), text
    assert "verification passed" in text
    assert f"wrote {out}" in text
    assert result.stderr == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy.pt"]
    deploy = torch.load(out, weights_only=True)
    assert deploy["repconv_deploy"] == PLAN_VERSION
    assert not any("bn." in key or "rbr_identity" in key for key in deploy["state_dict"])


def test_fuse_json(deploys: Deploys) -> None:
    data = deploys.repvgg_json
    assert data["ok"] is True
    assert data["output"] == str(deploys.repvgg)
    assert data["written"]
    assert data["rewrites_by_kind"] == {"multi-branch": REPVGG_BLOCKS}
    assert len(data["rewrites"]) == REPVGG_BLOCKS
    assert data["before"]["batchnorms"] == REPVGG_BNS
    assert data["after"]["batchnorms"] == 0
    assert data["before"]["convs"] == 2 * REPVGG_BLOCKS
    assert data["after"]["convs"] == REPVGG_BLOCKS
    assert data["after"]["parameters"] < data["before"]["parameters"]
    verification = data["verification"]
    assert verification["passed"] is True
    assert 0 <= verification["max_rel_error"] < 1e-5
    assert verification["trials"] == 5
    assert verification["input_shapes"] == [[1, 3, 32, 32]]
    assert data["skipped"] == []
    # --json: stdout is the document only; the human summary went to stderr
    assert deploys.repvgg_stdout.lstrip().startswith("{")
    assert "verification passed" in deploys.repvgg_stderr
    assert "verification passed" not in deploys.repvgg_stdout


def test_skip_verify_says_so(repvgg_ckpt: Path, tmp_path: Path, deploys: Deploys) -> None:
    """--skip-verify: no global verification (the local checks still run), said in the human
    output and the JSON; the deploy file is written and still verifies. It is the same file: the
    original's tensors freed as their fold is applied change nothing written or counted."""
    human = invoke("fuse", repvgg_ckpt, tmp_path / "a.pt", "--skip-verify")
    assert_no_traceback(human)
    assert human.exit_code == 0, human.output
    assert "verification skipped (--skip-verify)" in human.stdout
    assert "verification passed" not in human.stdout
    result = invoke("fuse", repvgg_ckpt, tmp_path / "b.pt", "--skip-verify", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["written"]
    assert data["verification"] is None and data["verification_skipped"] is True
    assert "verify" not in data["seconds"] and {"load", "fuse", "write"} <= set(data["seconds"])
    assert all(r["local_error"] < 1e-6 for r in data["rewrites"])  # checked one by one
    assert data["before"] == deploys.repvgg_json["before"]
    assert data["rewrites"] == deploys.repvgg_json["rewrites"]
    quick, checked = (torch.load(p, weights_only=True) for p in (tmp_path / "b.pt", deploys.repvgg))
    assert quick["plan"] == checked["plan"]
    assert quick["state_dict"].keys() == checked["state_dict"].keys()
    assert all(torch.equal(v, checked["state_dict"][k]) for k, v in quick["state_dict"].items())
    assert invoke("verify", repvgg_ckpt, tmp_path / "b.pt").exit_code == 0
    normal = json.loads(invoke("inspect", repvgg_ckpt, "--json").stdout)
    assert normal["verification_skipped"] is False


def test_fuse_failed_verification_writes_nothing(repvgg_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy.pt"
    before = snapshot(tmp_path, repvgg_ckpt)
    result = invoke("fuse", repvgg_ckpt, out, "--rtol", "1e-12")
    assert_no_traceback(result)
    assert result.exit_code == 1, result.output
    assert snapshot(tmp_path, repvgg_ckpt) == before
    assert not out.exists()
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "nothing written" in last
    assert "verification FAILED" in result.stdout


def test_fuse_failed_verification_json(repvgg_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy.pt"
    result = invoke("fuse", repvgg_ckpt, out, "--rtol", "1e-12", "--json")
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is False
    assert data["written"] is None
    assert data["verification"]["passed"] is False
    assert data["verification"]["rtol"] == 1e-12
    assert 1e-12 < data["verification"]["max_rel_error"] < 1e-5
    assert "nothing written" in data["error"]
    assert list(tmp_path.iterdir()) == []


def test_fuse_bare_state_dict_with_model_option(tmp_path: Path) -> None:
    bare = tmp_path / "bare.pt"
    torch.save(width8_state_dict(), bare)
    refused = invoke("fuse", bare, tmp_path / "a.pt")
    assert refused.exit_code == 2
    assert "--model" in error_line(refused)
    out = tmp_path / "deploy.pt"
    result = invoke("fuse", bare, out, "--model", "repconv.samples:repvgg_tiny",
                    "--model-kwargs", '{"width": 8}', "--input-shape", "1,3,32,32", "--json")
    assert_no_traceback(result)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True
    assert data["rewrites_by_kind"] == {"multi-branch": REPVGG_BLOCKS}
    assert data["after"]["batchnorms"] == 0
    assert data["verification"]["input_shapes"] == [[1, 3, 32, 32]]
    deploy = torch.load(out, weights_only=True)
    assert deploy["arch"] == "repconv.samples:repvgg_tiny"
    assert deploy["arch_kwargs"] == {"width": 8}
    assert deploy["input_shape"] == [1, 3, 32, 32]


def test_fuse_model_from_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--model may name a module in the folder repconv runs from."""
    name = f"user_models_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        "from repconv.samples import repvgg_tiny\n\n"
        "def build(width=8):\n    return repvgg_tiny(width=width)\n"
    )
    torch.save({"model_state_dict": width8_state_dict()}, tmp_path / "ckpt.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, name, raising=False)
    result = invoke("fuse", "ckpt.pt", "deploy.safetensors", "--model", f"{name}:build",
                    "--input-shape", SHAPE8)
    sys.modules.pop(name, None)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "deploy.safetensors").is_file()


def test_fuse_pickled_module_with_trust(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "module.pt"
    torch.save(randomize_bn(repvgg_tiny(width=8)), path)
    out = tmp_path / "deploy.pt"
    result = invoke("fuse", path, out, "--trust-pickle", "--input-shape", SHAPE8, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["loaded"] == ["a pickled RepVGGTiny"]
    assert data["after"]["batchnorms"] == 0
    fused = torch.load(out, weights_only=False)
    assert isinstance(fused, nn.Module)
    assert count_bns(fused) == 0  # the slots a fold leaves run as the identity


def test_fuse_pickled_args_entry_without_trust(repvgg_ckpt: Path, tmp_path: Path) -> None:
    """Old training scripts save argparse.Namespace next to the weights: it is read as inert
    data, named in the report, and the weights beside it fuse without --trust-pickle."""
    checkpoint = torch.load(repvgg_ckpt, weights_only=True)
    checkpoint["args"] = argparse.Namespace(lr=0.1, epochs=3)
    path = tmp_path / "ckpt.pt"
    torch.save(checkpoint, path)
    for trust in ((), ("--trust-pickle",)):
        result = invoke("fuse", path, tmp_path / "deploy.pt", *trust, "--json")
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["verification"]["passed"]
        assert any("argparse.Namespace at ['args']" in f for f in data["loaded"]), data["loaded"]


@pytest.mark.parametrize("as_json", [False, True], ids=["human", "json"])
def test_keyboard_interrupt_writes_nothing(repvgg_ckpt: Path, tmp_path: Path, as_json: bool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    interrupt_deploy_writes(monkeypatch)
    before = snapshot(tmp_path, repvgg_ckpt)
    result = invoke("fuse", repvgg_ckpt, tmp_path / "deploy.pt", *(["--json"] if as_json else []))
    monkeypatch.undo()
    assert_no_traceback(result)
    assert result.exit_code == 130
    assert "nothing written" in error_line(result)
    assert snapshot(tmp_path, repvgg_ckpt) == before
    if as_json:
        assert json.loads(result.stdout) == {"schema_version": 1, "ok": False, "exit_code": 130,
                                             "error": "interrupted: nothing written"}


def test_fuse_deploy_file_again_passes_through(resnet_ckpt: Path, deploys: Deploys,
                                              tmp_path: Path) -> None:
    """A deploy file given to fuse again is passed through unchanged with a note (idempotent
    pipeline step), and the copy still verifies against the training checkpoint."""
    out = tmp_path / "again.pt"
    in_hash = sha256(deploys.resnet)
    result = invoke("fuse", deploys.resnet, out, "--json")
    assert_no_traceback(result)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["rewrites"] == []
    assert data["before"] == data["after"]
    assert data["after"]["batchnorms"] == 0
    assert any("already a repconv deploy file" in note for note in data["notes"])
    assert sha256(deploys.resnet) == in_hash
    first = torch.load(deploys.resnet, weights_only=True)
    again = torch.load(out, weights_only=True)
    assert again["plan"] == first["plan"]
    assert set(again["state_dict"]) == set(first["state_dict"])
    assert all(torch.equal(again["state_dict"][k], v) for k, v in first["state_dict"].items())
    check = invoke("verify", resnet_ckpt, out, "--json")
    assert check.exit_code == 0, check.output
    assert json.loads(check.stdout)["max_rel_error"] < 1e-5


# ---------------------------------------------------------------------------------- verify


def test_verify_passes(repvgg_ckpt: Path, deploys: Deploys) -> None:
    human = invoke("verify", repvgg_ckpt, deploys.repvgg)
    assert_no_traceback(human)
    assert human.exit_code == 0, human.output
    assert "verification passed" in human.stdout
    result = invoke("verify", repvgg_ckpt, deploys.repvgg, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["passed"] is True
    assert 0 <= data["max_rel_error"] < 1e-5
    assert data["outputs_compared"] == 1
    assert data["trials"] == 5
    assert data["input_shapes"] == [[1, 3, 32, 32]]
    assert "verification passed" in result.stderr


def test_verify_detects_corrupted_deploy(repvgg_ckpt: Path, deploys: Deploys,
                                         tmp_path: Path) -> None:
    deploy = torch.load(deploys.repvgg, weights_only=True)
    key = next(k for k, v in deploy["state_dict"].items() if v.ndim == 4)
    weight = deploy["state_dict"][key]
    generator = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, weight.shape, generator=generator) * 2 - 1
    deploy["state_dict"][key] = weight + 0.03 * weight.abs().max() * signs
    corrupted = tmp_path / "corrupted.pt"
    torch.save(deploy, corrupted)

    human = invoke("verify", repvgg_ckpt, corrupted)
    assert_no_traceback(human)
    assert human.exit_code == 1, human.output
    assert "verification FAILED" in human.stdout
    result = invoke("verify", repvgg_ckpt, corrupted, "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["passed"] is False
    assert data["max_rel_error"] > 1e-3
    assert data["rtol"] == 1e-5


def test_verify_pt2(repvgg_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy.pt2"
    assert invoke("fuse", repvgg_ckpt, out).exit_code == 0
    result = invoke("verify", repvgg_ckpt, out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["passed"] is True and data["max_rel_error"] < 1e-5


def test_json_fields_are_documented(repvgg_ckpt: Path, deploys: Deploys) -> None:
    """Every field a --json document carries is named in docs/json.md."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "json.md").read_text()
    documented = set(re.findall(r"`(\w+)`", page))
    checked = invoke("verify", repvgg_ckpt, deploys.repvgg, "--json")
    verify_doc = json.loads(checked.stdout)
    fields = (set(deploys.repvgg_json) | set(deploys.repvgg_json["verification"])
              | set(verify_doc) | {"error"})
    assert fields - documented == set()
    assert verify_doc["schema_version"] == deploys.repvgg_json["schema_version"] == 1


# ---------------------------------------------------------------------------------- inspect


def test_inspect_repvgg_writes_nothing(repvgg_ckpt: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "repvgg.pt"
    shutil.copy(repvgg_ckpt, path)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    result = invoke("inspect", path)
    assert_no_traceback(result)
    assert result.exit_code == 0, result.output
    assert snapshot(tmp_path) == before
    text = result.stdout
    assert "rewrites" in text
    assert len(re.findall(r"multi-branch", text)) == REPVGG_BLOCKS + 1  # summary + table rows
    assert re.search(rf"batchnorms\s+{REPVGG_BNS}\s+0\b", text)
    assert "wrote" not in text


def test_inspect_resnet_json(resnet_ckpt: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    human = invoke("inspect", resnet_ckpt)
    assert human.exit_code == 0, human.output
    table_rows = [line for line in human.stdout.splitlines() if re.search(r"\sconv\+bn\s", line)]
    assert len(table_rows) == RESNET_BNS
    result = invoke("inspect", resnet_ckpt, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True
    assert data["output"] is None and data["written"] is None
    assert data["verification"] is None
    assert data["rewrites_by_kind"]["conv+bn"] == RESNET_BNS
    assert data["before"]["batchnorms"] == RESNET_BNS
    assert data["after"]["batchnorms"] == 0
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- help


@pytest.mark.parametrize(
    "command, codes",
    [
        ("fuse", (0, 1, 2)),
        ("verify", (0, 1, 2)),
        ("inspect", (0, 2)),
    ],
)
def test_help_documents_options_and_exit_codes(command: str, codes: tuple[int, ...]) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0
    text = result.stdout
    for option in ("--model", "--model-kwargs", "--input-shape", "--json"):
        assert option in text, option
    assert re.search(r"\bexit\b", text, re.IGNORECASE), text
    for code in codes:
        assert re.search(rf"(?<![\w.,]){code}:", text), f"exit code {code} not documented"


@pytest.mark.parametrize("command", ["fuse", "verify", "inspect", "bench"])
def test_help_paragraphs_wrap_at_the_terminal_width(command: str) -> None:
    """A description line ends short only where its paragraph ends: the docstring's own line
    breaks do not reach the terminal."""
    result = RUNNER.invoke(app, [command, "--help"], terminal_width=80, env={"COLUMNS": "80"})
    description = result.stdout.split("╭")[0]
    lines = [line.strip() for line in description.splitlines()][1:]  # after "Usage:"
    for line, after in pairwise(lines):
        if line and after and not line.startswith("Usage:"):
            assert len(line) + len(after.split()[0]) >= 70, (line, after)


def test_top_level_help_and_version() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("fuse", "verify", "inspect"):
        assert re.search(rf"\b{command}\b", result.stdout)
    version = invoke("version")
    assert version.exit_code == 0
    assert version.stdout.strip() == __version__


# ---------------------------------------------------------------------------------- security


def _planted_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A module in the working folder that leaves a marker file when imported."""
    name = f"planted_{tmp_path.name.replace('-', '_')}"
    marker = tmp_path / "IMPORTED"
    (tmp_path / f"{name}.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('imported')\n"
        "from repconv.samples import repvgg_tiny\n\n"
        "def build(width=8):\n    return repvgg_tiny(width=width)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name, marker


def test_arch_outside_repconv_is_never_imported(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    name, marker = _planted_module(tmp_path, monkeypatch)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": width8_state_dict(), "arch": f"{name}:build",
                "arch_kwargs": {"width": 8}, "input_shape": [1, 3, 16, 16]}, path)
    for command in (["fuse", path, tmp_path / "deploy.pt"], ["inspect", path]):
        result = invoke(*command)
        assert_no_traceback(result)
        assert result.exit_code == 2, result.output
        message = error_line(result)
        assert f"--model {name}:build" in message
        assert not marker.exists(), "repconv imported a module named by the file"
        assert name not in sys.modules
        assert not (tmp_path / "deploy.pt").exists()
    # the user names it explicitly: now it is imported and used
    ok = invoke("fuse", path, tmp_path / "deploy.pt", "--model", f"{name}:build")
    sys.modules.pop(name, None)
    assert ok.exit_code == 0, ok.output
    assert marker.exists()


def test_arch_cannot_call_arbitrary_repconv_functions(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    planted = tmp_path / "planted.pt"
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": width8_state_dict(), "arch": "repconv.samples.make:save_checkpoint",
                "arch_kwargs": {"checkpoint": {}, "path": str(planted)}}, path)
    result = invoke("inspect", path)
    assert result.exit_code == 2
    assert not planted.exists(), "a checkpoint made `repconv inspect` write a file"


# ---------------------------------------------------------------------------------- processes


def test_python_m_fuse_json_stdout_is_pure_json(repvgg_ckpt: Path, tmp_path: Path) -> None:
    proc = run_process([sys.executable, "-m", "repconv", "fuse", repvgg_ckpt, "deploy.pt",
                     "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["ok"] is True
    assert data["rewrites_by_kind"] == {"multi-branch": REPVGG_BLOCKS}
    assert data["verification"]["max_rel_error"] < 1e-5
    assert "verification passed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert torch.load(tmp_path / "deploy.pt", weights_only=True)["repconv_deploy"] == PLAN_VERSION


def test_console_script_verify_and_inspect_json(resnet_ckpt: Path, deploys: Deploys,
                                                tmp_path: Path) -> None:
    assert CONSOLE_SCRIPT.is_file(), f"console script missing at {CONSOLE_SCRIPT}"
    proc = run_process([CONSOLE_SCRIPT, "verify", resnet_ckpt, deploys.resnet, "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["ok"] is True and data["max_rel_error"] < 1e-5
    proc = run_process([CONSOLE_SCRIPT, "inspect", resnet_ckpt, "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["rewrites_by_kind"]["conv+bn"] == RESNET_BNS
    assert data["written"] is None
    assert list(tmp_path.iterdir()) == []


def test_console_script_bad_input_one_line(tmp_path: Path) -> None:
    proc = run_process([CONSOLE_SCRIPT, "fuse", "missing.pt", "deploy.pt", "--json"], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert json.loads(proc.stdout) == {"schema_version": 1, "ok": False, "exit_code": 2,
                                       "error": lines[0][len("error: "):]}
    assert list(tmp_path.iterdir()) == []


def test_python_m_version_and_help(tmp_path: Path) -> None:
    proc = run_process([sys.executable, "-m", "repconv", "version"], tmp_path)
    assert proc.returncode == 0
    assert proc.stdout.strip() == __version__
    proc = run_process([sys.executable, "-m", "repconv", "fuse", "--help"], tmp_path)
    assert proc.returncode == 0
    assert "Usage: repconv fuse" in proc.stdout


def test_damaged_pt2_deploy_no_traceback(resnet_ckpt: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(bytes(range(256)) * 8)
    proc = run_process([CONSOLE_SCRIPT, "verify", resnet_ckpt, bad], tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
