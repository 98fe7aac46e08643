"""Progress on stderr: plain timestamped lines when stderr is not a terminal (a CI log), a rich
bar when it is; stdout under --json stays one document either way."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

from helpers.cli_support import assert_process_refused, run_process
from rich.console import Console

from repconv.progress import INTERVAL_ENV, progress_display

LINE = re.compile(r"^repconv \[\s*\d+\.\ds\] (.+)$")


def _fuse(source: Path, folder: Path, interval: str,
          *extra: object) -> subprocess.CompletedProcess[str]:
    return run_process([sys.executable, "-m", "repconv", "fuse", source, "deploy.pt", *extra],
                       folder, env={INTERVAL_ENV: interval})


def test_plain_lines_when_stderr_is_not_a_terminal(repvgg_ckpt: Path, tmp_path: Path) -> None:
    proc = _fuse(repvgg_ckpt, tmp_path, "0", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True
    assert "\x1b" not in proc.stderr and "\r" not in proc.stderr  # no bar redraws in a log
    stages = [m[1] for line in proc.stderr.splitlines() if (m := LINE.match(line))]
    assert stages[0] == f"loading {repvgg_ckpt}"
    assert "tracing and fusing" in stages
    assert [s for s in stages if s.startswith("comparing outputs")] == [
        f"comparing outputs {i}/5" for i in range(5)]
    assert stages[-1] == "writing deploy.pt"


def test_no_lines_for_a_command_shorter_than_the_interval(repvgg_ckpt: Path,
                                                          tmp_path: Path) -> None:
    proc = _fuse(repvgg_ckpt, tmp_path, "3600")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "verification passed" in proc.stdout


def test_error_stays_the_last_line(tmp_path: Path) -> None:
    proc = _fuse(tmp_path / "missing.pt", tmp_path, "0")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "does not exist" in lines[-1]
    assert all(LINE.match(line) for line in lines[:-1])


def test_bad_interval_is_one_line(repvgg_ckpt: Path, tmp_path: Path) -> None:
    proc = _fuse(repvgg_ckpt, tmp_path, "soon", "--json")
    assert_process_refused(proc, [INTERVAL_ENV, "'soon'"], as_json=True)
    assert list(tmp_path.iterdir()) == []


def test_bar_on_a_terminal_is_transient() -> None:
    """A terminal gets a rich bar, one task per stage, gone when the command ends."""
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, width=100)
    with progress_display(console) as progress:
        progress("loading in.pt")
        for done in range(3):
            progress("comparing outputs", done, 3)
        progress("writing out.pt")
        assert [task.description for task in progress.display.tasks] == [  # type: ignore[attr-defined]
            "loading in.pt", "comparing outputs", "writing out.pt"]
        assert all(task.finished for task in progress.display.tasks[:2])  # type: ignore[attr-defined]
    assert "comparing outputs" in stream.getvalue()
