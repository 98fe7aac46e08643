"""A pickled deploy model whose forward dispatches on a size flag (repconv/rewrite/cases.py)
loads back; and `fuse` loads every pickled deploy model back before writing it, so one that
would not load is never written."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import torch
from helpers.cli_support import invoke
from helpers.measure import rel_err
from helpers.third_party_models import BY_NAME, shaped_input
from torch import fx

import repconv
from repconv.rewrite import cases

SIZE_FLAG = BY_NAME["size_flag_child"]


def _pickled_checkpoint(path: Path) -> Path:
    torch.save({"model": SIZE_FLAG.training(seed=3), "input_shape": [1, 3, 64, 64]}, path)
    return path


def test_a_dispatcher_in_a_pickled_deploy_loads_back_and_takes_each_case(tmp_path: Path) -> None:
    train = _pickled_checkpoint(tmp_path / "train.pt")
    result = invoke("fuse", train, tmp_path / "deploy.pt", "--trust-pickle")
    assert result.exit_code == 0, result.stdout
    original = torch.load(train, weights_only=False)["model"].eval()
    deployed = torch.load(tmp_path / "deploy.pt", weights_only=False)["model"].eval()
    dispatchers = [m for m in deployed.modules()
                   if isinstance(m, fx.GraphModule) and hasattr(m, cases.case_name(0))]
    assert dispatchers, "the size flag's block is a dispatcher"
    # a framework deep-copies a model (an EMA) before it saves it: the fused model's copy
    # pickles too (a loaded one is a plain GraphModule, which torch cannot pickle again)
    fused = repconv.fuse(original, shaped_input((1, 3, 64, 64))).model
    buffer = io.BytesIO()
    torch.save(copy.deepcopy(fused), buffer)
    buffer.seek(0)
    copied = torch.load(buffer, weights_only=False).eval()
    # 64 px and 128 px lie on either side of the flag's 96 px
    for shape in ((1, 3, 64, 64), (1, 3, 128, 128), (2, 3, 77, 101)):
        x = shaped_input(shape)
        with torch.no_grad():
            assert rel_err(original(x), deployed(x)) <= 1e-5
            assert rel_err(original(x), copied(x)) <= 1e-5


def test_a_pickled_deploy_that_would_not_load_is_not_written(tmp_path: Path,
                                                              monkeypatch) -> None:
    """With torch's own pickling of the dispatcher (it traces the code again on load, and the
    case table does not trace), fuse refuses to write: exit 3, one line, no file."""
    monkeypatch.setattr(cases, "_reduce_from_graph", fx.GraphModule.__reduce__)
    train = _pickled_checkpoint(tmp_path / "train.pt")
    result = invoke("fuse", train, tmp_path / "deploy.pt", "--trust-pickle")
    assert result.exit_code == 3
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert "does not load back (KeyError" in line and "nothing written" in line
    assert not (tmp_path / "deploy.pt").exists()
    assert list(tmp_path.iterdir()) == [train]
