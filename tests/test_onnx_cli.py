"""`repconv fuse IN OUT.onnx`, `repconv verify ORIGINAL DEPLOY.onnx` and `repconv bench IN
OUT.onnx` from the command line (issue 10): the written file is the verified one, verify fails a
tampered file with exit code 1, and every bad input is one line with exit code 2, nothing
written."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.cli_support import (
    SHAPE8,
    assert_no_traceback,
    assert_process_refused,
    assert_refused,
    invoke,
    json_document,
    run_process,
    snapshot,
    width8_state_dict,
)
from helpers.reference_blocks import randomize_bn
from helpers.user_models import Eigen, TupleHead
from torch import Tensor

from repconv.formats.checkpoint import load_checkpoint
from repconv.formats.onnx_deploy import INPUT_SHAPE_KEY
from repconv.formats.onnx_io import OUTPUT_TREE_KEY, OnnxModule

pytestmark = pytest.mark.needs_onnx
TAMPERED = "stages.1.0.fused_conv"  # the conv whose weight the tampered file scales by 1.01
# `python -c BLOCK MODULES repconv-args...`: repconv with the named modules unimportable, as
# on a machine without the repconv[onnx] extra
BLOCK = """
import runpy, sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None
sys.argv = ["repconv", *sys.argv[2:]]
runpy.run_module("repconv", run_name="__main__", alter_sys=True)
"""


def _ok_json(*args: object, code: int = 0) -> dict[str, Any]:
    result = invoke(*args, "--json")
    assert_no_traceback(result)
    assert result.exit_code == code, result.output
    return json_document(result.stdout)


@pytest.fixture(scope="module")
def sample_onnx(tmp_path_factory: pytest.TempPathFactory,
                repvgg_ckpt: Path) -> tuple[Path, dict[str, Any]]:
    """The sample checkpoint fused to ONNX once for the module, with fuse's JSON document."""
    out = tmp_path_factory.mktemp("onnx") / "deploy.onnx"
    return out, _ok_json("fuse", repvgg_ckpt, out)


def _onnx_model(path: Path) -> Any:
    import onnx

    return onnx.load(path)


def test_fuse_writes_the_verified_onnx(sample_onnx: tuple[Path, dict[str, Any]]) -> None:
    out, data = sample_onnx
    assert data["ok"] is True and data["written"] == "ONNX opset 18 with a dynamic batch dimension"
    assert sorted(p.name for p in out.parent.iterdir()) == ["deploy.onnx"]  # no temp file left
    verification = data["verification"]
    assert verification["passed"] is True
    assert 0 < verification["max_rel_error"] < 1e-5 and verification["rtol"] == 1e-5
    # the ONNX file has a dynamic batch and a fixed spatial size: example and batch 2
    assert [(r["source"], r["input_shapes"]) for r in verification["runs"]] == [
        ("example", [[1, 3, 32, 32]]), ("batch 2", [[2, 3, 32, 32]])]
    # each of the 6 rewrites checked against the file's own weights
    rows = verification["rewrite_errors"]
    assert len(rows) == 6 and all(r["passed"] and not r["problem"] for r in rows)
    assert max(r["magnitude_error"] for r in rows) < 1e-4
    model = _onnx_model(out)
    ops = [node.op_type for node in model.graph.node]
    assert (ops.count("Conv"), ops.count("BatchNormalization")) == (6, 0)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta[INPUT_SHAPE_KEY]) == [1, 3, 32, 32]
    assert OUTPUT_TREE_KEY in meta
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_dynamic_batch_on_a_file_exported_at_batch_1(sample_onnx: tuple[Path, dict[str, Any]],
                                                      repvgg_ckpt: Path) -> None:
    out, _ = sample_onnx
    original = load_checkpoint(repvgg_ckpt).model.eval()
    module = OnnxModule(out)
    for batch in (1, 2, 5):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        got = module(x)
        with torch.no_grad():
            want = original(x)
        assert got.shape == (batch, 10)
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_verify_onnx_passes(sample_onnx: tuple[Path, dict[str, Any]], repvgg_ckpt: Path) -> None:
    out, _ = sample_onnx
    data = _ok_json("verify", repvgg_ckpt, out)
    assert data["ok"] is True and data["passed"] is True
    assert data["input_shape_from"] == "ORIGINAL"
    assert 0 < data["max_rel_error"] < 1e-5
    assert data["trials"] == 2 and data["outputs_compared"] == 1
    assert len(data["notes"]) == 1 and "fixed spatial size" in data["notes"][0]
    assert len(data["rewrite_errors"]) == 6
    assert all(r["passed"] and not r["problem"] for r in data["rewrite_errors"])


def _tampered(src: Path, dst: Path, factor: float = 1.01) -> Path:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(src)
    target = next(w for w in model.graph.initializer if w.name == f"{TAMPERED}.weight")
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * factor, target.name))
    onnx.save(model, dst)
    return dst


def test_verify_fails_a_tampered_onnx(sample_onnx: tuple[Path, dict[str, Any]],
                                      repvgg_ckpt: Path, tmp_path: Path) -> None:
    tampered = _tampered(sample_onnx[0], tmp_path / "tampered.onnx")
    result = invoke("verify", repvgg_ckpt, tampered, "--json")
    assert_no_traceback(result)
    assert result.exit_code == 1, result.output
    data = json_document(result.stdout)
    assert data["ok"] is False and data["exit_code"] == 1
    assert data["max_rel_error"] > 10 * data["rtol"]  # 1 % of one conv's weight
    failed = [r["fused_module"] for r in data["rewrite_errors"] if not r["passed"]]
    assert failed == [TAMPERED]  # the per-rewrite table names the tampered conv
    assert "verification FAILED" in result.stderr  # the human report goes to stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"1 of 6 rewrite(s) differ from the ops they replaced by more than 1e-04: {TAMPERED} "
        f"({next(r for r in data['rewrite_errors'] if not r['passed'])['magnitude_error']:.1e})")


def _user_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cls: str,
                state: dict[str, Tensor]) -> str:
    """A --model module in the folder repconv runs from, and its weights in ckpt.pt."""
    name = f"onnx_models_{cls.lower()}_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(f"from helpers.user_models import {cls} as build\n")
    torch.save(state, tmp_path / "ckpt.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, name, raising=False)
    return f"{name}:build"


def test_tuple_outputs_round_trip_and_recorded_shape(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    reference = _user_model(tmp_path, monkeypatch, "TupleHead",
                            randomize_bn(TupleHead(), seed=2).state_dict())
    data = _ok_json("fuse", "ckpt.pt", "out.onnx", "--model", reference,
                    "--input-shape", "1,3,8,8")
    assert data["verification"]["passed"] is True
    assert data["verification"]["outputs_compared"] == 3
    assert data["verification"]["max_rel_error"] < 1e-5
    # the state_dict records no input shape: verify takes the one the .onnx recorded
    verified = _ok_json("verify", "ckpt.pt", "out.onnx", "--model", reference)
    assert verified["input_shape_from"] == "DEPLOY"
    assert verified["input_shapes"] == [[1, 3, 8, 8]]
    assert verified["outputs_compared"] == 3 and verified["max_rel_error"] < 1e-5
    got, (pooled, mapping) = OnnxModule(tmp_path / "out.onnx")(torch.randn(2, 3, 8, 8))
    assert (got.shape, pooled.shape, mapping["doubled"].shape) == (
        (2, 4, 8, 8), (2,), (2, 4, 8, 8))


def test_fp16_checkpoint(tmp_path: Path) -> None:
    import onnx

    state = {k: v.half() if v.is_floating_point() else v for k, v in width8_state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "w8_fp16.pt")
    model = ["--model", "repconv.samples:repvgg_tiny", "--model-kwargs", '{"width": 8}']
    data = _ok_json("fuse", tmp_path / "w8_fp16.pt", tmp_path / "out.onnx", *model,
                    "--input-shape", SHAPE8)
    verification = data["verification"]
    assert (verification["dtype"], verification["compared_in"]) == ("float16", "float32")
    assert verification["rtol"] == 5e-3
    assert 0 < verification["max_rel_error"] < 5e-3  # fp16 rounding in ONNX Runtime
    weights = onnx.load(tmp_path / "out.onnx").graph.initializer
    assert {w.data_type for w in weights if "fused_conv" in w.name} == {onnx.TensorProto.FLOAT16}
    verified = _ok_json("verify", tmp_path / "w8_fp16.pt", tmp_path / "out.onnx", *model)
    assert verified["passed"] is True and verified["max_rel_error"] < 5e-3
    assert all(r["passed"] and not r["problem"] for r in verified["rewrite_errors"])


def test_bench_times_the_onnx_runtime_session(sample_onnx: tuple[Path, dict[str, Any]],
                                              repvgg_ckpt: Path) -> None:
    out, _ = sample_onnx
    data = _ok_json("bench", repvgg_ckpt, out, "--seconds", "0.2", "--threads", "1")
    original, deployed = data["forms"]
    assert deployed["name"] == "deploy.onnx" and data["deploy"] == str(out)
    assert (original["runtime"], deployed["runtime"].split()[0]) == ("torch", "onnxruntime")
    assert data["rounds"] >= 5 and data["threads"] == 1
    for form in (original, deployed):
        latency = form["latency"]
        assert 0 < latency["min_ms"] <= latency["median_ms"] <= latency["max_ms"]
    assert original["ops"]["convs"] == 12
    # an ONNX Runtime session is timed only: its ops and memory are not torch's to count
    assert deployed["ops"] is None and deployed["parameters"] is None
    assert data["speedup"] == pytest.approx(original["latency"]["median_ms"]
                                            / deployed["latency"]["median_ms"])


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("opset", "needles"), [
    ("17", ["--opset 17 is out of range", "opsets 18 to"]),
    ("1000", ["--opset 1000 is out of range"]),
    ("eighteen", ["'--opset'", "valid integer"]),
])
def test_bad_opset(opset: str, needles: list[str], repvgg_ckpt: Path, tmp_path: Path) -> None:
    before = snapshot(tmp_path, repvgg_ckpt)
    result = invoke("fuse", repvgg_ckpt, tmp_path / "out.onnx", "--opset", opset)
    assert_refused(result, before, snapshot(tmp_path, repvgg_ckpt), needles)


def test_opset_with_another_format(repvgg_ckpt: Path, tmp_path: Path) -> None:
    before = snapshot(tmp_path, repvgg_ckpt)
    result = invoke("fuse", repvgg_ckpt, tmp_path / "out.pt", "--opset", "18")
    assert_refused(result, before, snapshot(tmp_path, repvgg_ckpt),
                   ["--opset 18 is for an .onnx OUT only", ".pt"])


def test_export_failure_names_the_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = _user_model(tmp_path, monkeypatch, "Eigen",
                            randomize_bn(Eigen(), seed=3).state_dict())
    before = snapshot(tmp_path)
    result = invoke("fuse", "ckpt.pt", "out.onnx", "--model", reference, "--input-shape",
                    "1,3,4,4", "--json")
    message = assert_refused(result, before, snapshot(tmp_path),
                             ["no ONNX translation for op aten._linalg_eigh"])
    assert json_document(result.stdout) == {"schema_version": 1, "ok": False,
                                            "error": message, "exit_code": 2}


def _unloadable(kind: str, good: Path, path: Path) -> Path:
    data = good.read_bytes()
    if kind == "garbage":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                       generator=torch.Generator().manual_seed(0))
                         .numpy().tobytes())
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"")
    return path


@pytest.mark.parametrize("command", ["verify", "bench"])
@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_onnx_that_does_not_load(command: str, kind: str, tmp_path: Path, repvgg_ckpt: Path,
                                 sample_onnx: tuple[Path, dict[str, Any]]) -> None:
    bad = _unloadable(kind, sample_onnx[0], tmp_path / "bad.onnx")
    before = snapshot(tmp_path, repvgg_ckpt)
    result = invoke(command, repvgg_ckpt, bad, *(["--seconds", "0.1"] if command == "bench"
                                                 else []))
    message = assert_refused(result, before, snapshot(tmp_path, repvgg_ckpt), [str(bad)])
    assert ("empty (0 bytes)" if kind == "empty" else "not an ONNX model") in message


@pytest.mark.parametrize(("stored", "problem"), [
    ("[0, 3, 32, 32]", "every dimension must be at least 1"),
    ("[1, 3, 100000, 100000]", "elements (at most"),
    ('"1,3,32,32"', "not a list of dimensions"),
    ("rm -rf /", "not a list of dimensions"),
    ("[" * 10_000, "characters, which is not an input shape"),
])
def test_hostile_input_shape_metadata(stored: str, problem: str, tmp_path: Path,
                                      repvgg_ckpt: Path,
                                      sample_onnx: tuple[Path, dict[str, Any]]) -> None:
    import onnx

    model = onnx.load(sample_onnx[0])
    next(p for p in model.metadata_props if p.key == INPUT_SHAPE_KEY).value = stored
    path = tmp_path / "hostile.onnx"
    onnx.save(model, path)
    before = snapshot(tmp_path, repvgg_ckpt)
    result = invoke("verify", repvgg_ckpt, path)
    message = assert_refused(result, before, snapshot(tmp_path, repvgg_ckpt),
                             [INPUT_SHAPE_KEY, problem])
    assert len(message) < 400


@pytest.mark.parametrize(("blocked", "command"), [
    ("onnx", "fuse"), ("onnxscript", "fuse"), ("onnxruntime", "fuse"),
    ("onnxruntime", "verify"), ("onnxruntime", "bench"),
])
def test_missing_extra_is_one_line(blocked: str, command: str, tmp_path: Path,
                                   repvgg_ckpt: Path,
                                   sample_onnx: tuple[Path, dict[str, Any]]) -> None:
    """A real process in which the package cannot be imported, as without repconv[onnx]."""
    deploy = tmp_path / "deploy.onnx"
    if command != "fuse":
        shutil.copy(sample_onnx[0], deploy)
    before = snapshot(tmp_path, repvgg_ckpt)
    proc = run_process([sys.executable, "-c", BLOCK, blocked, command, repvgg_ckpt, deploy,
                        "--json"], tmp_path)
    message = assert_process_refused(proc, [], as_json=True)
    assert message == (f"ONNX support needs the {blocked} package, which is not installed: "
                       "pip install 'repconv[onnx]'")
    assert snapshot(tmp_path, repvgg_ckpt) == before
