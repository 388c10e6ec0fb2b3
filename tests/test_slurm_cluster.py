"""The single-node test Slurm cluster itself (tests/slurm/cluster.py): starts from
Debian's packages, is reused when running, schedules typed fake GPUs with one
CUDA_VISIBLE_DEVICES per job, and works without accounting (squeue status).
Skipped, with the reason, where Slurm cannot be started."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from slurm import cluster
from slurm.fixtures import slurm_cluster  # noqa: F401  (the session fixture)
from slurm.helpers import copy_tiny, run_snakemake, tail

pytestmark = pytest.mark.slurm


def test_start_is_idempotent_and_reuses_the_running_cluster(slurm_cluster):  # noqa: F811
    again = cluster.start(accounting=True)
    assert again.started == {}, "a running cluster is reused, nothing new is started"
    running = cluster.status()
    assert all(running[d] for d in cluster.DAEMONS), running
    node = subprocess.run(["scontrol", "show", "node", slurm_cluster.host],
                          capture_output=True, text=True, check=True).stdout
    assert "CPUTot=4" in node
    assert "Gres=gpu:gb300:4" in node
    assert re.search(r"State=(IDLE|MIXED|ALLOCATED)", node), node
    # accounting answers (the plugin's default status command)
    subprocess.run(["sacct", "-X", "-n"], check=True, capture_output=True)


def test_gpu_jobs_run_at_once_each_on_its_own_fake_gpu(slurm_cluster, tmp_path):  # noqa: F811
    ids = []
    for i in range(4):
        out = tmp_path / f"job{i}.json"
        script = ("python3 -c 'import json,os,time; t=time.time(); time.sleep(6); "
                  "print(json.dumps({\"cvd\": os.environ.get(\"CUDA_VISIBLE_DEVICES\"), "
                  "\"gpus\": os.environ.get(\"SLURM_GPUS\"), \"start\": t, \"end\": time.time()}))'")
        ids.append(subprocess.run(
            ["sbatch", "--parsable", "--gpus=gb300:1", "--cpus-per-gpu=1", "--mem=200",
             "-t", "2", "-o", str(out), "--wrap", script],
            capture_output=True, text=True, check=True).stdout.strip())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        q = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%T"],
                           capture_output=True, text=True).stdout.split()
        if not any(s in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING") for s in q):
            break
        time.sleep(1)
    recs = [json.loads((tmp_path / f"job{i}.json").read_text()) for i in range(4)]
    assert sorted(r["cvd"] for r in recs) == ["0", "1", "2", "3"], recs
    assert all(r["gpus"] == "gb300:1" for r in recs)
    assert max(r["start"] for r in recs) < min(r["end"] for r in recs), "not concurrent"
    for jid in ids:
        tres = subprocess.run(["sacct", "-X", "-n", "-P", "-j", jid, "-o", "AllocTRES%200"],
                              capture_output=True, text=True, check=True).stdout
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
        kept = sorted(x.name for x in (wd / "shards" / "shard1").iterdir()
                      if x.name != ".snakemake_timestamp")
        assert kept == ["shard.json"], kept
        recs = [json.loads((wd / "shards" / f"shard{i}" / "shard.json").read_text())
                for i in range(4)]
        # (the retry of shard 1 runs later, so it may reuse another shard's GPU)
        assert all(r["cuda_visible_devices"] in ("0", "1", "2", "3") for r in recs), recs
    finally:
        adopt(cluster.start(accounting=True).started)
