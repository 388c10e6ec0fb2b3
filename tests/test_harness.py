"""The offline harness through real LoadGen with a deterministic fake engine."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import MLPERF_LOGS, QUICK_LOADGEN, quick_loadgen_args
from rackbench.harness import HarnessError, parse_summary, run_shard, shard_gpu_ids
from rackbench.shards import shard_sample_indices

MAX_NEW = 12


class FakeEngine:
    """Deterministic: output length and ids are functions of the prompt alone."""

    def __init__(self, max_batch_size=8, crash_after_batches=None, delay_s=0.0):
        self.max_batch_size = max_batch_size
        self.crash_after_batches = crash_after_batches
        self.delay_s = delay_s
        self.batches: list[int] = []
        self.closed = False

    @staticmethod
    def output_for(prompt, max_new_tokens):
        length = 2 + (sum(prompt) + len(prompt)) % (max_new_tokens - 1)  # 2..max_new_tokens
        return [(prompt[0] * 7 + k) % 1000 for k in range(length)]

    def generate(self, prompts, max_new_tokens):
        if self.crash_after_batches is not None and len(self.batches) >= self.crash_after_batches:
            raise RuntimeError("simulated engine crash")
        assert all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompts)
        self.batches.append(len(prompts))
        if self.delay_s:
            time.sleep(self.delay_s)
        return [self.output_for(p, max_new_tokens) for p in prompts]

    def close(self):
        self.closed = True


class AsyncFakeEngine:
    """The Engine contract with its own thread: each request takes ``step_s`` per token, runs
    alongside the others (an in-flight batch), reports its first token, and answers as
    FakeEngine does. Records how many requests were in flight at most."""

    def __init__(self, max_in_flight=8, step_s=0.002):
        import queue
        import threading

        self.max_in_flight = max_in_flight
        self.step_s = step_s
        self._queue = queue.Queue()
        self._lock = threading.Lock()
        self.in_flight = 0
        self.peak_in_flight = 0
        self.first_tokens = 0
        self.closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def submit(self, prompt, max_new_tokens, *, on_done, on_error, on_first_token=None):
        assert isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self._queue.put((prompt, max_new_tokens, on_done, on_first_token))

    def _run(self):
        import queue

        running = []  # [tokens left, request]
        while True:
            try:
                while True:
                    item = self._queue.get(block=not running)
                    if item is None:
                        return
                    running.append([FakeEngine.output_for(item[0], item[1]), 0, item])
            except queue.Empty:
                pass
            time.sleep(self.step_s)
            for entry in list(running):
                out, k, (prompt, n, on_done, on_first) = entry
                entry[1] = k = k + 1
                if k == 1 and on_first is not None:
                    self.first_tokens += 1
                    on_first(out[0])
                if k >= len(out):
                    running.remove(entry)
                    with self._lock:
                        self.in_flight -= 1
                    on_done(out)
            self._step_done()

    def _step_done(self):
        """After each step's callbacks (BurstFakeEngine says so to its listeners)."""

    def close(self):
        self._queue.put(None)
        self._thread.join()
        self.closed = True


class BurstFakeEngine(AsyncFakeEngine):
    """AsyncFakeEngine that says when each step's callbacks are over (``add_burst_listener``,
    as EndpointPool does per HTTP response): the SUT then completes a step's samples in one
    LoadGen call."""

    def __init__(self, **kw):
        self.listeners = []
        super().__init__(**kw)

    def add_burst_listener(self, fn):
        self.listeners.append(fn)

    def _step_done(self):
        for fn in self.listeners:
            fn()


def make_dataset(path: Path, n: int = 30, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 1000, size=int(rng.integers(2, 15))).tolist() for _ in range(n)]
    pq.write_table(
        pa.table(
            {
                "input": [" ".join(map(str, p)) for p in prompts],
                "tok_input": pa.array(prompts, pa.list_(pa.int32())),
                "output": ["reference answer"] * n,
            }
        ),
        path,
    )
    return prompts


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "samples.parquet"
    return path, make_dataset(path)


def _run(engine, ds, out, mode="performance", shard_index=0, num_shards=2, shard_mode="split", **kw):
    args = dict(
        samples_parquet=ds,
        out_dir=out,
        mode=mode,
        shard_index=shard_index,
        num_shards=num_shards,
        shard_mode=shard_mode,
        batch_size=4,
        max_new_tokens=MAX_NEW,
        **QUICK_LOADGEN,
        metadata={"model": "fake", "recipe": "none", "backend": "fake", "gpu_type": "cpu", "gpus_per_shard": 1},
        log=lambda msg: None,
    )
    args.update(kw)
    return run_shard(engine, **args)


def test_performance_shard(tmp_path, dataset):
    ds, prompts = dataset
    out = tmp_path / "perf" / "shard1"
    engine = FakeEngine()
    record = _run(engine, ds, out, shard_index=1)

    for name in (
        "mlperf_log_summary.txt",
        "mlperf_log_detail.txt",
        "mlperf_log_accuracy.json",
        "shard.json",
        "samples.parquet",
        "provenance.json",
    ):
        assert (out / name).is_file(), name
    summary = (out / "mlperf_log_summary.txt").read_text()
    assert "Result is : VALID" in summary
    assert "Tokens per second" in summary
    assert json.loads((out / "shard.json").read_text()) == json.loads(json.dumps(record))

    indices = shard_sample_indices(len(prompts), 1, 2, "split")
    assert record["sample_indices"] == [indices[0], indices[-1] + 1]
    assert record["num_samples"] == len(indices)
    assert record["layout"] == "2x1" and record["model"] == "fake"
    assert record["loadgen"]["result"] == "VALID"
    assert record["loadgen"]["tokens_per_second"] > 0 and record["loadgen"]["samples_per_second"] > 0
    assert record["loadgen"]["settings"]["use_token_latencies"] is True
    assert record["started_at"] <= record["finished_at"]
    assert record["provenance"]["step"] == "run_shard"

    table = pq.read_table(out / "samples.parquet")
    assert table.schema.field("qsl_index").type == pa.int64()
    assert table.schema.field("sample_index").type == pa.int64()
    assert table.schema.field("input_tokens").type == pa.int32()
    assert table.schema.field("output_tokens").type == pa.int32()
    assert table.schema.field("completed_at").type == pa.float64()
    assert "output_ids" not in table.column_names
    rows = table.to_pylist()
    assert len(rows) == record["completed_samples"] == record["issued_samples"]
    # every shard sample issued at least once, and the counts follow the fake engine's lengths
    assert {r["sample_index"] for r in rows} == set(indices)
    expected_out = 0
    expected_in = 0
    for r in rows:
        assert r["sample_index"] == indices[r["qsl_index"]]
        prompt = prompts[r["sample_index"]]
        assert r["input_tokens"] == len(prompt)
        assert r["output_tokens"] == len(FakeEngine.output_for(prompt, MAX_NEW))
        assert record["started_at"] <= r["completed_at"] <= record["finished_at"]
        expected_out += len(FakeEngine.output_for(prompt, MAX_NEW))
        expected_in += len(prompt)
    assert record["output_tokens"] == expected_out == record["loadgen_counted_tokens"]
    assert record["short_outputs"] == 0 and record["loadgen"]["errors"] is False
    assert record["input_tokens"] == expected_in
    assert max(engine.batches) <= 4
    # LoadGen's own token count (from n_tokens): tokens/s / samples/s = tokens / samples (same duration)
    lg = record["loadgen"]
    assert lg["tokens_per_second"] / lg["samples_per_second"] == pytest.approx(
        expected_out / record["completed_samples"], rel=1e-4
    )


def test_short_outputs_flagged_like_loadgen(tmp_path, dataset):
    """LoadGen counts no tokens for 0/1-token samples and logs an error for each."""
    ds, prompts = dataset

    class ShortEngine(FakeEngine):
        def generate(self, prompts, max_new_tokens):
            return [[1] * (p[0] % 4) for p in prompts]  # 0..3 tokens

    record = _run(ShortEngine(), ds, tmp_path / "short", num_shards=1)
    lengths = [p[0] % 4 for p in prompts]
    assert record["output_tokens"] == sum(lengths)
    assert record["short_outputs"] == sum(1 for n in lengths if n < 2)
    assert record["loadgen_counted_tokens"] == sum(n for n in lengths if n >= 2)
    lg = record["loadgen"]
    assert record["short_outputs"] > 0 and lg["errors"] is True
    assert lg["tokens_per_second"] / lg["samples_per_second"] == pytest.approx(
        record["loadgen_counted_tokens"] / record["completed_samples"], rel=1e-4
    )


def test_accuracy_shard_logs_int32_outputs(tmp_path, dataset):
    ds, prompts = dataset
    out = tmp_path / "acc" / "shard0"
    record = _run(FakeEngine(), ds, out, mode="accuracy", shard_mode="replicate")
    # accuracy runs always split
    assert record["shard_mode"] == "split" and record["requested_shard_mode"] == "replicate"
    indices = shard_sample_indices(len(prompts), 0, 2, "split")
    entries = json.loads((out / "mlperf_log_accuracy.json").read_text())
    assert sorted(e["qsl_idx"] for e in entries) == list(range(len(indices)))
    for e in entries:
        expected = FakeEngine.output_for(prompts[indices[e["qsl_idx"]]], MAX_NEW)
        assert np.frombuffer(bytes.fromhex(e["data"]), np.int32).tolist() == expected
        assert e["token_count"] == len(expected)
    rows = pq.read_table(out / "samples.parquet").to_pylist()
    assert len(rows) == len(indices) == record["completed_samples"]
    for r in rows:
        assert r["output_ids"] == FakeEngine.output_for(prompts[r["sample_index"]], MAX_NEW)
    assert record["output_tokens"] == sum(len(FakeEngine.output_for(prompts[i], MAX_NEW)) for i in indices)


def test_split_shards_partition_and_replicate_covers_all(tmp_path, dataset):
    ds, prompts = dataset
    seen = []
    for i in range(3):
        rec = _run(FakeEngine(), ds, tmp_path / f"s{i}", mode="accuracy", shard_index=i, num_shards=3)
        rows = pq.read_table(tmp_path / f"s{i}" / "samples.parquet").column("sample_index").to_pylist()
        assert len(rows) == rec["num_samples"]
        seen.extend(rows)
    assert sorted(seen) == list(range(len(prompts)))

    rec = _run(FakeEngine(), ds, tmp_path / "rep1", shard_index=1, num_shards=3, shard_mode="replicate")
    assert rec["num_samples"] == len(prompts) and rec["sample_indices"] == [0, len(prompts)]
    rows = pq.read_table(tmp_path / "rep1" / "samples.parquet").column("sample_index").to_pylist()
    assert set(rows) == set(range(len(prompts)))


def test_engine_crash_leaves_nothing(tmp_path, dataset):
    ds, _ = dataset
    out = tmp_path / "runs" / "shard0"
    with pytest.raises(HarnessError, match="simulated engine crash"):
        _run(FakeEngine(crash_after_batches=1), ds, out)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # the temporary dir is gone too


def test_killed_shard_leaves_no_output(tmp_path, dataset):
    ds, _ = dataset
    out = tmp_path / "runs" / "shard0"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_harness import FakeEngine, _run
        _run(FakeEngine(delay_s=0.5), {str(ds)!r}, {str(out)!r}, progress_interval_s=0.1,
             log=lambda m: print(m, file=sys.stderr, flush=True))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    try:
        # wait for a progress line that shows samples in flight, then SIGKILL
        for line in proc.stderr:
            if "samples (" in line and "/15 samples" in line:
                break
        else:
            pytest.fail("the shard process ended before it reported progress")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = list(out.parent.iterdir())
    assert all(p.name.startswith(".shard0.tmp-") for p in leftovers)


def test_batch_size_over_engine_max(tmp_path, dataset):
    ds, _ = dataset
    with pytest.raises(HarnessError, match="exceeds the engine's max_in_flight 2"):
        _run(FakeEngine(max_batch_size=2), ds, tmp_path / "x", batch_size=4)
    assert not (tmp_path / "x").exists()


def test_progress_lines(tmp_path, dataset):
    ds, _ = dataset
    lines = []
    _run(FakeEngine(delay_s=0.05), ds, tmp_path / "p", progress_interval_s=0.05, log=lines.append)
    progress = [line for line in lines if "output tok/s" in line]
    assert progress and "15/15 samples (100.0%)" in progress[-1] and "ETA" in progress[-1]


def test_async_engine_stays_full_offline(tmp_path, dataset):
    """Offline through the submit contract: requests go in as soon as others finish, never
    more than max_in_flight at once, and every sample's answer is the engine's."""
    ds, prompts = dataset
    engine = AsyncFakeEngine()
    try:
        record = _run(engine, ds, tmp_path / "off", num_shards=1, batch_size=None, max_in_flight=5)
    finally:
        engine.close()
    assert record["max_in_flight"] == 5 and record["scenario"] == "Offline"
    assert engine.peak_in_flight == 5 and engine.first_tokens == 0  # no first-token events in Offline
    rows = pq.read_table(tmp_path / "off" / "samples.parquet").to_pylist()
    assert len(rows) == len(prompts) == record["completed_samples"]
    assert all(r["output_tokens"] == len(FakeEngine.output_for(prompts[r["sample_index"]], MAX_NEW)) for r in rows)
    assert record["loadgen"]["result"] == "VALID" and record["loadgen"]["scenario"] == "Offline"


@pytest.mark.parametrize(
    "scenario, key, ttft_ns, tpot_ns",
    [
        ("Server", "llama2-70b", 2_000_000_000, 200_000_000),
        ("Interactive", "llama2-70b-interactive", 450_000_000, 40_000_000),
    ],
)
def test_server_scenarios_report_token_latencies(tmp_path, dataset, scenario, key, ttft_ns, tpot_ns):
    ds, prompts = dataset
    engine = AsyncFakeEngine(step_s=0.001)
    try:
        record = _run(
            engine, ds, tmp_path / scenario, num_shards=1, scenario=scenario, target_qps=200, offline_expected_qps=None
        )
    finally:
        engine.close()
    lg = record["loadgen"]
    # LoadGen's own settings for the scenario (its mlperf.conf), and its own latency figures
    assert lg["settings"]["loadgen_config_key"] == key and lg["settings"]["loadgen_scenario"] == "Server"
    assert (lg["ttft_latency_ns"], lg["tpot_latency_ns"]) == (ttft_ns, tpot_ns)
    assert lg["scenario"] == "Server" and lg["target_qps"] == 200
    assert 0 < lg["ttft_p99_ns"] < 1_000_000_000 and 0 < lg["tpot_p99_ns"] < 1_000_000_000
    assert lg["samples_per_second"] > 0 and lg["tokens_per_second"] > 0
    assert engine.first_tokens == record["completed_samples"] == len(prompts)
    table = pq.read_table(tmp_path / scenario / "samples.parquet")
    first, done = table.column("first_token_at").to_numpy(), table.column("completed_at").to_numpy()
    assert (first <= done).all() and record["first_issue_at"] <= first.min()


def test_server_scenario_needs_a_target_qps(tmp_path, dataset):
    ds, _ = dataset
    with pytest.raises(HarnessError, match="target QPS"):
        _run(AsyncFakeEngine(), ds, tmp_path / "s", scenario="Server")
    assert not (tmp_path / "s").exists()


def _parse_shared_summary(scenario_dir: str) -> dict:
    """parse_summary of a published run's performance summary under ../shared/mlperf-logs."""
    path = MLPERF_LOGS / scenario_dir / "performance" / "run_1" / "mlperf_log_summary.txt"
    if not path.exists():
        pytest.skip("shared MLPerf logs not present")
    return parse_summary(path.read_text())


def test_parse_summary_server_log():
    parsed = _parse_shared_summary(
        "v6.0_NVIDIA_GB300-NVL72_x72_TRT_submission/closed/NVIDIA/results/GB300-NVL72_GB300-288GB_aarch64x72_TRT"
        "/llama2-70b-99/Server"
    )
    assert parsed["scenario"] == "Server" and parsed["result"] == "VALID"
    assert parsed["tokens_per_second"] == pytest.approx(868277.92)
    assert parsed["samples_per_second"] == pytest.approx(3187.30)
    assert parsed["performance_constraints_satisfied"] is True
    assert (parsed["ttft_p99_ns"], parsed["tpot_p99_ns"]) == (276316453, 40548358)
    assert (parsed["ttft_latency_ns"], parsed["tpot_latency_ns"]) == (2_000_000_000, 200_000_000)
    assert parsed["target_qps"] == 3200


def test_parse_summary_published_log():
    parsed = _parse_shared_summary("v5.1_NVIDIA_B200-SXM-180GBx8_TRT/llama2-70b-99/Offline")
    assert parsed["result"] == "VALID"
    assert parsed["tokens_per_second"] == pytest.approx(101527)
    assert parsed["samples_per_second"] == pytest.approx(371.423)


def test_shard_gpu_ids():
    assert shard_gpu_ids(4, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == [0, 1, 2, 3]
    assert shard_gpu_ids(1, {"CUDA_VISIBLE_DEVICES": ""}) == []


def test_cli_opens_engine_and_runs(tmp_path, dataset, monkeypatch):
    import types

    from rackbench import harness

    ds, prompts = dataset
    calls = {}
    engine = FakeEngine()

    def open_engine(engine_dir, *, gpu_ids, settings, gpu_types):
        calls.update(engine_dir=engine_dir, gpu_ids=gpu_ids, settings=settings, gpu_types=gpu_types)
        return engine

    monkeypatch.setitem(sys.modules, "rackbench.build_engine", types.SimpleNamespace(open_engine=open_engine))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    out = tmp_path / "cli" / "shard0"
    rc = harness.main(
        [
            "--engine-dir",
            str(tmp_path / "engine"),
            "--dataset",
            str(ds),
            "--out",
            str(out),
            "--mode",
            "performance",
            "--shard-index",
            "0",
            "--num-shards",
            "1",
            "--shard-mode",
            "replicate",
            "--gpus-per-shard",
            "2",
            "--batch-size",
            "4",
            "--max-new-tokens",
            str(MAX_NEW),
            *quick_loadgen_args(),
            "--gpu-types-json",
            '{"cpu": {"kind": "cpu"}}',
            "--engine-settings-json",
            '{"torch_threads": 1}',
            "--meta-json",
            json.dumps(
                {
                    "model": "fake",
                    "recipe": "none",
                    "backend": "fake",
                    "gpu_type": "cpu",
                    "batch_size": 4,
                    "layout": "1x2",
                }
            ),
        ]
    )
    assert rc == 0 and engine.closed
    assert calls == {
        "engine_dir": str(tmp_path / "engine"),
        "gpu_ids": [0, 1],
        "settings": {"torch_threads": 1},
        "gpu_types": {"cpu": {"kind": "cpu"}},
    }
    record = json.loads((out / "shard.json").read_text())
    assert record["layout"] == "1x2" and record["gpus_per_shard"] == 2
    assert record["gpu_type"] == "cpu" and record["batch_size"] == 4 and "bs" not in record and "gpu" not in record
    assert record["cuda_visible_devices"] == "2,3" and record["slurm_job_id"] == "4242"
    assert record["num_samples"] == len(prompts) and record["loadgen"]["result"] == "VALID"


@pytest.mark.parametrize("scenario", ["Offline", "Server"])
def test_burst_engine_completes_each_burst_in_one_loadgen_call(tmp_path, dataset, monkeypatch, scenario):
    """An engine with add_burst_listener: every sample still reaches LoadGen with the engine's
    exact tokens (accuracy log), first tokens before completions, but in fewer LoadGen calls."""
    import mlperf_loadgen as lg

    calls = {"complete": 0, "first": 0}
    real_complete, real_first = lg.QuerySamplesComplete, lg.FirstTokenComplete

    def complete(responses, *a):
        calls["complete"] += 1
        return real_complete(responses, *a)

    def first(responses, *a):
        calls["first"] += 1
        return real_first(responses, *a)

    monkeypatch.setattr(lg, "QuerySamplesComplete", complete)
    monkeypatch.setattr(lg, "FirstTokenComplete", first)
    ds, prompts = dataset
    engine = BurstFakeEngine(max_in_flight=8, step_s=0.001)
    kw = {"target_qps": 2000, "offline_expected_qps": None} if scenario == "Server" else {}
    out = tmp_path / scenario
    try:
        record = _run(
            engine, ds, out, mode="accuracy", num_shards=1, batch_size=None, max_in_flight=8, scenario=scenario, **kw
        )
    finally:
        engine.close()
    assert record["completed_samples"] == len(prompts) and record["loadgen"]["errors"] is False
    entries = json.loads((out / "mlperf_log_accuracy.json").read_text())
    assert len(entries) == len(prompts)
    for e in entries:
        assert np.frombuffer(bytes.fromhex(e["data"]), np.int32).tolist() == FakeEngine.output_for(
            prompts[e["qsl_idx"]], MAX_NEW
        )
    assert 0 < calls["complete"] < len(prompts)  # batched per burst, and nothing left behind
    if scenario == "Server":
        assert engine.first_tokens == len(prompts) and 0 < calls["first"] < len(prompts)
        table = pq.read_table(out / "samples.parquet")
        assert (table.column("first_token_at").to_numpy() <= table.column("completed_at").to_numpy()).all()
    else:
        assert calls["first"] == 0


def test_int32_buffer_matches_array():
    import struct
    from array import array

    from rackbench.harness import _int32_buffer

    for tokens in ([], [7], list(range(-5, 300)), [2**31 - 1, -(2**31)]):
        assert _int32_buffer(tokens) == array("i", tokens)
    with pytest.raises(struct.error):  # out of int32 range is an error, never a wrapped value
        _int32_buffer([2**31])


def test_the_start_gate_runs_once_after_the_set_up_just_before_loadgen_starts(tmp_path, dataset):
    """The per-shard start barrier is this gate: LoadGen must start right after it returns
    (nothing of the set-up left to do), or the shards' starts drift apart again."""
    opened = []

    def gate():
        opened.append(time.time())
        time.sleep(0.3)  # waiting for the other shards

    record = _run(FakeEngine(), dataset[0], tmp_path / "out", start_gate=gate)
    assert len(opened) == 1
    assert 0.3 <= record["started_at"] - opened[0] < 0.6  # after the gate, and at once
    assert record["first_issue_at"] - record["started_at"] < 0.5
