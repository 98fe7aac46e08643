"""The deploy plan is untrusted input: every malformed or hostile record is an InputError."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.measure import count_bns
from helpers.reference_blocks import randomize_bn, tiny_net, tiny_net_example_input
from torch import nn

import repconv
from repconv.errors import InputError
from repconv.rewrite.plan import parse
from repconv.rewrite.surgery import replay_plan


def _fused_plan() -> tuple[list[dict], dict[str, torch.Tensor]]:
    net = randomize_bn(tiny_net("DBBWithInnerBN"), seed=4)
    result = repconv.fuse(net, tiny_net_example_input("DBBWithInnerBN", batch=2))
    return result.plan, result.model.state_dict()


def _first(plan: list[dict], kind: str) -> dict:
    return next(step for step in plan if step["kind"] == kind)


def _spec(plan: list[dict]) -> dict:
    return _first(plan, "frame")["edits"][0]["spec"]


def test_a_valid_plan_replays_and_matches_its_weights() -> None:
    plan, weights = _fused_plan()
    rebuilt = replay_plan(tiny_net("DBBWithInnerBN"), plan, weights)
    rebuilt.load_state_dict(weights)
    assert count_bns(rebuilt) == 0


HOSTILE = {
    "dunder_path": lambda p: _first(p, "swap").update(path="__class__.__base__.planted"),
    "private_hop": lambda p: _first(p, "swap").update(path="_modules.x"),
    "scope_dunder": lambda p: _first(p, "frame").update(scope="0.__dict__"),
    "unknown_type": lambda p: _spec(p).update(type="Sequential"),
    "device_kwarg": lambda p: _spec(p)["args"].update(device="cuda"),
    "unknown_kwarg": lambda p: _spec(p)["args"].update(evil=1),
    "int_dtype": lambda p: _spec(p).update(dtype="int64"),
    "huge_channels": lambda p: _spec(p)["args"].update(in_channels=2**20, out_channels=2**20),
    "bool_groups": lambda p: _spec(p)["args"].update(groups=True),
    "negative_padding": lambda p: _spec(p)["args"].update(padding=[-1, -1]),
    "missing_root": lambda p: _first(p, "frame")["edits"][0].pop("root"),
    "node_name_code": lambda p: _first(p, "frame")["edits"][0].update(root="x; import os"),
    "missing_spec": lambda p: _first(p, "frame")["edits"][0].update(spec=None),
    "concrete_object": lambda p: _first(p, "frame")["concrete"].update(flag=[1, 2]),
    "unknown_kind": lambda p: _first(p, "swap").update(kind="exec"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_plan_is_an_input_error(name: str) -> None:
    plan, weights = _fused_plan()
    bad = copy.deepcopy(plan)
    HOSTILE[name](bad)
    with pytest.raises(InputError, match="deploy plan is damaged"):
        replay_plan(tiny_net("DBBWithInnerBN"), bad, weights)
    assert "planted" not in vars(nn.Module)


@pytest.mark.parametrize("plan", [[1, 2], {"kind": "swap"}, "[]x", None, [{"kind": "frame"}]])
def test_malformed_plan_is_an_input_error(plan: object) -> None:
    with pytest.raises(InputError):
        parse(plan)


def test_spec_that_disagrees_with_the_file_weights_is_refused() -> None:
    plan, weights = _fused_plan()
    spec = _spec(plan)
    spec["args"]["out_channels"] *= 2  # would allocate more than the file holds
    with pytest.raises(InputError, match="weight"):
        parse(plan, weights)


def test_a_plan_naming_a_missing_module_is_an_input_error() -> None:
    plan, _ = _fused_plan()
    _first(plan, "swap")["path"] = "no_such_module"
    with pytest.raises(InputError, match="does not have"):
        replay_plan(tiny_net("DBBWithInnerBN"), plan)
