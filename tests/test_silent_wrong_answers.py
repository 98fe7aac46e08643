"""Issue 17's first table, case by case through the command line: models where `fuse` and
`verify` both exited 0 while the deploy model computed something else. Each now either stays
unfused where it would differ (with the reason in the report) or fails verification, and a
deploy file made the old way (fused through what differs) fails `verify` with exit 1.

The models are in adversarial_models.py (``--model helpers.adversarial_models:NAME``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.adversarial_models import checkpoint, frozen_flag_deploy
from helpers.cli_support import invoke, json_document


def _run(*args: object) -> tuple[int, dict[str, Any]]:
    result = invoke(*args, "--json")
    return result.exit_code, json_document(result.stdout)


def _model(name: str) -> list[str]:
    return ["--model", f"helpers.adversarial_models:{name}"]


def _fused(train: Path, out: Path, name: str, *extra: object) -> dict[str, Any]:
    code, data = _run("fuse", train, out, *_model(name), *extra)
    assert code == 0, data
    return data


def _verified(train: Path, deploy: Path, name: str, *extra: object) -> tuple[int, dict]:
    return _run("verify", train, deploy, *_model(name), *extra)


# ------------------------------------------------------------------ hooks and instance forwards


HOOKED = {
    "bn_hook": ("bn", "has a forward hook"),
    "conv_pre_hook": ("conv2", "has a forward pre-hook"),
    "conv_instance_forward": ("conv2", "its forward is replaced on the instance"),
}


@pytest.mark.parametrize("name", list(HOOKED))
def test_a_module_whose_call_runs_more_than_its_forward_stays(tmp_path: Path, name: str) -> None:
    train = checkpoint(name, tmp_path / "train.pt")
    data = _fused(train, tmp_path / "deploy.pt", name)
    where, reason = HOOKED[name]
    (skip,) = [s for s in data["skipped"] if s["where"] == where]
    assert reason in skip["reason"]
    # the other conv-BN pair still folds; the pair with the hook keeps its BatchNorm
    assert data["before"]["batchnorms"] == 2 and data["after"]["batchnorms"] == 1
    assert len(data["rewrites"]) == 1 and data["verification"]["passed"] is True
    code, report = _verified(train, tmp_path / "deploy.pt", name)
    assert code == 0 and report["passed"] is True
    # fused through it (as before: the same weights built without the hook), verify fails
    _fused(train, tmp_path / "through.pt", "plain")
    code, report = _verified(train, tmp_path / "through.pt", name)
    assert code == 1 and report["passed"] is False and report["max_rel_error"] > 0.01


# ------------------------------------------------------------------ in place through a view


@pytest.mark.parametrize("name", ["through_slice", "through_narrow", "through_view"])
def test_a_branch_input_changed_through_a_view_is_not_merged(tmp_path: Path, name: str) -> None:
    train = checkpoint(name, tmp_path / "train.pt")
    data = _fused(train, tmp_path / "deploy.pt", name)
    assert not any(r["kind"] == "multi-branch" for r in data["rewrites"])
    assert any("changed in place between the ops that read it" in s["reason"]
               for s in [*data["skipped"], *data["cuts"]])
    assert data["verification"]["passed"] is True
    assert _verified(train, tmp_path / "deploy.pt", name)[0] == 0
    # the branches merged as if the input had not changed: verify fails
    merged = _fused(train, tmp_path / "merged.pt", "two_branches")
    assert [r["kind"] for r in merged["rewrites"]] == ["multi-branch"]
    code, report = _verified(train, tmp_path / "merged.pt", name)
    assert code == 1 and report["passed"] is False


# ------------------------------------------------------------------ sentinels in outputs


def _classifier_scaled(deploy: Path, out: Path, factor: float) -> Path:
    saved = torch.load(deploy, weights_only=True)
    saved["state_dict"]["fc.weight"] = saved["state_dict"]["fc.weight"] * factor
    torch.save(saved, out)
    return out


@pytest.mark.parametrize("name, fill", [("masked_1e9", -1e9), ("masked_inf", float("-inf"))])
def test_masked_logits_with_a_perturbed_classifier_fail(tmp_path: Path, name: str,
                                                        fill: float) -> None:
    train = checkpoint(name, tmp_path / "train.pt")
    _fused(train, tmp_path / "deploy.pt", name)
    code, report = _verified(train, tmp_path / "deploy.pt", name)
    assert code == 0 and report["passed"] is True
    for run in report["runs"]:
        (output,) = run["outputs"]
        # the masked half is judged apart (-1e9) or must match exactly (-inf); the bar is the
        # logits' own: 1e-5 of about 1, not of 1e9
        assert output["sentinels"] == (run["input_shapes"][0][0] * 5 if fill == -1e9 else 0)
        assert output["nonfinite_mismatches"] == 0 and output["tolerance"] == 1e-5
    scaled = _classifier_scaled(tmp_path / "deploy.pt", tmp_path / "scaled.pt", 1.5)
    code, report = _verified(train, scaled, name)
    assert code == 1 and report["passed"] is False
    # the error is a third of the logits' scale, not 1e-9 of the sentinels'
    assert report["reference_error"] > 0.1 and report["max_abs_error"] > 0.1


def test_an_infinity_the_deploy_model_loses_fails(tmp_path: Path) -> None:
    """-inf masked logits: a deploy model giving a finite value (or +inf) where the original
    gives -inf fails, whatever the scale says."""
    train = checkpoint("masked_inf", tmp_path / "train.pt")
    _fused(train, tmp_path / "deploy.pt", "masked_inf")
    saved = torch.load(tmp_path / "deploy.pt", weights_only=True)
    saved["state_dict"]["fc.bias"][0] = float("inf")
    torch.save(saved, tmp_path / "inf.pt")
    code, report = _verified(train, tmp_path / "inf.pt", "masked_inf")
    assert code == 1 and report["passed"] is False
    assert "inf/NaN value(s) that differ between the models" in report["problem"]
    (output,) = report["runs"][0]["outputs"]
    assert output["nonfinite_mismatches"] == report["runs"][0]["input_shapes"][0][0]


# ------------------------------------------------------------------ sizes that cross guards


def test_a_size_flag_frozen_by_tracing_is_caught_at_a_larger_size(tmp_path: Path) -> None:
    """The child is called with ``big`` = width > 96. The default sizes include 128 px, where
    the original passes True: a deploy whose child was traced with the flag held at the
    example's False (as fusing used to write it) fails verify there, and at a --shapes size
    across the guard. fuse itself writes only what runs at 128 px."""
    train = checkpoint("size_flag", tmp_path / "train.pt")
    code, data = _run("fuse", train, tmp_path / "deploy.pt", *_model("size_flag"))
    if code == 0:  # the flag's block left as it is, or folded with the flag kept
        runs = {r["source"]: r for r in data["verification"]["runs"]}
        assert runs["spatial 128x128"]["outputs"][0]["passed"] is True
    else:
        assert code == 1 and not (tmp_path / "deploy.pt").exists()
    frozen_flag_deploy(train, tmp_path / "frozen.pt")
    code, report = _verified(train, tmp_path / "frozen.pt", "size_flag")
    assert code == 1 and "[[1, 3, 128, 128]]" in report["problem"]
    assert "specialized" in report["problem"]
    code, report = _verified(train, tmp_path / "frozen.pt", "size_flag", "--shapes",
                             "2,3,32,32;1,3,64,64")  # sizes that do not cross the guard
    assert code == 0 and [r["source"] for r in report["runs"]] == [
        "example", "listed 1", "listed 2"]
    code, report = _verified(train, tmp_path / "frozen.pt", "size_flag", "--shapes",
                             "1,3,101,101")
    assert code == 1 and "[[1, 3, 101, 101]]" in report["problem"]


def test_shapes_lists_the_sizes_and_each_costs_seconds(repvgg_ckpt: Path,
                                                      tmp_path: Path) -> None:
    assert invoke("fuse", repvgg_ckpt, tmp_path / "deploy.pt").exit_code == 0
    code, report = _run("verify", repvgg_ckpt, tmp_path / "deploy.pt", "--shapes",
                        "1,3,64,64;2,3,101,101")
    assert code == 0 and report["passed"] is True
    assert [(r["source"], r["input_shapes"]) for r in report["runs"]] == [
        ("example", [[1, 3, 32, 32]]), ("listed 1", [[1, 3, 64, 64]]),
        ("listed 2", [[2, 3, 101, 101]])]
    assert all(r["seconds"] > 0 for r in report["runs"])
    human = invoke("verify", repvgg_ckpt, tmp_path / "deploy.pt", "--shapes", "2,3,101,101")
    header = next(line for line in human.stdout.splitlines() if line.startswith("input"))
    assert header.split()[-1] == "s" and "listed 1 2x3x101x101" in human.stdout
