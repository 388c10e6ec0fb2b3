"""rackbench.rack: one LoadGen over several engine servers, and its faults (issue 10).

Real parts: real rackbench.serve server processes (the zero-cost ``instant`` backend, with a
delay so requests are open when a server is killed), real HTTP, real LoadGen. The demo's own
engine behind the same servers is covered by the demo run (tests/test_workflow.py)."""

import json
import os
import signal
import threading
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rackbench import launch, paths, rack

N_SAMPLES = 40


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "samples.parquet"
    prompts = [[1 + (i * 7 + j) % 50 for j in range(5 + i % 9)] for i in range(N_SAMPLES)]
    pq.write_table(pa.table({"tok_input": pa.array(prompts, pa.list_(pa.int64()))}), path)
    return path


def _group(tmp_path, servers=2, **settings):
    specs = rack.server_specs(
        kind="rackbench",
        servers=servers,
        gpus_per_server=0,
        launcher="local",
        backend="instant",
        engine_settings={"output_len": 4, **settings},
    )
    for spec in specs:  # the servers import this checkout's rackbench
        spec.env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    return launch.ServerGroup(specs, log_dir=tmp_path / "server-logs", term_grace_s=5)


def _run(group, dataset, out, scenario="Offline", target_qps=None, modes=("performance",)):
    return rack.run_rack(
        group,
        dataset=dataset,
        out_dir=out,
        scenario=scenario,
        target_qps=target_qps,
        modes=modes,
        batch_size=8,
        max_new_tokens=4,
        ready_timeout=60,
        min_duration_ms=0,
        min_query_count=1,
        offline_expected_qps=100,
        progress_interval_s=60,
    )


def _pids(group):
    return [p.pid for p in group.procs.values()]


def _all_gone(pids, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("scenario,qps", [("Offline", None), ("Server", 200.0)])
def test_one_loadgen_over_two_servers(tmp_path, dataset, scenario, qps):
    group = _group(tmp_path)
    out = tmp_path / paths.rack_run_name(scenario, qps)
    records = _run(group, dataset, out, scenario, qps, modes=("performance", "accuracy"))
    assert _all_gone(_pids(group)), "a server outlived the run"
    for mode in ("performance", "accuracy"):
        assert records[mode]["completed_samples"] == N_SAMPLES
        assert records[mode]["num_shards"] == 1 and records[mode]["method"] == "one_loadgen"
        for name in paths.RACK_MODE_FILES:
            assert (out / mode / name).is_file(), name
        endpoints = json.loads((out / mode / paths.ENDPOINTS_FILE).read_text())["endpoints"]
        assert len(endpoints) == 2 and all(ep["samples"] > 0 for ep in endpoints)
        assert sum(ep["samples"] for ep in endpoints) == N_SAMPLES
        assert json.loads((out / mode / paths.ENDPOINTS_FILE).read_text())["stream"] is (scenario != "Offline")
    assert records["performance"]["loadgen"]["scenario"] == scenario


def test_server_killed_mid_run_names_it_tears_down_and_keeps_earlier_results(tmp_path, dataset):
    out = tmp_path / "Offline"
    _run(_group(tmp_path), dataset, out)  # an earlier, complete result
    before = {p.name: p.read_bytes() for p in (out / "performance").iterdir()}

    group = _group(tmp_path, delay_s=0.3)  # requests stay open long enough to kill a server under them
    victim = {}

    def kill_when_busy():
        while not group.procs or any(p.poll() is not None for p in group.procs.values()):
            time.sleep(0.05)
        time.sleep(1.5)  # ready and serving
        proc = group.procs["server1"]
        victim["url"] = group.specs[1].url
        os.killpg(proc.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    started = time.monotonic()
    with pytest.raises(rack.RackError) as err:
        rack.run_rack(
            group,
            dataset=dataset,
            out_dir=out,
            scenario="Offline",
            target_qps=None,
            modes=("performance",),
            batch_size=2,
            max_new_tokens=4,
            ready_timeout=60,
            min_duration_ms=0,
            min_query_count=1,
            offline_expected_qps=100,
        )
    assert time.monotonic() - started < 60, "the run hung after the server died"
    message = str(err.value)
    assert "INVALID" in message and victim["url"] in message and "server1" in message, message
    assert _all_gone(_pids(group)), "the other servers were not torn down"
    after = {p.name: p.read_bytes() for p in (out / "performance").iterdir()}
    assert after == before, "the earlier result was touched"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".Offline") and p.name.endswith("tmp")]


def test_cli_reports_a_server_that_never_starts(tmp_path, dataset, capsys):
    rc = rack.main(
        [
            "--dataset",
            str(dataset),
            "--out",
            str(tmp_path / "Offline"),
            "--scenario",
            "Offline",
            "--servers",
            "1",
            "--server-kind",
            "command",
            "--server-command",
            "false --port {port}",
            "--launcher",
            "local",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "4",
            "--ready-timeout",
            "20",
        ]
    )
    assert rc == 2
    assert "exited before it became ready" in capsys.readouterr().err
    assert not (tmp_path / "Offline").exists()
