"""Bad input on the command line, case by case (docs/design.md "8. Command-line contract").

Every case must give: exit code 2, exactly one stderr line starting with ``error:``, no
traceback anywhere, nothing written (no OUT, no temp file beside it), IN unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers.cli_support import (
    SHAPE8,
    assert_refused,
    invoke,
    sha256,
    snapshot,
    width8_state_dict,
)
from safetensors.torch import save_file
from typer.testing import Result

from repconv.samples import repvgg_tiny, resnet_tiny


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
    "in_plain_pickle": lambda e: (
        _fuse(e, _write(e.inp / "plain.pt", pickle.dumps([1, 2], protocol=4))),
        e.inp / "plain.pt", ["plain.pt", "Unsupported operand", "torch.save"]),
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
        ["argparse.Namespace (read as inert data)", "not a model"]),
    "in_namespace_trusted": lambda e: (
        _fuse(e, e.inp / "ns.pt", "--trust-pickle"),
        _save(argparse.Namespace(lr=0.1), e.inp / "ns.pt"), ["Namespace"]),
    "in_pickled_module_untrusted": lambda e: (
        _fuse(e, e.inp / "module.pt"), _save(repvgg_tiny(width=8), e.inp / "module.pt"),
        ["module.pt", "RepVGGTiny", "--trust-pickle", "--model"]),
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
        ["fuse", e.repvgg, e.out.with_suffix(".tflite")], e.repvgg,
        ["deploy.tflite", ".onnx"]),
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
    "in_is_torch_export_program": lambda e: (
        _fuse(e, _write(e.inp / "deploy.pt2", b"PK\x03\x04 an exported program")),
        e.inp / "deploy.pt2", ["deploy.pt2", "torch.export program", "training checkpoint"]),
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




@pytest.fixture(scope="module")
def deploy_resnet(tmp_path_factory: pytest.TempPathFactory, resnet_ckpt: Path) -> Path:
    """A deploy file of the resnet sample, fused once (read only)."""
    out = tmp_path_factory.mktemp("deploys") / "resnet.pt"
    result = invoke("fuse", resnet_ckpt, out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def env(tmp_path: Path, repvgg_ckpt: Path, resnet_ckpt: Path, deploy_resnet: Path) -> Env:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return Env(tmp_path, tmp_path / "in", tmp_path / "out" / "deploy.pt", repvgg_ckpt,
               resnet_ckpt, deploy_resnet)


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
    assert data == {"schema_version": 1, "ok": False, "error": message, "exit_code": 2}


@pytest.mark.parametrize("name", ["in_random_bytes", "in_json_text", "in_plain_pickle",
                                  "in_truncated"])
def test_not_a_pickle_is_not_sent_to_trust_pickle(env: Env, name: str) -> None:
    """Nor to torch's advice (weights_only=False, a documentation link, miniz internals)."""
    _, message = _run_bad(env, FUSE_CASES[name])
    assert "--trust-pickle" not in message
    assert "not a PyTorch checkpoint" in message
    assert not any(word in message for word in ("weights_only", "http", "miniz"))


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
        ["verify", e.resnet, _copy(e.resnet, e.inp / "train_copy.pt")], e.inp / "train_copy.pt",
        ["not a repconv deploy file"]),
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


