"""Helpers shared by several test modules (``from helpers import ...``; pytest puts tests/ on sys.path).

Fixtures stay in the modules that use them (or tests/conftest.py); what is here is plain code
that more than one test file needed: where the repository and the shared MLPerf logs are, the
environment a ``python -m rackbench.X`` subprocess needs, the demo's model and dataset, and the
LoadGen settings that keep a test run short.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
# read-only test data beside the repository (../shared: MLPerf logs, MLCommons' tools)
SHARED = ROOT.parent / "shared"
MLPERF_LOGS = SHARED / "mlperf-logs"

# run_shard's LoadGen settings for a test: no minimum duration, one query is enough, no progress lines
QUICK_LOADGEN = {"min_duration_ms": 0, "min_query_count": 1, "offline_expected_qps": 10, "progress_interval_s": 0}


def quick_loadgen_args() -> list[str]:
    """QUICK_LOADGEN as ``python -m rackbench.harness`` options."""
    return [a for key, value in QUICK_LOADGEN.items() for a in ("--" + key.replace("_", "-"), str(value))]


def python_env(**extra: str) -> dict:
    """This environment with this checkout's scripts/ first on PYTHONPATH, for ``python -m rackbench.X``
    subprocesses (the installed package may point at another checkout), plus ``extra``."""
    return dict(os.environ, PYTHONPATH=str(SCRIPTS) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)


def alive(pids) -> list[int]:
    """Those of ``pids`` still running (a zombie, exited but not yet reaped, does not count)."""
    running = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
        except psutil.NoSuchProcess:
            pass
    return running


def wait_gone(pids, timeout: float, poll: float = 0.1) -> list[int]:
    """Those of ``pids`` still running after up to ``timeout`` seconds (a killed process takes
    a moment to be gone)."""
    deadline = time.monotonic() + timeout
    while (left := alive(pids)) and time.monotonic() < deadline:
        time.sleep(poll)
    return left


def make_demo_model(out: Path, *model_args: str, seed: int = 0, env: dict | None = None) -> Path:
    """The demo's tiny model (``rackbench.demo model``) at ``out``; in a subprocess with ``env``
    where one is given (the demo seeds torch's global generator), else in this process."""
    argv = ["model", "--out", str(out), "--seed", str(seed), *model_args]
    if env is None:
        from rackbench import demo

        assert demo.main(argv) == 0
    else:
        subprocess.run([sys.executable, "-m", "rackbench.demo", *argv], check=True, env=env, capture_output=True)
    return out


def make_demo_dataset(model: Path, out: Path, *, num_samples: int, num_calibration: int) -> Path:
    """The demo's OpenOrca-shaped pickles (``rackbench.demo dataset``) from ``model``, at ``out``."""
    from rackbench import demo

    argv = ["dataset", "--model", str(model), "--out", str(out), "--num-samples", str(num_samples)]
    argv += ["--num-calibration", str(num_calibration), "--max-new-tokens", "64", "--seed", "0"]
    assert demo.main(argv) == 0
    return out
