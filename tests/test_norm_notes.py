"""Models normalised with GroupNorm / LayerNorm / InstanceNorm are told why those norms stay,
not "nothing to fuse (already fused?)" (issue 8, item 9). The builders below are imported by
name through --model, as a user's own module would be.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.cli_support import invoke
from torch import Tensor, nn

from repconv.pipeline import Options, fuse_checkpoint

SHAPE = "2,3,8,8"


class PerSampleNorms(nn.Module):
    """conv -> GroupNorm, conv -> InstanceNorm, conv -> LayerNorm: nothing BatchNorm-like."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.conv2, self.inorm = nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True)
        self.conv3, self.ln = nn.Conv2d(8, 4, 1), nn.LayerNorm([4, 8, 8])

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.gn(self.conv1(x)))
        x = torch.relu(self.inorm(self.conv2(x)))
        return self.ln(self.conv3(x))


class BatchNormAndGroupNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.gn = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.gn(self.conv2(torch.relu(self.bn(self.conv1(x)))))


class PlainConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.conv(x))


def _fuse(tmp_path: Path, builder: type[nn.Module]) -> list[str]:
    torch.manual_seed(0)
    path = tmp_path / "ckpt.pt"
    torch.save(builder().state_dict(), path)
    options = Options(model=f"{__name__}:{builder.__name__}", input_shape=(2, 3, 8, 8))
    outcome = fuse_checkpoint(path, tmp_path / "deploy.pt", options)
    assert outcome.report.verification.passed
    return outcome.report.notes


def test_per_sample_norms_are_named_with_the_reason(tmp_path: Path) -> None:
    (note,) = _fuse(tmp_path, PerSampleNorms)
    assert note.startswith("nothing to fuse: ")
    for listed in ("1 GroupNorm (gn)", "1 InstanceNorm2d (inorm)", "1 LayerNorm (ln)"):
        assert listed in note, note
    assert "of that sample, computed at run time" in note
    assert "already fused" not in note


def test_norm_note_beside_rewrites(tmp_path: Path) -> None:
    notes = _fuse(tmp_path, BatchNormAndGroupNorm)
    assert notes == [notes[0]] and notes[0].startswith("1 GroupNorm (gn) cannot fold")


def test_model_without_any_norm_may_be_already_fused(tmp_path: Path) -> None:
    (note,) = _fuse(tmp_path, PlainConvs)
    assert "already fused?" in note and "GroupNorm" not in note


@pytest.mark.parametrize("command", ["inspect", "fuse"])
def test_cli_shows_the_reason(tmp_path: Path, command: str) -> None:
    torch.manual_seed(0)
    path = tmp_path / "ckpt.pt"
    torch.save(PerSampleNorms().state_dict(), path)
    args = [path, *([tmp_path / "deploy.pt"] if command == "fuse" else [])]
    result = invoke(command, *args, "--model", f"{__name__}:PerSampleNorms",
                    "--input-shape", SHAPE)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())  # rich may wrap the note
    assert "note: nothing to fuse: 1 GroupNorm (gn)" in text
    assert "per-channel scale and shift" in text
