"""README's plain-shell CI step, run as written: against a shipped sample it passes, and once
the deploy file it wrote is tampered with it fails with exit code 1."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

import torch
from helpers.cli_support import REPO, run_process


def _shell_step() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Plain shell step", 1)[1]
    match = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert match, "README's plain shell step has no ```bash block"
    return match[1]


def _scale_first_conv(path: Path, factor: float) -> None:
    """Multiply the first fused conv's weights in the archive's raw tensor record."""
    with zipfile.ZipFile(path) as archive:
        records = {info.filename: archive.read(info) for info in archive.infolist()}
    config_name = next(n for n in records if n.endswith("data/weights/model_weights_config.json"))
    config = json.loads(records[config_name])["config"]
    entry = next(e for name, e in config.items() if name.endswith("fused_conv.weight"))
    name = config_name.replace("model_weights_config.json", entry["path_name"])
    weight = torch.frombuffer(bytearray(records[name]), dtype=torch.float32) * factor
    records[name] = weight.numpy().tobytes()
    with zipfile.ZipFile(path, "w") as archive:
        for record, data in records.items():
            archive.writestr(record, data)


def test_readme_shell_step(repvgg_ckpt: Path, tmp_path: Path) -> None:
    script = tmp_path / "ci.sh"
    script.write_text(_shell_step())
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(repvgg_ckpt, tmp_path / "checkpoints" / "train.pt")
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    first = run_process(["bash", script], tmp_path, env=env, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    deploy = tmp_path / "dist" / "model.pt2"
    assert deploy.is_file()
    assert '"passed": true' in (tmp_path / "repconv-verify.json").read_text()

    _scale_first_conv(deploy, 1.02)
    second = run_process(["bash", script], tmp_path, env=env, timeout=300)
    assert second.returncode == 1, second.stdout + second.stderr
    assert '"passed": false' in (tmp_path / "repconv-verify.json").read_text()
