"""The single-node test Slurm cluster itself (tests/slurm/cluster.py): starts from
Debian's packages, is reused when running, schedules typed fake GPUs with one
CUDA_VISIBLE_DEVICES per job, and works without accounting (squeue status).
Skipped, with the reason, where Slurm cannot be started."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm import cluster
from slurm.fixtures import slurm_cluster  # noqa: F401  (the session fixture)
from slurm.helpers import copy_tiny, run_snakemake, tail

pytestmark = pytest.mark.slurm
TESTS = Path(__file__).resolve().parent


def test_start_is_idempotent_and_reuses_the_running_cluster(slurm_cluster):  # noqa: F811
    again = cluster.start(accounting=True)
    assert again.started == {}, "a running cluster is reused, nothing new is started"
    running = cluster.status()
    assert all(running[d] for d in cluster.DAEMONS), running
    node = subprocess.run(
        ["scontrol", "show", "node", slurm_cluster.host], capture_output=True, text=True, check=True
    ).stdout
    assert "CPUTot=4" in node
    assert "Gres=gpu:gb300:4" in node
    assert re.search(r"State=(IDLE|MIXED|ALLOCATED)", node), node
    # accounting answers (the plugin's default status command)
    subprocess.run(["sacct", "-X", "-n"], check=True, capture_output=True)


def test_gpu_jobs_run_at_once_each_on_its_own_fake_gpu(slurm_cluster, tmp_path):  # noqa: F811
    ids = []
    for i in range(4):
        out = tmp_path / f"job{i}.json"
        script = (
            "python3 -c 'import json,os,time; t=time.time(); time.sleep(6); "
            'print(json.dumps({"cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), '
            '"gpus": os.environ.get("SLURM_GPUS"), "start": t, "end": time.time()}))\''
        )
        ids.append(
            subprocess.run(
                [
                    "sbatch",
                    "--parsable",
                    "--gpus=gb300:1",
                    "--cpus-per-gpu=1",
                    "--mem=200",
                    "-t",
                    "2",
                    "-o",
                    str(out),
                    "--wrap",
                    script,
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        q = subprocess.run(
            ["squeue", "-h", "-j", ",".join(ids), "-o", "%T"], capture_output=True, text=True
        ).stdout.split()
        if not any(s in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING") for s in q):
            break
        time.sleep(1)
    recs = [json.loads((tmp_path / f"job{i}.json").read_text()) for i in range(4)]
    assert sorted(r["cvd"] for r in recs) == ["0", "1", "2", "3"], recs
    assert all(r["gpus"] == "gb300:1" for r in recs)
    assert max(r["start"] for r in recs) < min(r["end"] for r in recs), "not concurrent"
    for jid in ids:
        tres = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-j", jid, "-o", "AllocTRES%200"], capture_output=True, text=True, check=True
        ).stdout
        assert "gres/gpu:gb300=1" in tres, tres


def test_without_accounting_squeue_status_and_scancel_retry(slurm_cluster, tmp_path):  # noqa: F811
    """A cluster without slurmdbd: sacct fails, so Snakemake needs
    --slurm-status-command squeue (MinJobAge 300 >= 120). A shard killed with
    scancel is retried, and its partial output does not count."""

    def adopt(started):
        # daemons this session started are stopped at its end, restarted ones too;
        # one that replaced a daemon running before the session is left running
        for name, pid in started.items():
            if name in slurm_cluster.started:
                slurm_cluster.started[name] = pid

    try:
        c = cluster.start(accounting=False)
        adopt(c.started)
        assert not c.accounting
        no_acct = subprocess.run(["sacct", "-X", "-n"], capture_output=True, text=True)
        assert no_acct.returncode != 0 or "disabled" in (no_acct.stdout + no_acct.stderr)

        wd = copy_tiny(tmp_path / "wf")
        (wd / "control" / "cancel-once-1").touch()  # partial output, then scancel itself
        p = run_snakemake(["--slurm-status-command", "squeue"], cwd=wd, timeout=300)
        out = p.stdout + p.stderr
        assert p.returncode == 0, tail(p)
        assert "SLURM status is: 'CANCELLED'" in out, tail(p)
        assert "Trying to restart job" in out
        assert "command=squeue" in out and "command=sacct" not in out
        # the retry started from nothing: no partial file survives
        kept = sorted(x.name for x in (wd / "shards" / "shard1").iterdir() if x.name != ".snakemake_timestamp")
        assert kept == ["shard.json"], kept
        recs = [json.loads((wd / "shards" / f"shard{i}" / "shard.json").read_text()) for i in range(4)]
        # (the retry of shard 1 runs later, so it may reuse another shard's GPU)
        assert all(r["cuda_visible_devices"] in ("0", "1", "2", "3") for r in recs), recs
    finally:
        adopt(cluster.start(accounting=True).started)


# Inner test sessions for the teardown test: each runs with tests/conftest.py as a plugin
# (its session-finish check included) and records its session marker.
INNER_COMMON = """
import os
from pathlib import Path
from slurm import cluster
from slurm.fixtures import slurm_cluster  # noqa: F401

def note_session():
    Path(os.environ["INNER_NOTES"], "marker").write_text(os.environ["RACKBENCH_TEST_SESSION"])
"""
INNER_RESTART = (
    INNER_COMMON
    + """
def test_restart_in_another_configuration(slurm_cluster):  # noqa: F811
    note_session()
    assert slurm_cluster.started, "the inner session must start the cluster itself"
    cluster.start(accounting=False)  # new slurmctld and slurmd, not in slurm_cluster.started
    cluster.start(accounting=True)
"""
)
INNER_INTERRUPTED = (
    INNER_COMMON
    + """
def test_interrupted_while_a_job_runs(slurm_cluster):  # noqa: F811
    import subprocess, time
    note_session()
    subprocess.run(["sbatch", "-o", "/dev/null", "--wrap", "sleep 300"], check=True, capture_output=True)
    Path(os.environ["INNER_NOTES"], "ready").touch()
    time.sleep(600)
"""
)


def _inner_pytest(tmp_path, name, source):
    notes = tmp_path / f"{name}-notes"
    notes.mkdir()
    (tmp_path / f"test_{name}.py").write_text(source)
    env = {
        **os.environ,
        "INNER_NOTES": str(notes),
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent / "scripts")]),
    }
    env.pop("RACKBENCH_SLURM_KEEP", None)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "conftest",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(tmp_path),
        str(tmp_path / f"test_{name}.py"),
    ]
    return subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ), notes


def test_teardown_stops_every_daemon_it_started_also_when_interrupted(tmp_path):
    """Issue 14, item 5. A session that restarted the cluster in another configuration (as
    test_without_accounting_... does), and one killed with SIGTERM while a job runs, each
    leave no daemon of theirs running (slurmctld, slurmd, slurmstepd, slurmdbd, mariadbd,
    munged), and the session-finish check of tests/conftest.py passes."""
    if os.geteuid() != 0 or cluster.missing_binaries():
        pytest.skip("needs root and Debian's Slurm packages (installed by the other Slurm tests)")
    foreign = {n: p for n, p in cluster.status().items() if p and p not in cluster.started_here().values()}
    if foreign:
        pytest.skip(f"a test cluster this session did not start is running: {foreign}")
    # this session's own cluster (if an earlier test started it) makes way, and comes back at the end
    had_cluster = bool(cluster.started_here())
    cluster.stop(cluster.started_here())
    try:
        proc, notes = _inner_pytest(tmp_path, "restart", INNER_RESTART)
        out, _ = proc.communicate(timeout=900)
        marker = (notes / "marker").read_text()
        assert proc.returncode == 0, out[-4000:]
        assert "left daemons running" not in out, out[-4000:]
        assert cluster.daemons_with_env("RACKBENCH_TEST_SESSION", marker) == {}

        proc, notes = _inner_pytest(tmp_path, "interrupted", INNER_INTERRUPTED)
        deadline = time.monotonic() + 600
        while not (notes / "ready").exists():
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "the inner session never got its cluster up"
            time.sleep(1)
        marker = (notes / "marker").read_text()
        assert "slurmctld" in cluster.daemons_with_env("RACKBENCH_TEST_SESSION", marker).values()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode != 0
        assert cluster.daemons_with_env("RACKBENCH_TEST_SESSION", marker) == {}, out[-4000:]
        assert not cluster.processes_named(*cluster.DAEMON_NAMES), cluster.processes_named(*cluster.DAEMON_NAMES)
    finally:
        if had_cluster:
            cluster.start(accounting=True)
