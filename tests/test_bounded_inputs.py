"""Issue 17's resource and error paths: every bad file is exit 2 in one bounded line (never an
internal error, exit 3), a file or shape that would take gigabytes is refused before the
allocation, and libraries' logs stay off stderr around the error line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from helpers.adversarial_models import checkpoint
from helpers.cli_support import (
    REPO,
    assert_process_refused,
    assert_refused,
    invoke,
    json_document,
    repconv_process,
    repconv_process_peak,
    snapshot,
)
from helpers.hostile_files import DEPTH, deflated_checkpoint, expanded_inputs, nested, save_deep
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from repconv.errors import InputError
from repconv.verify.footprint import MemoryBudget
from repconv.verify.inputs import VARIATIONS
from repconv.verify.outputs import verify

TESTS = {"PYTHONPATH": str(REPO / "tests")}  # --model helpers.adversarial_models:...,
# in a process
NESTED = "nested more than 100 deep"


@pytest.fixture(scope="module")
def deploys(tmp_path_factory: pytest.TempPathFactory, repvgg_ckpt: Path) -> dict[str, Path]:
    """The repvgg sample fused to .pt and .safetensors, and a model whose own forward is
    rewritten (a plan with node edits) with its checkpoint."""
    folder = tmp_path_factory.mktemp("bounded")
    for suffix in (".pt", ".safetensors"):
        assert invoke("fuse", repvgg_ckpt, folder / f"deploy{suffix}").exit_code == 0
    train = checkpoint("two_branches", folder / "branches.pt")
    fused = invoke("fuse", train, folder / "branches_deploy.pt", "--model",
                   "helpers.adversarial_models:two_branches")
    assert fused.exit_code == 0, fused.output
    return {"pt": folder / "deploy.pt", "safetensors": folder / "deploy.safetensors",
            "branches": train, "branches_deploy": folder / "branches_deploy.pt"}


def _refused(tmp_path: Path, *argv: object, needles: list[str]) -> str:
    before = snapshot(tmp_path)
    result = invoke(*argv)
    message = assert_refused(result, before, snapshot(tmp_path), needles)
    assert len(message) <= 400
    return message


# ------------------------------------------------------------------ lists nested 10,000 deep


@pytest.mark.parametrize("entry", ["input_shape", "arch_kwargs", "optimizer"])
def test_training_checkpoint_nested_too_deep(repvgg_ckpt: Path, tmp_path: Path,
                                             entry: str) -> None:
    saved = torch.load(repvgg_ckpt, weights_only=True)
    saved[entry] = {"width": nested()} if entry == "arch_kwargs" else nested()
    path = save_deep(saved, tmp_path / "deep.pt")
    extra = ["--keep-extra"] if entry == "optimizer" else []  # an extra entry kept in OUT
    _refused(tmp_path, "fuse", path, tmp_path / "out.pt", *extra, needles=["deep.pt", NESTED])


@pytest.mark.parametrize("where", ["plan", "spec_args"])
def test_deploy_plan_nested_too_deep(deploys: dict[str, Path], repvgg_ckpt: Path,
                                     tmp_path: Path, where: str) -> None:
    saved = torch.load(deploys["pt"], weights_only=True)
    plan = json.loads(saved["plan"]) if isinstance(saved["plan"], str) else saved["plan"]
    if where == "plan":
        plan = nested(leaf=plan)
    else:
        plan[0]["edits"][0]["spec"]["args"]["kernel_size"] = nested()
    saved["plan"] = plan
    path = save_deep(saved, tmp_path / "deep.pt")
    _refused(tmp_path, "verify", repvgg_ckpt, path, needles=["deep.pt", NESTED])


@pytest.mark.parametrize("key, needles", [
    ("plan", ["no readable rewrite plan"]),
    ("input_shape", ["input_shape", "not a usable shape"]),
    ("arch_kwargs", ["arch_kwargs", "not an object"]),
])
def test_safetensors_metadata_nested_too_deep(deploys: dict[str, Path], repvgg_ckpt: Path,
                                              tmp_path: Path, key: str,
                                              needles: list[str]) -> None:
    """JSON text 10,000 lists deep: the parser's own recursion limit, caught."""
    source = deploys["safetensors"]
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
    metadata[key] = "[" * DEPTH + "]" * DEPTH
    path = tmp_path / "deep.safetensors"
    save_file(load_file(str(source)), str(path), metadata=metadata)
    _refused(tmp_path, "verify", repvgg_ckpt, path, needles=["deep.safetensors", *needles])


# ------------------------------------------------------------------ damaged plan edits


@pytest.mark.parametrize("change", ["root_is_output", "first_is_input", "root_and_sink_swapped"])
def test_plan_edit_that_is_not_a_region(deploys: dict[str, Path], tmp_path: Path,
                                        change: str) -> None:
    saved = torch.load(deploys["branches_deploy"], weights_only=True)
    plan = json.loads(saved["plan"]) if isinstance(saved["plan"], str) else saved["plan"]
    (edit,) = plan[0]["edits"]
    assert plan[0]["kind"] == "frame" and edit["root"] == "x"
    if change == "root_is_output":
        edit["root"] = "output"
    elif change == "first_is_input":
        edit["first"] = "x"
    else:
        edit["root"], edit["sink"] = edit["sink"], edit["root"]
    saved["plan"] = json.dumps(plan)
    torch.save(saved, tmp_path / "edited.pt")
    _refused(tmp_path, "verify", deploys["branches"], tmp_path / "edited.pt", "--model",
             "helpers.adversarial_models:two_branches",
             needles=["deploy plan edits", "not a region"])


# ------------------------------------------------------------------ models that broke the copy


def test_legacy_weight_norm_is_left_as_it_is(tmp_path: Path) -> None:
    """Its ``weight`` cannot be deep-copied (exit 3 before); its pre-hook recomputes it."""
    train = checkpoint("weight_normed", tmp_path / "train.pt")
    model = ["--model", "helpers.adversarial_models:weight_normed"]
    result = invoke("fuse", train, tmp_path / "deploy.pt", *model, "--json")
    assert result.exit_code == 0, result.output
    data = json_document(result.stdout)
    (skip,) = [s for s in data["skipped"] if s["where"] == "conv2"]
    assert "forward pre-hook (WeightNorm)" in skip["reason"]
    assert invoke("verify", train, tmp_path / "deploy.pt", *model).exit_code == 0


def test_root_forward_replaced_by_a_closure(tmp_path: Path) -> None:
    """The closure calls the modules it was built over, not the working copy's: nothing is
    folded, and that is said."""
    train = checkpoint("closure_forward", tmp_path / "train.pt")
    model = ["--model", "helpers.adversarial_models:closure_forward"]
    result = invoke("fuse", train, tmp_path / "deploy.pt", *model, "--json")
    assert result.exit_code == 0, result.output
    data = json_document(result.stdout)
    assert data["rewrites"] == [] and data["verification"]["passed"] is True
    assert any("its forward is replaced on the instance" in note for note in data["notes"])
    assert invoke("verify", train, tmp_path / "deploy.pt", *model).exit_code == 0


# ------------------------------------------------------------------ one bounded line


def test_ten_thousand_inputs_are_one_short_line(repvgg_ckpt: Path, tmp_path: Path) -> None:
    torch.save([torch.randn(1, 3, 2, 2) for _ in range(10_000)], tmp_path / "many.pt")
    proc = repconv_process("fuse", repvgg_ckpt, "out.pt", "--inputs", "many.pt", cwd=tmp_path)
    message = assert_process_refused(proc, ["10001 were given"])
    assert len(message) <= 400 and "[1, 3, 2, 2], ..." in message
    assert not (tmp_path / "out.pt").exists()


def test_torch_warnings_stay_off_a_refusal(tmp_path: Path) -> None:
    """The model's builder makes torch warn (legacy weight_norm); the command is refused: its
    one line is all of stderr. A successful command still shows the warning."""
    train = checkpoint("weight_normed", tmp_path / "train.pt")
    model = ["--model", "helpers.adversarial_models:weight_normed_loud"]
    proc = repconv_process("fuse", train, "out.pt", *model, "--input-shape", "1,4,32,32",
                           cwd=tmp_path, env=TESTS)
    assert_process_refused(proc, ["4 channels"])
    done = repconv_process("fuse", train, "out.pt", *model, cwd=tmp_path, env=TESTS)
    assert done.returncode == 0, done.stderr
    assert "FutureWarning" in done.stderr


def test_onnx_runtime_log_stays_off_stderr(repvgg_ckpt: Path, tmp_path: Path) -> None:
    """A graph that fails while it runs: ONNX Runtime logs the failure in colour before
    raising it; only repconv's report is shown (verify's exit 1 is a result: on stdout)."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper
    assert invoke("fuse", repvgg_ckpt, tmp_path / "deploy.onnx").exit_code == 0
    model = onnx.load(tmp_path / "deploy.onnx")
    (reshape,) = [n for n in model.graph.node if n.op_type == "Reshape"]
    (shape,) = [i for i in model.graph.initializer if i.name == reshape.input[1]]
    shape.CopyFrom(numpy_helper.from_array(torch.tensor([3, -1]).numpy(), shape.name))
    onnx.save(model, tmp_path / "broken.onnx")
    proc = repconv_process("verify", repvgg_ckpt, "broken.onnx", cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr
    assert "verification FAILED: the fused model fails" in proc.stdout
    assert "[E:onnxruntime" not in proc.stdout and "\x1b[" not in proc.stdout


# ------------------------------------------------------------------ memory


def test_a_shape_above_max_memory_is_refused_fast(repvgg_ckpt: Path, tmp_path: Path) -> None:
    start = time.perf_counter()
    proc = repconv_process("fuse", repvgg_ckpt, "out.pt", "--input-shape", "1,3,5000,5000",
                           "--max-memory", "1GB", cwd=tmp_path)
    message = assert_process_refused(proc, ["[[1, 3, 5000, 5000]]", "needs about",
                                            "more than --max-memory (1.0 GB)"])
    assert time.perf_counter() - start < 60, message
    assert not (tmp_path / "out.pt").exists()


def test_a_shape_above_the_available_memory_is_refused(tmp_path: Path) -> None:
    """No option: the limit is what the machine has. 1024 channels at 9e7 input elements
    take hundreds of GB (estimated on a 32 px probe)."""
    train = checkpoint("wide", tmp_path / "train.pt", [1, 3, 10_000, 3_000])
    proc, peak = repconv_process_peak("fuse", train, "out.pt", "--model",
                                      "helpers.adversarial_models:wide", cwd=tmp_path, env=TESTS)
    assert_process_refused(proc, ["needs about", "more than the memory available"])
    assert peak < 2 << 30  # the 0.36 GB example input, not one activation of 123 GB


@pytest.mark.parametrize("text", ["lots", "0.5MB", "-1GB"])
def test_bad_max_memory(repvgg_ckpt: Path, tmp_path: Path, text: str) -> None:
    _refused(tmp_path, "verify", repvgg_ckpt, repvgg_ckpt, "--max-memory", text,
             needles=["--max-memory", "8GB"])


def test_a_varied_size_above_the_limit_is_skipped_and_a_listed_one_refused() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 32, 32)
    budget = MemoryBudget(1 << 20, "the test's limit")  # 32 px fits, 64 and 128 px do not
    report = verify(model, model, x, trials=1, vary=VARIATIONS, memory=budget)
    assert report.passed and [r.source for r in report.runs] == ["example", "spatial 17x17"]
    skipped = {s.source: s.reason for s in report.skipped_runs}
    assert set(skipped) == {"batch 2", "spatial 64x64", "spatial 128x128"}
    assert all("more than the test's limit (1.0 MB)" in r for r in skipped.values())
    with pytest.raises(InputError, match=r"listed 1 inputs of shape \[\[1, 3, 64, 64\]\] needs"):
        verify(model, model, x, trials=1, shapes=[[[1, 3, 64, 64]]], memory=budget)


# ------------------------------------------------------------------ files that expand


def test_a_deflated_checkpoint_is_refused_before_it_inflates(tmp_path: Path) -> None:
    path = deflated_checkpoint(tmp_path / "deflated.pt", 1 << 28)  # 1 GiB of zeros
    assert path.stat().st_size < 8 << 20
    proc, peak = repconv_process_peak("fuse", "deflated.pt", "out.pt", cwd=tmp_path)
    assert_process_refused(proc, ["deflated.pt", "unpack to 1.0 GB", "32x its size"])
    assert peak < 700 << 20  # python, torch and repconv, without the gigabyte


def test_an_expanded_inputs_tensor_is_refused_before_it_is_used(repvgg_ckpt: Path,
                                                                 tmp_path: Path) -> None:
    expanded_inputs(tmp_path / "inputs.pt")
    assert (tmp_path / "inputs.pt").stat().st_size < 2000
    start = time.perf_counter()
    proc, peak = repconv_process_peak("fuse", repvgg_ckpt, "out.pt", "--inputs", "inputs.pt",
                                      cwd=tmp_path)
    assert_process_refused(proc, ["--inputs inputs.pt", "tensors hold 381.5 MB"])
    assert time.perf_counter() - start < 60 and peak < 700 << 20


@pytest.mark.parametrize("text, needles", [
    ("1,3,x", ["--shapes entry '1,3,x'", "not a usable shape"]),
    ("1,3,0,8", ["at least 1"]),
    (";".join(["1,3,8,8"] * 33), ["lists 33 sizes", "1 to 32"]),
    ("3,32,32", ["3 dimensions, the example input 4"]),
    ("1,3,32,32+1,3,32,32", ["gives 2 shape(s)", "1 tensor input(s)"]),
])
def test_bad_shapes(repvgg_ckpt: Path, tmp_path: Path, text: str, needles: list[str]) -> None:
    _refused(tmp_path, "fuse", repvgg_ckpt, tmp_path / "out.pt", "--shapes", text,
             needles=needles)
