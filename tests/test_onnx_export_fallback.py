"""ONNX that exports (issue 16): a model that fixes its batch size exports with a static batch
and says so; where the strict dynamic batch fails, Dim.AUTO, then a static batch, are tried and
the report names the cause; a forward that returns another structure while exported is recorded
and verified as exported; torch's logs stay off stderr; a failure is one line with its cause.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from helpers import export_models
from helpers.cli_support import REPO, repconv_process

from repconv.formats.onnx_io import OUTPUT_TREE_KEY, OnnxModule, export_program

pytestmark = pytest.mark.needs_onnx
ENV = {"PYTHONPATH": str(REPO / "tests")}


def _fuse_to_onnx(tmp_path: Path, builder: str, *extra: str) -> tuple[Any, Path]:
    model = getattr(export_models, builder)()
    source = tmp_path / "model.pt"
    torch.save({"state_dict": model.state_dict()}, source)
    out = tmp_path / "model.onnx"
    proc = repconv_process("fuse", source, out, "--model", f"helpers.export_models:{builder}",
                           "--input-shape", "1,3,8,8", "--json", *extra, cwd=tmp_path, env=ENV)
    return proc, out


def test_a_model_fixing_its_batch_exports_with_a_static_batch(tmp_path: Path) -> None:
    proc, out = _fuse_to_onnx(tmp_path, "batch_guard")
    assert proc.returncode == 0, proc.stderr
    for noise in ("torchvision is not installed", "Warning", "torch/onnx/_internal"):
        assert noise not in proc.stderr, "torch's exporter logs reached stderr"
    report = json.loads(proc.stdout)
    assert report["after"]["batchnorms"] == 0
    assert report["written"] == ("ONNX opset 18 with a static batch size (the exporter fixed it: "
                                 "the model's code specializes on the batch size)")
    # verified at the one batch size the file takes, not at batch 2
    assert [run["source"] for run in report["verification"]["runs"]] == ["example"]
    verify = repconv_process("verify", tmp_path / "model.pt", out, "--model",
                             "helpers.export_models:batch_guard", "--json", cwd=tmp_path, env=ENV)
    assert verify.returncode == 0, verify.stderr
    assert "has a fixed batch and spatial size" in " ".join(json.loads(verify.stdout)["notes"])


def test_outputs_changed_under_export_are_recorded_as_exported(tmp_path: Path) -> None:
    proc, out = _fuse_to_onnx(tmp_path, "export_branch")
    assert proc.returncode == 0, proc.stderr
    assert "dynamic batch dimension" in json.loads(proc.stdout)["written"]
    module = OnnxModule(out)
    assert module.output_tree.num_leaves == 1 == len(module.session.get_outputs())
    verify = repconv_process("verify", tmp_path / "model.pt", out, "--model",
                             "helpers.export_models:export_branch", cwd=tmp_path, env=ENV)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    stored = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert OUTPUT_TREE_KEY in stored


_VIOLATION = ("Constraints violated (batch)! For more information, run with "
              "TORCH_LOGS=\"+dynamic\".\n  - Not all values of batch = L['x'].size()[0] in "
              "the specified range satisfy "
              "the generated guard L['x'].size()[0] <= 1.\nSuggested fixes:\n  batch = "
              "Dim('batch', max=1)")


def _failing_export(fail: set[str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """torch.onnx.export failing (as torch.export does on a batch guard) for the batch kinds in
    ``fail``: 'dynamic' (Dim), 'auto' (Dim.AUTO), 'static' (no dynamic shapes)."""
    real, tried = torch.onnx.export, []

    def export(*args: Any, dynamic_shapes: Any = None, **kwargs: Any) -> Any:
        dim = None if dynamic_shapes is None else dynamic_shapes[0][0]
        kind = ("static" if dim is None else "auto" if dim is torch.export.Dim.AUTO
                else "dynamic")
        tried.append(kind)
        if kind in fail:
            raise RuntimeError("Failed to export the model with torch.export.") from \
                torch._dynamo.exc.UserError(torch._dynamo.exc.UserErrorType.CONSTRAINT_VIOLATION,
                                            _VIOLATION)
        return real(*args, dynamic_shapes=dynamic_shapes, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    return tried


@pytest.mark.parametrize(("fail", "batch", "via"), [
    ({"dynamic"}, "a dynamic batch dimension", "Dim.AUTO"),
    ({"dynamic", "auto"}, "a static batch size", "static"),
], ids=["auto", "static"])
def test_a_failed_dynamic_batch_falls_back(monkeypatch: pytest.MonkeyPatch, fail: set[str],
                                           batch: str, via: str) -> None:
    tried = _failing_export(fail, monkeypatch)
    exported = export_program(export_models.export_branch(), torch.randn(1, 3, 8, 8))
    assert tried == ["dynamic", "auto", "static"][:len(fail) + 1]
    described = exported.describe(18)
    assert described.startswith(f"ONNX opset 18 with {batch} (exported with {via} after the "
                                "dynamic batch failed: Constraints violated (batch)! ... "
                                "Suggested fixes: batch = Dim('batch', max=1))"), described


def test_an_export_failing_every_way_is_one_line_with_its_cause(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from repconv.errors import InputError

    _failing_export({"dynamic", "auto", "static"}, monkeypatch)
    with pytest.raises(InputError) as caught:
        export_program(export_models.batch_guard(), torch.randn(1, 3, 8, 8))
    message = str(caught.value)
    assert "\n" not in message
    assert message == ("the model does not export to ONNX (Constraints violated (batch)! ... "
                       "Suggested fixes: batch = Dim('batch', max=1)); write .pt, .safetensors "
                       "or .pt2 instead")
