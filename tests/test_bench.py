"""`repconv bench IN [OUT]`: latency, ops, parameters, MACs and peak memory of the original and
the fused model, as a table and as --json; bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.cli_support import assert_no_traceback, assert_refused, invoke, snapshot
from rich.console import Console

from repconv.measure.bench import Form, bench
from repconv.samples import repvgg_tiny


@pytest.fixture(scope="module")
def deploy_pt2(tmp_path_factory: pytest.TempPathFactory, repvgg_ckpt: Path) -> Path:
    out = tmp_path_factory.mktemp("bench") / "deploy.pt2"
    assert invoke("fuse", repvgg_ckpt, out).exit_code == 0
    return out


def _bench_json(*args: object) -> dict:
    result = invoke("bench", *args, "--seconds", "0.2", "--json")
    assert_no_traceback(result)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_bench_json_in_memory(repvgg_ckpt: Path) -> None:
    data = _bench_json(repvgg_ckpt, "--threads", "1")
    assert data["ok"] is True and data["deploy"] is None
    assert data["threads"] == 1 and data["torch"] == torch.__version__
    assert data["input_shapes"] == [[1, 3, 32, 32]]
    assert data["rounds"] >= 5 and data["warmup"] >= 2
    original, fused = data["forms"]
    assert (original["name"], fused["name"]) == ("original", "fused")
    for form in data["forms"]:
        latency = form["latency"]
        assert 0 < latency["min_ms"] <= latency["q1_ms"] <= latency["median_ms"]
        assert latency["median_ms"] <= latency["q3_ms"] <= latency["max_ms"]
        assert form["peak_memory_bytes"] > form["weight_bytes"] > 0
        assert form["macs"] > 0
    assert (original["ops"]["convs"], fused["ops"]["convs"]) == (12, 6)
    assert (original["ops"]["batchnorms"], fused["ops"]["batchnorms"]) == (14, 0)
    assert fused["ops"]["total"] < original["ops"]["total"]
    assert fused["parameters"] < original["parameters"]
    assert fused["macs"] < original["macs"]
    assert data["speedup"] == pytest.approx(original["latency"]["median_ms"]
                                            / fused["latency"]["median_ms"])


def test_bench_deploy_file_as_loaded(repvgg_ckpt: Path, deploy_pt2: Path) -> None:
    data = _bench_json(repvgg_ckpt, deploy_pt2)
    assert data["deploy"] == str(deploy_pt2)
    assert data["forms"][1]["name"] == "deploy.pt2"
    assert data["forms"][1]["ops"]["batchnorms"] == 0
    assert data["forms"][1]["ops"]["convs"] == 6


def test_bench_table(repvgg_ckpt: Path) -> None:
    result = invoke("bench", repvgg_ckpt, "--seconds", "0.2")
    assert result.exit_code == 0, result.output
    for needle in ("latency ms (median)", "spread ms (q1-q3)", "batchnorms", "MACs",
                   "peak memory MB", "thread(s)", "fused runs"):
        assert needle in result.stdout, needle


def test_a_runtime_without_torch_modules_is_timed_too() -> None:
    """The form an ONNX Runtime session will be: timed, other figures unknown."""
    model = repvgg_tiny(width=4).eval()
    opaque = Form("runtime", lambda x: model(x))
    report = bench([Form("original", model, model), opaque], (torch.randn(1, 3, 16, 16),),
                   input_path="in.pt", deploy_path=None, seconds=0.1)
    runtime = report.forms[1]
    assert runtime.latency.median_ms > 0
    assert runtime.ops is runtime.macs is runtime.peak_memory_bytes is None
    console = Console(width=120, record=True, color_system=None)
    console.print(report)
    assert "?" in console.export_text()


@pytest.mark.parametrize("case", ["missing_out", "zero_threads", "zero_seconds", "deploy_as_in"])
def test_bench_bad_input_is_one_line(repvgg_ckpt: Path, deploy_pt2: Path, tmp_path: Path,
                                     case: str) -> None:
    args, needle = {
        "missing_out": ([repvgg_ckpt, tmp_path / "missing.pt2"], "does not exist"),
        "zero_threads": ([repvgg_ckpt, "--threads", "0"], "--threads 0"),
        "zero_seconds": ([repvgg_ckpt, "--seconds", "0"], "--seconds"),
        "deploy_as_in": ([deploy_pt2], "torch.export program"),
    }[case]
    before = snapshot(tmp_path, repvgg_ckpt)
    assert_refused(invoke("bench", *args), before, snapshot(tmp_path, repvgg_ckpt), [needle])
