"""The command line as scripts and CI pipelines use it (DESIGN.md section 3).

Most tests run the Typer app in-process with ``typer.testing.CliRunner``: its ``Result`` keeps
``stdout`` and ``stderr`` apart (``output`` mixes both). A few run ``python -m repconv`` and the
``repconv`` console script as real subprocesses to prove the entry points work and that stdout
under ``--json`` holds one JSON document and nothing else.

Every bad input must give: exit code 2, exactly one stderr line starting with ``error:``, no
traceback anywhere, nothing written (no OUT, no temp file beside it), IN unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from reference_blocks import randomize_bn
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner, Result

from repconv import __version__
from repconv.cli import app
from repconv.samples import RepVGGBlock, repvgg_tiny, resnet_tiny

RUNNER = CliRunner()
CONSOLE_SCRIPT = Path(sys.executable).with_name("repconv")
SHAPE8 = "1,3,16,16"  # verification input for the width-8 test models


# ---------------------------------------------------------------------------------- helpers


def invoke(*args: object) -> Result:
    return RUNNER.invoke(app, [str(a) for a in args])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file (with its hash) and folder under ``roots``: proves nothing was written."""
    seen: dict[str, str] = {}
    for root in roots:
        if root.is_file():
            seen[str(root)] = sha256(root)
        elif root.is_dir():
            seen[str(root)] = "<dir>"
            for path in sorted(root.rglob("*")):
                seen[str(path)] = sha256(path) if path.is_file() else "<dir>"
    return seen


def assert_no_traceback(result: Result) -> None:
    assert "Traceback" not in result.output, result.output
    # CliRunner turns an exception that escaped the app into exit code 1 + result.exception
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        repr(result.exception)
    )


def error_line(result: Result) -> str:
    """The single 'error:' line a refused command prints on stderr (its text after 'error:')."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0][len("error: "):]


def assert_refused(result: Result, before: dict[str, str], after: dict[str, str],
                   needles: list[str]) -> str:
    assert_no_traceback(result)
    assert result.exit_code == 2, (result.exit_code, result.output)
    message = error_line(result)
    assert before == after, "a refused command changed files"
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def width8_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return randomize_bn(repvgg_tiny(width=8)).state_dict()


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
    assert deploy["repconv_deploy"] == 1
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
    assert verification["trials"] == 3
    assert verification["input_shapes"] == [[1, 3, 32, 32]]
    assert data["skipped"] == []
    # --json: stdout is the document only; the human summary went to stderr
    assert deploys.repvgg_stdout.lstrip().startswith("{")
    assert "verification passed" in deploys.repvgg_stderr
    assert "verification passed" not in deploys.repvgg_stdout


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
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())


def test_fuse_pickled_args_entry_with_trust(repvgg_ckpt: Path, tmp_path: Path) -> None:
    """Old training scripts save argparse.Namespace next to the weights: needs trust, then
    works."""
    checkpoint = torch.load(repvgg_ckpt, weights_only=True)
    checkpoint["args"] = argparse.Namespace(lr=0.1, epochs=3)
    path = tmp_path / "ckpt.pt"
    torch.save(checkpoint, path)
    refused = invoke("fuse", path, tmp_path / "a.pt")
    assert refused.exit_code == 2
    assert "--trust-pickle" in error_line(refused)
    result = invoke("fuse", path, tmp_path / "deploy.pt", "--trust-pickle")
    assert result.exit_code == 0, result.output
    assert "verification passed" in result.stdout


def test_keyboard_interrupt_writes_nothing(repvgg_ckpt: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        Path(f).write_bytes(b"half a checkpoint")  # type: ignore[arg-type]
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    before = snapshot(tmp_path, repvgg_ckpt)
    result = invoke("fuse", repvgg_ckpt, tmp_path / "deploy.pt")
    assert_no_traceback(result)
    assert result.exit_code == 130
    assert "nothing written" in result.stderr
    assert snapshot(tmp_path, repvgg_ckpt) == before


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
    assert data["trials"] == 3
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


def test_top_level_help_and_version() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("fuse", "verify", "inspect"):
        assert re.search(rf"\b{command}\b", result.stdout)
    version = invoke("version")
    assert version.exit_code == 0
    assert version.stdout.strip() == __version__


# ---------------------------------------------------------------------------------- bad input


@dataclass
class Env:
    tmp: Path
    inp: Path  # folder for inputs the case writes
    out: Path  # OUT of a fuse case (its folder starts empty)
    repvgg: Path
    resnet: Path
    deploy_resnet: Path


def _sample_copy(env: Env, mutate: Callable[[dict], None], name: str = "ckpt.pt") -> Path:
    checkpoint = torch.load(env.repvgg, weights_only=True)
    mutate(checkpoint)
    path = env.inp / name
    torch.save(checkpoint, path)
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _nan_mean(checkpoint: dict) -> None:
    checkpoint["state_dict"]["stages.1.1.rbr_dense.bn.running_mean"][3] = math.nan


def _negative_var(checkpoint: dict) -> None:
    checkpoint["state_dict"]["stages.2.0.rbr_1x1.bn.running_var"][0] = -0.5


def _shape_mismatches(env: Env) -> int:
    own = repvgg_tiny().state_dict()
    theirs = width8_state_dict()
    return sum(own[k].shape != v.shape for k, v in theirs.items())


def _key_mismatch_needles(env: Env) -> list[str]:
    own = resnet_tiny().state_dict()
    theirs = torch.load(env.repvgg, weights_only=True)["state_dict"]
    missing = [k for k in own if k not in theirs and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in theirs if k not in own]
    return [f"missing keys {len(missing)} (", f"unexpected keys {len(unexpected)} (", "--model"]


Case = Callable[[Env], tuple[list[object], Path, list[str]]]  # -> argv, IN, needles


def _fuse(env: Env, inp: Path, *options: object) -> list[object]:
    return ["fuse", inp, env.out, *options]


def _bad_json_file(env: Env) -> Path:
    return _write(env.inp / "notes.pt", b'{"epoch": 3, "lr": 0.1}\n')


FUSE_CASES: dict[str, Case] = {
    "in_missing": lambda e: (_fuse(e, e.inp / "missing.pt"), e.inp / "missing.pt",
                             ["missing.pt", "does not exist"]),
    "in_directory": lambda e: (_fuse(e, e.inp), e.inp, ["is a directory"]),
    "in_empty": lambda e: (_fuse(e, _write(e.inp / "empty.pt", b"")), e.inp / "empty.pt",
                           ["empty.pt", "empty"]),
    "in_random_bytes": lambda e: (
        _fuse(e, _write(e.inp / "random.pt", bytes(range(256)) * 8)), e.inp / "random.pt",
        ["random.pt"]),
    "in_json_text": lambda e: (_fuse(e, _bad_json_file(e)), e.inp / "notes.pt", ["notes.pt"]),
    "in_truncated": lambda e: (
        _fuse(e, _write(e.inp / "half.pt", e.repvgg.read_bytes()[: e.repvgg.stat().st_size // 2])),
        e.inp / "half.pt", ["half.pt", "not a PyTorch checkpoint"]),
    "in_set": lambda e: (
        _fuse(e, e.inp / "set.pt"), _save({1, 2, 3}, e.inp / "set.pt"),
        ["set.pt", "set", "not a model or state_dict"]),
    "in_list": lambda e: (
        _fuse(e, e.inp / "list.pt"), _save([1, 2, 3], e.inp / "list.pt"),
        ["list.pt", "list", "not a model or state_dict"]),
    "in_dict_without_weights": lambda e: (
        _fuse(e, e.inp / "meta.pt"), _save({"epoch": 3, "optimizer": {}}, e.inp / "meta.pt"),
        ["no model weights", "epoch"]),
    "in_namespace_untrusted": lambda e: (
        _fuse(e, e.inp / "ns.pt"), _save(argparse.Namespace(lr=0.1), e.inp / "ns.pt"),
        ["--trust-pickle"]),
    "in_namespace_trusted": lambda e: (
        _fuse(e, e.inp / "ns.pt", "--trust-pickle"),
        _save(argparse.Namespace(lr=0.1), e.inp / "ns.pt"), ["Namespace"]),
    "in_pickled_module_untrusted": lambda e: (
        _fuse(e, e.inp / "module.pt"), _save(repvgg_tiny(width=8), e.inp / "module.pt"),
        ["module.pt", "--trust-pickle"]),
    "in_bare_state_dict_without_model": lambda e: (
        _fuse(e, e.inp / "bare.pt"), _save(width8_state_dict(), e.inp / "bare.pt"),
        ["--model", "--model-kwargs"]),
    "safetensors_wrong_shapes_for_model": lambda e: (
        _fuse(e, e.inp / "w8.safetensors", "--model", "repconv.samples:repvgg_tiny",
              "--input-shape", SHAPE8),
        _save_safetensors(width8_state_dict(), e.inp / "w8.safetensors"),
        ["shapes do not fit", f"{_shape_mismatches(e)} tensors differ", "--model-kwargs"]),
    "state_dict_does_not_fit_model": lambda e: (
        _fuse(e, e.repvgg, "--model", "repconv.samples:resnet_tiny"), e.repvgg,
        _key_mismatch_needles(e)),
    "model_not_importable": lambda e: (
        _fuse(e, e.repvgg, "--model", "no_such_module_for_repconv_tests:build"), e.repvgg,
        ["cannot import", "no_such_module_for_repconv_tests"]),
    "model_attribute_missing": lambda e: (
        _fuse(e, e.repvgg, "--model", "repconv.samples:no_such_builder"), e.repvgg,
        ["no attribute", "no_such_builder"]),
    "model_returns_non_module": lambda e: (
        _fuse(e, e.repvgg, "--model", "collections:OrderedDict"), e.repvgg,
        ["OrderedDict", "not a torch nn.Module"]),
    "model_without_colon": lambda e: (
        _fuse(e, e.repvgg, "--model", "repconv.samples"), e.repvgg,
        ["module:callable"]),
    "model_constructor_fails": lambda e: (
        _fuse(e, e.repvgg, "--model", "repconv.samples:repvgg_tiny", "--model-kwargs",
              '{"depth": 3}'), e.repvgg, ["depth", "--model-kwargs"]),
    "model_kwargs_malformed": lambda e: (
        _fuse(e, e.repvgg, "--model", "repconv.samples:repvgg_tiny", "--model-kwargs",
              "{width: 8"), e.repvgg, ["--model-kwargs", "not valid JSON"]),
    "model_kwargs_not_object": lambda e: (
        _fuse(e, e.repvgg, "--model", "repconv.samples:repvgg_tiny", "--model-kwargs", "[8]"),
        e.repvgg, ["--model-kwargs", "JSON object"]),
    "input_shape_1,x": lambda e: (_fuse(e, e.repvgg, "--input-shape", "1,x"), e.repvgg,
                                  ["--input-shape", "'1,x'"]),
    "input_shape_0,3,4,4": lambda e: (_fuse(e, e.repvgg, "--input-shape", "0,3,4,4"), e.repvgg,
                                      ["--input-shape", "'0,3,4,4'"]),
    "input_shape_letters": lambda e: (_fuse(e, e.repvgg, "--input-shape", "abc"), e.repvgg,
                                      ["--input-shape"]),
    "input_shape_empty": lambda e: (_fuse(e, e.repvgg, "--input-shape", ""), e.repvgg,
                                    ["--input-shape"]),
    "input_shape_wrong_channels": lambda e: (
        _fuse(e, e.repvgg, "--input-shape", "1,4,32,32"), e.repvgg, ["channels"]),
    "out_unsupported_suffix": lambda e: (
        ["fuse", e.repvgg, e.out.with_suffix(".onnx")], e.repvgg,
        ["deploy.onnx", ".safetensors"]),
    "out_equals_in": lambda e: (
        ["fuse", e.inp / "same.pt", e.inp / "same.pt"], _copy(e.repvgg, e.inp / "same.pt"),
        ["same file"]),
    "out_equals_in_other_spelling": lambda e: (
        ["fuse", e.inp / "same.pt", e.inp / "." / ".." / e.inp.name / "same.pt"],
        _copy(e.repvgg, e.inp / "same.pt"), ["same file"]),
    "out_folder_missing": lambda e: (
        ["fuse", e.repvgg, e.out.parent / "nope" / "deploy.pt"], e.repvgg,
        ["nope", "does not exist"]),
    "out_is_directory": lambda e: (
        ["fuse", e.repvgg, _mkdir(e.out.parent / "dir.pt")], e.repvgg, ["is a directory"]),
    "nan_running_mean": lambda e: (
        _fuse(e, e.inp / "ckpt.pt"), _sample_copy(e, _nan_mean),
        ["stages.1.1.rbr_dense.bn", "NaN"]),
    "negative_running_var": lambda e: (
        _fuse(e, e.inp / "ckpt.pt"), _sample_copy(e, _negative_var),
        ["stages.2.0.rbr_1x1.bn", "negative running_var"]),
    "model_kwargs_without_model": lambda e: (
        _fuse(e, e.repvgg, "--model-kwargs", '{"width": 8}'), e.repvgg, ["--model"]),
    "in_name_with_brackets": lambda e: (
        _fuse(e, e.inp / "ckpt[ema].pt"), e.inp / "ckpt[ema].pt", ["ckpt[ema].pt"]),
    "in_path_with_closing_tag": lambda e: (
        _fuse(e, e.inp / "runs[" / "best]" / "c.pt"), e.inp / "runs[" / "best]" / "c.pt",
        ["c.pt", "does not exist"]),
}


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    return dst


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path




@pytest.fixture
def env(tmp_path: Path, repvgg_ckpt: Path, resnet_ckpt: Path, deploys: Deploys) -> Env:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return Env(tmp_path, tmp_path / "in", tmp_path / "out" / "deploy.pt", repvgg_ckpt,
               resnet_ckpt, deploys.resnet)


def _run_bad(env: Env, case: Case, extra: tuple[str, ...] = ()) -> tuple[Result, str]:
    argv, in_path, needles = case(env)
    watched = (env.tmp, in_path) if in_path.exists() else (env.tmp,)
    before = snapshot(*watched)
    in_hash = sha256(in_path) if in_path.is_file() else None
    result = invoke(*argv, *extra)
    message = assert_refused(result, before, snapshot(*watched), needles)
    if in_hash is not None:
        assert sha256(in_path) == in_hash
    if argv[0] == "fuse":
        out = Path(str(argv[2]))
        assert not out.exists() or out.is_dir() or out.resolve() == in_path.resolve()
        assert not any(p.name.endswith(".tmp") for p in env.tmp.rglob("*"))
    return result, message


@pytest.mark.parametrize("name", list(FUSE_CASES))
def test_fuse_bad_input(env: Env, name: str) -> None:
    _run_bad(env, FUSE_CASES[name])


@pytest.mark.parametrize("name", ["in_random_bytes", "in_json_text", "model_not_importable"])
def test_bad_input_json_payload(env: Env, name: str) -> None:
    """--json on a refused command: stdout is still one JSON document naming the error."""
    result, message = _run_bad(env, FUSE_CASES[name], ("--json",))
    data = json.loads(result.stdout)
    assert data == {"ok": False, "error": message}


@pytest.mark.parametrize("name", ["in_random_bytes", "in_json_text"])
def test_not_a_pickle_is_not_sent_to_trust_pickle(env: Env, name: str) -> None:
    _, message = _run_bad(env, FUSE_CASES[name])
    assert "--trust-pickle" not in message
    assert "not a PyTorch checkpoint" in message


@pytest.mark.parametrize("option", [("--rtol", "-1"), ("--atol", "-1")], ids=["rtol-1", "atol-1"])
def test_negative_tolerance_is_usage_error(env: Env, option: tuple[str, str]) -> None:
    _run_bad(env, lambda e: (_fuse(e, e.repvgg, *option), e.repvgg, [option[0]]))


def test_nan_tolerance_is_usage_error(env: Env) -> None:
    _run_bad(env, lambda e: (_fuse(e, e.repvgg, "--rtol", "nan"), e.repvgg, ["--rtol"]))


@pytest.mark.parametrize("argv", [["--rtol", "abc"], ["--bogus"]], ids=["rtol-abc", "unknown"])
def test_usage_error_is_one_line(env: Env, argv: list[str]) -> None:
    _run_bad(env, lambda e: (_fuse(e, e.repvgg, *argv), e.repvgg, []))


VERIFY_CASES: dict[str, Case] = {
    "original_missing": lambda e: (["verify", e.inp / "missing.pt", e.deploy_resnet],
                                   e.inp / "missing.pt", ["missing.pt", "does not exist"]),
    "deploy_missing": lambda e: (["verify", e.resnet, e.inp / "missing.pt"],
                                 e.inp / "missing.pt", ["missing.pt", "does not exist"]),
    "deploy_pt2_missing": lambda e: (["verify", e.resnet, e.inp / "missing.pt2"],
                                     e.inp / "missing.pt2", ["missing.pt2", "does not exist"]),
    "deploy_is_training_checkpoint": lambda e: (
        ["verify", e.resnet, e.resnet], e.resnet, ["not a repconv deploy file"]),
    "deploy_of_another_model": lambda e: (
        ["verify", e.repvgg, e.deploy_resnet], e.deploy_resnet, ["deploy plan"]),
    "deploy_pt2_random_bytes": lambda e: (
        ["verify", e.resnet, _write(e.inp / "bad.pt2", bytes(range(256)) * 8)],
        e.inp / "bad.pt2", ["bad.pt2", "torch.export"]),
    "original_random_bytes": lambda e: (
        ["verify", _write(e.inp / "random.pt", bytes(range(256)) * 8), e.deploy_resnet],
        e.inp / "random.pt", ["random.pt"]),
    "input_shape_bad": lambda e: (
        ["verify", e.resnet, e.deploy_resnet, "--input-shape", "1,3,-2,4"], e.deploy_resnet,
        ["--input-shape"]),
}

INSPECT_CASES: dict[str, Case] = {
    "in_missing": lambda e: (["inspect", e.inp / "missing.pt"], e.inp / "missing.pt",
                             ["does not exist"]),
    "in_random_bytes": lambda e: (
        ["inspect", _write(e.inp / "random.pt", bytes(range(256)) * 8)], e.inp / "random.pt",
        ["random.pt"]),
    "pickled_module_untrusted": lambda e: (
        ["inspect", e.inp / "module.pt"], _save(repvgg_tiny(width=8), e.inp / "module.pt"),
        ["--trust-pickle"]),
    "bare_state_dict_without_model": lambda e: (
        ["inspect", e.inp / "bare.pt"], _save(width8_state_dict(), e.inp / "bare.pt"),
        ["--model"]),
    "nan_running_mean": lambda e: (
        ["inspect", e.inp / "ckpt.pt"], _sample_copy(e, _nan_mean), ["NaN"]),
}


@pytest.mark.parametrize("name", list(VERIFY_CASES))
def test_verify_bad_input(env: Env, name: str) -> None:
    _run_bad(env, VERIFY_CASES[name])


@pytest.mark.parametrize("name", list(INSPECT_CASES))
def test_inspect_bad_input(env: Env, name: str) -> None:
    _run_bad(env, INSPECT_CASES[name])


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
    torch.save({"state_dict": width8_state_dict(), "arch": "repconv.make_samples:save_checkpoint",
                "arch_kwargs": {"checkpoint": {}, "path": str(planted)}}, path)
    result = invoke("inspect", path)
    assert result.exit_code == 2
    assert not planted.exists(), "a checkpoint made `repconv inspect` write a file"


# ---------------------------------------------------------------------------------- processes


def _process(argv: list[object], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def test_python_m_fuse_json_stdout_is_pure_json(repvgg_ckpt: Path, tmp_path: Path) -> None:
    proc = _process([sys.executable, "-m", "repconv", "fuse", repvgg_ckpt, "deploy.pt",
                     "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["ok"] is True
    assert data["rewrites_by_kind"] == {"multi-branch": REPVGG_BLOCKS}
    assert data["verification"]["max_rel_error"] < 1e-5
    assert "verification passed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert torch.load(tmp_path / "deploy.pt", weights_only=True)["repconv_deploy"] == 1


def test_console_script_verify_and_inspect_json(resnet_ckpt: Path, deploys: Deploys,
                                                tmp_path: Path) -> None:
    assert CONSOLE_SCRIPT.is_file(), f"console script missing at {CONSOLE_SCRIPT}"
    proc = _process([CONSOLE_SCRIPT, "verify", resnet_ckpt, deploys.resnet, "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["ok"] is True and data["max_rel_error"] < 1e-5
    proc = _process([CONSOLE_SCRIPT, "inspect", resnet_ckpt, "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["rewrites_by_kind"]["conv+bn"] == RESNET_BNS
    assert data["written"] is None
    assert list(tmp_path.iterdir()) == []


def test_console_script_bad_input_one_line(tmp_path: Path) -> None:
    proc = _process([CONSOLE_SCRIPT, "fuse", "missing.pt", "deploy.pt", "--json"], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert json.loads(proc.stdout) == {"ok": False, "error": lines[0][len("error: "):]}
    assert list(tmp_path.iterdir()) == []


def test_python_m_version_and_help(tmp_path: Path) -> None:
    proc = _process([sys.executable, "-m", "repconv", "version"], tmp_path)
    assert proc.returncode == 0
    assert proc.stdout.strip() == __version__
    proc = _process([sys.executable, "-m", "repconv", "fuse", "--help"], tmp_path)
    assert proc.returncode == 0
    assert "Usage: repconv fuse" in proc.stdout


def test_damaged_pt2_deploy_no_traceback(resnet_ckpt: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(bytes(range(256)) * 8)
    proc = _process([CONSOLE_SCRIPT, "verify", resnet_ckpt, bad], tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
