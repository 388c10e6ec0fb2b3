"""Atomic outputs: nothing appears at the final path until the writer finishes."""

import pytest

from rackbench.atomic import atomic_path, write_json_atomic


def test_file_appears_only_on_success(tmp_path):
    final = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    write_json_atomic(final, {"a": 1})
    assert final.read_text() == '{\n  "a": 1\n}\n'


def test_directory_replaced_only_when_complete(tmp_path):
    final = tmp_path / "engine"
    final.mkdir()
    (final / "old").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(final, directory=True) as tmp:
            (tmp / "new").write_text("new")
            raise KeyboardInterrupt
    assert [p.name for p in final.iterdir()] == ["old"]
    with atomic_path(final, directory=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_stale_temporaries_of_a_killed_attempt_are_removed(tmp_path):
    final = tmp_path / "shard0"
    stale = tmp_path / ".shard0.tmp-abc123"
    stale.mkdir()
    (stale / "mlperf_log_detail.txt").write_text("half")
    other = tmp_path / ".shard1.tmp-xyz"  # another output's temporary is left alone
    other.mkdir()
    with atomic_path(final, directory=True) as tmp:
        (tmp / "shard.json").write_text("{}")
    assert not stale.exists() and other.exists()


WRITER = """
import ctypes, sys
from rackbench.atomic import atomic_path
with atomic_path(sys.argv[1], directory=True) as tmp:
    (tmp / "partial").write_text("half of it")
    print("writing", flush=True)
    while True:
        ctypes.CDLL(None).sleep(30)  # native code, as LoadGen's StartTest: Python's handlers wait for it
"""


def test_sigterm_says_why_removes_the_partial_output_and_exits_143(tmp_path):
    """As Slurm ends a job past its time limit (SIGTERM, then SIGKILL KillWait seconds later):
    the writer says so on stderr at once, even while in native code, and leaves nothing."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    final = tmp_path / "shard0"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "scripts")
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(final)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline() == "writing\n"
    assert list(tmp_path.glob(".shard0.tmp-*/partial"))
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert time.monotonic() - t0 < 5, "not within Slurm's KillWait"
    assert proc.returncode == 143, err
    assert f"rackbench: received SIGTERM: {final} not finished; partial output removed, nothing counts as done" in err
    assert list(tmp_path.iterdir()) == []
