"""What the command-line tests share: running repconv in-process (CliRunner) and as a real
process, and the checks every refused command must pass (docs/design.md "8. Command-line
contract"): exit code 2, one stderr line starting with 'error:', no traceback, nothing written,
IN unchanged; with
--json, exactly one JSON document on stdout.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from typer.testing import CliRunner, Result

from helpers.reference_blocks import randomize_bn
from repconv.cli import app
from repconv.samples import repvgg_tiny

# Plain progress lines go to stderr every few seconds when it is not a terminal; on a slow
# machine they would precede the one error line the tests check. test_cli_progress.py tests them.
os.environ["REPCONV_PROGRESS_SECONDS"] = "3600"
RUNNER = CliRunner()
CONSOLE_SCRIPT = Path(sys.executable).with_name("repconv")
SHAPE8 = "1,3,16,16"  # verification input for the width-8 test models
REPO = Path(__file__).resolve().parents[2]


def invoke(*args: object) -> Result:
    return RUNNER.invoke(app, [str(a) for a in args])


def run_process(argv: list[object], cwd: Path, *, timeout: float = 120,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A real process, with this interpreter's environment (plus ``env``)."""
    return subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False, env={**os.environ, **(env or {})})


def repconv_process(*args: object, cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run_process([sys.executable, "-m", "repconv", *args], cwd, **kwargs)


_PEAK = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[2:]); "
         "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN)"
         ".ru_maxrss)); sys.exit(done.returncode)")


def repconv_process_peak(*args: object, cwd: Path,
                         **kwargs: Any) -> tuple[subprocess.CompletedProcess[str], int]:
    """A real repconv process and its peak resident memory in bytes (measured by a parent of
    its own, so no other child of the test process counts)."""
    record = cwd / "peak_rss.txt"
    done = run_process([sys.executable, "-c", _PEAK, record, sys.executable, "-m", "repconv",
                        *args], cwd, **kwargs)
    peak = int(record.read_text()) * 1024  # ru_maxrss is in KiB on Linux
    record.unlink()
    return done, peak


def interrupt_deploy_writes(monkeypatch: Any) -> list[str]:
    """Ctrl-C at the first write of the deploy file, once part of it reached the disk, whichever
    writer takes it: ``os.pwrite`` from the threads of the one around the page cache (whose
    failure the main thread raises), ``os.write`` for the one through it. Returns the paths
    written to (where /proc tells them)."""
    real_write, real_pwrite = os.write, os.pwrite
    written: list[str] = []

    def record(fd: int) -> None:
        written.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd")
                       else "")

    def write_half_then_interrupt(fd: int, data: bytes) -> int:
        record(fd)
        real_write(fd, bytes(data)[: len(data) // 2])
        raise KeyboardInterrupt

    def pwrite_a_sector_then_interrupt(fd: int, data: memoryview, offset: int) -> int:
        record(fd)
        head = memoryview(data)[:4096]  # a direct write takes whole sectors
        if len(head) == 4096:
            real_pwrite(fd, head, offset)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "write", write_half_then_interrupt)
    monkeypatch.setattr(os, "pwrite", pwrite_a_sector_then_interrupt)
    return written


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file (with its hash) and folder under ``roots``: proves nothing was written."""
    seen: dict[str, str] = {}
    for root in roots:
        if root.is_file():
            seen[str(root)] = sha256(root)
        elif root.is_dir():
            seen[str(root)] = "<dir>"
            for path in sorted(root.rglob("*")):
                seen[str(path)] = sha256(path) if path.is_file() else "<dir>"
    return seen


def assert_no_traceback(result: Result) -> None:
    assert "Traceback" not in result.output, result.output
    # CliRunner turns an exception that escaped the app into exit code 1 + result.exception
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        repr(result.exception)
    )


def one_error_line(stderr: str) -> str:
    """The single 'error:' line of a refused command (its text after 'error:')."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0][len("error: "):]


def error_line(result: Result) -> str:
    return one_error_line(result.stderr)


def assert_refused(result: Result, before: dict[str, str], after: dict[str, str],
                   needles: list[str]) -> str:
    assert_no_traceback(result)
    assert result.exit_code == 2, (result.exit_code, result.output)
    message = error_line(result)
    assert before == after, "a refused command changed files"
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def json_document(stdout: str) -> dict[str, Any]:
    """stdout under --json: exactly one JSON object and nothing else."""
    data = json.loads(stdout)
    assert isinstance(data, dict)
    assert data["schema_version"] == 1
    return data


def assert_process_refused(proc: subprocess.CompletedProcess[str], needles: list[str],
                           *, as_json: bool = False) -> str:
    """A real process refused its input: exit 2, one line, no traceback (and the document)."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    message = one_error_line(proc.stderr)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    if as_json:
        assert json_document(proc.stdout) == {"schema_version": 1, "ok": False,
                                              "error": message, "exit_code": 2}
    else:
        assert proc.stdout == ""
    return message


def width8_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return randomize_bn(repvgg_tiny(width=8)).state_dict()
