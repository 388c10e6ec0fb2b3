"""rackbench.rack: one LoadGen over several engine servers, and its faults (issue 10).

Real parts: real rackbench.serve server processes (the zero-cost ``instant`` backend, with a
delay so requests are open when a server is killed), real HTTP, real LoadGen, and TEST06's
own audit.config from ../shared/mlcommons-inference. The demo's own engine behind the same
servers is covered by the demo run (tests/test_workflow.py)."""

import json
import os
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from helpers import wait_gone
from rackbench import compliance, launch, paths, rack

N_SAMPLES = 40
INFERENCE = (ROOT.parent / "shared" / "mlcommons-inference").resolve()


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


def _run(group, dataset, out, runs=None, audit_config=None, batch_size=8, **options):
    return rack.run_rack(
        group,
        dataset=dataset,
        out_dir=out,
        runs=rack.run_list("Offline", None, accuracy=False) if runs is None else runs,
        audit_config=audit_config,
        batch_size=batch_size,
        max_new_tokens=4,
        ready_timeout=60,
        min_duration_ms=0,
        min_query_count=1,
        offline_expected_qps=100,
        progress_interval_s=60,
        **options,
    )


def _pids(group):
    return [p.pid for p in group.procs.values()]


def test_one_session_makes_every_run_over_two_servers_started_once(tmp_path, dataset):
    """Offline (performance, accuracy), Server (performance, accuracy) and a Server sweep point
    (performance), each one LoadGen over both servers, in one session: the servers start once
    and are gone after it."""
    runs = [
        *rack.run_list("Offline", None),
        *rack.run_list("Server", 200.0),
        *rack.run_list("Server", 100.0, accuracy=False),
    ]
    group = _group(tmp_path)
    started = []
    start = group.start
    group.start = lambda *a, **k: (started.append(1), start(*a, **k))[1]
    out = tmp_path / "runs"
    records = _run(group, dataset, out, runs)
    assert started == [1], "the servers were started more than once"
    assert not wait_gone(_pids(group), 10), "a server outlived the session"
    assert list(records) == ["Offline", "Server-qps200", "Server-qps100"]
    for run in runs:
        assert list(records[run["name"]]) == run["modes"]
        for mode in run["modes"]:
            _check_mode(records[run["name"]][mode], out / run["name"] / mode, run, samples=N_SAMPLES)
        assert records[run["name"]]["performance"]["loadgen"]["scenario"] == run["scenario"]


def test_offline_samples_waiting_for_a_server_go_out_as_one_request_of_several_prompts(tmp_path, dataset):
    """prompts_per_request: the same samples and outputs over far fewer HTTP requests (each a
    list of prompts); per server never more samples open than its share of max_in_flight."""
    out = tmp_path / "runs"
    records = _run(_group(tmp_path, delay_s=0.05), dataset, out, batch_size=8, prompts_per_request={"Offline": 4})
    record = records["Offline"]["performance"]
    _check_mode(record, out / "Offline" / "performance", rack.run_list("Offline", None)[0], samples=N_SAMPLES)
    assert record["prompts_per_request"] == 4
    stats = json.loads((out / "Offline" / "performance" / paths.ENDPOINTS_FILE).read_text())
    requests = sum(ep["requests"] for ep in stats["endpoints"])
    # 40 samples, 8 open per server in requests of at most 4: at least 10 requests, and far
    # fewer than one per sample (the delayed servers let samples wait and group)
    assert N_SAMPLES / 4 <= requests <= N_SAMPLES * 3 / 4, requests
    accuracy_run = rack.run_list("Offline", None)
    acc = _run(_group(tmp_path), dataset, tmp_path / "acc", runs=accuracy_run, prompts_per_request={"Offline": 4})[
        "Offline"
    ]["accuracy"]
    assert acc["completed_samples"] == N_SAMPLES  # every output came back to its own sample:
    logged = json.loads((tmp_path / "acc" / "Offline" / "accuracy" / "mlperf_log_accuracy.json").read_text())
    prompts = pq.read_table(dataset).column("tok_input").to_pylist()
    for entry in logged:  # the instant engine answers prompt[-1] + 1.. (rackbench.serve.InstantEngine)
        last = prompts[entry["qsl_idx"]][-1]
        ids = list(np.frombuffer(bytes.fromhex(entry["data"]), dtype=np.int32))
        assert ids == [last + 1 + i for i in range(4)], (entry["qsl_idx"], ids)


def test_cli_refuses_a_bad_prompts_per_request_before_starting_a_server(tmp_path, dataset, capsys):
    argv = ["--dataset", str(dataset), "--out", str(tmp_path / "o"), "--scenario", "Offline", "--servers", "1"]
    argv += ["--server-kind", "urls", "--urls", "http://127.0.0.1:9", "--batch-size", "2", "--max-new-tokens", "2"]
    assert rack.main([*argv, "--prompts-per-request-json", '{"Ofline": 2}']) == 2
    assert "unknown scenario 'Ofline'" in capsys.readouterr().err
    assert rack.main([*argv, "--prompts-per-request-json", '{"Offline": 0}']) == 2
    assert "Offline must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _check_mode(record, mode_dir, run, samples):
    assert record["completed_samples"] == samples
    assert record["num_shards"] == 1 and record["method"] == "one_loadgen"
    assert record["rack_run"] == run["name"]
    for name in paths.RACK_MODE_FILES:
        assert (mode_dir / name).is_file(), (mode_dir, name)
    stats = json.loads((mode_dir / paths.ENDPOINTS_FILE).read_text())
    assert len(stats["endpoints"]) == 2 and all(ep["samples"] > 0 for ep in stats["endpoints"])
    assert sum(ep["samples"] for ep in stats["endpoints"]) == samples
    assert stats["stream"] is (run["scenario"] != "Offline")


@pytest.mark.skipif(
    not INFERENCE.is_dir(), reason=f"{INFERENCE} (mlcommons/inference, TEST06's audit.config) is absent"
)
def test_a_sessions_test06_run_is_a_performance_run_under_test06s_audit_config(tmp_path, dataset):
    run = {**rack.run_list("Offline", None)[0], "modes": ["performance", "TEST06"]}
    out = tmp_path / "runs"
    records = _run(_group(tmp_path), dataset, out, [run], compliance.audit_config(INFERENCE))
    mode_dir = out / "Offline" / "TEST06"
    # LoadGen applied it: its min_query_count 100 > the 40 samples, so samples repeat
    _check_mode(records["Offline"]["TEST06"], mode_dir, run, samples=100)
    assert compliance.audit_config_read(mode_dir / "mlperf_log_detail.txt")
    assert (mode_dir / "audit.config").read_bytes() == compliance.audit_config(INFERENCE).read_bytes()
    assert (
        records["Offline"]["TEST06"]["test"] == compliance.TEST06
        and records["Offline"]["TEST06"]["mode"] == "performance"
    )
    assert "test" not in records["Offline"]["performance"]
    assert not compliance.audit_config_read(out / "Offline" / "performance" / "mlperf_log_detail.txt")


def test_a_session_refuses_bad_runs_before_starting_a_server(tmp_path, dataset):
    group = _group(tmp_path)
    bad = [
        ([], "at least one run"),
        (rack.run_list("Offline", None) * 2, "repeat"),
        ([{**rack.run_list("Server", 5.0)[0], "name": "Server-qps6"}], "does not match"),
        ([{**rack.run_list("Offline", None)[0], "modes": ["accuracy"]}], "performance needed"),
        ([{**rack.run_list("Offline", None)[0], "modes": ["performance", "TEST06"]}], "no --audit-config"),
    ]
    for runs, why in bad:
        with pytest.raises(rack.RackError, match=why):
            _run(group, dataset, tmp_path / "runs", runs)
    assert not group.procs and not (tmp_path / "runs").exists()


def test_server_killed_mid_run_names_it_tears_down_and_keeps_earlier_results(tmp_path, dataset):
    out = tmp_path / "runs"
    _run(_group(tmp_path), dataset, out)  # an earlier, complete result
    before = {p.name: p.read_bytes() for p in (out / "Offline" / "performance").iterdir()}

    group = _group(tmp_path, delay_s=0.3)  # requests stay open long enough to kill a server under them
    victim = {}

    def kill_when_busy():
        # the session's temporary dir appears once every server is ready: LoadGen starts then
        while not list(tmp_path.glob(".runs.tmp-*")):
            time.sleep(0.05)
        time.sleep(0.5)  # serving
        proc = group.procs["server1"]
        victim["url"] = group.specs[1].url
        os.killpg(proc.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    started = time.monotonic()
    with pytest.raises(rack.RackError) as err:
        _run(group, dataset, out, batch_size=2)
    assert time.monotonic() - started < 60, "the run hung after the server died"
    message = str(err.value)
    assert "INVALID" in message and victim["url"] in message and "server1" in message, message
    assert not wait_gone(_pids(group), 10), "the other servers were not torn down"
    after = {p.name: p.read_bytes() for p in (out / "Offline" / "performance").iterdir()}
    assert after == before, "the earlier result was touched"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".runs.tmp")], "a temporary session dir was left"


def test_cli_reports_a_server_that_never_starts(tmp_path, dataset, capsys):
    rc = rack.main(
        [
            "--dataset",
            str(dataset),
            "--out",
            str(tmp_path / "runs"),
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
    assert not (tmp_path / "runs").exists()


def test_more_connections_than_the_hard_open_file_limit_is_refused_naming_the_knobs(tmp_path, dataset):
    """Each open request is a connection: 72 servers x 3072 samples at one per request would
    need 221,184 descriptors. Over the hard limit, the session says so before any server starts."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    group = _group(tmp_path)
    too_many = (hard if hard != resource.RLIM_INFINITY else 1 << 40) + 1
    with pytest.raises(rack.RackError, match=r"hard limit .*rack_run.prompts_per_request"):
        _run(group, dataset, tmp_path / "o", batch_size=too_many)
    assert not group.procs and not (tmp_path / "o").exists()
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)


def test_a_low_soft_open_file_limit_is_raised_for_the_session(tmp_path, dataset):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        records = _run(_group(tmp_path), dataset, tmp_path / "o", batch_size=8)
        assert records["Offline"]["performance"]["completed_samples"] == N_SAMPLES
        raised = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raised == -(-16 // 1) + 2 + rack.FILE_DESCRIPTOR_MARGIN  # 16 in flight, 2 servers
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
