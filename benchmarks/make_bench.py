"""`make bench`: the three benchmark tables of one run (deploy latency, conversion cost,
numerical error), printed as they come and saved to benchmarks/results_bench.md, which
docs/benchmarks.md quotes.

Run: `make bench` or `python benchmarks/make_bench.py`.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results_bench.md"
SCRIPTS = (("1. Deploy latency", "deploy_speed.py"),
           ("2. Conversion cost", "conversion_cost.py"),
           ("3. Numerical error", "numerics.py"))


def _load() -> str:
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


def main() -> int:
    start = time.perf_counter()
    lines = [f"# make bench, {datetime.date.today()}", "",
             f"{platform.machine()}, {os.cpu_count()} CPU cores, Python "
             f"{platform.python_version()}, torch {torch.__version__}; load average at the "
             f"start {_load()} (other jobs on the machine slow every figure; ratios are "
             "measured within one run)", ""]
    print("\n".join(lines), flush=True)
    for title, script in SCRIPTS:
        lines += [f"## {title}", "", f"`python benchmarks/{script}`", "", "```"]
        print(f"## {title}\n", flush=True)
        began = time.perf_counter()
        process = subprocess.Popen([sys.executable, str(HERE / script)], stdout=subprocess.PIPE,
                                   text=True)
        assert process.stdout is not None
        for line in process.stdout:
            print(line, end="", flush=True)
            lines.append(line.rstrip("\n"))
        if process.wait() != 0:
            print(f"{script} failed with exit code {process.returncode}", file=sys.stderr)
            return process.returncode
        lines += ["```", "", f"({time.perf_counter() - began:.0f} s)", ""]
    lines.append(f"Total: {time.perf_counter() - start:.0f} s; load average at the end {_load()}")
    print(lines[-1])
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"saved to {RESULTS.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
