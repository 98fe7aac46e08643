"""`repconv inspect --quant IN` and `repconv fuse --quant` (issue 10): the INT8 readiness table at
a fixed width, its JSON section equal to a direct computation, the section only when asked for,
and bad options as one line with exit code 2."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.cli_support import (
    assert_no_traceback,
    assert_refused,
    invoke,
    json_document,
    run_process,
    snapshot,
)

import repconv
from repconv.formats.checkpoint import load_checkpoint
from repconv.measure.quant import calibration_batches, quant_report

LAYERS = 7  # the sample's 6 fused convs and its linear head
SUSPECT = "stages.2.1"  # a block with an identity branch, whose BN the test starves
DEAD = 3  # the channel it starves


def _json(*args: object) -> dict[str, Any]:
    result = invoke(*args, "--json")
    assert_no_traceback(result)
    assert result.exit_code == 0, result.output
    return json_document(result.stdout)


def test_inspect_quant_table_at_fixed_width(repvgg_ckpt: Path, tmp_path: Path) -> None:
    proc = run_process([sys.executable, "-m", "repconv", "inspect", "--quant", repvgg_ckpt],
                       tmp_path, env={"COLUMNS": "100"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("INT8 simulation on 3 calibration batch(es): whole-model error ")
               for line in lines)
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["layer", "INT8"])
    assert lines[header - 2] == "INT8 readiness, most sensitive layer first"
    assert set(lines[header + 1].strip()) == {"─"}
    table = lines[header - 1: header + 3 + LAYERS]
    assert table[0].strip() == table[-1].strip() == ""  # SIMPLE_HEAD's blank edges
    assert max(len(line) for line in table) <= 100  # the table fits the terminal width
    assert lines[header + 3 + LAYERS] == lines[-1]  # then the verdict, last
    rows = [line.split() for line in table[3:-1]]
    assert [row[0] for row in rows[-1:]] == ["linear"]
    assert {row[0] for row in rows[:-1]} == {f"stages.{s}.fused_conv" for s in
                                             ("0.0", "1.0", "1.1", "2.0", "2.1", "3.0")}
    sensitivities = [float(row[1]) for row in rows]
    assert sensitivities == sorted(sensitivities, reverse=True)
    assert all(row[-1].startswith("(") and row[-1].endswith(".bn)") for row in rows[:-1])
    verdict = lines[-1]
    assert re.fullmatch(r"INT8 error \d\.\d\de-\d\d \(per-channel weights\) (meets|misses) the "
                        r"target 1e-02.*", verdict), verdict
    assert list(tmp_path.iterdir()) == []  # inspect writes nothing


def test_inspect_quant_json_is_the_direct_computation(repvgg_ckpt: Path) -> None:
    quant = _json("inspect", "--quant", repvgg_ckpt)["quant"]
    # the same figures computed here: the sample fused, calibrated on the verification inputs
    loaded = load_checkpoint(repvgg_ckpt)
    example = (torch.randn(loaded.input_shape, generator=torch.Generator().manual_seed(0)),)
    result = repconv.fuse(loaded.model, example, check=False, seed=0)
    direct = quant_report(loaded.model, result.model, result.report.rewrites,
                          calibration_batches(example, {}, seed=0)).to_dict()
    assert quant["calibration_batches"] == 3 and quant["target"] == 1e-2
    for key in ("error_per_tensor", "error_per_channel", "error_kept"):
        assert quant[key] == pytest.approx(direct[key], rel=1e-6), key
    assert quant["keep_float"] == direct["keep_float"]
    assert quant["verdict"] == direct["verdict"]
    assert [layer["layer"] for layer in quant["layers"]] == [
        layer["layer"] for layer in direct["layers"]]
    assert [layer["sensitivity"] for layer in quant["layers"]] == pytest.approx(
        [layer["sensitivity"] for layer in direct["layers"]], rel=1e-6)
    assert len(quant["layers"]) == LAYERS
    assert 0 < quant["error_per_channel"] <= quant["error_per_tensor"] < 0.1


def test_quant_section_only_when_asked(repvgg_ckpt: Path, tmp_path: Path) -> None:
    assert "quant" not in _json("inspect", repvgg_ckpt)
    assert "quant" not in _json("fuse", repvgg_ckpt, tmp_path / "plain.pt")
    data = _json("fuse", repvgg_ckpt, tmp_path / "deploy.pt", "--quant", "--quant-target", "0.1")
    assert data["written"] and (tmp_path / "deploy.pt").is_file()
    quant = data["quant"]
    assert quant["target"] == 0.1 and quant["keep_float"] == []
    assert quant["error_kept"] == quant["error_per_channel"] < 0.1
    assert quant["verdict"].endswith("meets the target 1e-01 with every layer in INT8")
    assert "quant" in data["seconds"]


def test_strict_target_keeps_layers_in_fp16(repvgg_ckpt: Path) -> None:
    quant = _json("inspect", "--quant", "--quant-target", "1e-3", repvgg_ckpt)["quant"]
    ranked = [layer["layer"] for layer in quant["layers"]]
    kept = quant["keep_float"]
    assert 0 < len(kept) <= LAYERS and kept == ranked[:len(kept)]  # most sensitive first
    assert quant["error_kept"] <= 1e-3 < quant["error_per_channel"]
    assert f"keep {len(kept)} of {LAYERS} layers in fp16" in quant["verdict"]


def _starved_checkpoint(source: Path, path: Path) -> Path:
    """The QARepVGG failure on the sample: channel DEAD of the block before SUSPECT made
    constant (its kernels zeroed), and SUSPECT's identity BN given the statistics training
    gives such a channel: the constant as running_mean, a near-zero running_var. The float model
    is unchanged in behaviour, but SUSPECT's fused kernel gets an identity tap ~300x its other
    weights."""
    checkpoint = torch.load(source, weights_only=True)
    state = checkpoint["state_dict"]
    before = f"{SUSPECT[:-1]}0"
    for branch in ("rbr_dense", "rbr_1x1"):
        state[f"{before}.{branch}.conv.weight"][DEAD] = 0
    torch.save(checkpoint, path)
    model = load_checkpoint(path).model.eval()
    seen: list[torch.Tensor] = []
    model.get_submodule(before).register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    constant = seen[0][:, DEAD]
    assert float(constant.max() - constant.min()) == 0  # the channel is constant
    state[f"{SUSPECT}.rbr_identity.running_mean"][DEAD] = float(constant.flatten()[0])
    state[f"{SUSPECT}.rbr_identity.running_var"][DEAD] = 1e-6
    torch.save(checkpoint, path)
    return path


def test_starved_identity_bn_ranks_first(repvgg_ckpt: Path, tmp_path: Path) -> None:
    quant = _json("inspect", "--quant", _starved_checkpoint(repvgg_ckpt,
                                                            tmp_path / "starved.pt"))["quant"]
    first = quant["layers"][0]
    assert first["layer"] == f"{SUSPECT}.fused_conv"
    assert first["largest_bn_scale"]["source"] == f"{SUSPECT}.rbr_identity"
    assert first["largest_bn_scale"]["channel"] == DEAD
    assert first["largest_bn_scale"]["scale"] > 100
    assert first["near_zero_variance"] == [{"source": f"{SUSPECT}.rbr_identity",
                                            "channels": [DEAD], "smallest": pytest.approx(1e-6)}]
    assert first["outlier_channels"] == [DEAD]
    assert quant["keep_float"][0] == f"{SUSPECT}.fused_conv"
    assert first["sensitivity"] > 3 * quant["layers"][1]["sensitivity"]


def test_inputs_file_calibrates(repvgg_ckpt: Path, tmp_path: Path) -> None:
    torch.save(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
               tmp_path / "inputs.pt")
    data = _json("inspect", "--quant", "--inputs", tmp_path / "inputs.pt", repvgg_ckpt)
    assert data["quant"]["calibration_batches"] == 1
    assert len(data["quant"]["layers"]) == LAYERS


@pytest.mark.parametrize(("args", "needles"), [
    (["--quant", "--quant-target", "0"], ["--quant-target", "> 0, not 0.0"]),
    (["--quant", "--quant-target", "-1"], ["--quant-target", "not -1.0"]),
    (["--quant", "--quant-target", "inf"], ["--quant-target", "not inf"]),
    (["--quant", "--quant-target", "nan"], ["--quant-target", "not nan"]),
    (["--quant-target", "1e-2"], ["--quant-target is used only with --quant"]),
    (["--quant", "--quant-target", "tiny"], ["'--quant-target'"]),
])
@pytest.mark.parametrize("command", ["inspect", "fuse"])
def test_bad_quant_options(command: str, args: list[str], needles: list[str],
                           repvgg_ckpt: Path, tmp_path: Path) -> None:
    before = snapshot(tmp_path, repvgg_ckpt)
    out = [tmp_path / "out.pt"] if command == "fuse" else []
    result = invoke(command, repvgg_ckpt, *out, *args)
    assert_refused(result, before, snapshot(tmp_path, repvgg_ckpt), needles)
