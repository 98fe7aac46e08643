"""`repconv verify` as CI runs it on artifacts it did not make, tried the way a hostile or
careless user would (issue 8): no code runs from a file, verification never passes without
comparing something, and every bad file or option is one line with exit code 2.
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.cli_support import (
    assert_no_traceback,
    assert_process_refused,
    assert_refused,
    error_line,
    invoke,
    json_document,
    repconv_process,
    snapshot,
)
from helpers.user_models import ReturnsNone
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from repconv.errors import InputError
from repconv.formats.pt2 import load_program
from repconv.samples import repvgg_tiny
from repconv.verify.outputs import verify


class Payload:
    """Unpickling this writes ``marker``: the proof that a file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def payload_bytes(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    return buffer.getvalue()


Records = dict[str, bytes]  # a .pt2 archive's records, by name relative to its root


def rewrite_archive(src: Path, dst: Path, change: Callable[[Records], Records]) -> Path:
    """Copy a .pt2 archive with its records passed through ``change``: how an attacker edits
    a real deploy file."""
    with zipfile.ZipFile(src) as archive:
        root = archive.namelist()[0].split("/")[0]
        records = {info.filename.partition("/")[2]: archive.read(info)
                   for info in archive.infolist()}
    with zipfile.ZipFile(dst, "w") as out:
        for name, data in change(records).items():
            out.writestr(f"{root}/{name}", data)
    return dst


def pickled_first_weight(marker: Path) -> Callable[[Records], Records]:
    """use_pickle on one weight, and the payload in that weight's bytes."""
    def change(records: Records) -> Records:
        config = json.loads(records["data/weights/model_weights_config.json"])
        entry = next(iter(config["config"].values()))
        entry["use_pickle"] = True
        return {**records, "data/weights/model_weights_config.json": json.dumps(config).encode(),
                f"data/weights/{entry['path_name']}": payload_bytes(marker)}

    return change


def evil_sample_inputs(marker: Path) -> Callable[[Records], Records]:
    """torch retries a failed weights-only load of the sample inputs with full unpickling."""
    return lambda records: {**records, "data/sample_inputs/model.pt": payload_bytes(marker)}


@pytest.fixture(scope="module")
def deploy_files(tmp_path_factory: pytest.TempPathFactory, repvgg_ckpt: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    for suffix in (".pt", ".pt2", ".safetensors"):
        result = invoke("fuse", repvgg_ckpt, folder / f"deploy{suffix}")
        assert result.exit_code == 0, result.output
    return {p.suffix: p for p in folder.iterdir()}


# ------------------------------------------------------------------------ code from a .pt2


@pytest.mark.parametrize("attack", ["pickled_weight", "sample_inputs"])
def test_pt2_payload_does_not_run(deploy_files: dict[str, Path], repvgg_ckpt: Path,
                                  tmp_path: Path, attack: str) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    change = pickled_first_weight(marker) if attack == "pickled_weight" else \
        evil_sample_inputs(marker)
    evil = rewrite_archive(deploy_files[".pt2"], tmp_path / "evil.pt2", change)
    for extra in ([], ["--json"]):
        proc = repconv_process("verify", repvgg_ckpt, evil, *extra, cwd=tmp_path)
        assert_process_refused(proc, ["evil.pt2", "--trust-pickle"], as_json=bool(extra))
        assert not marker.exists(), "repconv ran code from a .pt2 it was not told to trust"
    # the control: the archive really is hostile, and --trust-pickle means what it says
    repconv_process("verify", repvgg_ckpt, evil, "--trust-pickle", cwd=tmp_path)
    assert marker.read_text() == "ran"


def test_unpickling_guard_catches_what_inspection_would_miss(
        deploy_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Should torch add a way to unpickle, the guard around torch.export.load still refuses."""
    monkeypatch.setattr("repconv.formats.pt2.check_archive", lambda path: None)
    for name, change in (("weight", pickled_first_weight), ("sample", evil_sample_inputs)):
        marker = tmp_path / f"RAN_{name}"
        evil = rewrite_archive(deploy_files[".pt2"], tmp_path / f"{name}.pt2", change(marker))
        with pytest.raises(InputError, match="asks to unpickle"):
            load_program(evil, trust_pickle=False)
        assert not marker.exists()
    assert torch.load is not None and torch.load.__module__ == "torch.serialization"


def test_pt2_with_compiled_code_or_unknown_records_is_refused(deploy_files: dict[str, Path],
                                                              tmp_path: Path) -> None:
    for name in ("data/aotinductor/model/model.so", "data/weights/model.pt", "notes.pkl"):
        archive = rewrite_archive(deploy_files[".pt2"], tmp_path / "extra.pt2",
                                  lambda records, name=name: {**records, name: b"\x7fELF..."})
        with pytest.raises(InputError, match="not part of a plain exported program"):
            load_program(archive, trust_pickle=False)


@torch.library.custom_op("repconv_tests::double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_double.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class CallsCustomOp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _double(x) + 1


def test_pt2_graph_may_only_call_aten_ops(tmp_path: Path) -> None:
    """The graph names the callables it runs; only aten operators are run untrusted."""
    path = tmp_path / "custom.pt2"
    torch.export.save(torch.export.export(CallsCustomOp(), (torch.ones(2),)), path)
    with pytest.raises(InputError, match=r"repconv_tests\.double.*not an aten operator"):
        load_program(path, trust_pickle=False)
    trusted = load_program(path, trust_pickle=True)
    assert torch.equal(trusted(torch.ones(2)), torch.full((2,), 3.0))


def test_plain_pt2_loads_without_trust(deploy_files: dict[str, Path], repvgg_ckpt: Path) -> None:
    result = invoke("verify", repvgg_ckpt, deploy_files[".pt2"], "--json")
    assert result.exit_code == 0, result.output
    data = json_document(result.stdout)
    assert data["passed"] is True and data["max_rel_error"] < 1e-5
    assert data["input_shape_from"] == "ORIGINAL" and data["input_shapes"] == [[1, 3, 32, 32]]


# ------------------------------------------------------------------------ vacuous passes


def _edited_deploy(source: Path, target: Path, **changes: object) -> Path:
    deploy = torch.load(source, weights_only=True)
    deploy.update(changes)
    torch.save(deploy, target)
    return target


def test_scaled_weights_with_an_empty_recorded_shape_do_not_pass(
        deploy_files: dict[str, Path], repvgg_ckpt: Path, tmp_path: Path) -> None:
    deploy = torch.load(deploy_files[".pt"], weights_only=True)
    scaled = {k: v * 100 if v.is_floating_point() else v for k, v in deploy["state_dict"].items()}
    empty = _edited_deploy(deploy_files[".pt"], tmp_path / "empty.pt", state_dict=scaled,
                           input_shape=[0, 3, 32, 32])
    before = snapshot(tmp_path, repvgg_ckpt)
    refused = invoke("verify", repvgg_ckpt, empty)
    assert_refused(refused, before, snapshot(tmp_path, repvgg_ckpt),
                   ["empty.pt", "input_shape", "at least 1"])
    # with a usable shape the x100 weights are caught: the empty shape was the only hole
    usable = _edited_deploy(empty, tmp_path / "usable.pt", input_shape=[1, 3, 32, 32])
    result = invoke("verify", repvgg_ckpt, usable, "--json")
    assert result.exit_code == 1, result.output
    data = json_document(result.stdout)
    assert data["passed"] is False and data["max_rel_error"] > 10
    assert data["elements_compared"] == 10 and data["outputs_compared"] == 1


class EmptyOutput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :0] * 2


@pytest.mark.parametrize("model, problem", [(ReturnsNone(), "returned no tensor"),
                                            (EmptyOutput(), "output[0] has no elements")])
def test_verification_that_compared_nothing_fails(model: nn.Module, problem: str) -> None:
    report = verify(model, model, torch.randn(1, 3, 8, 8))
    assert report.passed is False
    assert problem in report.problem and problem in report.summary()
    assert report.elements_compared == 0


def test_fused_output_of_another_structure_fails() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    class Single(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            return (x,)

    report = verify(Pair(), Single(), torch.randn(1, 3))
    assert report.passed is False and "2" in report.problem and "1" in report.problem


def test_fuse_of_a_model_returning_none_writes_nothing(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(ReturnsNone().state_dict(), path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "none_models.py").write_text(
        "from helpers.user_models import ReturnsNone as build\n")
    monkeypatch.delitem(sys.modules, "none_models", raising=False)
    result = invoke("fuse", path, tmp_path / "out.pt", "--model", "none_models:build",
                    "--input-shape", "1,3,8,8", "--json")
    assert result.exit_code == 1, result.output
    data = json_document(result.stdout)
    assert data["ok"] is False and data["written"] is None
    assert "returned no tensor" in data["error"]
    assert not (tmp_path / "out.pt").exists()


# ------------------------------------------------------------------------ ORIGINAL must be a
#                                                                          training checkpoint


def test_swapped_or_repeated_deploy_files_are_refused(deploy_files: dict[str, Path],
                                                      repvgg_ckpt: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.pt"
    assert invoke("fuse", repvgg_ckpt, other).exit_code == 0
    pt, pt2 = deploy_files[".pt"], deploy_files[".pt2"]
    cases = {
        (pt, pt): "same file",
        (pt, other): "is a repconv deploy file",
        (pt, repvgg_ckpt): "is a repconv deploy file",
        (pt2, repvgg_ckpt): "torch.export program",
        (deploy_files[".safetensors"], pt): "is a repconv deploy file",
    }
    for (original, deploy), needle in cases.items():
        before = snapshot(tmp_path, original, deploy)
        result = invoke("verify", original, deploy)
        assert_refused(result, before, snapshot(tmp_path, original, deploy), [needle])


def test_swapped_pickled_files_are_refused(tmp_path: Path) -> None:
    """A pickled deploy carries no marker; a DEPLOY with BatchNorms its ORIGINAL lacks does."""
    torch.manual_seed(0)
    train = tmp_path / "train.pt"
    torch.save(repvgg_tiny(width=8), train)
    deploy = tmp_path / "deploy.pt"
    args = ["--trust-pickle", "--input-shape", "1,3,16,16"]
    assert invoke("fuse", train, deploy, *args).exit_code == 0
    assert invoke("verify", train, deploy, *args).exit_code == 0
    swapped = invoke("verify", deploy, train, *args)
    assert swapped.exit_code == 2, swapped.output
    assert "swapped" in error_line(swapped)


# ------------------------------------------------------------------------ bad metadata


BAD_METADATA = {
    "version_99": ({"repconv_deploy": 99}, ["deploy format 99", "upgrade repconv"]),
    "version_0": ({"repconv_deploy": 0}, ["deploy format 0"]),
    "version_text": ({"repconv_deploy": "one"}, ["not a deploy-format version"]),
    "version_true": ({"repconv_deploy": True}, ["not a deploy-format version"]),
    "shape_negative": ({"input_shape": [-1, 3, 32, 32]}, ["input_shape", "at least 1"]),
    "shape_floats": ({"input_shape": [1, 3, 2e5, 2e5]}, ["input_shape", "whole numbers"]),
    "shape_too_big": ({"input_shape": [1, 3, 200000, 200000]},
                      ["input_shape", "120,000,000,000 elements", "100,000,000"]),
    "shape_text": ({"input_shape": "abc"}, ["input_shape", "not a list"]),
    "shape_nested": ({"input_shape": [[1], [3]]}, ["input_shape", "whole numbers"]),
    "kwargs_list": ({"arch_kwargs": [1, 2]}, ["arch_kwargs"]),
    "kwargs_broken_json": ({"arch_kwargs": "{oops"}, ["arch_kwargs"]),
    "plan_not_json": ({"plan": "[{oops"}, ["rewrite plan"]),
}


@pytest.mark.parametrize("fmt", [".pt", ".safetensors"])
@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_bad_deploy_metadata_is_one_line(deploy_files: dict[str, Path], repvgg_ckpt: Path,
                                         tmp_path: Path, case: str, fmt: str) -> None:
    changes, needles = BAD_METADATA[case]
    path = tmp_path / f"bad{fmt}"
    if fmt == ".pt":
        _edited_deploy(deploy_files[".pt"], path, **changes)
    else:
        with safe_open(str(deploy_files[".safetensors"]), framework="pt") as handle:
            metadata = dict(handle.metadata())
        metadata.update({k: v if isinstance(v, str) else json.dumps(v)
                         for k, v in changes.items()})
        save_file(load_file(str(deploy_files[".safetensors"])), str(path), metadata=metadata)
    before = snapshot(tmp_path, repvgg_ckpt)
    result = invoke("verify", repvgg_ckpt, path, "--json")
    message = assert_refused(result, before, snapshot(tmp_path, repvgg_ckpt), needles)
    assert json_document(result.stdout) == {"schema_version": 1, "ok": False, "error": message,
                                            "exit_code": 2}


@pytest.mark.parametrize("case", [c for c in BAD_METADATA if not c.startswith(("version",
                                                                              "plan"))])
def test_bad_training_metadata_is_one_line(repvgg_ckpt: Path, tmp_path: Path, case: str) -> None:
    changes, needles = BAD_METADATA[case]
    checkpoint = torch.load(repvgg_ckpt, weights_only=True)
    checkpoint.update(changes)
    path = tmp_path / "train.pt"
    torch.save(checkpoint, path)
    before = snapshot(tmp_path)
    result = invoke("fuse", path, tmp_path / "out.pt", "--input-shape", "1,3,32,32")
    assert_refused(result, before, snapshot(tmp_path), needles)


# ------------------------------------------------------------------------ bad tensors, options


@pytest.mark.parametrize("damage", ["int64", "bool", "meta"])
def test_bad_weight_tensors_are_one_line(repvgg_ckpt: Path, tmp_path: Path, damage: str) -> None:
    checkpoint = torch.load(repvgg_ckpt, weights_only=True)
    key = "stages.0.0.rbr_dense.conv.weight"
    weight = checkpoint["state_dict"][key]
    checkpoint["state_dict"][key] = {"int64": weight.long(), "bool": weight > 0,
                                     "meta": weight.to("meta")}[damage]
    path = tmp_path / "train.pt"
    torch.save(checkpoint, path)
    before = snapshot(tmp_path)
    result = invoke("fuse", path, tmp_path / "out.pt")
    expected = "meta tensor" if damage == "meta" else f"dtype torch.{damage}"
    assert_refused(result, before, snapshot(tmp_path), [key, expected])


def test_pickled_module_without_weights_is_one_line(tmp_path: Path) -> None:
    """A trusted pickle still gets its tensors checked: a meta module has no values."""
    path = tmp_path / "module.pt"
    torch.save(repvgg_tiny(width=8).to("meta"), path)
    before = snapshot(tmp_path)
    result = invoke("fuse", path, tmp_path / "out.pt", "--trust-pickle", "--input-shape",
                    "1,3,16,16")
    assert_refused(result, before, snapshot(tmp_path), ["meta tensor", "without its weights"])


@pytest.mark.parametrize("option, needles", [
    (["--input-shape", "1,3,100000,100000"], ["--input-shape", "30,000,000,000 elements"]),
    (["--input-shape", "1,1,1,1,1,1,1,1,1"], ["--input-shape", "9 dimensions"]),
    (["--seed", "1e23"], ["--seed"]),
    (["--seed", str(2**70)], ["--seed", "out of range"]),
    (["--seed", "-1"], ["--seed", "out of range"]),
], ids=["huge-shape", "nine-dims", "seed-float", "seed-2**70", "seed-negative"])
def test_bad_options_are_one_line(deploy_files: dict[str, Path], repvgg_ckpt: Path,
                                  tmp_path: Path, option: list[str], needles: list[str]) -> None:
    before = snapshot(tmp_path)
    result = invoke("verify", repvgg_ckpt, deploy_files[".pt"], *option, "--json")
    message = assert_refused(result, before, snapshot(tmp_path), needles)
    assert json_document(result.stdout)["error"] == message


def test_unexpected_failure_is_still_one_line_and_one_document(
        repvgg_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("repconv.pipeline.fusing.fuse", broken)
    result = invoke("fuse", repvgg_ckpt, tmp_path / "out.pt", "--json")
    assert_no_traceback(result)
    assert result.exit_code == 3
    message = error_line(result)
    assert "internal error" in message and "RuntimeError: a bug" in message
    assert json_document(result.stdout) == {"schema_version": 1, "ok": False, "error": message,
                                            "exit_code": 3}
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ --json stays one document


PRINTING_MODEL = '''
import torch
from repconv.samples import repvgg_tiny

class Chatty(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = repvgg_tiny(width=8)

    def forward(self, x):
        print("forward called")
        return self.net(x)
'''


def test_model_prints_go_to_stderr_under_json(tmp_path: Path) -> None:
    (tmp_path / "chatty_models.py").write_text(PRINTING_MODEL)
    torch.manual_seed(0)
    torch.save({"net." + k: v for k, v in repvgg_tiny(width=8).state_dict().items()},
               tmp_path / "train.pt")
    args = ["--model", "chatty_models:Chatty", "--input-shape", "1,3,16,16", "--json"]
    fused = repconv_process("fuse", "train.pt", "deploy.pt", *args, cwd=tmp_path)
    assert fused.returncode == 0, fused.stderr
    assert json_document(fused.stdout)["ok"] is True
    assert "forward called" in fused.stderr
    checked = repconv_process("verify", "train.pt", "deploy.pt", *args, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert json_document(checked.stdout)["passed"] is True
    assert "forward called" in checked.stderr


def test_usage_error_under_json_is_one_document(tmp_path: Path) -> None:
    proc = repconv_process("fuse", "in.pt", "out.pt", "--rtol", "abc", "--json", cwd=tmp_path)
    assert_process_refused(proc, ["--rtol", "valid number"], as_json=True)
