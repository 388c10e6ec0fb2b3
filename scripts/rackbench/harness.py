"""The offline harness: one MLPerf LoadGen instance (Offline scenario) per shard.

SUT/QSL split as in MLPerf's ``language/llama2-70b`` reference:

* the QSL holds only this shard's samples (``rackbench.shards.shard_sample_indices``;
  accuracy runs always ``split`` so every sample is scored exactly once);
* the SUT takes the samples LoadGen issues, hands the engine ``batch_size``
  ``tok_input`` prompts at a time (``Engine.generate``), and completes each
  sample with ``lg.QuerySampleResponse(id, ptr, size, n_tokens)`` where the
  data are the generated token ids as int32 (what ``evaluate-accuracy.py
  --dtype int32`` reads, as ``run_accuracy.sh`` calls it) and ``n_tokens`` is
  their count, so that LoadGen (``use_token_latencies``, set for llama2-70b by
  its built-in mlperf.conf) reports "Tokens per second". LoadGen 6.x logs an
  ``error_runtime`` for every sample of 0 or 1 tokens and counts none of its
  tokens; shard.json reports ``short_outputs`` and ``loadgen_counted_tokens``.
  (The Engine contract excludes EOS, so an immediate EOS is 0 tokens.)

LoadGen settings start from LoadGen's built-in mlperf.conf for ``loadgen_model``
(``TestSettings.FromConfig("", model, "Offline", 0)``: official RNG seeds,
``use_token_latencies``, ``sample_concatenate_permutation``, min duration/query
count) and are then overridden by the arguments that are not ``None``. The
performance sample count is always the shard's sample count, and
``min_query_count`` is raised to at least that so every shard sample is issued.

Everything is written into a temporary sibling of ``out_dir`` (LoadGen's outdir
included) and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import threading
import time
from array import array
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rackbench.args import json_arg
from rackbench.atomic import atomic_path, write_json_atomic
from rackbench.config import schema_defaults
from rackbench.provenance import write_provenance
from rackbench.shards import SHARD_MODES, layout_name, shard_sample_indices

RUN_DEFAULTS = schema_defaults("run")  # the CLI's defaults are the config schema's

MODES = ("performance", "accuracy")
RESPONSE_DTYPE = np.int32          # evaluate-accuracy.py --dtype int32
DEFAULT_LOADGEN_MODEL = "llama2-70b"
_ARRAY_CODE = "i"
_ITEMSIZE = array(_ARRAY_CODE).itemsize
assert _ITEMSIZE == np.dtype(RESPONSE_DTYPE).itemsize, "array('i') is not 32-bit here"


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
        contiguous = bool(indices) and indices[-1] - indices[0] + 1 == len(indices) \
            and all(b - a == 1 for a, b in zip(indices, indices[1:]))
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
            loaded[j] = values[offsets[j]:offsets[j + 1]].tolist()

    def unload_samples(self, qsl_indices) -> None:
        for j in qsl_indices:
            self._loaded[j] = None

    def prompt(self, qsl_index: int) -> list[int]:
        cached = self._loaded[qsl_index]
        if cached is not None:
            return cached
        return self.values[self.offsets[qsl_index]:self.offsets[qsl_index + 1]].tolist()


# --------------------------------------------------------------------------- SUT

class OfflineSUT:
    """Batches issued samples for one Engine and completes them with LoadGen."""

    def __init__(self, engine, samples: ShardSamples, *, batch_size: int, max_new_tokens: int,
                 keep_outputs: bool, lg_module):
        self.engine = engine
        self.samples = samples
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.keep_outputs = keep_outputs
        self.lg = lg_module
        self._pending: list = []
        self._cond = threading.Condition()
        self._stop = False
        self.issued = 0
        self.completed = 0
        self.output_tokens = 0
        self.short_outputs = 0
        self.short_output_tokens = 0
        self.first_issue_at: float | None = None
        self.error: BaseException | None = None
        # per-batch records, concatenated at the end
        self._rec_qsl: list[np.ndarray] = []
        self._rec_out_len: list[np.ndarray] = []
        self._rec_time: list[tuple[float, int]] = []
        self._rec_ids: list = []
        self._worker = threading.Thread(target=self._run, name="rackbench-sut", daemon=True)
        self._worker.start()

    # LoadGen callbacks -------------------------------------------------
    def issue_query(self, query_samples) -> None:
        with self._cond:
            if self.first_issue_at is None:
                self.first_issue_at = time.time()
            self._pending.append(query_samples)
            self.issued += len(query_samples)
            self._cond.notify()

    def flush_queries(self) -> None:
        pass

    # worker ------------------------------------------------------------
    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._worker.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if not self._pending and self._stop:
                    return
                query_samples = self._pending.pop(0)
            ids = [q.id for q in query_samples]
            qsl = np.fromiter((q.index for q in query_samples), dtype=np.int64, count=len(ids))
            for start in range(0, len(ids), self.batch_size):
                if self.error is not None:
                    self._complete_empty(ids[start:])
                    break
                try:
                    self._run_batch(ids[start:start + self.batch_size], qsl[start:start + self.batch_size])
                except BaseException as exc:   # the test must still end: LoadGen waits for every sample
                    self.error = exc
                    self._complete_empty(ids[start:])
                    break

    def _complete_empty(self, ids) -> None:
        lg = self.lg
        lg.QuerySamplesComplete([lg.QuerySampleResponse(i, 0, 0, 0) for i in ids])

    def _run_batch(self, ids: list[int], qsl: np.ndarray) -> None:
        lg = self.lg
        prompt = self.samples.prompt
        prompts = [prompt(j) for j in qsl.tolist()]
        outputs = self.engine.generate(prompts, self.max_new_tokens)
        n = len(ids)
        if len(outputs) != n:
            raise HarnessError(f"engine returned {len(outputs)} outputs for {n} prompts")
        # one int32 buffer per output (array('i') is 4-byte int32 on every platform LoadGen runs on)
        arrays = [array(_ARRAY_CODE, out) for out in outputs]
        response = lg.QuerySampleResponse
        responses = []
        lengths = []
        for i, a in zip(ids, arrays):
            k = len(a)
            lengths.append(k)
            responses.append(response(i, a.buffer_info()[0], k * _ITEMSIZE, k))
        lengths = np.asarray(lengths, dtype=np.int64)
        if n and int(lengths.max()) > self.max_new_tokens:
            raise HarnessError(f"engine returned {int(lengths.max())} tokens; max_new_tokens is {self.max_new_tokens}")
        lg.QuerySamplesComplete(responses)   # LoadGen copies the data (accuracy mode) before returning
        now = time.time()
        total = int(lengths.sum())
        self._rec_qsl.append(qsl)
        self._rec_out_len.append(lengths)
        self._rec_time.append((now, n))
        if self.keep_outputs:
            self._rec_ids.extend(arrays)
        self.output_tokens += total
        self.completed += n
        short = lengths < 2
        if short.any():   # LoadGen (use_token_latencies) logs an error and counts 0 tokens for these
            self.short_outputs += int(short.sum())
            self.short_output_tokens += int(lengths[short].sum())

    # results -----------------------------------------------------------
    def table(self) -> pa.Table:
        qsl = np.concatenate(self._rec_qsl) if self._rec_qsl else np.zeros(0, np.int64)
        out_len = np.concatenate(self._rec_out_len) if self._rec_out_len else np.zeros(0, np.int64)
        completed_at = np.concatenate([np.full(k, t, dtype=np.float64) for t, k in self._rec_time]) \
            if self._rec_time else np.zeros(0, np.float64)
        columns = {
            "qsl_index": pa.array(qsl, pa.int64()),
            "sample_index": pa.array(self.samples.sample_indices[qsl], pa.int64()),
            "input_tokens": pa.array(self.samples.input_lengths[qsl], pa.int32()),
            "output_tokens": pa.array(out_len.astype(np.int32), pa.int32()),
            "completed_at": pa.array(completed_at, pa.float64()),
        }
        if self.keep_outputs:
            flat = np.frombuffer(b"".join(a.tobytes() for a in self._rec_ids), dtype=RESPONSE_DTYPE)
            offsets = np.zeros(len(out_len) + 1, dtype=np.int32)
            np.cumsum(out_len, out=offsets[1:])
            columns["output_ids"] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                                             pa.array(flat, pa.int32()))
        return pa.table(columns)

    def input_tokens(self) -> int:
        if not self._rec_qsl:
            return 0
        return int(self.samples.input_lengths[np.concatenate(self._rec_qsl)].astype(np.int64).sum())


# --------------------------------------------------------------------------- progress

class _Progress:
    def __init__(self, sut: OfflineSUT, interval_s: float, label: str, log: Callable[[str], None]):
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
        return (f"{self.label}: {done}/{total} samples ({pct:.1f}%) | {tps:,.1f} output tok/s | "
                f"{sps:.2f} samples/s | elapsed {elapsed:.0f}s | ETA {eta_s}")

    def _run(self):
        while not self._done.wait(self.interval_s):
            self.log(self.line())


# --------------------------------------------------------------------------- LoadGen summary

_SUMMARY_FIELDS = {
    "scenario": (r"^Scenario\s*:\s*(.+)$", str),
    "loadgen_mode": (r"^Mode\s*:\s*(.+)$", str),
    "samples_per_second": (r"^Samples per second\s*:\s*(\S+)", float),
    "tokens_per_second": (r"^Tokens per second\s*:\s*(\S+)", float),
    "result": (r"^Result is\s*:\s*(\S+)", str),
    "min_duration_satisfied": (r"^\s*Min duration satisfied\s*:\s*(\S+)", lambda v: v == "Yes"),
    "min_queries_satisfied": (r"^\s*Min queries satisfied\s*:\s*(\S+)", lambda v: v == "Yes"),
    "early_stopping_satisfied": (r"^\s*Early stopping satisfied\s*:\s*(\S+)", lambda v: v == "Yes"),
}


def parse_summary(text: str) -> dict:
    """The few headline fields of ``mlperf_log_summary.txt`` (None where absent)."""
    out = {}
    for key, (pattern, conv) in _SUMMARY_FIELDS.items():
        match = re.search(pattern, text, re.MULTILINE)
        out[key] = conv(match.group(1).strip()) if match else None
    out["warnings"] = "No warnings encountered during test." not in text
    out["errors"] = "No errors encountered during test." not in text
    return out


# --------------------------------------------------------------------------- the run

def _loadgen_settings(lg, *, mode, n_samples, loadgen_model, min_duration_ms, min_query_count,
                      offline_expected_qps):
    settings = lg.TestSettings()
    settings.scenario = lg.TestScenario.Offline
    if loadgen_model:
        rc = settings.FromConfig("", loadgen_model, "Offline", 0)   # LoadGen's built-in mlperf.conf
        if rc != 0:
            raise HarnessError(f"LoadGen could not load its mlperf.conf for model {loadgen_model!r} (rc={rc})")
    settings.mode = lg.TestMode.AccuracyOnly if mode == "accuracy" else lg.TestMode.PerformanceOnly
    settings.use_token_latencies = True
    if min_duration_ms is not None:
        settings.min_duration_ms = int(min_duration_ms)
    requested_mqc = int(min_query_count) if min_query_count is not None else int(settings.min_query_count)
    settings.min_query_count = max(requested_mqc, n_samples)
    if offline_expected_qps is not None:
        settings.offline_expected_qps = float(offline_expected_qps)
    settings.performance_sample_count_override = n_samples
    effective = {
        "loadgen_model": loadgen_model,
        "min_duration_ms": int(settings.min_duration_ms),
        "min_query_count_requested": requested_mqc,
        "min_query_count": int(settings.min_query_count),
        "offline_expected_qps": float(settings.offline_expected_qps),
        "performance_sample_count": n_samples,
        "use_token_latencies": bool(settings.use_token_latencies),
        "sample_concatenate_permutation": bool(settings.sample_concatenate_permutation),
        "qsl_rng_seed": int(settings.qsl_rng_seed),
        "sample_index_rng_seed": int(settings.sample_index_rng_seed),
        "schedule_rng_seed": int(settings.schedule_rng_seed),
    }
    return settings, effective


def run_shard(engine, *, samples_parquet, out_dir, mode: str, shard_index: int, num_shards: int,
              shard_mode: str, batch_size: int, max_new_tokens: int,
              min_duration_ms: int | None = None, min_query_count: int | None = None,
              offline_expected_qps: float | None = None, loadgen_model: str | None = DEFAULT_LOADGEN_MODEL,
              metadata: dict | None = None, progress_interval_s: float = 30.0,
              summary_to_stdout: bool = False, log: Callable[[str], None] = _stderr_log) -> dict:
    """Run one shard through LoadGen Offline and write its output dir; return shard.json's content.

    LoadGen settings left ``None`` keep the values of LoadGen's built-in mlperf.conf
    for ``loadgen_model`` (MLPerf's defaults); ``loadgen_model=None`` starts from
    LoadGen's bare TestSettings defaults instead.
    """
    import mlperf_loadgen as lg

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if shard_mode not in SHARD_MODES:
        raise ValueError(f"shard_mode must be one of {SHARD_MODES}, got {shard_mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    engine_max = getattr(engine, "max_batch_size", None)
    if engine_max is not None and batch_size > int(engine_max):
        raise HarnessError(f"batch size {batch_size} exceeds the engine's max_batch_size {engine_max}: "
                           f"lower the batch size or rebuild the engine with a larger max_batch_size")
    metadata = dict(metadata or {})
    label = f"shard {shard_index}/{num_shards} {mode}"
    # the workflow passes its wildcards, named as shard.json names them (rackbench.config.CONFIG_FIELDS)
    if "batch_size" in metadata and str(metadata["batch_size"]) != str(batch_size):
        raise HarnessError(f"metadata says batch size {metadata['batch_size']!r} but the run uses {batch_size}")
    gps = metadata.get("gpus_per_shard")
    if metadata.get("layout") and gps is not None and metadata["layout"] != layout_name(num_shards, gps):
        raise HarnessError(f"layout {metadata['layout']!r} does not match {num_shards} shards of {gps} GPU(s)")
    requested_shard_mode = shard_mode
    if mode == "accuracy" and shard_mode != "split":
        log(f"{label}: accuracy runs always split the dataset; ignoring shard_mode={shard_mode!r}")
        shard_mode = "split"

    n_dataset = pq.ParquetFile(samples_parquet).metadata.num_rows
    indices = shard_sample_indices(n_dataset, shard_index, num_shards, shard_mode)
    samples = ShardSamples(samples_parquet, indices)
    n = len(samples)
    out_dir = Path(out_dir)

    with atomic_path(out_dir, directory=True) as tmp:
        settings, effective = _loadgen_settings(
            lg, mode=mode, n_samples=n, loadgen_model=loadgen_model, min_duration_ms=min_duration_ms,
            min_query_count=min_query_count, offline_expected_qps=offline_expected_qps)
        log_output = lg.LogOutputSettings()
        log_output.outdir = str(tmp)
        log_output.copy_summary_to_stdout = bool(summary_to_stdout)
        log_settings = lg.LogSettings()
        log_settings.log_output = log_output
        log_settings.enable_trace = False

        sut_impl = OfflineSUT(engine, samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              keep_outputs=(mode == "accuracy"), lg_module=lg)
        sut = lg.ConstructSUT(sut_impl.issue_query, sut_impl.flush_queries)
        qsl = lg.ConstructQSL(n, n, samples.load_samples, samples.unload_samples)
        progress = _Progress(sut_impl, progress_interval_s, label, log)
        log(f"{label}: {n} samples of {n_dataset} ({shard_mode}), batch size {batch_size}, "
            f"max_new_tokens {max_new_tokens}, LoadGen settings {effective}")
        started_at = time.time()
        progress.start()
        try:
            lg.StartTestWithLogSettings(sut, qsl, settings, log_settings)
        finally:
            finished_at = time.time()
            progress.stop()
            sut_impl.stop()
            lg.DestroyQSL(qsl)
            lg.DestroySUT(sut)
        if sut_impl.error is not None:
            raise HarnessError(f"{label}: engine failed: {sut_impl.error!r}") from sut_impl.error
        log(progress.line())

        summary_path = tmp / "mlperf_log_summary.txt"
        if not summary_path.exists():
            raise HarnessError(f"LoadGen wrote no {summary_path.name}")
        loadgen = parse_summary(summary_path.read_text())
        loadgen["settings"] = effective

        pq.write_table(sut_impl.table(), tmp / "samples.parquet")

        gpus_per_shard = metadata.get("gpus_per_shard")
        record = {
            **metadata,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "layout": metadata.get("layout") or (layout_name(num_shards, gpus_per_shard)
                                                  if gpus_per_shard is not None else None),
            "mode": mode,
            "shard_index": shard_index,
            "num_shards": num_shards,
            "shard_mode": shard_mode,
            "requested_shard_mode": requested_shard_mode,
            "gpus_per_shard": gpus_per_shard,
            "dataset_samples": n_dataset,
            "num_samples": n,
            "sample_indices": [indices[0], indices[-1] + 1] if samples.contiguous else None,
            "started_at": started_at,
            "finished_at": finished_at,
            # LoadGen's timed part: first IssueQuery .. last sample completed (QSL load is before it)
            "first_issue_at": sut_impl.first_issue_at,
            "last_complete_at": sut_impl._rec_time[-1][0] if sut_impl._rec_time else None,
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
        fragment = {k: v for k, v in record.items()
                    if k not in ("started_at", "finished_at", "output_tokens", "input_tokens",
                                 "completed_samples", "issued_samples", "loadgen", "hostname",
                                 "slurm_job_id", "cuda_visible_devices")}
        fragment["loadgen_settings"] = effective
        record["provenance"] = write_provenance(tmp / "provenance.json", step="run_shard",
                                                config_fragment=fragment)
        write_json_atomic(tmp / "shard.json", record)
        log(f"{label}: done: LoadGen result {loadgen['result']}, {loadgen['tokens_per_second']} tokens/s, "
            f"{loadgen['samples_per_second']} samples/s; {record['completed_samples']} samples, "
            f"{record['output_tokens']} output tokens in {finished_at - started_at:.1f}s")
    return record


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
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--min-duration-ms", type=int, default=None, help="default: LoadGen's mlperf.conf")
    p.add_argument("--min-query-count", type=int, default=None, help="default: LoadGen's mlperf.conf")
    p.add_argument("--offline-expected-qps", type=float, default=None, help="default: LoadGen's mlperf.conf")
    p.add_argument("--loadgen-model", default=DEFAULT_LOADGEN_MODEL,
                   help="model name whose LoadGen mlperf.conf entries are the defaults")
    p.add_argument("--progress-interval-s", type=float, default=RUN_DEFAULTS["progress_interval_s"])
    p.add_argument("--gpu-types-json", default="{}", help="JSON (or file): config['gpu_types']")
    p.add_argument("--engine-settings-json", default="{}", help="JSON (or file): engine runtime settings")
    p.add_argument("--meta-json", default="{}", help="JSON (or file): model, recipe, backend, gpu_type, ...")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from rackbench.build_engine import open_engine

    metadata = json_arg(args.meta_json)
    metadata.setdefault("gpus_per_shard", args.gpus_per_shard)
    gpu_ids = shard_gpu_ids(args.gpus_per_shard)
    if gpu_ids and len(gpu_ids) != args.gpus_per_shard:
        _stderr_log(f"warning: CUDA_VISIBLE_DEVICES shows {len(gpu_ids)} GPUs; --gpus-per-shard is {args.gpus_per_shard}")
    engine = open_engine(args.engine_dir, gpu_ids=gpu_ids, settings=json_arg(args.engine_settings_json),
                         gpu_types=json_arg(args.gpu_types_json))
    try:
        run_shard(engine, samples_parquet=args.dataset, out_dir=args.out, mode=args.mode,
                  shard_index=args.shard_index, num_shards=args.num_shards, shard_mode=args.shard_mode,
                  batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                  min_duration_ms=args.min_duration_ms, min_query_count=args.min_query_count,
                  offline_expected_qps=args.offline_expected_qps, loadgen_model=args.loadgen_model,
                  metadata=metadata, progress_interval_s=args.progress_interval_s, summary_to_stdout=True)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
