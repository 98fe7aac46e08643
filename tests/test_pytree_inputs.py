"""Lists and dicts of tensors as example inputs (issue 15): `repconv.fuse(model, ([img],))` for a
model taking a list of images, as torchvision detectors do, and a model taking a dict. Seeded
inputs, varied sizes and the float64 reference walk every tensor of the inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.adversarial_models import DictInput, ListInput

import repconv
from repconv.errors import InputError
from repconv.verify.inputs import VARIATIONS, leaf_shapes, random_inputs, varied_shapes
from repconv.verify.outputs import verify


def test_a_list_of_images_is_verified_not_crashed_on() -> None:
    torch.manual_seed(0)
    model = ListInput().eval()
    images = [torch.randn(3, 32, 32), torch.randn(3, 24, 20)]
    result = repconv.fuse(model, (images,))
    report = result.report.verification
    assert report is not None and report.passed, report.summary()
    assert report.input_shapes == [[3, 32, 32], [3, 24, 20]] and report.trials == 3
    assert all(r.outputs_compared == 2 and r.outputs[0].noise is not None for r in report.runs)
    broken = copy.deepcopy(result.model)
    with torch.no_grad():
        broken.net.conv2.weight.mul_(1.001)
    assert not verify(model, broken, (images,)).passed


def test_a_dict_input_at_varied_sizes() -> None:
    torch.manual_seed(0)
    model = DictInput().eval()
    batch = {"image": torch.randn(1, 3, 32, 32), "aux": torch.randn(1, 3, 16, 16)}
    result = repconv.fuse(model, (batch,))
    assert result.report.verification is not None and result.report.verification.passed
    report = verify(model, result.model, (batch,), trials=1, vary=VARIATIONS)
    assert report.passed, report.summary()
    shapes = {r.source: r.input_shapes for r in report.runs}
    assert shapes["batch 2"] == [[2, 3, 32, 32], [2, 3, 16, 16]]  # leaves in key order
    assert shapes["spatial 17x17"] == [[1, 3, 17, 17], [1, 3, 9, 9]]
    assert len(report.runs) == 1 + len(varied_shapes(leaf_shapes((batch,)), VARIATIONS))


def test_random_inputs_keep_the_structure_and_other_leaves() -> None:
    example = ([torch.zeros(3, 8, 8)], {"k": torch.zeros(2, 4), "steps": 3,
                                        "ids": torch.zeros(2, dtype=torch.long)})
    made = random_inputs(example, 0, [[3, 5, 5], [2, 4], [2]])
    assert made[0][0].shape == (3, 5, 5) and made[1]["k"].shape == (2, 4)
    assert made[1]["steps"] == 3 and made[1]["ids"] is example[1]["ids"]
    assert float(made[0][0].std()) > 0.5


@pytest.mark.parametrize("bad", [[[[1, 3, 8, 8]]], [[[1, 3, 8]], [[1, 3, 8, 8]]]])
def test_listed_shapes_must_fit_the_inputs(bad: list) -> None:
    model = ListInput().eval()
    images = [torch.randn(3, 8, 8), torch.randn(3, 8, 8)]
    with pytest.raises(InputError, match="--shapes entry"):
        verify(model, model, (images,), trials=1, shapes=bad)
