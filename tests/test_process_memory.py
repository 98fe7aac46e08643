"""The memory side of a conversion's speed: the memory probe's forward answers convolutions and
linear layers with their output's shape alone (it measures bytes, and their numbers would read
every weight once), and the repconv command keeps the memory its process frees for its next
allocations (glibc hands blocks above 32 MB back to the kernel, whose fresh pages it must then
zero at every conv call)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers.cli_support import invoke, run_process
from torch import nn

from repconv import cli
from repconv.formats import syscalls
from repconv.verify import footprint
from repconv.verify.footprint import ShapesOnly, output_bytes

CALLS = [
    pytest.param(F.conv2d, (torch.randn(2, 4, 9, 7), torch.randn(6, 2, 3, 3)),
                 {"stride": 2, "padding": 1, "groups": 2}, id="strided-grouped"),
    pytest.param(F.conv2d, (torch.randn(4, 9, 7), torch.randn(6, 4, 3, 3)),
                 {"padding": "same", "dilation": 2}, id="unbatched-same-dilated"),
    pytest.param(F.conv1d, (torch.randn(2, 4, 9), torch.randn(6, 4, 3)),
                 {"padding": "valid", "stride": 3}, id="1d-valid"),
    pytest.param(F.conv3d, (torch.randn(1, 4, 5, 6, 7), torch.randn(6, 4, 3, 1, 2)),
                 {"padding": (1, 0, 1), "dilation": (1, 2, 2)}, id="3d-per-dim"),
    pytest.param(F.conv2d, (), {"input": torch.randn(1, 4, 5, 5), "weight": torch.randn(
        6, 4, 3, 3), "bias": torch.randn(6), "stride": (1, 2)}, id="keywords"),
    pytest.param(F.conv2d, (torch.randn(1, 4, 6, 5), torch.randn(6, 4, 3, 3)),
                 {"padding": (1,), "stride": [2]}, id="one-item-sequences"),
    pytest.param(F.linear, (torch.randn(3, 5, 8), torch.randn(6, 8)), {}, id="linear-tokens"),
    pytest.param(F.linear, (torch.randn(8), torch.randn(6, 8), torch.randn(6)), {},
                 id="linear-vector"),
]


@pytest.mark.parametrize(("function", "args", "kwargs"), CALLS)
def test_shapes_only_gives_the_real_shape_without_computing(function: Any, args: tuple,
                                                            kwargs: dict) -> None:
    real = function(*args, **kwargs)
    with ShapesOnly():
        shaped = function(*args, **kwargs)
    assert shaped.shape == real.shape and shaped.dtype == real.dtype
    assert real.abs().sum() > 0 and not shaped.any()  # zeros: the op did not run


@pytest.mark.parametrize(("function", "args", "kwargs"), [
    (F.conv2d, (torch.randn(1, 3, 5, 5), torch.randn(6, 4, 3, 3)), {}),  # channels differ
    (F.conv2d, (torch.randn(1, 4, 2, 2), torch.randn(6, 4, 3, 3)), {}),  # smaller than kernel
    (F.conv2d, (torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)),
     {"padding": "same", "stride": 2}),
    (F.conv2d, (torch.randn(1, 4, 5, 5).double(), torch.randn(6, 4, 3, 3)), {}),  # dtypes
    (F.conv2d, (torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)), {"padding": (1, 1, 1)}),
    (F.conv2d, (torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)), {"padded": 1}),
    (F.linear, (torch.randn(3, 5), torch.randn(6, 8)), {}),
])
def test_a_call_that_fails_fails_alike_under_shapes_only(function: Any, args: tuple,
                                                         kwargs: dict) -> None:
    with pytest.raises((RuntimeError, TypeError)) as real:
        function(*args, **kwargs)
    with pytest.raises((RuntimeError, TypeError)) as shaped, ShapesOnly():
        function(*args, **kwargs)
    assert str(shaped.value) == str(real.value)


class _Mixed(nn.Module):
    """Convs of three kinds, a transposed conv (run for real), BN, linear layers on tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.depthwise = nn.Conv2d(16, 16, 5, padding="same", groups=16)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.line = nn.Conv1d(8, 12, 3, dilation=2)
        self.head = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(self.depthwise(torch.relu(self.bn(self.stem(x)))))
        return self.head(self.line(x.flatten(2)).transpose(1, 2))


def test_the_probe_measures_the_bytes_a_real_forward_makes(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    model, x = _Mixed().eval(), torch.randn(1, 3, 32, 24)
    shaped = output_bytes(model, (x,))
    monkeypatch.setattr(footprint, "ShapesOnly", contextlib.nullcontext)
    real = output_bytes(model, (x,))
    assert shaped == real and shaped[0] > 100_000


_KEPT = r"""
import ctypes, sys, torch
from repconv.formats.syscalls import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096
torch.ones(1 << 16).sum()  # torch's own first-use set-up, before the measure
before = rss()
block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MB, written: resident
del block
print((rss() - before) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux")
                    or syscalls._libc_function("mallopt") is None, reason="glibc's mallopt")
def test_freed_memory_stays_with_the_process_that_keeps_it(tmp_path: Path) -> None:
    kept, returned = (int(run_process([sys.executable, "-c", _KEPT, how], tmp_path).stdout)
                      for how in ("keep", "return"))
    # MB still resident after the 64 MB tensor is freed, whatever else the process allocated
    assert kept - returned >= 48


def test_the_commands_keep_freed_memory_but_bench_measures_as_a_user_process(
        monkeypatch: pytest.MonkeyPatch, repvgg_ckpt: Path, tmp_path: Path) -> None:
    calls: list[str] = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("kept"))
    assert invoke("inspect", repvgg_ckpt).exit_code == 0
    assert calls == ["kept"]
    bench = invoke("bench", repvgg_ckpt, "--seconds", "0.05")
    assert bench.exit_code == 0, bench.output
    assert calls == ["kept"]
