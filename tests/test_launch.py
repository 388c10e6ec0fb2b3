"""rackbench.launch: command lines (srun steps, trtllm-serve against facts from TensorRT-LLM
source), ports, and teardown of real local server processes (success, failure, SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from helpers import ROOT, alive, python_env, wait_gone
from rackbench import launch
from rackbench.endpoints import EndpointError, EndpointPool

SPEC = yaml.safe_load((ROOT / "tests/contracts/trtllm_serve_1_2.yaml").read_text())


# --------------------------------------------------------------------------- command lines


def test_srun_step_command_line():
    argv = launch.srun_command(
        ["python", "-m", "rackbench.serve", "--port", "8001"],
        node="gpu-07",
        gpus=1,
        cpus=8,
        mem="100G",
        job_name="rackbench-server3",
        output="/logs/server3.log",
    )
    assert argv == [
        "srun",
        "--exact",
        "--nodes=1",
        "--ntasks=1",
        "--nodelist=gpu-07",
        "--gres=gpu:1",
        "--job-name=rackbench-server3",
        "--kill-on-bad-exit=1",
        "--cpus-per-task=8",
        "--mem=100G",
        "--output=/logs/server3.log",
        "python",
        "-m",
        "rackbench.serve",
        "--port",
        "8001",
    ]


def test_slurm_specs_place_servers_per_node_on_distinct_ports():
    specs = launch.slurm_specs(
        lambda host, port: ["serve", host, str(port)],
        nodes=["n0", "n1"],
        servers_per_node=4,
        gpus_per_server=1,
        base_port=8000,
        log_dir="/logs",
    )
    assert [s.url for s in specs] == [f"http://n{n}:{8000 + 4 * n + k}" for n in range(2) for k in range(4)]
    assert all(s.slurm for s in specs)
    first = specs[5].argv
    assert first[:6] == ["srun", "--exact", "--nodes=1", "--ntasks=1", "--nodelist=n1", "--gres=gpu:1"]
    assert "--job-name=rackbench-server5" in first and "--output=/logs/server5.log" in first
    assert first[-3:] == ["serve", "0.0.0.0", "8005"]  # listens on the node's network


def test_trtllm_serve_command_uses_only_options_trtllm_serve_has(tmp_path):
    opts = tmp_path / "llm_api_options.yaml"
    argv = launch.trtllm_serve_command(
        "/engines/llama2-70b",
        host="0.0.0.0",
        port=8000,
        backend="pytorch",
        tp_size=1,
        max_batch_size=2048,
        max_num_tokens=8192,
        extra_llm_api_options=opts,
        tokenizer="/models/llama2-70b",
    )
    assert argv[0] == SPEC["llmapi_launch"]["executable"]
    assert argv[1] == SPEC["trtllm_serve"]["executable"] and argv[2] == "/engines/llama2-70b"
    known = SPEC["trtllm_serve"]["options"]
    flags = [a for a in argv[3:] if a.startswith("--")]
    assert flags and all(f in known for f in flags), [f for f in flags if f not in known]
    assert argv[argv.index("--backend") + 1] in known["--backend"]["choices"]
    assert argv[argv.index("--extra_llm_api_options") + 1] == str(opts)
    assert argv[argv.index("--port") + 1] == "8000"
    assert "trtllm-llmapi-launch" not in launch.trtllm_serve_command("m", host="h", port=1, wrapper=False)


def test_the_pool_sends_trtllm_serve_only_fields_it_accepts_and_reads_its_token_ids():
    fields = SPEC["completion_request"]["fields"]
    pool = EndpointPool(["http://127.0.0.1:9"], stream=True)
    try:
        from rackbench.endpoints import _Request

        body = pool._body([_Request([1, 2, 3], 8, None, None, None), _Request([4, 5], 8, None, None, None)])
    finally:
        pool.close()
    assert set(body) <= set(fields), set(body) - set(fields)
    assert body["prompt"] == [[1, 2, 3], [4, 5]]  # List[List[int]] is a CompletionRequest prompt type
    assert body["detokenize"] is False and SPEC["completion_response"]["token_ids_when"] == "detokenize == false"
    assert "token_ids" in SPEC["completion_response"]["choice_fields"]
    assert "token_ids" in SPEC["completion_stream"]["choice_fields"]
    assert launch.rackbench_serve_command("/e", host="h", port=1)[:3] == [sys.executable, "-m", "rackbench.serve"]


def test_rackbench_serve_accepts_what_the_pool_sends_to_trtllm_serve():
    from rackbench import serve

    assert serve.HEALTH_ROUTE == SPEC["routes"]["health"]["path"]
    assert serve.COMPLETIONS_ROUTE == SPEC["routes"]["completions"]["path"]
    assert serve.REQUEST_FIELDS <= set(SPEC["completion_request"]["fields"])  # a subset of trtllm-serve's


def test_template_command_for_other_servers():
    argv = launch.template_command(
        "vllm serve {model} --host {host} --port {port} --tensor-parallel-size 1", host="0.0.0.0", port=8100, model="/m"
    )
    assert argv == ["vllm", "serve", "/m", "--host", "0.0.0.0", "--port", "8100", "--tensor-parallel-size", "1"]
    with pytest.raises(launch.LaunchError, match="unknown placeholder"):
        launch.template_command("sglang --p {prot}", host="h", port=1)


# --------------------------------------------------------------------------- ports


def test_a_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(launch.LaunchError, match=f"port {port} on 127.0.0.1 is already in use"):
            launch.local_rackbench_specs(1, "/engine", ports=[port])
        # the server itself, started on the taken port anyway, exits at once naming it
        spec = launch.ServerSpec(
            "server0",
            [sys.executable, "-m", "rackbench.serve", "--backend", "instant", "--port", str(port)],
            "127.0.0.1",
            port,
            env=python_env(),
        )
        group = launch.ServerGroup([spec], log_dir=tmp_path)
        with group, pytest.raises(EndpointError, match="exited with code") as err:
            group.wait_ready(60)
        assert f"cannot bind 127.0.0.1:{port}" in str(err.value)  # the server's own message, from its log
    ports = launch.free_ports(16)
    assert len(set(ports)) == 16


def test_chosen_ports_are_free_and_below_the_ephemeral_range(tmp_path, monkeypatch):
    """Outgoing connections take ephemeral ports at any moment, so a port chosen now for a
    server that binds it later must not be one of them."""
    low = int(launch.EPHEMERAL_PORT_RANGE.read_text().split()[0]) if launch.EPHEMERAL_PORT_RANGE.exists() else 32768
    for ports in (launch.free_ports(8), launch.free_ports(3, "0.0.0.0", consecutive=True), [launch.free_port()]):
        assert all(launch.SERVER_PORT_FLOOR <= p < low for p in ports), ports
        for port in ports:
            launch.ensure_port_free("127.0.0.1", port)
    block = launch.free_ports(3, "0.0.0.0", consecutive=True)
    assert block == list(range(block[0], block[0] + 3))
    with socket.socket() as taken:  # a port in use is never chosen: here 1 of the 5 in range
        taken.bind(("127.0.0.1", block[0]))
        taken.listen()
        (tmp_path / "range").write_text(f"{block[0] + 5}\t60999\n")
        monkeypatch.setattr(launch, "EPHEMERAL_PORT_RANGE", tmp_path / "range")
        monkeypatch.setattr(launch, "SERVER_PORT_FLOOR", block[0])
        chosen = {launch.free_port() for _ in range(40)}
        assert block[0] not in chosen and chosen <= set(range(block[0] + 1, block[0] + 5)), chosen


# --------------------------------------------------------------------------- teardown


def _launch_two_instant_servers(tmp_path, urls_out, *options_then_command):
    """``python -m rackbench.launch local`` with 2 instant servers, then its further options and ``-- command``."""
    return [
        sys.executable,
        "-m",
        "rackbench.launch",
        "local",
        "--servers",
        "2",
        "--engine-dir",
        str(tmp_path),
        "--backend",
        "instant",
        "--ready-timeout",
        "60",
        "--urls-out",
        str(urls_out),
        *options_then_command,
    ]


def test_launcher_runs_a_command_with_the_urls_then_tears_down(tmp_path):
    out = tmp_path / "urls.json"
    seen = tmp_path / "seen.txt"
    cmd = _launch_two_instant_servers(
        tmp_path,
        out,
        "--log-dir",
        str(tmp_path / "logs"),
        "--",
        sys.executable,
        "-c",
        f"import os; open({str(seen)!r}, 'w').write(os.environ['{launch.ENDPOINTS_ENV}'])",
    )
    proc = subprocess.run(cmd, env=python_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    urls = json.loads(out.read_text())["endpoints"]
    assert len(urls) == 2 and seen.read_text() == ",".join(urls)
    for url in urls:  # nobody listens any more
        host, port = url.removeprefix("http://").split(":")
        with socket.socket() as s:
            assert s.connect_ex((host, int(port))) != 0


def test_sigterm_to_the_launcher_tears_every_server_down(tmp_path):
    cmd = _launch_two_instant_servers(
        tmp_path, tmp_path / "urls.json", "--", sys.executable, "-c", "import time; time.sleep(600)"
    )
    proc = subprocess.Popen(cmd, env=python_env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "urls.json").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert (tmp_path / "urls.json").exists(), proc.stderr.read() if proc.poll() is not None else "not ready"
        time.sleep(0.5)
        family = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert len(family) >= 3  # 2 servers + the command
        proc.send_signal(signal.SIGTERM)  # what scancel sends the batch script
        proc.wait(timeout=60)
        assert proc.returncode != 0
        left = wait_gone(family, 30, poll=0.2)
        assert not left, f"left running: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_teardown_after_a_failure_inside_the_group(tmp_path):
    specs = launch.local_rackbench_specs(2, None, backend="instant")
    for spec in specs:
        spec.env = python_env()
    group = launch.ServerGroup(specs, log_dir=tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="the harness failed"):
        with group:
            group.wait_ready(60)
            raise RuntimeError("the harness failed")
    assert not alive([p.pid for p in group.procs.values()])
    assert signal.getsignal(signal.SIGTERM) is before  # the launcher's handler is gone again


def test_scancel_steps_cancels_the_named_steps_still_listed(tmp_path, monkeypatch):
    """With fake squeue/scancel on PATH (fakes of Slurm's CLI, named as such): the step ids
    listed under our step names are the ones cancelled."""
    calls = tmp_path / "scancel.calls"
    (tmp_path / "squeue").write_text(
        "#!/bin/sh\n# fake squeue for this test\n"
        "printf '41.0 rackbench-server0\\n41.1 rackbench-server1\\n41.2 other\\n'\n"
    )
    (tmp_path / "scancel").write_text(f'#!/bin/sh\n# fake scancel for this test\necho "$@" >> {calls}\n')
    for f in ("squeue", "scancel"):
        (tmp_path / f).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    cancelled = launch.scancel_steps(["rackbench-server0", "rackbench-server1"], env={"SLURM_JOB_ID": "41"})
    assert cancelled == ["41.0", "41.1"]
    assert calls.read_text().split() == ["41.0", "41.1"]
    assert launch.scancel_steps(["rackbench-server0"], env={}) == []  # outside an allocation: nothing
