"""Models are built without nn.init's random fills when the checkpoint overwrites every tensor
they fill, and the ordinary way when it does not: loading gives what a plain build and load
gives, either way."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from repconv.formats.checkpoint import load_checkpoint
from repconv.formats.lazy_init import RANDOM_INITS, random_init_skipped


class WithRandomBuffer(nn.Module):
    """A fixed random projection that is not saved: only a seeded ordinary build makes it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("projection", nn.init.normal_(torch.empty(4)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.projection[:, None, None]


def build_plain() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def test_fills_are_skipped_and_restored() -> None:
    originals = {name: getattr(nn.init, name) for name in RANDOM_INITS}
    with random_init_skipped() as left_unfilled:
        model = build_plain()
        assert nn.init.kaiming_uniform_ is not originals["kaiming_uniform_"]
    assert {name: getattr(nn.init, name) for name in RANDOM_INITS} == originals
    assert left_unfilled(model)  # nothing loaded yet: the conv still holds its unfilled weight
    model[0].weight = nn.Parameter(torch.zeros_like(model[0].weight))
    model[0].bias = nn.Parameter(torch.zeros_like(model[0].bias))
    assert not left_unfilled(model)


@pytest.mark.parametrize("builder", [build_plain, WithRandomBuffer])
def test_loading_gives_what_a_plain_build_gives(builder: type, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    trained = builder()
    path = tmp_path / "ckpt.pt"
    torch.save(trained.state_dict(), path)
    monkeypatch.setitem(sys.modules, "lazy_models", sys.modules[__name__])
    loaded = load_checkpoint(path, model_reference=f"lazy_models:{builder.__name__}").model
    plain = builder()
    plain.load_state_dict(torch.load(path, weights_only=True))
    for (name, want), (_, got) in zip(plain.state_dict(keep_vars=True).items(),
                                      loaded.state_dict(keep_vars=True).items()):
        assert torch.equal(want, got), name
    if isinstance(plain, WithRandomBuffer):
        assert torch.equal(loaded.projection, plain.projection)
