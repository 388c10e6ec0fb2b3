"""Snakemake through a real Slurm (tests/slurm/cluster.py), with the ci-slurm profile.

First on a tiny stand-in workflow (tests/slurm/tiny: a CPU rule, one GPU job per
shard, a local report), then on rackbench's own demo workflow made into a
one-node "GB300" rack (tests/slurm/demo-gb300.yaml). Every Snakemake call runs
under `timeout`. Skipped, with the reason, where Slurm cannot be started.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slurm.fixtures import slurm_cluster  # noqa: F401  (the session fixture)
from slurm.helpers import (
    REPO,
    comment_of,
    copy_tiny,
    run_snakemake,
    sacct,
    sbatch_calls,
    slurm_run_id,
    tail,
)

pytestmark = pytest.mark.slurm

TINY_TIMEOUT = 300


def shard_records(workdir: Path) -> dict[int, dict]:
    return {int(d.name[len("shard"):]): json.loads((d / "shard.json").read_text())
            for d in sorted((workdir / "shards").glob("shard*"))}


def assert_concurrent(intervals: list[tuple[float, float]]) -> None:
    """All intervals overlap: the last start is before the first end."""
    last_start = max(s for s, _ in intervals)
    first_end = min(e for _, e in intervals)
    assert last_start < first_end, f"not all at once: {intervals}"


# ---------------------------------------------------------------- the tiny workflow

@pytest.fixture(scope="module")
def tiny_run(slurm_cluster, tmp_path_factory):  # noqa: F811
    wd = copy_tiny(tmp_path_factory.mktemp("slurm-tiny") / "wf")
    p = run_snakemake([], cwd=wd, timeout=TINY_TIMEOUT)
    assert p.returncode == 0, tail(p)
    return wd, p


def test_each_shard_is_its_own_gpu_job(tiny_run):
    wd, p = tiny_run
    calls = {comment_of(c): c for c in sbatch_calls(p)}
    assert set(calls) == {"rule_prepare"} | {f"rule_shard_wildcards_{i}" for i in range(4)}, calls
    for i in range(4):
        call = calls[f"rule_shard_wildcards_{i}"]
        assert "--gpus=gb300:1" in call
        assert "--cpus-per-gpu=1" in call
        assert "--ntasks-per-gpu" not in call and "--ntasks" not in call
        assert "--mem 300" in call and "-t 5" in call
    # the CPU rule asks for no GPU
    assert "--gpus" not in calls["rule_prepare"] and "--cpus-per-gpu" not in calls["rule_prepare"]
    assert "--cpus-per-task=1" in calls["rule_prepare"]

    jobs = sacct(slurm_run_id(p))
    by_comment = {j["Comment"]: j for j in jobs}
    assert len(jobs) == 5 and set(by_comment) == set(calls), jobs
    assert all(j["State"] == "COMPLETED" for j in jobs), jobs
    for i in range(4):
        assert "gres/gpu:gb300=1" in by_comment[f"rule_shard_wildcards_{i}"]["AllocTRES"]
    assert "gres/gpu" not in by_comment["rule_prepare"]["AllocTRES"]

    # the plugin kept each successful job's log, named by its Slurm job id
    recs = shard_records(wd)
    for i, rec in recs.items():
        log = wd / ".snakemake" / "slurm_logs" / "rule_shard" / str(i) / f"{rec['slurm_job_id']}.log"
        assert log.exists(), log
        assert by_comment[f"rule_shard_wildcards_{i}"]["JobIDRaw"] == rec["slurm_job_id"]


def test_shards_ran_at_once_on_their_own_gpus(tiny_run):
    wd, _ = tiny_run
    recs = shard_records(wd)
    assert sorted(recs) == [0, 1, 2, 3]
    assert_concurrent([(r["started_at"], r["finished_at"]) for r in recs.values()])
    devices = [r["cuda_visible_devices"] for r in recs.values()]
    assert sorted(devices) == ["0", "1", "2", "3"], devices
    assert all(r["fake_gpu_type"] == "gb300" for r in recs.values())
    assert len({r["slurm_job_id"] for r in recs.values()}) == 4


def test_failed_shards_are_retried_and_a_later_run_resubmits_only_the_missing(
        slurm_cluster, tmp_path):  # noqa: F811
    """Through the plugin's default status path (sacct). Jobs killed with scancel:
    tests/test_slurm_cluster.py (squeue path), and test_sacct_reports_scancel_... below."""
    wd = copy_tiny(tmp_path / "wf")
    ctl = wd / "control"
    (ctl / "fail-once-0").touch()      # exits non-zero on its first attempt
    (ctl / "fail-always-2").touch()    # fails on every attempt
    p = run_snakemake(["--keep-going"], cwd=wd, timeout=TINY_TIMEOUT)
    assert p.returncode != 0, "shard 2 cannot succeed"
    jobs = sacct(slurm_run_id(p))
    states = {}
    for j in sorted(jobs, key=lambda j: int(j["JobIDRaw"])):
        states.setdefault(j["Comment"], []).append(j["State"].split()[0])
    # retries: 1 in profiles/ci-slurm -> each failing shard is submitted twice
    assert states["rule_shard_wildcards_0"] == ["FAILED", "COMPLETED"], states
    assert states["rule_shard_wildcards_1"] == ["COMPLETED"], states
    assert states["rule_shard_wildcards_2"] == ["FAILED", "FAILED"], states
    assert states["rule_shard_wildcards_3"] == ["COMPLETED"], states
    # no partial output counts: shard 2 has none, and there is no report
    assert not (wd / "shards" / "shard2").exists()
    assert not list((wd / "shards").glob("*.tmp-*"))
    assert not (wd / "report.json").exists()
    before = {i: r["slurm_job_id"] for i, r in shard_records(wd).items()}
    assert sorted(before) == [0, 1, 3]

    (ctl / "fail-always-2").unlink()
    p2 = run_snakemake([], cwd=wd, timeout=TINY_TIMEOUT)
    assert p2.returncode == 0, tail(p2)
    jobs2 = sacct(slurm_run_id(p2))
    assert [j["Comment"] for j in jobs2] == ["rule_shard_wildcards_2"], jobs2
    after = {i: r["slurm_job_id"] for i, r in shard_records(wd).items()}
    assert {i: after[i] for i in before} == before  # shards 0, 1, 3 untouched
    assert sorted(after) == [0, 1, 2, 3]
    assert (wd / "report.json").exists()


def test_sacct_reports_scancel_as_cancelled_by_uid(slurm_cluster, tmp_path):  # noqa: F811
    """Why profiles/slurm sets slurm-status-command: squeue.

    sacct (the plugin's default status command) reports a job killed with scancel
    as 'CANCELLED by <uid>', which snakemake-executor-plugin-slurm 2.8.0 matches
    against its failure states verbatim: it never counts the job as failed, and
    Snakemake waits forever. squeue reports plain 'CANCELLED'. If this test fails
    because the plugin learnt the prefix, the squeue setting can go.
    """
    import asyncio
    import logging
    import subprocess
    import time

    from snakemake_executor_plugin_slurm.job_status_query import (
        query_job_status, query_job_status_sacct, query_job_status_squeue)

    name = f"rackbench-cancel-{tmp_path.name}"
    jobid = subprocess.run(["sbatch", "--parsable", "--job-name", name, "-o", "/dev/null",
                            "--gpus=gb300:1", "--wrap", "sleep 120"],
                           capture_output=True, text=True, check=True).stdout.strip()
    time.sleep(2)
    subprocess.run(["scancel", jobid], check=True)
    log = logging.getLogger("test")
    for _ in range(30):
        via_sacct, _ = asyncio.run(query_job_status(query_job_status_sacct(name), log))
        if via_sacct and via_sacct.get(jobid, "").startswith("CANCELLED"):
            break
        time.sleep(1)
    via_squeue, _ = asyncio.run(query_job_status(query_job_status_squeue(name), log))
    assert via_squeue[jobid] == "CANCELLED"
    assert via_sacct[jobid].startswith("CANCELLED by "), via_sacct


# ---------------------------------------------------------------- the demo workflow

DEMO_TIMEOUT = 1500
DEMO_ARGS = ["-s", str(REPO / "Snakefile"), "--configfile", str(REPO / "config.yaml"),
             str(REPO / "tests" / "slurm" / "demo-gb300.yaml")]
CFG = "tiny-llama/nvfp4/reference/gb300/bs16/4x1"
GPU_RULES = {"build_engine", "run_shard"}


@pytest.fixture(scope="module")
def demo_run(slurm_cluster, tmp_path_factory):  # noqa: F811
    wd = tmp_path_factory.mktemp("slurm-demo")
    p = run_snakemake(DEMO_ARGS, cwd=wd, timeout=DEMO_TIMEOUT)
    assert p.returncode == 0, tail(p)
    return wd, p


def test_demo_gpu_jobs_are_slurm_jobs_with_their_gpu_requests(demo_run):
    wd, p = demo_run
    calls = sbatch_calls(p)
    by_rule = {}
    for c in calls:
        rule = comment_of(c)[len("rule_"):].split("_wildcards_")[0]
        by_rule.setdefault(rule, []).append(c)
    assert "download_model" not in by_rule and "report" not in by_rule  # localrules
    assert len(by_rule["run_shard"]) == 8  # 4 performance + 4 accuracy shards
    assert len(by_rule["build_engine"]) == 1
    for rule, cs in by_rule.items():
        for c in cs:
            if rule == "run_shard":
                assert "--gpus=gb300:1" in c and "--cpus-per-gpu=1" in c and "--mem 2000" in c, c
                assert "-t 20" in c, c
            elif rule in GPU_RULES:
                assert "--gpus=gb300:" in c and "--cpus-per-gpu=" in c, c
            else:
                assert "--gpus" not in c and "--cpus-per-gpu" not in c, c
            assert "--ntasks-per-gpu" not in c, c
    jobs = sacct(slurm_run_id(p))
    assert len(jobs) == len(calls)
    assert all(j["State"] == "COMPLETED" for j in jobs), jobs
    for j in jobs:
        if j["Comment"].startswith("rule_run_shard_"):
            assert "gres/gpu:gb300=1" in j["AllocTRES"], j
    # each shard's record names its own Slurm job, whose kept log is there
    shard_jobs = {j["JobIDRaw"] for j in jobs if j["Comment"].startswith("rule_run_shard_")}
    recs = [json.loads(f.read_text()) for f in wd.glob(f"results/runs/{CFG}/*/shard*/shard.json")]
    assert len(recs) == 8
    assert {str(r["slurm_job_id"]) for r in recs} == shard_jobs
    logs = {f.stem for f in (wd / ".snakemake" / "slurm_logs" / "rule_run_shard").rglob("*.log")}
    assert shard_jobs <= logs


def test_demo_shards_ran_at_once_each_with_its_own_gpu(demo_run):
    wd, _ = demo_run
    for mode in ("performance", "accuracy"):
        recs = [json.loads(f.read_text())
                for f in sorted(wd.glob(f"results/runs/{CFG}/{mode}/shard*/shard.json"))]
        assert len(recs) == 4
        assert_concurrent([(r["started_at"], r["finished_at"]) for r in recs])
        assert sorted(r["cuda_visible_devices"] for r in recs) == ["0", "1", "2", "3"]
        assert all(r["gpu_type"] == "gb300" for r in recs)
