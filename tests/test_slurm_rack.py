"""A rack run inside one allocation of the real test Slurm cluster (tests/slurm/cluster.py).

One ``sbatch`` job (2 of the node's fake gb300 GPUs) runs ``python -m rackbench.launch slurm``,
which starts 2 ``rackbench.serve`` servers as ``srun --exact`` job steps, each bound to its own
GPU, polls their /health, then runs ONE LoadGen (tests/slurm/rack_client.py: harness.run_shard
over rackbench.endpoints.EndpointPool) against both. Checked: the tokens LoadGen recorded equal
the demo engine's own output, both endpoints served, each step saw only its GPU; and that no
server process or job step is left after success, after a server is killed mid-run (the error
names its endpoint, no hang), and after ``scancel`` of the allocation.

Two Slurm nodes: two slurmd on this machine (Debian's slurmd 22.05 is built with
--enable-multiple-slurmd), in the test cluster's "rack" partition (docs/slurm.md).
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import ROOT, make_demo_model, python_env
from rackbench import launch
from slurm import cluster
from slurm.fixtures import slurm_cluster  # noqa: F401  (the session fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CLIENT = ROOT / "tests" / "slurm" / "rack_client.py"
MAX_NEW = 16
SETTINGS = {"torch_threads": 1}
NODES = 2  # the test cluster's two slurmd (tests/slurm/cluster.py: EXTRA_NODES)
SERVERS = NODES  # one server per node
JOB_NAME = "rackbench-rack-test"
READY_TIMEOUT = 240  # model load on 2 busy cores


def _env() -> dict:
    env = python_env(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for k in [k for k in env if k.startswith("SLURM_")]:
        env.pop(k)
    return env


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    return make_demo_model(tmp_path_factory.mktemp("rack-model") / "model", env=_env())


@pytest.fixture(scope="module")
def samples(demo_model, tmp_path_factory):
    """A few demo prompts as the harness's samples parquet (the dataset's columns)."""
    from tokenizers import Tokenizer

    from rackbench.demo import corpus

    tok = Tokenizer.from_file(str(demo_model / "tokenizer.json"))
    texts = [" ".join(doc.split()[:n]) for doc, n in zip(corpus(0)[:6], range(4, 40, 6))]
    prompts = [[1] + tok.encode(t, add_special_tokens=False).ids for t in texts]  # <s> + text
    path = tmp_path_factory.mktemp("rack-data") / "samples.parquet"
    pq.write_table(
        pa.table({"input": texts, "tok_input": pa.array(prompts, pa.list_(pa.int32())), "output": ["-"] * len(texts)}),
        path,
    )
    return path, prompts


@pytest.fixture(scope="module")
def direct(demo_model, samples):
    """The engine's own tokens, in this process, no HTTP, no LoadGen."""
    from rackbench.engines import generate, reference

    engine = reference.load(demo_model, record={}, gpu_ids=[], settings=SETTINGS)
    try:
        return generate(engine, samples[1], MAX_NEW)
    finally:
        engine.close()


def _base_port() -> int:
    """A port p with p .. p+SERVERS-1 free (server i listens on base + i)."""
    return launch.free_ports(SERVERS, "0.0.0.0", consecutive=True)[0]


def _submit(wd: Path, engine_dir: Path, *, backend: str, settings: dict, client_args: list[str]) -> tuple[str, int]:
    """sbatch the rack run: one allocation of 2 nodes, a GPU each; the launcher starts the servers as srun steps."""
    base = _base_port()
    launcher = [
        sys.executable,
        "-m",
        "rackbench.launch",
        "slurm",
        "--engine-dir",
        str(engine_dir),
        "--backend",
        backend,
        "--settings",
        json.dumps(settings),
        "--servers-per-node",
        str(SERVERS // NODES),
        "--gpus-per-server",
        "1",
        "--cpus-per-server",
        "1",
        "--mem-per-server",
        "1000",
        "--base-port",
        str(base),
        "--ready-timeout",
        str(READY_TIMEOUT),
        "--log-dir",
        str(wd / "logs"),
        "--urls-out",
        str(wd / "urls.json"),
        "--",
        sys.executable,
        str(CLIENT),
        "--out",
        str(wd / "loadgen"),
        *client_args,
    ]
    sbatch = [
        "sbatch",
        "--parsable",
        f"--job-name={JOB_NAME}",
        f"--partition={cluster.RACK_PARTITION}",
        f"--nodes={NODES}",
        "--ntasks-per-node=1",
        "--cpus-per-task=2",
        "--gpus-per-node=gb300:1",
        "--mem=2000",
        "--time=5",
        f"--chdir={wd}",
        f"--output={wd / 'job.log'}",
        "--wrap",
        "exec " + shlex.join(launcher),
    ]
    out = subprocess.run(sbatch, capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0], base


def _job_state(job: str) -> str:
    """squeue's state while the job is listed as unfinished, else sacct's final state."""
    q = subprocess.run(["squeue", "-h", "-j", job, "-t", "PD,R,CG", "-o", "%T"], capture_output=True, text=True)
    if q.stdout.strip():
        return q.stdout.strip()
    a = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "State,ExitCode"], capture_output=True, text=True)
    return a.stdout.strip() or "UNKNOWN"


def _wait_finished(job: str, timeout: float, wd: Path) -> tuple[str, float]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        state = _job_state(job)
        if state.split("|")[0].split()[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY"):
            return state, time.monotonic() - t0
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} not finished after {timeout}s ({_job_state(job)}):\n{_log(wd)}")


def _wait_for(path: Path, job: str, wd: Path, timeout: float = READY_TIMEOUT + 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} not written after {timeout}s:\n{_log(wd)}"
        assert _job_state(job).split()[0] in ("PENDING", "RUNNING"), f"job ended early:\n{_log(wd)}"
        time.sleep(0.5)


def _log(wd: Path) -> str:
    parts = []
    for f in [wd / "job.log", *sorted((wd / "logs").glob("*.log"))]:
        if f.exists():
            parts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-40:]))
    return "\n".join(parts)


def _processes_of(engine_dir: Path, servers_only: bool = False) -> list[psutil.Process]:
    """Live processes naming this test's engine dir (other sessions run servers of their own):
    the rackbench.serve servers (``servers_only``), else also their srun and shell."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if str(engine_dir) not in cmd or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if not servers_only or cmd[1:3] == ["-m", "rackbench.serve"]:
            found.append(proc)
    return found


def _servers_of(engine_dir: Path) -> list[psutil.Process]:
    return _processes_of(engine_dir, servers_only=True)


def _assert_nothing_left(job: str, engine_dir: Path, wd: Path, wait_s: float = 20) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        servers = _processes_of(engine_dir)  # servers, their srun, their shell
        steps = subprocess.run(["squeue", "-h", "--steps", "-j", job], capture_output=True, text=True).stdout.strip()
        stepds = [
            p.pid
            for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "slurmstepd" and any(f"[{job}." in c for c in p.info["cmdline"] or [])
        ]
        if not (servers or steps or stepds) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not servers, f"server processes left running: {[(p.pid, p.name()) for p in servers]}\n{_log(wd)}"
    assert not steps, f"job steps still listed:\n{steps}"
    assert not stepds, f"slurmstepd of job {job} still running: {stepds}"


def _step_bindings(wd: Path) -> dict[str, dict]:
    out = {}
    for i in range(SERVERS):
        banner = launch.parse_step_banner((wd / "logs" / f"server{i}.log").read_text(errors="replace"))
        assert banner, f"server{i}: no {launch.STEP_BANNER} line:\n{_log(wd)}"
        out[f"server{i}"] = banner
    return out


def test_one_loadgen_drives_srun_step_servers_and_records_the_engine_tokens(
    slurm_cluster,  # noqa: F811
    demo_model,
    samples,
    direct,
    tmp_path,
):
    ds, prompts = samples
    job, base = _submit(
        tmp_path,
        demo_model,
        backend="reference",
        settings=SETTINGS,
        client_args=["--samples", str(ds), "--mode", "accuracy", "--max-new-tokens", str(MAX_NEW)],
    )
    state, elapsed = _wait_finished(job, READY_TIMEOUT + 120, tmp_path)
    assert state.startswith("COMPLETED|0:0"), f"{state}\n{_log(tmp_path)}"
    log = (tmp_path / "job.log").read_text()

    # the srun lines the launcher ran (Slurm 22.05 accepted them: the servers came up)
    sruns = [line for line in log.splitlines() if line.startswith("rackbench.launch: server") and " srun " in line]
    assert len(sruns) == SERVERS, log
    nodes = [slurm_cluster.host, *cluster.extra_node_names(slurm_cluster.host)]
    for i, line in enumerate(sruns):
        for flag in (
            "--exact",
            "--nodes=1",
            "--ntasks=1",
            f"--nodelist={nodes[i]}",
            "--gres=gpu:1",
            "--kill-on-bad-exit=1",
            "--cpus-per-task=1",
            "--mem=1000",
        ):
            assert f" {flag} " in line, (flag, line)
        assert f"--port {base + i}" in line

    # each step on its own node of the allocation, bound to one GPU there
    bindings = _step_bindings(tmp_path)
    assert [b["node"] for b in bindings.values()] == nodes, bindings
    assert all(b["job"] == job for b in bindings.values()), bindings
    for b in bindings.values():
        assert b["SLURM_STEP_GPUS"] and "," not in b["SLURM_STEP_GPUS"], b
        assert b["CUDA_VISIBLE_DEVICES"] and "," not in b["CUDA_VISIBLE_DEVICES"], b
    assert len({b["step"] for b in bindings.values()}) == SERVERS

    # one LoadGen over both endpoints; the tokens it recorded are the engine's own
    urls = json.loads((tmp_path / "urls.json").read_text())["endpoints"]
    addresses = launch.node_addresses(nodes)  # the extra node's NodeAddr is 127.0.0.1
    assert urls == [f"http://{addresses[nodes[i]]}:{base + i}" for i in range(SERVERS)]
    assert f"one LoadGen over {SERVERS} endpoint(s)" in log
    entries = json.loads((tmp_path / "loadgen" / "mlperf_log_accuracy.json").read_text())
    got = {e["qsl_idx"]: np.frombuffer(bytes.fromhex(e["data"]), np.int32).tolist() for e in entries}
    assert got == dict(enumerate(direct)), log
    assert any(direct)
    stats = json.loads((tmp_path / "endpoints.json").read_text())["endpoints"]
    assert [s["url"] for s in stats] == urls
    assert all(s["samples"] > 0 and s["errors"] == 0 for s in stats), stats
    assert sum(s["samples"] for s in stats) == len(prompts)
    assert sum(s["output_tokens"] for s in stats) == sum(map(len, direct))
    _assert_nothing_left(job, demo_model, tmp_path)


def _instant_job(tmp_path, engine_dir):
    """A long Offline run on zero-cost servers that answer after 0.5 s, 4 samples in flight."""
    ds = tmp_path / "samples.parquet"
    prompts = [[1, 2 + i % 7, 3] for i in range(40)]
    pq.write_table(
        pa.table({"input": ["-"] * 40, "tok_input": pa.array(prompts, pa.list_(pa.int32())), "output": ["-"] * 40}),
        ds,
    )
    return _submit(
        tmp_path,
        engine_dir,
        backend="instant",
        settings={"delay_s": 0.5, "output_len": 2},
        client_args=[
            "--samples",
            str(ds),
            "--mode",
            "performance",
            "--max-new-tokens",
            "4",
            "--min-query-count",
            "400",
            "--max-in-flight",
            "4",
        ],
    )


def test_a_server_killed_mid_run_fails_the_run_naming_its_endpoint_and_leaves_nothing(
    slurm_cluster,  # noqa: F811
    tmp_path,
):
    engine_dir = tmp_path / "instant-engine"
    engine_dir.mkdir()
    job, base = _instant_job(tmp_path, engine_dir)
    _wait_for(tmp_path / "urls.json", job, tmp_path)
    time.sleep(2)  # the LoadGen is sending
    assert _job_state(job).split()[0] == "RUNNING", _log(tmp_path)
    victim = [p for p in _servers_of(engine_dir) if p.cmdline()[p.cmdline().index("--port") + 1] == str(base + 1)]
    assert len(victim) == 1, _servers_of(engine_dir)
    victim[0].send_signal(signal.SIGKILL)
    state, elapsed = _wait_finished(job, 90, tmp_path)
    log = (tmp_path / "job.log").read_text()
    assert state.startswith("FAILED"), f"{state}\n{log}"
    killed_url = json.loads((tmp_path / "urls.json").read_text())["endpoints"][1]
    assert killed_url.endswith(f":{base + 1}")
    assert killed_url in log and "died" in log, log
    assert not (tmp_path / "loadgen").exists()  # no half-written LoadGen output
    _assert_nothing_left(job, engine_dir, tmp_path)


def test_scancel_of_the_allocation_leaves_no_server_and_no_step(slurm_cluster, tmp_path):  # noqa: F811
    engine_dir = tmp_path / "instant-engine"
    engine_dir.mkdir()
    job, _ = _instant_job(tmp_path, engine_dir)
    _wait_for(tmp_path / "urls.json", job, tmp_path)
    assert len(_servers_of(engine_dir)) == SERVERS
    steps = subprocess.run(["squeue", "-h", "--steps", "-j", job, "-o", "%i %j"], capture_output=True, text=True)
    assert sorted(line.split()[1] for line in steps.stdout.splitlines() if "rackbench-server" in line) == [
        f"rackbench-server{i}" for i in range(SERVERS)
    ], steps.stdout
    subprocess.run(["scancel", job], check=True)
    state, elapsed = _wait_finished(job, 60, tmp_path)
    assert state.startswith("CANCELLED"), state
    _assert_nothing_left(job, engine_dir, tmp_path)
