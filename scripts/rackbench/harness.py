"""The harness: one MLPerf LoadGen test (Offline, Server or Interactive) over one Engine.

The Engine is one shard's (per-shard mode: one LoadGen per shard) or the whole rack's
(an endpoint pool in front of every engine server: one LoadGen, MLPerf's method).
SUT/QSL split as in MLPerf's ``language/llama2-70b`` reference:

* the QSL holds only this shard's samples (``rackbench.shards.shard_sample_indices``;
  accuracy runs always ``split`` so every sample is scored exactly once);
* the SUT (:class:`EngineSUT`) hands each sample LoadGen issues to the engine at once
  (``Engine.submit``, the ``tok_input`` ids), at most ``max_in_flight`` at a time, and
  completes each sample as the engine finishes it with ``lg.QuerySampleResponse(id, ptr,
  size, n_tokens)`` where the data are the generated token ids as int32 (what
  ``evaluate-accuracy.py --dtype int32`` reads, as ``run_accuracy.sh`` calls it) and
  ``n_tokens`` is their count, so that LoadGen (``use_token_latencies``, set for
  llama2-70b by its built-in mlperf.conf) reports tokens per second. In Server and
  Interactive the first token goes to ``lg.FirstTokenComplete`` (TTFT; TPOT follows).
  LoadGen 6.x logs an ``error_runtime`` for every sample of 0 or 1 tokens and counts none
  of its tokens; shard.json reports ``short_outputs`` and ``loadgen_counted_tokens``.
  (The Engine contract excludes EOS, so an immediate EOS is 0 tokens.)

LoadGen settings start from LoadGen's built-in mlperf.conf for ``loadgen_model``
(``TestSettings.FromConfig("", model, scenario, 0)``; Interactive is the Server scenario
under the ``<model>-interactive`` key: TTFT 450 ms / TPOT 40 ms for llama2-70b, against
Server's 2 s / 200 ms; official RNG seeds,
``use_token_latencies``, ``sample_concatenate_permutation``, min duration/query
count) and are then overridden by the arguments that are not ``None``. The
performance sample count is always the shard's sample count, and
``min_query_count`` is raised to at least that so every shard sample is issued.

Everything is written into a temporary sibling of ``out_dir`` (LoadGen's outdir
included) and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import re
import socket
import struct
import sys
import threading
import time
from array import array
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rackbench.args import json_arg
from rackbench.atomic import atomic_path, write_json_atomic
from rackbench.config import schema_defaults
from rackbench.engines import BatchedEngine
from rackbench.engines import max_in_flight as engine_max_in_flight
from rackbench.provenance import write_provenance
from rackbench.shards import SHARD_MODES, layout_name, shard_sample_indices

RUN_DEFAULTS = schema_defaults("run")  # the CLI's defaults are the config schema's

MODES = ("performance", "accuracy")
RESPONSE_DTYPE = np.int32  # evaluate-accuracy.py --dtype int32
# the audit.config LoadGen reads from the working directory unless told another file (loadgen.h StartTest)
LOADGEN_AUDIT_CONFIG = "audit.config"
DEFAULT_LOADGEN_MODEL = "llama2-70b"
_ARRAY_CODE = "i"
_ITEMSIZE = array(_ARRAY_CODE).itemsize
assert _ITEMSIZE == np.dtype(RESPONSE_DTYPE).itemsize, "array('i') is not 32-bit here"
_PACKERS: dict[int, struct.Struct] = {}


def _int32_buffer(tokens) -> array:
    """The token ids as a native int32 ``array``. ``struct`` packs a list ~3x faster than
    ``array('i', list)`` (which converts item by item); at ~300 tokens a sample that is most
    of the SUT's own per-sample cost."""
    n = len(tokens)
    packer = _PACKERS.get(n)
    if packer is None:
        packer = _PACKERS.setdefault(n, struct.Struct(f"={n}{_ARRAY_CODE}"))
    data = array(_ARRAY_CODE)
    data.frombytes(packer.pack(*tokens))
    return data


class HarnessError(RuntimeError):
    pass


def _stderr_log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- QSL data


class ShardSamples:
    """This shard's prompts, held as one flat int32 array plus offsets."""

    def __init__(self, samples_parquet, indices: list[int]):
        table = pq.read_table(samples_parquet, columns=["tok_input"])
        column = table.column("tok_input").combine_chunks()
        self.dataset_size = len(column)
        if indices and (min(indices) < 0 or max(indices) >= self.dataset_size):
            raise HarnessError(f"shard sample indices outside the dataset of {self.dataset_size} rows")
        contiguous = (
            bool(indices)
            and indices[-1] - indices[0] + 1 == len(indices)
            and all(b - a == 1 for a, b in zip(indices, indices[1:]))
        )
        taken = column.slice(indices[0], len(indices)) if contiguous else column.take(pa.array(indices, pa.int64()))
        lengths = pc.list_value_length(taken).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        self.values = np.ascontiguousarray(pc.list_flatten(taken).to_numpy(zero_copy_only=False), dtype=np.int64)
        self.offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.input_lengths = lengths.astype(np.int32)
        self.sample_indices = np.asarray(indices, dtype=np.int64)
        self.contiguous = contiguous

        self._loaded: list[list[int] | None] = [None] * len(indices)

    def __len__(self) -> int:
        return len(self.sample_indices)

    # LoadGen QSL callbacks: LoadGen loads the performance sample set before the
    # timed run, so turning prompts into Python lists here keeps that cost out of it.
    def load_samples(self, qsl_indices) -> None:
        values, offsets, loaded = self.values, self.offsets, self._loaded
        for j in qsl_indices:
            loaded[j] = values[offsets[j] : offsets[j + 1]].tolist()

    def unload_samples(self, qsl_indices) -> None:
        for j in qsl_indices:
            self._loaded[j] = None

    def prompt(self, qsl_index: int) -> list[int]:
        cached = self._loaded[qsl_index]
        if cached is not None:
            return cached
        return self.values[self.offsets[qsl_index] : self.offsets[qsl_index + 1]].tolist()


# --------------------------------------------------------------------------- SUT


class EngineSUT:
    """Hands each sample LoadGen issues to the Engine at once (``Engine.submit``), at most
    ``max_in_flight`` at a time (the rest wait in issue order and go as requests finish),
    and completes each with LoadGen when the engine reports it done. With ``first_tokens``
    (Server, Interactive) the first token is reported with ``lg.FirstTokenComplete``; a
    request whose engine reported no first token before it ended (0 tokens, or an engine
    without first-token events) reports it at completion, so its TTFT is its latency.

    Only the Engine contract is used (submit/on_done/on_error/on_first_token), so the same
    SUT drives an in-process engine, a replica pool or HTTP endpoints. Callbacks may come
    from any thread; a request's successor is submitted from its completion callback, so an
    engine's free row is refilled before its next step.

    Engines that deliver callbacks in bursts (``rackbench.endpoints.EndpointPool``: one HTTP
    response, or one read of a stream) may offer ``add_burst_listener(fn)`` and call ``fn()``
    after each burst; the SUT then hands LoadGen the burst's first tokens and completions in
    one ``FirstTokenComplete`` / ``QuerySamplesComplete`` call each, at the burst's end
    (no timer, no extra thread). Without it each sample is completed with LoadGen at once.
    """

    def __init__(
        self,
        engine,
        samples: ShardSamples,
        *,
        max_in_flight: int,
        max_new_tokens: int,
        keep_outputs: bool,
        first_tokens: bool,
        lg_module,
    ):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.engine = engine
        self.samples = samples
        self.max_in_flight = max_in_flight
        self.max_new_tokens = max_new_tokens
        self.keep_outputs = keep_outputs
        self.first_tokens = first_tokens
        self.lg = lg_module
        self._response = lg_module.QuerySampleResponse
        self._lock = threading.Lock()
        self._waiting: collections.deque = collections.deque()
        self._in_flight = 0
        self._pumping = False
        self.issued = 0
        self.completed = 0
        self.output_tokens = 0
        self.short_outputs = 0
        self.short_output_tokens = 0
        self.first_issue_at: float | None = None
        self.last_complete_at: float | None = None
        self.error: BaseException | None = None
        # per-sample records, in completion order
        self._rec_qsl: list[int] = []
        self._rec_out_len: list[int] = []
        self._rec_time: list[float] = []
        self._rec_first: list[float] = []
        self._rec_ids: list = []
        self._first_at: dict[int, float] = {}  # sample id -> when its first token came
        # LoadGen responses not yet handed over (burst mode), each with the buffer it points into
        self._pending_first: list = []
        self._pending_done: list = []
        self._pending_data: list = []
        add_listener = getattr(engine, "add_burst_listener", None)
        self._bursts = callable(add_listener)
        if self._bursts:
            add_listener(self.flush_completions)

    # LoadGen callbacks -------------------------------------------------
    def issue_query(self, query_samples) -> None:
        if self.first_issue_at is None:
            # LoadGen has loaded the QSL (every prompt a Python list): keep those long-lived
            # objects out of the collector's full passes, which otherwise rescan them all
            # while the run allocates (~15 % of the rack client's CPU; BENCHMARKS note 8a).
            # They are still freed by reference counting; only cycles among them outlive the run.
            gc.freeze()
        with self._lock:
            if self.first_issue_at is None:
                self.first_issue_at = time.time()
            self._waiting.extend(query_samples)
            self.issued += len(query_samples)
        self._pump()

    def flush_queries(self) -> None:
        pass

    # dispatch ------------------------------------------------------------
    def _pump(self) -> None:
        """Submit waiting samples while there is room. One thread pumps at a time, in a loop
        (an engine that completes inside ``submit`` must not recurse once per sample)."""
        with self._lock:
            if self._pumping:
                return
            self._pumping = True
        self._pump_loop()

    def _pump_loop(self) -> None:
        """The pumping thread's loop (``self._pumping`` is set)."""
        lock, waiting, limit, submit = self._lock, self._waiting, self.max_in_flight, self._submit
        while True:
            with lock:
                n = min(len(waiting), limit - self._in_flight)
                if n <= 0:
                    self._pumping = False
                    break
                self._in_flight += n
                batch = [waiting.popleft() for _ in range(n)]
            for q in batch:
                submit(q.id, q.index)
        if self._bursts:  # completions made on this thread (errors, engines answering inside submit)
            self.flush_completions()

    def _submit(self, qid: int, qsl_index: int) -> None:
        if self.error is not None:  # the run is failing: finish quickly, the error is raised after
            self._finish(qid, qsl_index, None)
            return
        try:
            self.engine.submit(
                self.samples.prompt(qsl_index),
                self.max_new_tokens,
                on_done=partial(self._finish, qid, qsl_index),
                on_error=partial(self._on_error, qid, qsl_index),
                on_first_token=partial(self._on_first_token, qid) if self.first_tokens else None,
            )
        except BaseException as exc:  # the test must still end: LoadGen waits for every sample
            self._on_error(qid, qsl_index, exc)

    def _on_first_token(self, qid: int, token: int) -> None:
        self._first_at[qid] = time.time()
        self._report_first_token(qid, (token,))

    def _on_error(self, qid: int, qsl_index: int, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
        self._finish(qid, qsl_index, None)

    def _report_first_token(self, qid: int, tokens) -> None:
        data = _int32_buffer(tokens[:1])
        response = self._response(qid, data.buffer_info()[0], len(data) * _ITEMSIZE, len(data))
        if self._bursts:
            with self._lock:
                self._pending_first.append(response)
                self._pending_data.append(data)
        else:
            self.lg.FirstTokenComplete([response])

    def flush_completions(self) -> None:
        """Hand LoadGen every first token and completion queued so far (burst mode)."""
        with self._lock:
            if not (self._pending_first or self._pending_done):
                return
            first, done, data = self._pending_first, self._pending_done, self._pending_data
            self._pending_first, self._pending_done, self._pending_data = [], [], []
        if first:  # each sample's first token was queued before its completion
            self.lg.FirstTokenComplete(first)
        if done:
            self.lg.QuerySamplesComplete(done)  # LoadGen copies the data (accuracy mode) before returning
        del data

    def _finish(self, qid: int, qsl_index: int, tokens) -> None:
        """Complete one sample with LoadGen (``tokens`` None: failed, completed empty)."""
        data = _int32_buffer(tokens if tokens is not None else ())
        n = len(data)
        first_at = None
        if self.first_tokens:
            first_at = self._first_at.pop(qid, None)
            if first_at is None:  # no first-token event came: report it now
                self._report_first_token(qid, data)
        response = self._response(qid, data.buffer_info()[0], n * _ITEMSIZE, n)
        if not self._bursts:
            self.lg.QuerySamplesComplete([response])  # LoadGen copies the data (accuracy mode) before returning
        now = time.time()
        with self._lock:
            if self._bursts:
                self._pending_done.append(response)
                self._pending_data.append(data)
            self._in_flight -= 1
            if tokens is not None:
                if n > self.max_new_tokens and self.error is None:
                    self.error = HarnessError(f"engine returned {n} tokens; max_new_tokens is {self.max_new_tokens}")
                self._rec_qsl.append(qsl_index)
                self._rec_out_len.append(n)
                self._rec_time.append(now)
                if self.first_tokens:
                    self._rec_first.append(first_at if first_at is not None else float("nan"))
                if self.keep_outputs:
                    self._rec_ids.append(data)
                self.output_tokens += n
                self.completed += 1
                self.last_complete_at = now
                if n < 2:  # LoadGen (use_token_latencies) logs an error and counts 0 tokens for these
                    self.short_outputs += 1
                    self.short_output_tokens += n
            if not self._waiting or self._pumping:
                return
            self._pumping = True
        self._pump_loop()  # this sample's successor goes in from here, before the engine's next step

    # results -----------------------------------------------------------
    def table(self) -> pa.Table:
        qsl = np.asarray(self._rec_qsl, dtype=np.int64)
        out_len = np.asarray(self._rec_out_len, dtype=np.int64)
        columns = {
            "qsl_index": pa.array(qsl, pa.int64()),
            "sample_index": pa.array(self.samples.sample_indices[qsl], pa.int64()),
            "input_tokens": pa.array(self.samples.input_lengths[qsl], pa.int32()),
            "output_tokens": pa.array(out_len.astype(np.int32), pa.int32()),
            "completed_at": pa.array(np.asarray(self._rec_time, dtype=np.float64), pa.float64()),
        }
        if self.first_tokens:
            columns["first_token_at"] = pa.array(np.asarray(self._rec_first, dtype=np.float64), pa.float64())
        if self.keep_outputs:
            flat = np.frombuffer(b"".join(a.tobytes() for a in self._rec_ids), dtype=RESPONSE_DTYPE)
            offsets = np.zeros(len(out_len) + 1, dtype=np.int32)
            np.cumsum(out_len, out=offsets[1:])
            columns["output_ids"] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.int32()))
        return pa.table(columns)

    def input_tokens(self) -> int:
        if not self._rec_qsl:
            return 0
        return int(self.samples.input_lengths[np.asarray(self._rec_qsl, dtype=np.int64)].astype(np.int64).sum())


# --------------------------------------------------------------------------- progress


class _Progress:
    def __init__(self, sut: EngineSUT, interval_s: float, label: str, log: Callable[[str], None]):
        self.sut, self.interval_s, self.label, self.log = sut, interval_s, label, log
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rackbench-progress", daemon=True)

    def start(self):
        if self.interval_s and self.interval_s > 0:
            self._thread.start()
        return self

    def stop(self):
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()

    def line(self) -> str:
        sut = self.sut
        if sut.first_issue_at is None:
            return f"{self.label}: waiting for LoadGen to issue samples"
        elapsed = max(time.time() - sut.first_issue_at, 1e-9)
        done, total = sut.completed, sut.issued
        sps = done / elapsed
        tps = sut.output_tokens / elapsed
        eta = (total - done) / sps if sps > 0 else float("inf")
        pct = 100.0 * done / total if total else 0.0
        eta_s = "?" if eta == float("inf") else f"{eta:.0f}s"
        return (
            f"{self.label}: {done}/{total} samples ({pct:.1f}%) | {tps:,.1f} output tok/s | "
            f"{sps:.2f} samples/s | elapsed {elapsed:.0f}s | ETA {eta_s}"
        )

    def _run(self):
        while not self._done.wait(self.interval_s):
            self.log(self.line())


# --------------------------------------------------------------------------- LoadGen summary

_SUMMARY_FIELDS = {
    "scenario": (r"^Scenario\s*:\s*(.+)$", str),
    "loadgen_mode": (r"^Mode\s*:\s*(.+)$", str),
    # Offline: "Samples per second", "Tokens per second"; Server: "Completed samples per second", ...
    "samples_per_second": (r"^(?:Completed s|S)amples per second\s*:\s*(\S+)", float),
    "tokens_per_second": (r"^(?:Completed t|T)okens per second\s*:\s*(\S+)", float),
    "result": (r"^Result is\s*:\s*(\S+)", str),
    "performance_constraints_satisfied": (r"^\s*Performance constraints satisfied\s*:\s*(\S+)", lambda v: v == "Yes"),
    "min_duration_satisfied": (r"^\s*Min duration satisfied\s*:\s*(\S+)", lambda v: v == "Yes"),
    "min_queries_satisfied": (r"^\s*Min queries satisfied\s*:\s*(\S+)", lambda v: v == "Yes"),
    "early_stopping_satisfied": (r"^\s*Early stopping satisfied\s*:\s*(\S+)", lambda v: v == "Yes"),
    "scheduled_samples_per_second": (r"^Scheduled samples per second\s*:\s*(\S+)", float),
    "target_qps": (r"^target_qps\s*:\s*(\S+)", float),
    # token latencies (Server/Interactive), as LoadGen reports them, and their limits
    "ttft_p99_ns": (r"^99\.00 percentile first token latency \(ns\)\s*:\s*(\d+)", int),
    "tpot_p99_ns": (r"^99\.00 percentile time to output token \(ns\)\s*:\s*(\d+)", int),
    "ttft_latency_ns": (r"^ttft_latency \(ns\)\s*:\s*(\d+)", int),
    "tpot_latency_ns": (r"^tpot_latency \(ns\)\s*:\s*(\d+)", int),
}


def parse_summary(text: str) -> dict:
    """The headline fields of ``mlperf_log_summary.txt`` (None where absent)."""
    out = {}
    for key, (pattern, conv) in _SUMMARY_FIELDS.items():
        match = re.search(pattern, text, re.MULTILINE)
        out[key] = conv(match.group(1).strip()) if match else None
    out["warnings"] = "No warnings encountered during test." not in text
    out["errors"] = "No errors encountered during test." not in text
    return out


# --------------------------------------------------------------------------- LoadGen settings

#: scenario -> (LoadGen scenario, suffix of the mlperf.conf model key). Interactive is LoadGen's
#: Server scenario under the "<model>-interactive" key (mlperf.conf: llama2-70b-interactive.Server.*)
SCENARIOS = {"Offline": ("Offline", ""), "Server": ("Server", ""), "Interactive": ("Server", "-interactive")}


def loadgen_settings(
    lg,
    *,
    scenario: str,
    mode: str,
    n_samples: int,
    loadgen_model: str | None,
    min_duration_ms=None,
    min_query_count=None,
    offline_expected_qps=None,
    target_qps=None,
):
    """LoadGen TestSettings from its built-in mlperf.conf, overridden by the arguments that are
    not None; returns (settings, the effective values for shard.json)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {sorted(SCENARIOS)}, got {scenario!r}")
    lg_scenario, key_suffix = SCENARIOS[scenario]
    if lg_scenario == "Server" and target_qps is None:
        raise HarnessError(f"the {scenario} scenario needs a target QPS")
    settings = lg.TestSettings()
    settings.scenario = getattr(lg.TestScenario, lg_scenario)
    conf_model = f"{loadgen_model}{key_suffix}" if loadgen_model else None
    if conf_model:
        rc = settings.FromConfig("", conf_model, lg_scenario, 0)  # LoadGen's built-in mlperf.conf
        if rc != 0:
            raise HarnessError(f"LoadGen could not load its mlperf.conf for model {conf_model!r} (rc={rc})")
    settings.mode = lg.TestMode.AccuracyOnly if mode == "accuracy" else lg.TestMode.PerformanceOnly
    settings.use_token_latencies = True
    if min_duration_ms is not None:
        settings.min_duration_ms = int(min_duration_ms)
    requested_mqc = int(min_query_count) if min_query_count is not None else int(settings.min_query_count)
    settings.min_query_count = max(requested_mqc, n_samples)
    if offline_expected_qps is not None:
        settings.offline_expected_qps = float(offline_expected_qps)
    if target_qps is not None:
        settings.server_target_qps = float(target_qps)
    settings.performance_sample_count_override = n_samples
    effective = {
        "scenario": scenario,
        "loadgen_scenario": lg_scenario,
        "loadgen_model": loadgen_model,
        "loadgen_config_key": conf_model,
        "min_duration_ms": int(settings.min_duration_ms),
        "min_query_count_requested": requested_mqc,
        "min_query_count": int(settings.min_query_count),
        "performance_sample_count": n_samples,
        "use_token_latencies": bool(settings.use_token_latencies),
        "sample_concatenate_permutation": bool(settings.sample_concatenate_permutation),
        "qsl_rng_seed": int(settings.qsl_rng_seed),
        "sample_index_rng_seed": int(settings.sample_index_rng_seed),
        "schedule_rng_seed": int(settings.schedule_rng_seed),
    }
    if lg_scenario == "Offline":
        effective["offline_expected_qps"] = float(settings.offline_expected_qps)
    else:
        effective.update(
            target_qps=float(settings.server_target_qps),
            ttft_latency_ns=int(settings.ttft_latency),
            tpot_latency_ns=int(settings.tpot_latency),
        )
    return settings, effective


def _log_settings(lg, outdir: Path, summary_to_stdout: bool):
    log_output = lg.LogOutputSettings()
    log_output.outdir = str(outdir)
    log_output.copy_summary_to_stdout = bool(summary_to_stdout)
    log_settings = lg.LogSettings()
    log_settings.log_output = log_output
    log_settings.enable_trace = False
    return log_settings


# --------------------------------------------------------------------------- the run


def _check_arguments(*, mode, shard_mode, scenario, batch_size, max_new_tokens, max_in_flight, engine_limit):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if shard_mode not in SHARD_MODES:
        raise ValueError(f"shard_mode must be one of {SHARD_MODES}, got {shard_mode!r}")
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {sorted(SCENARIOS)}, got {scenario!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_in_flight is not None and max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size is not None and batch_size > engine_limit:
        raise HarnessError(
            f"batch size {batch_size} exceeds the engine's max_in_flight {engine_limit}: "
            f"lower the batch size or rebuild the engine with a larger max_batch_size"
        )


def _shard_metadata(metadata: dict | None, *, batch_size, num_shards: int) -> dict:
    """The workflow's wildcards, named as shard.json names them (rackbench.config.CONFIG_FIELDS), checked."""
    metadata = dict(metadata or {})
    if "batch_size" in metadata and str(metadata["batch_size"]) != str(batch_size):
        raise HarnessError(f"metadata says batch size {metadata['batch_size']!r} but the run uses {batch_size}")
    gps = metadata.get("gpus_per_shard")
    if metadata.get("layout") and gps is not None and metadata["layout"] != layout_name(num_shards, gps):
        raise HarnessError(f"layout {metadata['layout']!r} does not match {num_shards} shards of {gps} GPU(s)")
    return metadata


def _drive_loadgen(
    lg,
    sut_impl: EngineSUT,
    samples: ShardSamples,
    settings,
    log_settings,
    progress: "_Progress",
    audit_config: str = LOADGEN_AUDIT_CONFIG,
    start_gate: Callable[[], object] | None = None,
) -> tuple[float, float]:
    """One LoadGen test over ``sut_impl``; returns (started_at, finished_at). ``start_gate``
    runs just before LoadGen starts, after all the set-up (the per-shard start barrier)."""
    n = len(samples)
    sut = lg.ConstructSUT(sut_impl.issue_query, sut_impl.flush_queries)
    qsl = lg.ConstructQSL(n, n, samples.load_samples, samples.unload_samples)
    if start_gate is not None:
        start_gate()
    started_at = time.time()
    progress.start()
    try:
        lg.StartTestWithLogSettings(sut, qsl, settings, log_settings, audit_config)
    finally:
        finished_at = time.time()
        progress.stop()
        lg.DestroyQSL(qsl)
        lg.DestroySUT(sut)
    return started_at, finished_at


_RUN_ONLY_FIELDS = (
    "started_at",
    "finished_at",
    "output_tokens",
    "input_tokens",
    "completed_samples",
    "issued_samples",
    "loadgen",
    "hostname",
    "slurm_job_id",
    "cuda_visible_devices",
)


def _shard_record(metadata: dict, sut_impl: EngineSUT, samples: ShardSamples, loadgen: dict, **fields) -> dict:
    gpus_per_shard = metadata.get("gpus_per_shard")
    num_shards = fields["num_shards"]
    return {
        **metadata,
        **fields,
        "layout": metadata.get("layout")
        or (layout_name(num_shards, gpus_per_shard) if gpus_per_shard is not None else None),
        "gpus_per_shard": gpus_per_shard,
        "num_samples": len(samples),
        "sample_indices": [int(samples.sample_indices[0]), int(samples.sample_indices[-1]) + 1]
        if samples.contiguous
        else None,
        # LoadGen's timed part: first IssueQuery .. last sample completed (QSL load is before it)
        "first_issue_at": sut_impl.first_issue_at,
        "last_complete_at": sut_impl.last_complete_at,
        "output_tokens": int(sut_impl.output_tokens),
        "input_tokens": sut_impl.input_tokens(),
        "completed_samples": int(sut_impl.completed),
        "issued_samples": int(sut_impl.issued),
        # LoadGen's token count skips samples of fewer than 2 tokens (an error_runtime each)
        "short_outputs": int(sut_impl.short_outputs),
        "loadgen_counted_tokens": int(sut_impl.output_tokens - sut_impl.short_output_tokens),
        "loadgen": loadgen,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "hostname": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def _write_outputs(tmp: Path, sut_impl: EngineSUT, record: dict, effective: dict) -> None:
    pq.write_table(sut_impl.table(), tmp / "samples.parquet")
    fragment = {k: v for k, v in record.items() if k not in _RUN_ONLY_FIELDS}
    fragment["loadgen_settings"] = effective
    record["provenance"] = write_provenance(tmp / "provenance.json", step="run_shard", config_fragment=fragment)
    write_json_atomic(tmp / "shard.json", record)


def run_shard(
    engine,
    *,
    samples_parquet,
    out_dir,
    mode: str,
    shard_index: int,
    num_shards: int,
    shard_mode: str,
    batch_size: int | None,
    max_new_tokens: int,
    scenario: str = "Offline",
    target_qps: float | None = None,
    max_in_flight: int | None = None,
    min_duration_ms: int | None = None,
    min_query_count: int | None = None,
    offline_expected_qps: float | None = None,
    loadgen_model: str | None = DEFAULT_LOADGEN_MODEL,
    metadata: dict | None = None,
    progress_interval_s: float = 30.0,
    summary_to_stdout: bool = False,
    audit_config=None,
    start_gate: Callable[[], object] | None = None,
    log: Callable[[str], None] = _stderr_log,
) -> dict:
    """Run one shard (or, with ``num_shards=1``, the whole rack) through one LoadGen test and
    write its output dir; return shard.json's content.

    At most ``max_in_flight`` requests are in the engine at once; default ``batch_size``
    (the configuration's batch size), else the engine's ``max_in_flight``. Engines with only
    a blocking ``generate`` run through ``rackbench.engines.BatchedEngine``. LoadGen
    settings left ``None`` keep the values of LoadGen's built-in mlperf.conf for
    ``loadgen_model`` (MLPerf's defaults); ``loadgen_model=None`` starts from LoadGen's bare
    TestSettings defaults instead. Server and Interactive need ``target_qps``.
    ``audit_config``: a compliance test's audit.config (TEST06), which overrides the settings;
    None: LoadGen's own rule (an ``audit.config`` in the working directory, if any).
    ``start_gate``: called once everything is set up, just before LoadGen starts (the shards'
    start barrier, so that the set-up's own time does not separate their starts).
    """
    import mlperf_loadgen as lg

    wrapped = BatchedEngine.wrap(engine)
    try:
        engine_limit = engine_max_in_flight(wrapped)
        _check_arguments(
            mode=mode,
            shard_mode=shard_mode,
            scenario=scenario,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            max_in_flight=max_in_flight,
            engine_limit=engine_limit,
        )
        in_flight = max_in_flight or batch_size or engine_limit
        metadata = _shard_metadata(metadata, batch_size=batch_size, num_shards=num_shards)
        label = f"shard {shard_index}/{num_shards} {scenario} {mode}"
        requested_shard_mode = shard_mode
        if mode == "accuracy" and shard_mode != "split":
            log(f"{label}: accuracy runs always split the dataset; ignoring shard_mode={shard_mode!r}")
            shard_mode = "split"
        n_dataset = pq.ParquetFile(samples_parquet).metadata.num_rows
        samples = ShardSamples(samples_parquet, shard_sample_indices(n_dataset, shard_index, num_shards, shard_mode))
        out_dir = Path(out_dir)
        with atomic_path(out_dir, directory=True) as tmp:
            settings, effective = loadgen_settings(
                lg,
                scenario=scenario,
                mode=mode,
                n_samples=len(samples),
                loadgen_model=loadgen_model,
                min_duration_ms=min_duration_ms,
                min_query_count=min_query_count,
                offline_expected_qps=offline_expected_qps,
                target_qps=target_qps,
            )
            sut_impl = EngineSUT(
                wrapped,
                samples,
                max_in_flight=in_flight,
                max_new_tokens=max_new_tokens,
                keep_outputs=(mode == "accuracy"),
                first_tokens=(scenario != "Offline"),
                lg_module=lg,
            )
            progress = _Progress(sut_impl, progress_interval_s, label, log)
            log(
                f"{label}: {len(samples)} samples of {n_dataset} ({shard_mode}), at most {in_flight} in flight, "
                f"max_new_tokens {max_new_tokens}, LoadGen settings {effective}"
            )
            started_at, finished_at = _drive_loadgen(
                lg,
                sut_impl,
                samples,
                settings,
                _log_settings(lg, tmp, summary_to_stdout),
                progress,
                str(audit_config) if audit_config else LOADGEN_AUDIT_CONFIG,
                start_gate,
            )
            if sut_impl.error is not None:
                raise HarnessError(f"{label}: engine failed: {sut_impl.error!r}") from sut_impl.error
            log(progress.line())
            summary_path = tmp / "mlperf_log_summary.txt"
            if not summary_path.exists():
                raise HarnessError(f"LoadGen wrote no {summary_path.name}")
            loadgen = parse_summary(summary_path.read_text())
            loadgen["settings"] = effective
            record = _shard_record(
                metadata,
                sut_impl,
                samples,
                loadgen,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                scenario=scenario,
                target_qps=target_qps,
                max_in_flight=in_flight,
                mode=mode,
                shard_index=shard_index,
                num_shards=num_shards,
                shard_mode=shard_mode,
                requested_shard_mode=requested_shard_mode,
                dataset_samples=n_dataset,
                started_at=started_at,
                finished_at=finished_at,
            )
            _write_outputs(tmp, sut_impl, record, effective)
            log(
                f"{label}: done: LoadGen result {loadgen['result']}, {loadgen['tokens_per_second']} tokens/s, "
                f"{loadgen['samples_per_second']} samples/s; {record['completed_samples']} samples, "
                f"{record['output_tokens']} output tokens in {finished_at - started_at:.1f}s"
            )
        return record
    finally:
        if wrapped is not engine:
            wrapped.close()  # its worker thread only: the caller closes the engine


# --------------------------------------------------------------------------- CLI


def shard_gpu_ids(gpus_per_shard: int, environ=os.environ) -> list[int]:
    """Device indices as this shard sees them."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [e for e in visible.split(",") if e.strip() and e.strip() != "-1"]
        return list(range(len(entries)))
    try:
        import torch

        if torch.cuda.is_available():
            return list(range(gpus_per_shard))
    except ImportError:
        pass
    return []


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rackbench.harness", description=__doc__.splitlines()[0])
    p.add_argument("--engine-dir", required=True)
    p.add_argument("--dataset", required=True, help="dataset parquet (tok_input column)")
    p.add_argument("--out", required=True, help="shard output dir (created atomically)")
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--shard-index", type=int, required=True)
    p.add_argument("--num-shards", type=int, required=True)
    p.add_argument("--shard-mode", choices=SHARD_MODES, default=RUN_DEFAULTS["performance_shard_mode"])
    p.add_argument("--gpus-per-shard", type=int, default=1)
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="the configuration's batch size; bounds the requests in flight unless --max-in-flight",
    )
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=None,
        help="most requests in the engine at once (default: --batch-size, else the engine's max_in_flight)",
    )
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="Offline")
    p.add_argument("--target-qps", type=float, default=None, help="Server/Interactive: LoadGen's server_target_qps")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--min-duration-ms", type=int, default=None, help="default: LoadGen's mlperf.conf")
    p.add_argument("--min-query-count", type=int, default=None, help="default: LoadGen's mlperf.conf")
    p.add_argument("--offline-expected-qps", type=float, default=None, help="default: LoadGen's mlperf.conf")
    p.add_argument(
        "--loadgen-model",
        default=DEFAULT_LOADGEN_MODEL,
        help="model name whose LoadGen mlperf.conf entries are the defaults",
    )
    p.add_argument("--progress-interval-s", type=float, default=RUN_DEFAULTS["progress_interval_s"])
    p.add_argument("--gpu-types-json", default="{}", help="JSON (or file): config['gpu_types']")
    p.add_argument("--engine-settings-json", default="{}", help="JSON (or file): engine runtime settings")
    p.add_argument("--meta-json", default="{}", help="JSON (or file): model, recipe, backend, gpu_type, ...")
    p.add_argument(
        "--start-barrier",
        default=None,
        help="folder the shards share: start LoadGen once every shard has loaded its engine (rackbench.barrier)",
    )
    p.add_argument("--start-barrier-timeout-s", type=float, default=None, help="with --start-barrier: longest wait")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.start_barrier and args.start_barrier_timeout_s is None:
        parser.error("--start-barrier needs --start-barrier-timeout-s")  # before minutes of engine load
    from rackbench import barrier
    from rackbench.build_engine import open_engine

    metadata = json_arg(args.meta_json)
    metadata.setdefault("gpus_per_shard", args.gpus_per_shard)
    gpu_ids = shard_gpu_ids(args.gpus_per_shard)
    if gpu_ids and len(gpu_ids) != args.gpus_per_shard:
        _stderr_log(
            f"warning: CUDA_VISIBLE_DEVICES shows {len(gpu_ids)} GPUs; --gpus-per-shard is {args.gpus_per_shard}"
        )
    engine = open_engine(
        args.engine_dir,
        gpu_ids=gpu_ids,
        settings=json_arg(args.engine_settings_json),
        gpu_types=json_arg(args.gpu_types_json),
    )
    gate = None
    if args.start_barrier:
        gate = partial(
            barrier.wait_for_shards,
            args.start_barrier,
            shard_index=args.shard_index,
            num_shards=args.num_shards,
            timeout_s=args.start_barrier_timeout_s,
            log=_stderr_log,
        )
    try:
        run_shard(
            engine,
            samples_parquet=args.dataset,
            out_dir=args.out,
            mode=args.mode,
            shard_index=args.shard_index,
            num_shards=args.num_shards,
            shard_mode=args.shard_mode,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            scenario=args.scenario,
            target_qps=args.target_qps,
            max_in_flight=args.max_in_flight,
            min_duration_ms=args.min_duration_ms,
            min_query_count=args.min_query_count,
            offline_expected_qps=args.offline_expected_qps,
            loadgen_model=args.loadgen_model,
            metadata=metadata,
            progress_interval_s=args.progress_interval_s,
            summary_to_stdout=True,
            start_gate=gate,
        )
    finally:
        engine.close()
        if args.start_barrier:
            barrier.leave(args.start_barrier, args.shard_index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
