"""``fuse --strict``: exit 4, nothing written, when a BatchNorm a hand-written deploy form would
fold is left unfused; the summary groups what is left by cause (issue 15, "Loud leftovers")."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from helpers.cli_support import one_error_line, repconv_process
from helpers.reference_blocks import randomize_bn
from torch import Tensor, nn

MODELS = '''
import torch
from torch import nn


class SharedInRoot(nn.Module):
    """One conv called twice in the model's own forward, a BN after each call: folding each
    would rewrite the model's own forward, so both BNs stay."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(torch.relu(x)))


class LoneBn(nn.Module):
    """A BN reading the input: no conv next to it, nothing to fold it into."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(x)))
'''


def _checkpoint(tmp_path: Path, name: str) -> Path:
    (tmp_path / "strict_models.py").write_text(MODELS)
    sys.path.insert(0, str(tmp_path))
    try:
        import strict_models

        model = randomize_bn(getattr(strict_models, name)(), seed=1)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("strict_models", None)
    path = tmp_path / f"{name}.pt"
    torch.save({"state_dict": model.state_dict(), "input_shape": [1, 3, 8, 8]}, path)
    return path


def test_strict_fails_with_exit_4_and_writes_nothing(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, "SharedInRoot")
    out = tmp_path / "deploy.pt"
    args = ["fuse", ckpt, out, "--model", "strict_models:SharedInRoot"]
    proc = repconv_process(*args, "--strict", cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr
    line = one_error_line(proc.stderr)
    assert line.startswith("--strict: 2 BatchNorm(s) next to a conv left unfused")
    assert "shared by 2 call sites" in line and "nothing written" in line
    assert "left unfused: 2 BatchNorm(s) (2 next to a conv)" in proc.stdout
    assert "2 x shared layer" in proc.stdout
    assert not out.exists()
    as_json = repconv_process(*args, "--strict", "--json", cwd=tmp_path)
    document = json.loads(as_json.stdout)
    assert document["exit_code"] == 4 and document["left"]["batchnorms_next_to_a_conv"] == 2
    assert {s["cause"] for s in document["skipped"]} == {"shared layer"}
    # without --strict the same model is fused as far as it goes, verified and written
    assert repconv_process(*args, cwd=tmp_path).returncode == 0
    assert out.exists()


def test_strict_passes_when_only_a_bn_without_a_conv_is_left(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, "LoneBn")
    out = tmp_path / "deploy.pt"
    proc = repconv_process("fuse", ckpt, out, "--model", "strict_models:LoneBn", "--strict",
                           cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "left unfused: 1 BatchNorm(s)\n" in proc.stdout
    assert "1 x no conv next to it" in proc.stdout
    assert out.exists()


def test_every_bn_left_is_grouped_with_one_reason() -> None:
    """The summary counts each BatchNorm once, under the cause of its one reason."""
    import repconv

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn1(self.conv(x)) + self.bn2(self.conv(torch.relu(x)))

    report = repconv.fuse(randomize_bn(Shared(), seed=2).eval(), torch.randn(1, 3, 8, 8)).report
    batchnorms = [s for s in report.skipped if s.kind == "batchnorm"]
    assert sorted(s.where for s in batchnorms) == ["bn1", "bn2"]
    assert report.left_by_cause().keys() == {"shared layer"}
    assert report.to_dict()["left"]["by_cause"] == {"shared layer": len(report.skipped)}
