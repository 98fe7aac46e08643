"""Ordinary training checkpoints read without trusting pickles (issue 16): config objects next
to the weights come back as inert placeholders holding their data, the weights fuse without
--trust-pickle, a pickled module is named with its classes where trust is needed, and hostile
pickles never run, checked in real processes with marker files.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import pickle_payloads as pp
from helpers.cli_support import SHAPE8, assert_process_refused, repconv_process, run_process
from helpers.measure import count_bns
from helpers.reference_blocks import randomize_bn

from repconv.errors import InputError
from repconv.formats.checkpoint import load_checkpoint
from repconv.formats.unpickle import Placeholder, read_inert
from repconv.samples import repvgg_tiny

REPVGG8 = ("--model", "repconv.samples:repvgg_tiny", "--model-kwargs", '{"width": 8}')


def _checkpoint_with_configs(path: Path) -> torch.nn.Module:
    model = randomize_bn(repvgg_tiny(width=8), seed=4)
    torch.save({"state_dict": model.state_dict(), **pp.config_objects(), "epoch": 3}, path)
    return model


def test_config_objects_load_as_inert_data(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    _checkpoint_with_configs(path)
    tree = read_inert(path)
    assert tree["epoch"] == 3 and isinstance(tree["state_dict"]["stages.0.0.rbr_dense.conv.weight"],
                                             torch.Tensor)
    kinds = {key: type(value).qualified_name for key, value in tree.items()
             if isinstance(value, Placeholder)}
    assert kinds == {"config": "helpers.pickle_payloads.CfgNode", "args": "argparse.Namespace",
                     "options": "helpers.pickle_payloads.TrainOptions",
                     "best_acc": "numpy._core.multiarray.scalar",
                     "histogram": "numpy._core.multiarray._reconstruct",
                     "phase": "helpers.pickle_payloads.Phase"}
    # the data they were pickled with is kept, nothing constructed from it
    config = dict(tree["config"].items)
    assert dict(config["MODEL"].items) == {"ARCH": "RepVGG-A0"}
    assert tree["config"].state == {"_frozen": False}
    assert tree["args"].state == {"arch": "RepVGG-A0", "lr": 0.1}
    assert tree["options"].state == {"lr": 0.1, "epochs": 120}
    assert tree["phase"].args == (2,)


def test_config_objects_fuse_without_trust_in_a_real_process(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    original = _checkpoint_with_configs(path)
    proc = repconv_process("fuse", path, tmp_path / "deploy.pt", *REPVGG8, "--input-shape",
                           SHAPE8, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["verification"]["passed"]
    assert any("6 object(s) of classes repconv does not load, kept as inert data: "
               "helpers.pickle_payloads.CfgNode at ['config'], argparse.Namespace at "
               "['args']" in line for line in report["loaded"]), report["loaded"]
    deploy = torch.load(tmp_path / "deploy.pt", weights_only=True)  # a weights-only deploy file
    fused = repvgg_tiny(width=8)
    from repconv import load_deploy

    fused = load_deploy(fused, tmp_path / "deploy.pt")
    x = torch.randn(2, 3, 16, 16)
    assert deploy["input_shape"] == [1, 3, 16, 16] and count_bns(fused) == 0
    assert torch.allclose(fused(x), original.eval()(x), rtol=1e-4, atol=1e-5)


def test_keep_extra_leaves_placeholders_out(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    _checkpoint_with_configs(path)
    proc = repconv_process("fuse", path, tmp_path / "deploy.pt", *REPVGG8, "--input-shape",
                           SHAPE8, "--keep-extra", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    deploy = torch.load(tmp_path / "deploy.pt", weights_only=True)
    assert deploy["epoch"] == 3 and "config" not in deploy and "args" not in deploy


def test_pickled_module_needs_trust_and_names_its_classes(tmp_path: Path) -> None:
    model = randomize_bn(repvgg_tiny(width=8), seed=5)
    path = tmp_path / "last.pt"
    torch.save({"epoch": 1, "ema": model, "args": pp.config_objects()["args"]}, path)
    message = assert_process_refused(
        repconv_process("fuse", path, tmp_path / "out.pt", "--input-shape", SHAPE8,
                        cwd=tmp_path),
        ["holds a pickled repconv.samples.models.RepVGGTiny under 'ema': using it",
         "repconv.samples.models.RepVGGBlock", "torch.nn.modules.batchnorm.BatchNorm2d",
         "--trust-pickle", "--model"])
    assert "argparse" not in message
    # --model builds the architecture and takes the pickled module's weights, classes unloaded
    loaded = load_checkpoint(path, model_reference="repconv.samples:repvgg_tiny",
                             model_kwargs={"width": 8})
    assert "the weights of the pickled module under 'ema' (its classes not loaded)" in \
        loaded.found
    expected = model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.model.state_dict().items())


def test_a_bare_pickled_module_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(repvgg_tiny(width=8), path)
    with pytest.raises(InputError,
                       match=r"a pickled repconv\.samples\.models\.RepVGGTiny: using it runs"):
        load_checkpoint(path)


_LOAD_EACH = """
import json, sys
from pathlib import Path
from repconv.errors import InputError
from repconv.formats.checkpoint import load_checkpoint
outcomes = {}
for name, path in json.loads(sys.argv[1]).items():
    try:
        load_checkpoint(Path(path), model_reference="repconv.samples:repvgg_tiny")
        outcomes[name] = "loaded"
    except InputError as exc:
        outcomes[name] = "refused: " + str(exc)
print(json.dumps(outcomes))
"""


def test_hostile_pickles_never_run_in_a_real_process(tmp_path: Path) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    files = pp.hostile_files(tmp_path, marker)
    proc = run_process([sys.executable, "-c", _LOAD_EACH,
                        json.dumps({k: str(v) for k, v in files.items()})], tmp_path)
    assert proc.returncode == 0, proc.stderr
    outcomes = json.loads(proc.stdout)
    assert not marker.exists(), "a checkpoint ran code while repconv read it"
    assert set(outcomes) == set(files)
    for name, outcome in outcomes.items():
        # each either loads inert (its payload a placeholder) or is refused in one line
        assert outcome == "loaded" or outcome.startswith("refused: "), (name, outcome)
        assert "\n" not in outcome
    # getattr(__import__('os'), 'system') made inert objects; calling what they returned stops
    assert "(REDUCE of an instance of builtins.getattr is not allowed)" in \
        outcomes["getattr chain"]
    assert outcomes["eval"].endswith("holds a builtins.eval (read as inert data), not a model or "
                                     "state_dict")
    assert "holds a posix.system (read as inert data)" in outcomes["os.system"]


@pytest.mark.parametrize("trust", [(), ("--trust-pickle",)], ids=["untrusted", "trusted"])
def test_nested_payloads_stay_inert_through_a_fuse(tmp_path: Path, trust: tuple[str, ...]
                                                   ) -> None:
    """Payloads inside config objects next to real weights: the fuse succeeds and nothing
    runs, with --trust-pickle too (no pickled module to use, so nothing is unpickled for real)."""
    marker = tmp_path / "PAYLOAD_RAN"
    model = randomize_bn(repvgg_tiny(width=8), seed=6)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": model.state_dict(),
                "args": pp.argparse.Namespace(hook=pp.Reduces(exec, pp._writes(marker))),
                "config": pp.CfgNode(CALLBACKS=[pp.Reduces(eval, pp._writes(marker))])}, path)
    proc = repconv_process("fuse", path, tmp_path / "deploy.pt", *REPVGG8, "--input-shape",
                           SHAPE8, *trust, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()


def test_controls_show_the_payloads_work(tmp_path: Path) -> None:
    """The same files under plain pickle run their code: the tests above prove something."""
    marker = tmp_path / "PAYLOAD_RAN"
    files = pp.hostile_files(tmp_path, marker)
    control = ("import sys; from helpers import pickle_payloads as pp; from pathlib import Path; "
               "pp.plain_pickle(Path(sys.argv[1]))")
    env = {"PYTHONPATH": str(Path(__file__).parent)}
    for name in ("getattr chain", "eval", "old protocol INST"):
        marker.unlink(missing_ok=True)
        run_process([sys.executable, "-c", control, files[name]], tmp_path, env=env)
        assert marker.exists(), name


def test_build_on_a_class_is_refused(tmp_path: Path) -> None:
    path = pp.torch_file_with_pickle(pp.PATCHES_A_CLASS, tmp_path / "patch.pt")
    before = collections.Counter.__repr__
    with pytest.raises(InputError, match=r"\(BUILD of Counter is not allowed\)"):
        load_checkpoint(path)
    assert collections.Counter.__repr__ is before
