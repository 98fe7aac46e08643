"""`repconv verify` as a CI step (README "Verify in CI"): the JSON schema (inputs at several
shapes, per-output errors, the per-rewrite table), --inputs, a tampered deploy file named by
its rewrite, sizes the model does not run at, .pt2 files with a dynamic batch and a recorded
input shape, and fp16/bf16 models compared in float32.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers.cli_support import (
    assert_no_traceback,
    assert_refused,
    invoke,
    snapshot,
    width8_state_dict,
)
from safetensors.torch import save_file
from torch import nn

from repconv.formats.pt2 import read_record
from repconv.verify.outputs import REWRITE_RTOL, UPCAST_RTOL


@pytest.fixture(scope="module")
def deploy(tmp_path_factory: pytest.TempPathFactory, repvgg_ckpt: Path) -> tuple[Path, dict]:
    """The repvgg sample fused to .pt once, with its fuse document."""
    out = tmp_path_factory.mktemp("deploy") / "deploy.pt"
    result = invoke("fuse", repvgg_ckpt, out, "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def _verify(*args: object) -> tuple[int, dict, str]:
    result = invoke("verify", *args, "--json")
    assert_no_traceback(result)
    return result.exit_code, json.loads(result.stdout), result.stderr


def _tampered(deploy: Path, folder: Path, fused_module: str, factor: float) -> Path:
    checkpoint = torch.load(deploy, weights_only=True)
    checkpoint["state_dict"][f"{fused_module}.weight"] *= factor
    path = folder / f"tampered{deploy.suffix}"
    torch.save(checkpoint, path)
    return path


def test_schema_shapes_outputs_and_rewrites(repvgg_ckpt: Path,
                                            deploy: tuple[Path, dict]) -> None:
    path, fused = deploy
    code, data, _ = _verify(repvgg_ckpt, path)
    assert code == 0 and data["ok"] is True and data["passed"] is True
    assert data["schema_version"] == 1
    assert data["input_shape_from"] == "ORIGINAL"
    assert data["dtype"] == data["compared_in"] == "float32"
    assert [(r["source"], r["input_shapes"]) for r in data["runs"]] == [
        ("example", [[1, 3, 32, 32]]), ("batch 2", [[2, 3, 32, 32]]),
        ("spatial 64x64", [[1, 3, 64, 64]]), ("spatial 17x17", [[1, 3, 17, 17]]),
        ("spatial 128x128", [[1, 3, 128, 128]])]
    assert data["trials"] == 5 and data["skipped_runs"] == []
    for run in data["runs"]:
        assert run["outputs_compared"] == 1
        assert run["elements_compared"] == run["input_shapes"][0][0] * 10
        (output,) = run["outputs"]
        assert output["name"] == "output[0]" and output["passed"] is True
        assert output["shape"] == [run["input_shapes"][0][0], 10]
        assert 0 <= output["max_rel_error"] < 1e-5
        # the bar: the original's own float32 noise against its float64 run, at least rtol
        assert 0 < output["noise"] < 1e-6 and 0 < output["reference_error"] < 1e-6
        assert output["tolerance"] == max(1e-5, 8 * output["noise"]) == 1e-5
    assert data["reference"] == "float64" and data["reference_note"] == ""
    assert data["noise_factor"] == 8.0 and data["rtol"] == 1e-5
    assert data["tolerance"] == 1e-5 and data["noise"] < 1e-6
    assert data["deciding_output"].startswith("output[0] (")
    assert set(data["seconds"]) == {"outputs", "float64_reference", "rewrites"}
    names = [r["fused_module"] for r in fused["rewrites"]]
    rows = data["rewrite_errors"]
    assert [r["fused_module"] for r in rows] == names
    assert all(r["passed"] and r["problem"] == "" for r in rows)
    assert all(r["max_rel_error"] < 1e-5 and r["magnitude_error"] < 1e-5 for r in rows)
    assert all(r["kind"] == "multi-branch" and r["sources"] for r in rows)
    assert data["rewrite_rtol"] == 1e-4 and data["worst_rewrite"] in names


def test_tampered_rewrite_is_named(repvgg_ckpt: Path, deploy: tuple[Path, dict],
                                   tmp_path: Path) -> None:
    path, fused = deploy
    broken = fused["rewrites"][2]["fused_module"]
    code, data, stderr = _verify(repvgg_ckpt, _tampered(path, tmp_path, broken, 1.02))
    assert code == 1 and data["ok"] is False and data["passed"] is False
    failed = [r["fused_module"] for r in data["rewrite_errors"] if not r["passed"]]
    assert failed == [broken]
    assert data["worst_rewrite"] == broken
    assert f"1 of {len(fused['rewrites'])} rewrite(s) differ" in stderr and broken in stderr


def test_sizes_the_model_does_not_run_at_are_skipped(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A head flattening a fixed-size map runs only at the recorded size: the other spatial
    size is skipped with the reason, batch 2 still runs, and verification passes."""
    name = f"fixed_{tmp_path.name.replace('-', '_')}"
    build = ("nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), "
             "nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))")
    (tmp_path / f"{name}.py").write_text(f"from torch import nn\n\ndef build():\n"
                                         f"    return {build}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, name, raising=False)
    torch.manual_seed(0)
    torch.save(eval(build, {"nn": nn}).state_dict(), tmp_path / "train.pt")
    options = ["--model", f"{name}:build", "--input-shape", "1,3,8,8"]
    fused = invoke("fuse", "train.pt", "deploy.pt", *options)
    assert fused.exit_code == 0, fused.output
    code, data, stderr = _verify("train.pt", "deploy.pt", *options)
    sys.modules.pop(name, None)
    assert code == 0, stderr
    assert [r["source"] for r in data["runs"]] == ["example", "batch 2"]
    assert [(s["source"], s["input_shapes"]) for s in data["skipped_runs"]] == [
        ("spatial 16x16", [[1, 3, 16, 16]]), ("spatial 5x5", [[1, 3, 5, 5]])]
    assert all("does not run at this size" in s["reason"] for s in data["skipped_runs"])
    assert "not compared at spatial 16x16" in stderr and "not compared at spatial 5x5" in stderr


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_inputs_file_is_compared_first(repvgg_ckpt: Path, deploy: tuple[Path, dict],
                                       tmp_path: Path, suffix: str) -> None:
    samples = tmp_path / f"samples{suffix}"
    x = torch.randn(4, 3, 32, 32)
    if suffix == ".pt":
        torch.save((x,), samples)
    else:
        save_file({"images": x}, samples)
    code, data, _ = _verify(repvgg_ckpt, deploy[0], "--inputs", samples)
    assert code == 0
    assert data["runs"][0]["source"] == "--inputs"
    assert data["runs"][0]["seed"] is None
    assert data["runs"][0]["input_shapes"] == [[4, 3, 32, 32]]
    assert data["runs"][0]["elements_compared"] == 40
    assert data["input_shape_from"] == "ORIGINAL" and data["trials"] == 6


def _bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    cases: dict[str, tuple[object, str]] = {
        "int.pt": (torch.arange(3 * 32 * 32).reshape(1, 3, 32, 32), "must be floating point"),
        "nan.pt": (torch.full((1, 3, 32, 32), float("nan")), "NaN or Inf"),
        "two.pt": ({"a": torch.randn(1, 3, 32, 32), "b": torch.randn(1, 3, 32, 32)},
                   "dict with 2 entries"),
        "scalar.pt": (torch.tensor(1.0), "not a usable input shape"),
        "text.pt": ("images", "holds a str"),
        "pickled.pt": ((torch.randn(1, 3, 32, 32), nn.ReLU()), "weights-only"),
        "empty_list.pt": ([], "empty sequence"),
    }
    paths = {}
    for name, (value, needle) in cases.items():
        torch.save(value, folder / name)
        paths[name] = (folder / name, needle)
    (folder / "garbage.safetensors").write_bytes(b"\x00" * 64)
    paths["garbage.safetensors"] = (folder / "garbage.safetensors", "not a readable safetensors")
    (folder / "samples.npy").write_bytes(b"x")
    paths["samples.npy"] = (folder / "samples.npy", "must end in .pt, .pth or .safetensors")
    paths["missing.pt"] = (folder / "missing.pt", "does not exist")
    return paths


@pytest.mark.parametrize("command", ["verify", "fuse"])
def test_bad_inputs_file_is_one_line(repvgg_ckpt: Path, deploy: tuple[Path, dict],
                                     tmp_path: Path, command: str) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    target = deploy[0] if command == "verify" else tmp_path / "out.pt"
    for name, (path, needle) in _bad_inputs(folder).items():
        before = snapshot(tmp_path, repvgg_ckpt)
        result = invoke(command, repvgg_ckpt, target, "--inputs", path)
        message = assert_refused(result, before, snapshot(tmp_path, repvgg_ckpt), [needle])
        assert name in message or "--inputs" in message, message


def test_pt2_has_a_dynamic_batch_and_records_its_shape(tmp_path: Path) -> None:
    """A bare state_dict records no shape: the .pt2 does, so verify needs no --input-shape,
    and the program runs at any batch."""
    torch.save(width8_state_dict(), tmp_path / "train.pt")
    model = ["--model", "repconv.samples:repvgg_tiny", "--model-kwargs", '{"width": 8}']
    out = tmp_path / "deploy.pt2"
    fused = invoke("fuse", tmp_path / "train.pt", out, *model, "--input-shape", "1,3,32,32")
    assert fused.exit_code == 0, fused.output
    assert "dynamic batch" in fused.stdout
    record = read_record(out)
    assert record.input_shape == (1, 3, 32, 32)
    assert record.dynamic is not None and 0 in record.dynamic[0]
    program = torch.export.load(out).module()
    assert program(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    code, data, stderr = _verify(tmp_path / "train.pt", out, *model)
    assert code == 0, stderr
    assert data["input_shape_from"] == "DEPLOY"
    assert [r["input_shapes"] for r in data["runs"]][:2] == [[[1, 3, 32, 32]], [[2, 3, 32, 32]]]
    assert len(data["rewrite_errors"]) == 6 and all(r["passed"] for r in data["rewrite_errors"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_is_compared_in_float32(repvgg_ckpt: Path, tmp_path: Path,
                                              dtype: torch.dtype) -> None:
    checkpoint = torch.load(repvgg_ckpt, weights_only=True)
    checkpoint["state_dict"] = {k: v.to(dtype) if v.is_floating_point() else v
                                for k, v in checkpoint["state_dict"].items()}
    train = tmp_path / "train.pt"
    torch.save(checkpoint, train)
    out = tmp_path / "deploy.pt"
    fused = invoke("fuse", train, out, "--json")
    assert fused.exit_code == 0, fused.output
    verification = json.loads(fused.stdout)["verification"]
    assert verification["dtype"] == str(dtype).removeprefix("torch.")
    assert verification["compared_in"] == "float32"
    assert verification["rtol"] == UPCAST_RTOL[dtype]
    # float32 noise (~1e-7) is far under the floor: the noise term loosens nothing here
    assert verification["reference"] == "float64" and verification["noise"] < 1e-6
    assert verification["tolerance"] == UPCAST_RTOL[dtype]
    assert verification["rewrite_rtol"] == REWRITE_RTOL[dtype]
    assert torch.load(out, weights_only=True)["state_dict"]["linear.weight"].dtype == dtype
    code, data, _ = _verify(train, out)
    assert code == 0 and data["compared_in"] == "float32"
    # a 2% change of one fused conv hides in the outputs' rounding; its row shows it
    broken = json.loads(fused.stdout)["rewrites"][3]["fused_module"]
    code, data, _ = _verify(train, _tampered(out, tmp_path, broken, 1.02))
    assert code == 1
    assert [r["fused_module"] for r in data["rewrite_errors"] if not r["passed"]] == [broken]
