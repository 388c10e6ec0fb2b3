"""Snakemake through a real Slurm (tests/slurm/cluster.py), with the ci-slurm profile.

First on a tiny stand-in workflow (tests/slurm/tiny: a CPU rule, one GPU job per
shard, a local report), then on rackbench's own demo workflow made into a
one-node "GB300" rack (tests/slurm/demo-gb300.yaml). Every Snakemake call runs
under `timeout`. Skipped, with the reason, where Slurm cannot be started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from rackbench.slurm_jobs import incomplete_markers
from slurm.fixtures import slurm_cluster  # noqa: F401  (the session fixture)
from slurm.helpers import (
    CI_PROFILE,
    REPO,
    comment_of,
    copy_tiny,
    queued_jobs,
    run_snakemake,
    sacct,
    sbatch_calls,
    slurm_run_id,
    snakemake_env,
    start_snakemake,
    tail,
)
from test_reliability import TIMING_COLUMNS  # the per-shard timing columns of shards.csv

pytestmark = pytest.mark.slurm

TINY_TIMEOUT = 300


def shard_records(workdir: Path) -> dict[int, dict]:
    return {
        int(d.name[len("shard") :]): json.loads((d / "shard.json").read_text())
        for d in sorted((workdir / "shards").glob("shard*"))
    }


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


def _states_by_comment(jobs: list[dict]) -> dict[str, list[str]]:
    """sacct rows -> each job comment's states, one per attempt in order ("CANCELLED by 0" -> "CANCELLED")."""
    states = {}
    for j in sorted(jobs, key=lambda j: int(j["JobIDRaw"])):
        states.setdefault(j["Comment"], []).append(j["State"].split()[0])
    return states


def _shard_2_missing_and_no_report(wd: Path) -> dict[int, str]:
    """After a tiny run whose shard 2 never succeeded: nothing of shard 2 (no partial output counts),
    no report; returns the other shards' Slurm job ids."""
    assert not (wd / "shards" / "shard2").exists()
    assert not list((wd / "shards").glob("*.tmp-*"))
    assert not (wd / "report.json").exists()
    before = {i: r["slurm_job_id"] for i, r in shard_records(wd).items()}
    assert sorted(before) == [0, 1, 3]
    return before


def _only_shard_2_added_then_the_report(wd: Path, before: dict[int, str]) -> None:
    """After the rerun: shards 0, 1, 3 are the jobs they were, shard 2 is there, and so is the report."""
    after = {i: r["slurm_job_id"] for i, r in shard_records(wd).items()}
    assert {i: after[i] for i in before} == before  # shards 0, 1, 3 untouched
    assert sorted(after) == [0, 1, 2, 3]
    assert (wd / "report.json").exists()


def test_failed_shards_are_retried_and_a_later_run_resubmits_only_the_missing(slurm_cluster, tmp_path):  # noqa: F811
    """Through the plugin's default status path (sacct). Jobs killed with scancel:
    tests/test_slurm_cluster.py (squeue path), and test_sacct_reports_scancel_... below."""
    wd = copy_tiny(tmp_path / "wf")
    ctl = wd / "control"
    (ctl / "fail-once-0").touch()  # exits non-zero on its first attempt
    (ctl / "fail-always-2").touch()  # fails on every attempt
    p = run_snakemake(["--keep-going"], cwd=wd, timeout=TINY_TIMEOUT)
    assert p.returncode != 0, "shard 2 cannot succeed"
    states = _states_by_comment(sacct(slurm_run_id(p)))
    # retries: 1 in profiles/ci-slurm -> each failing shard is submitted twice
    assert states["rule_shard_wildcards_0"] == ["FAILED", "COMPLETED"], states
    assert states["rule_shard_wildcards_1"] == ["COMPLETED"], states
    assert states["rule_shard_wildcards_2"] == ["FAILED", "FAILED"], states
    assert states["rule_shard_wildcards_3"] == ["COMPLETED"], states
    # no partial output counts: shard 2 has none, and there is no report
    before = _shard_2_missing_and_no_report(wd)

    (ctl / "fail-always-2").unlink()
    p2 = run_snakemake([], cwd=wd, timeout=TINY_TIMEOUT)
    assert p2.returncode == 0, tail(p2)
    jobs2 = sacct(slurm_run_id(p2))
    assert [j["Comment"] for j in jobs2] == ["rule_shard_wildcards_2"], jobs2
    _only_shard_2_added_then_the_report(wd, before)


def test_scancelled_shards_are_retried_and_a_later_run_resubmits_only_the_missing(slurm_cluster, tmp_path):  # noqa: F811
    """Shard jobs killed with scancel (their partial output already written), under the
    status command profiles/slurm sets (squeue; sacct would hang, see the next test):
    retried per the profile's `retries`; one cancelled on every attempt leaves no output
    (its partial files are gone), the others finish (keep-going), and a later run
    resubmits only that shard."""
    site = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert site["slurm-status-command"] == "squeue"
    retries = yaml.safe_load((CI_PROFILE / "config.yaml").read_text())["retries"]
    wd = copy_tiny(tmp_path / "wf")
    ctl = wd / "control"
    (ctl / "cancel-once-1").touch()  # partial output, then scancel of its own job, once
    (ctl / "cancel-always-2").touch()  # the same on every attempt
    squeue = ["--slurm-status-command", "squeue"]
    p = run_snakemake(["--keep-going", *squeue], cwd=wd, timeout=TINY_TIMEOUT)
    out = p.stdout + p.stderr
    assert p.returncode != 0, "shard 2 cannot succeed"
    assert "SLURM status is: 'CANCELLED'" in out, tail(p)
    states = _states_by_comment(sacct(slurm_run_id(p)))
    assert states["rule_shard_wildcards_1"] == ["CANCELLED", "COMPLETED"], states
    assert states["rule_shard_wildcards_2"] == ["CANCELLED"] * (1 + retries), states
    assert states["rule_shard_wildcards_0"] == states["rule_shard_wildcards_3"] == ["COMPLETED"], states
    # no partial output counts: the retried shard holds only its complete record, the
    # cancelled one nothing at all, and there is no report
    kept = sorted(x.name for x in (wd / "shards" / "shard1").iterdir() if x.name != ".snakemake_timestamp")
    assert kept == ["shard.json"], kept
    before = _shard_2_missing_and_no_report(wd)

    (ctl / "cancel-always-2").unlink()
    p2 = run_snakemake(squeue, cwd=wd, timeout=TINY_TIMEOUT)
    assert p2.returncode == 0, tail(p2)
    assert [comment_of(c) for c in sbatch_calls(p2)] == ["rule_shard_wildcards_2"]
    assert [j["Comment"] for j in sacct(slurm_run_id(p2))] == ["rule_shard_wildcards_2"]
    _only_shard_2_added_then_the_report(wd, before)


def test_site_profile_runs_container_jobs_under_apptainer_with_nv(slurm_cluster, tmp_path):  # noqa: F811
    """profiles/slurm runs container jobs (TensorRT-LLM's) under apptainer with --nv.
    The test cluster has no apptainer: a stand-in (tests/slurm/bin/apptainer) records
    each call and runs the wrapped command on the host. Each GPU job must have called
    `apptainer exec ... --nv <image>` inside its own Slurm job, on its own GPU."""
    site = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert site["software-deployment-method"] == "apptainer" and site["apptainer-args"] == "--nv"
    wd = copy_tiny(tmp_path / "wf")
    (wd / "trtllm.sif").touch()
    log = wd / "apptainer-calls.log"
    env = snakemake_env(PATH=f"{REPO / 'tests' / 'slurm' / 'bin'}:{os.environ['PATH']}", FAKE_APPTAINER_LOG=str(log))
    p = run_snakemake(
        [
            "--software-deployment-method",
            site["software-deployment-method"],
            f"--apptainer-args={site['apptainer-args']}",  # "=": a bare "--nv" reads as an option
            "--config",
            "container=trtllm.sif",
            "sleep=3",
        ],
        cwd=wd,
        timeout=TINY_TIMEOUT,
        env=env,
    )
    assert p.returncode == 0, tail(p)
    calls = {}
    for line in log.read_text().splitlines():
        jobid, cvd, argv = line.split("\t")
        calls.setdefault(jobid, []).append((cvd, argv.split()))
    recs = shard_records(wd)
    assert sorted(recs) == [0, 1, 2, 3]
    # only the four shard jobs (the CPU rule names no container), one call each
    assert sorted(calls) == sorted(r["slurm_job_id"] for r in recs.values()), calls
    for rec in recs.values():
        [(cvd, argv)] = calls[rec["slurm_job_id"]]
        assert argv[0] == "exec" and "--nv" in argv, argv
        image = [i for i, a in enumerate(argv) if a.strip("'").endswith("trtllm.sif")]
        assert len(image) == 1 and argv.index("--nv") < image[0], argv  # --nv, then the image
        assert cvd == rec["cuda_visible_devices"] != "none"


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
        query_job_status,
        query_job_status_sacct,
        query_job_status_squeue,
    )

    name = f"rackbench-cancel-{tmp_path.name}"
    jobid = subprocess.run(
        ["sbatch", "--parsable", "--job-name", name, "-o", "/dev/null", "--gpus=gb300:1", "--wrap", "sleep 120"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
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

DEMO_TIMEOUT = 720  # about 3.5 min on 2 shared cores
DEMO_ARGS = [
    "-s",
    str(REPO / "Snakefile"),
    "--configfile",
    str(REPO / "config.yaml"),
    str(REPO / "tests" / "slurm" / "demo-gb300.yaml"),
]
CFG = "tiny-llama/nvfp4/reference/gb300/bs16/2x1"
GPU_RULES = {"build_engine", "run_shard"}
# Columns that legitimately differ between two runs of the same configuration:
# timings (and what follows from them) and where the jobs ran.
SHARD_VARYING = [*TIMING_COLUMNS, "hostname", "slurm_job_id"]
THROUGHPUT_VARYING = [
    "concurrent",
    "non_overlapping_shards",
    "a_sum_tokens_per_s",
    "b_concurrent_tokens_per_s",
    "window_s",
    "c_per_gpu_mean",
    "c_per_gpu_min",
    "c_per_gpu_max",
    "c_cv",
    "slowest_shard",
    "slowest_shard_dir",
    "a_per_gpu",
    "b_per_gpu",
    "efficiency_a",
    "efficiency_b",
]


def logs_of(folder: Path) -> dict[str, Path]:
    """The plugin's kept job logs under a rule's folder, by Slurm job id."""
    return {f.stem: f for f in folder.rglob("*.log")}


def rule_of(call: str) -> str:
    return comment_of(call)[len("rule_") :].split("_wildcards_")[0]


@pytest.fixture(scope="module")
def demo_run(slurm_cluster, tmp_path_factory):  # noqa: F811
    """The demo as a one-node GB300 rack through Slurm, run once for this module:
    RACKBENCH_FAKE_GPU_TYPE=gb300 snakemake --executor slurm --workflow-profile profiles/ci-slurm
        --configfile config.yaml tests/slurm/demo-gb300.yaml"""
    wd = tmp_path_factory.mktemp("slurm-demo")
    p = run_snakemake(DEMO_ARGS, cwd=wd, timeout=DEMO_TIMEOUT)
    assert p.returncode == 0, tail(p)
    return wd, p


def from_demo_run(demo_wd: Path, dest: Path, keep: tuple[str, ...] | None = None) -> Path:
    """``dest`` seeded from the module's finished Slurm demo run, to save CI's time on steps
    a test is not about: everything but the shard runs, their accuracy and the report
    (with Snakemake's metadata, so that a run there redoes just those), or only the
    ``keep`` paths under results/ (no metadata: Snakemake takes them as they are)."""
    if keep is None:
        shutil.copytree(demo_wd, dest, symlinks=True, ignore=shutil.ignore_patterns("snakemake-*.log", "slurm_logs"))
        for rel in ("results/runs", "results/accuracy", "results/report"):
            shutil.rmtree(dest / rel)
        return dest
    for rel in keep:
        shutil.copytree(demo_wd / "results" / rel, dest / "results" / rel, symlinks=True)
    return dest


@pytest.fixture(scope="module")
def demo_local(demo_run, tmp_path_factory):
    """The same config run locally (`--cores 2`, RACKBENCH_FAKE_GPU_TYPE=gb300 too), in
    another directory, after the Slurm run (so the two do not share the 2 cores). It starts
    from the Slurm run's demo assets (rackbench.demo's seeded model and dataset, the inputs
    both runs share); every step from there on runs locally."""
    wd = from_demo_run(demo_run[0], tmp_path_factory.mktemp("local-demo"), keep=("demo",))
    p = run_snakemake(["--cores", "2", *DEMO_ARGS], cwd=wd, timeout=DEMO_TIMEOUT, slurm=False)
    assert p.returncode == 0, tail(p)
    return wd


def test_demo_gpu_jobs_are_slurm_jobs_with_their_gpu_requests(demo_run):
    wd, p = demo_run
    calls = sbatch_calls(p)
    by_rule = {}
    for c in calls:
        by_rule.setdefault(rule_of(c), []).append(c)
    assert "download_model" not in by_rule and "report" not in by_rule  # localrules
    assert set(by_rule) == {
        "demo_model",
        "demo_dataset",
        "prepare_dataset",
        "quantize",
        "build_engine",
        "run_shard",
        "accuracy",
        "rack_run",
        "rack_accuracy",
    }, sorted(by_rule)
    assert len(by_rule["run_shard"]) == 4  # 2 performance + 2 accuracy shards
    assert len(by_rule["build_engine"]) == 1
    assert all(len(cs) == 1 for rule, cs in by_rule.items() if rule != "run_shard")
    for rule, cs in by_rule.items():
        for c in cs:
            if rule in GPU_RULES:
                # one GPU per shard (layout 2x1); the reference engine builds on one GPU
                assert "--gpus=gb300:1" in c and "--cpus-per-gpu=1" in c and "--mem 2000" in c, c
                assert "-t 20" in c and "--cpus-per-task" not in c, c
            elif rule == "rack_run":  # one allocation of the whole rack: its node, both GPUs
                # a task per server and one for the LoadGen (+ its memory: rack_run.client_mem_mb 4000)
                assert "--nodes=1" in c and "--gres=gpu:gb300:2" in c and "--mem 8000" in c, c
                assert "--ntasks=3" in c and "--cpus-per-task=1" in c and "--gpus" not in c, c
            else:
                assert "--gpus" not in c and "--cpus-per-gpu" not in c, c
            assert "--ntasks-per-gpu" not in c, c

    jobs = sacct(slurm_run_id(p))
    assert len(jobs) == len(calls)
    assert all(j["State"] == "COMPLETED" for j in jobs), jobs
    by_comment = {}
    for j in jobs:
        by_comment.setdefault(rule_of(f"--comment {j['Comment']}"), []).append(j)
    assert {r: len(js) for r, js in by_comment.items()} == {r: len(cs) for r, cs in by_rule.items()}
    for rule, js in by_comment.items():
        for j in js:
            if rule in GPU_RULES:
                assert "gres/gpu:gb300=1" in j["AllocTRES"], j
            elif rule == "rack_run":
                assert "gres/gpu:gb300=2" in j["AllocTRES"], j
            else:
                assert "gres/gpu" not in j["AllocTRES"], j

    # each shard's record names its own Slurm job, whose kept log is there
    shard_jobs = {j["JobIDRaw"] for j in by_comment["run_shard"]}
    recs = [json.loads(f.read_text()) for f in wd.glob(f"results/runs/{CFG}/*/*/shard*/shard.json")]
    assert len(recs) == 4
    assert {str(r["slurm_job_id"]) for r in recs} == shard_jobs
    kept = wd / ".snakemake" / "slurm_logs"
    for rule in GPU_RULES:
        logs = logs_of(kept / f"rule_{rule}")
        jobids = {j["JobIDRaw"] for j in by_comment[rule]}
        assert jobids <= set(logs), (rule, sorted(logs))
        for jobid in jobids:  # the log is that job's: the allocation ran this rule's step
            text = logs[jobid].read_text()
            assert f"Finished jobid: 0 (Rule: {rule})" in text, text[-2000:]
    for r in recs:
        text = logs_of(kept / "rule_run_shard")[str(r["slurm_job_id"])].read_text()
        assert f"run_shard {r['mode']} shard {r['shard_index']} of tiny-llama/nvfp4" in text, text[-2000:]


def test_demo_engine_is_built_on_and_run_on_gb300(demo_run):
    """The engine was built inside a gb300 job (RACKBENCH_FAKE_GPU_TYPE reaches it through
    --export=ALL) and every shard ran it as gb300: the run-time check passed."""
    wd, _ = demo_run
    (engine_json,) = wd.glob("results/engines/tiny-llama/nvfp4/reference/gb300/*/engine/engine.json")
    engine = json.loads(engine_json.read_text())
    assert engine["gpu_type"] == "gb300" and engine["fake_gpu"] is True
    assert engine["built_on"]["gpu_type"] == "gb300"
    assert engine["compute_capability"] == "10.3"
    for f in wd.glob(f"results/runs/{CFG}/*/*/shard*/shard.json"):
        rec = json.loads(f.read_text())
        assert rec["gpu_type"] == "gb300", f  # it ran: open_engine found the engine's GPU type here
        if rec["mode"] == "performance":
            assert rec["loadgen"]["result"] == "VALID", f


def test_demo_shards_ran_at_once_each_with_its_own_gpu(demo_run):
    """All four shard jobs (2 performance + 2 accuracy) held the node's four GPUs at
    once, one each, and the performance shards' LoadGen runs overlapped."""
    wd, p = demo_run
    recs = [json.loads(f.read_text()) for f in sorted(wd.glob(f"results/runs/{CFG}/*/*/shard*/shard.json"))]
    assert len(recs) == 4
    assert sorted(r["cuda_visible_devices"] for r in recs) == ["0", "1", "2", "3"]
    assert len({r["slurm_job_id"] for r in recs}) == 4
    assert all(r["gpu_type"] == "gb300" for r in recs)
    perf = [r for r in recs if r["mode"] == "performance"]
    assert len(perf) == 2
    assert_concurrent([(r["started_at"], r["finished_at"]) for r in perf])
    # Slurm's view: the four allocations overlapped (sacct times, 1 s resolution)
    jobs = [j for j in sacct(slurm_run_id(p)) if j["Comment"].startswith("rule_run_shard_")]
    assert len(jobs) == 4
    assert max(j["Start"] for j in jobs) < min(j["End"] for j in jobs), jobs  # ISO times sort as text
    # the report measures it too: each performance shard shared most of its run time with
    # the other (its `concurrent` flag needs 90%, which 2 shared cores do not promise)
    shards = pd.read_csv(wd / "results" / "report" / "shards.csv")
    assert len(shards) == 2 and (shards["overlap_fraction"] > 0.5).all(), shards


def test_demo_rack_session_is_one_allocation_with_a_server_step_per_gpu(demo_run):
    """The rack_run rule through Slurm: one sbatch allocation (the node, both GPUs); inside it
    one `srun --exact` step per engine server (rackbench.launch), each with one GPU; one
    LoadGen per run over both endpoints; no server left afterwards."""
    wd, p = demo_run
    (job,) = [j for j in sacct(slurm_run_id(p)) if j["Comment"].startswith("rule_rack_run_")]
    assert job["State"] == "COMPLETED", job
    steps = subprocess.run(
        ["sacct", "-P", "-n", "-j", job["JobIDRaw"], "-o", "JobIDRaw,JobName,State,AllocTRES"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    servers = [line.split("|") for line in steps if "|rackbench-server" in line]
    assert sorted(s[1] for s in servers) == ["rackbench-server0", "rackbench-server1"], steps
    assert all(s[0].startswith(job["JobIDRaw"] + ".") for s in servers), steps  # steps of that allocation
    assert all("gres/gpu" in s[3] and "gres/gpu=1" in s[3].replace(":gb300", "") for s in servers), servers
    records = [json.loads(f.read_text()) for f in wd.glob(f"results/rack/{CFG}/*/runs/*/*/shard.json")]
    assert {r["rack_run"] for r in records} == {"Offline"}
    for r in records:
        assert r["num_shards"] == 1 and r["servers"] == 2 and len(set(r["endpoints"])) == 2, r
        assert str(r["slurm_job_id"]) == job["JobIDRaw"], r  # the LoadGen ran in the allocation
    import psutil

    leftovers = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        if "rackbench.serve" in (proc.info["cmdline"] or []) and proc.info["cwd"] == str(wd):
            leftovers.append(proc.info["cmdline"])
    assert not leftovers, leftovers


def test_demo_report_through_slurm_equals_a_local_run(demo_run, demo_local):
    """Same tables and accuracy as `snakemake --cores 2` of the same config, apart from
    timings and where the jobs ran."""
    wd, _ = demo_run
    for table, varying in (("shards.csv", SHARD_VARYING), ("throughput.csv", THROUGHPUT_VARYING)):
        slurm, local = (pd.read_csv(d / "results" / "report" / table) for d in (wd, demo_local))
        assert set(varying) <= set(slurm.columns), table
        pd.testing.assert_frame_equal(slurm.drop(columns=varying), local.drop(columns=varying), obj=table)
    shards = pd.read_csv(wd / "results" / "report" / "shards.csv")
    assert shards["slurm_job_id"].notna().all()
    assert pd.read_csv(demo_local / "results" / "report" / "shards.csv")["slurm_job_id"].isna().all()
    assert (pd.read_csv(wd / "results" / "report" / "throughput.csv")["status"] == "VALID").all()
    (acc,) = (p.relative_to(wd) for p in wd.glob(f"results/accuracy/{CFG}/*/accuracy.json"))
    assert json.loads((wd / acc).read_text()) == json.loads((demo_local / acc).read_text())


# ---------------------------------------------------------------- faults on the cluster


def wait_until(what, pred, timeout, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pred()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"snakemake ended ({proc.returncode}) before {what}:\n"
                + "\n".join(proc.log_path.read_text().splitlines()[-60:])
            )
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_rerun_after_a_lost_login_session_waits_for_and_adopts_the_running_shards(slurm_cluster, demo_run, tmp_path):  # noqa: F811
    """Issue 14, item 2. SIGKILL of snakemake while the four demo shard jobs run (each held
    45 s before its output's rename), then `snakemake --unlock` and the same command again:
    the rerun finds the four orphans (squeue: this working directory, a plugin run ID, a rule
    comment), waits for them, adopts their outputs, and submits no shard a second time
    (rackbench.slurm_jobs). The steps before the shards come from the module's demo run."""
    wd = from_demo_run(demo_run[0], tmp_path / "demo")
    held = {
        "RACKBENCH_FAULT_PAUSE_BEFORE_RENAME_S": "45",
        "RACKBENCH_FAULT_PAUSE_ONLY": f"{wd}/results/runs/*/shard[0-9]",
    }
    first = start_snakemake(DEMO_ARGS, cwd=wd, env=snakemake_env(**held))
    try:

        def four_shards_running():
            running = [
                j for j in queued_jobs(wd) if j["Comment"].startswith("rule_run_shard_") and j["State"] == "RUNNING"
            ]
            return running if len(running) == 4 else None

        orphans = wait_until("four running shard jobs", four_shards_running, DEMO_TIMEOUT, first)
    finally:
        os.kill(first.pid, signal.SIGKILL)  # the login session is gone; its Slurm jobs go on
        first.wait()
    orphan_ids = sorted(j["JobID"] for j in orphans)
    assert {j["State"] for j in queued_jobs(wd) if j["JobID"] in orphan_ids} == {"RUNNING"}

    unlock = run_snakemake(["--unlock", *DEMO_ARGS], cwd=wd, timeout=300)
    assert unlock.returncode == 0, tail(unlock)
    again = run_snakemake(DEMO_ARGS, cwd=wd, timeout=DEMO_TIMEOUT)
    out = again.stdout + again.stderr
    assert again.returncode == 0, tail(again)
    assert "waiting for them and adopting their outputs" in out, tail(again)
    for job in orphans:
        assert f"Slurm job {job['JobID']} ({job['Comment']}) COMPLETED: its output is adopted" in out, tail(again)
    # no shard submitted again: the rerun ran only what came after the shards
    assert not [c for c in sbatch_calls(again) if rule_of(c) == "run_shard"], sbatch_calls(again)
    assert {rule_of(c) for c in sbatch_calls(again)} == {"accuracy"}, sbatch_calls(again)
    # the adopted outputs are the orphans' own, and nothing of them is marked incomplete
    recs = [json.loads(f.read_text()) for f in wd.glob(f"results/runs/{CFG}/*/*/shard*/shard.json")]
    assert sorted(str(r["slurm_job_id"]) for r in recs) == orphan_ids
    assert not incomplete_markers(wd)
    assert (wd / "results" / "report" / "report.md").exists()


def test_a_shard_past_its_time_limit_says_so_counts_for_nothing_and_its_retry_gets_more_time(
    slurm_cluster,  # noqa: F811
    demo_run,
    tmp_path,
):
    """Issue 14, item 3. GPU jobs get a 2-minute limit (runtime_min: 2; Slurm's shortest is 1,
    too short for the other shards on 2 shared cores); performance shard 0 is held 200 s
    before its output's rename on its first attempt only. Slurm ends it (TIMEOUT: SIGTERM,
    SIGKILL KillWait=5 s later); its Slurm log says it hit the limit, nothing of it is kept,
    and the retry asks for twice the time (runtime x attempt) and finishes. The steps before
    the engine build come from the module's demo run (the new limit rebuilds the engine)."""
    wd = from_demo_run(demo_run[0], tmp_path / "demo")
    short_limit = wd / "short-limit.yaml"
    short_limit.write_text(yaml.safe_dump({"gpu_types": {"gb300": {"slurm": {"runtime_min": 2}}}}))
    # shard 0's run dir, whatever its settings variant (fnmatch: * also spans the variant level)
    shard0_pattern = Path("results", "runs", CFG, "*", "performance", "shard0")
    env = snakemake_env(
        RACKBENCH_FAULT_PAUSE_BEFORE_RENAME_S="200",
        RACKBENCH_FAULT_PAUSE_ONLY=str(wd / shard0_pattern),
        RACKBENCH_FAULT_PAUSE_ONCE=str(wd / "held-once"),
    )
    p = run_snakemake([*DEMO_ARGS, str(short_limit)], cwd=wd, timeout=DEMO_TIMEOUT + 600, env=env)
    assert p.returncode == 0, tail(p)
    assert (wd / "held-once").exists(), "the slow attempt never ran"
    calls = [c for c in sbatch_calls(p) if rule_of(c) == "run_shard" and comment_of(c).endswith("_performance_0")]
    assert len(calls) == 2, calls
    (shard0,) = (d.relative_to(wd) for d in wd.glob(str(shard0_pattern)))
    assert "-t 2 " in calls[0] and "-t 4 " in calls[1], calls  # the retry asks for more time
    jobs = sorted(
        (j for j in sacct(slurm_run_id(p)) if j["Comment"] == comment_of(calls[0])), key=lambda j: int(j["JobIDRaw"])
    )
    assert [j["State"].split()[0] for j in jobs] == ["TIMEOUT", "COMPLETED"], jobs
    timed_out, retried = (j["JobIDRaw"] for j in jobs)
    slurm_log = logs_of(wd / ".snakemake" / "slurm_logs" / "rule_run_shard")[timed_out].read_text()
    assert f"rackbench: Slurm job {timed_out} hit its time limit" in slurm_log, slurm_log[-3000:]
    assert f"{shard0} not finished; partial output removed, nothing counts as done" in slurm_log
    # what counts is the retry's output alone
    assert str(json.loads((wd / shard0 / "shard.json").read_text())["slurm_job_id"]) == retried
    assert not list((wd / shard0).parent.glob(".shard0.tmp-*"))
    assert (wd / "results" / "report" / "report.md").exists()
