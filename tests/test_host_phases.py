"""`benchmarks/host_phases.py` wraps the engine's methods by name (gpu_profile.py's phase list): a renamed method
would silently drop out of its table. Its smoke run times every phase a CPU step has."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_host_phases_times_every_phase_of_a_cpu_step():
    run = subprocess.run([sys.executable, "benchmarks/host_phases.py", "--smoke"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in run.stdout.splitlines() if line.startswith("| ")}
    for phase in ("step", "schedule", "prepare inputs", "forward (eager)", "sampling batch", "sample",
                  "wait + read tokens", "process outputs"):
        assert phase in rows and float(rows[phase].split("|")[2]) > 0, run.stdout
