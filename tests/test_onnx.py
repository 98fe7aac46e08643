"""ONNX round trips: the fused model exported by torch's exporter, run by ONNX Runtime, checked
with repconv.verify; and every bad input as one InputError line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers.measure import count_convs
from helpers.reference_blocks import randomize_bn, tiny_net, tiny_net_example_input
from helpers.user_models import TupleHead
from torch import Tensor, nn

import repconv
from repconv.errors import InputError
from repconv.formats.onnx_io import (
    DEFAULT_OPSET,
    OUTPUT_TREE_KEY,
    OnnxModule,
    export_onnx,
    load_onnx_session,
    onnx_bytes,
)

FAMILIES = ("RepVGGBlock", "DiverseBranchBlock", "MobileOneBlock", "RepMixer",
            "Branchy1d", "Branchy3d")


def _onnx_conv_count(data: bytes) -> int:
    import onnx

    return sum(node.op_type == "Conv" for node in onnx.load_from_string(data).graph.node)


@pytest.mark.needs_onnx
@pytest.mark.parametrize("family", FAMILIES)
def test_block_family_round_trip(family: str, tmp_path: Path) -> None:
    net = randomize_bn(tiny_net(family), seed=1)
    example = tiny_net_example_input(family)
    fused = repconv.fuse(net, example).model
    path = tmp_path / "fused.onnx"
    export_onnx(fused, example, path)
    report = repconv.verify(net, OnnxModule(path), example)
    assert report.passed, report.summary()
    assert report.max_rel_error < 1e-5
    data = path.read_bytes()
    assert _onnx_conv_count(data) == count_convs(fused)
    # runtimes fold BN into a conv, not branches: the training model's export keeps them all
    assert _onnx_conv_count(onnx_bytes(net, example)) == count_convs(net)
    assert count_convs(fused) < count_convs(net)
    assert [p.name for p in tmp_path.iterdir()] == ["fused.onnx"]  # no temp file left


@pytest.mark.needs_onnx
def test_tuple_outputs_keep_their_structure() -> None:
    net = randomize_bn(TupleHead(), seed=2)
    example = torch.randn(1, 3, 8, 8)
    module = OnnxModule(onnx_bytes(repconv.fuse(net, example).model, example))
    x = torch.randn(2, 3, 8, 8)
    got, (pooled, mapping) = module(x)
    want, (want_pooled, want_mapping) = net(x)
    assert set(mapping) == {"doubled"}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, want_pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mapping["doubled"], want_mapping["doubled"], rtol=1e-5, atol=1e-5)
    assert repconv.verify(net, module, example).passed


@pytest.mark.needs_onnx
def test_fp16_weights_stay_fp16() -> None:
    import onnx

    net = randomize_bn(tiny_net("RepVGGBlock"), seed=3).half()
    example = tiny_net_example_input("RepVGGBlock").half()
    data = onnx_bytes(repconv.fuse(net, example).model, example)
    float_types = {onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE}
    weights = [w for w in onnx.load_from_string(data).graph.initializer
               if w.data_type in float_types]
    assert len(weights) == 8  # 3 fused convs and the linear layer, weights and biases
    assert {w.data_type for w in weights} == {onnx.TensorProto.FLOAT16}
    report = repconv.verify(net, OnnxModule(data), example)
    assert report.passed and report.rtol == 1e-2, report.summary()
    assert report.max_rel_error < 5e-3  # fp16 rounding, not a different computation


@pytest.mark.needs_onnx
def test_batch_dimension_is_dynamic() -> None:
    net = randomize_bn(tiny_net("MobileOneBlock"), seed=4)
    example = tiny_net_example_input("MobileOneBlock", batch=1)
    fused = repconv.fuse(net, example).model
    module = OnnxModule(onnx_bytes(fused, example))
    assert module.session.get_inputs()[0].shape[0] == "batch"
    x = tiny_net_example_input("MobileOneBlock", batch=3, seed=7)
    got = module(x)
    assert got.shape == (3, 10)
    torch.testing.assert_close(got, net(x), rtol=1e-5, atol=1e-5)
    assert repconv.verify(net, module, x).passed


@pytest.mark.needs_onnx
def test_tampered_file_fails_verification(tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    net = randomize_bn(tiny_net("RepVGGBlock"), seed=5)
    example = tiny_net_example_input("RepVGGBlock")
    path = tmp_path / "fused.onnx"
    export_onnx(repconv.fuse(net, example).model, example, path)
    assert repconv.verify(net, OnnxModule(path), example).passed
    model = onnx.load(path)
    conv_weights = {node.input[1] for node in model.graph.node if node.op_type == "Conv"}
    target = next(w for w in model.graph.initializer if w.name in conv_weights)
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * 1.01, target.name))
    onnx.save(model, path)
    report = repconv.verify(net, OnnxModule(path), example)
    assert not report.passed
    assert report.max_rel_error > 10 * report.rtol  # 1 % of one conv's weight: 6e-4


@pytest.mark.needs_onnx
def test_chosen_opset_is_written() -> None:
    import onnx

    net = randomize_bn(tiny_net("ACBlock"), seed=6)
    example = tiny_net_example_input("ACBlock")
    fused = repconv.fuse(net, example).model
    data = onnx_bytes(fused, example, opset=20)
    imports = onnx.load_from_string(data).opset_import
    assert next(entry.version for entry in imports if entry.domain == "") == 20
    assert _onnx_conv_count(data) == count_convs(fused)
    assert repconv.verify(net, OnnxModule(data), example).passed
    with pytest.raises(InputError, match=r"--opset 17 is out of range: torch's exporter writes "
                                         r"opsets 18 to \d+$"):
        onnx_bytes(fused, example, opset=17)


@pytest.mark.parametrize("missing", ["onnx", "onnxscript", "onnxruntime"])
def test_missing_extra_names_the_pip_line(missing: str, monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import missing` fail
    conv = nn.Conv2d(3, 4, 3).eval()
    call = (lambda: load_onnx_session(b"")) if missing == "onnxruntime" else (
        lambda: export_onnx(conv, torch.randn(1, 3, 8, 8), tmp_path / "out.onnx"))
    with pytest.raises(InputError) as caught:
        call()
    assert str(caught.value) == (f"ONNX support needs the {missing} package, which is not "
                                 "installed: pip install 'repconv[onnx]'")
    assert list(tmp_path.iterdir()) == []


class _Eigen(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.linalg.eigh(x @ x.transpose(-1, -2)).eigenvalues


@pytest.mark.needs_onnx
def test_export_failure_names_the_op(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no ONNX translation for op aten\._linalg_eigh; ") as e:
        export_onnx(_Eigen(), torch.randn(1, 3, 3), tmp_path / "out.onnx")
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


class _Counted(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor, int]:
        return x * 2, 3


@pytest.mark.needs_onnx
def test_non_tensor_output_is_refused() -> None:
    with pytest.raises(InputError, match="returns int besides tensors"):
        onnx_bytes(_Counted(), torch.randn(1, 3))


@pytest.mark.needs_onnx
@pytest.mark.parametrize("content", ["garbage", "truncated", "empty", "directory"])
def test_unloadable_onnx_is_an_input_error(content: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.onnx"
    conv = nn.Conv2d(3, 4, 3).eval()
    if content == "garbage":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                       generator=torch.Generator().manual_seed(0)).numpy()
                         .tobytes())
    elif content == "truncated":
        data = onnx_bytes(conv, torch.randn(1, 3, 8, 8))
        path.write_bytes(data[: len(data) // 2])
    elif content == "empty":
        path.write_bytes(b"")
    else:
        path.mkdir()
    with pytest.raises(InputError) as caught:
        OnnxModule(path)
    assert "\n" not in str(caught.value)
    assert str(path) in str(caught.value)


@pytest.mark.needs_onnx
def test_output_structure_metadata_is_checked() -> None:
    import onnx

    conv = nn.Conv2d(3, 4, 3).eval()
    model = onnx.load_from_string(onnx_bytes(conv, torch.randn(1, 3, 8, 8)))
    onnx.helper.set_model_props(model, {OUTPUT_TREE_KEY: "not a tree"})
    with pytest.raises(InputError, match="not a valid output structure"):
        OnnxModule(model.SerializeToString())
    del model.metadata_props[:]  # a file from another exporter: outputs as they are
    module = OnnxModule(model.SerializeToString())
    assert isinstance(module(torch.randn(2, 3, 8, 8)), Tensor)
    with pytest.raises(InputError, match="takes 1 input"):
        module(torch.randn(2, 3, 8, 8), torch.randn(1))


@pytest.mark.needs_onnx
def test_same_model_gives_the_same_bytes() -> None:
    net = randomize_bn(tiny_net("RepVGGBlock"), seed=8)
    example = tiny_net_example_input("RepVGGBlock")
    fused = repconv.fuse(net, example).model
    first = onnx_bytes(fused, example)
    assert first == onnx_bytes(fused, example, opset=DEFAULT_OPSET)
    assert b"stack_trace" not in first  # no paths of this machine in the file


@pytest.mark.needs_onnx
def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path) -> None:
    """An .onnx may name files holding its weights; ONNX Runtime reads none outside its folder."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    (tmp_path / "secret.bin").write_bytes(np.arange(12, dtype=np.float32).tobytes())
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[3, 4])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "48")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])], [weight])
    (tmp_path / "models").mkdir()
    path = tmp_path / "models" / "evil.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    with pytest.raises(InputError, match="escapes model directory"):
        OnnxModule(path)
