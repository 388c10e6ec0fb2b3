"""How much the harness costs: LoadGen Offline + rackbench's SUT with a zero-cost engine.

Runs, in one process, over a synthetic parquet of 24,576 samples:

1. LoadGen alone: a minimal SUT that completes every issued sample at once
   (fixed-length int32 data, n_tokens set), no batching, no engine;
2. rackbench.harness.run_shard with a zero-cost engine whose submit() answers at once
   (performance mode, one shard): the SUT's own cost, the figure the targets are for;
3. the same with a zero-cost blocking generate(), which the harness runs through
   rackbench.engines.BatchedEngine (its worker thread and static batches on top).

Prints samples/s and output tokens/s for both: over the timed span (first
IssueQuery .. last sample completed, wall clock), as LoadGen's summary reports
them, and over the whole StartTest / run_shard call (which also holds the QSL
load, where the harness turns prompts into lists, and LoadGen's log setup).
Targets for (2), on the timed span: >= 25,000 samples/s and >= 7,000,000
output tokens/s.

    python bench/harness_overhead.py [--samples 24576] [--output-len 294] [--batch-size 256] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TARGET_SPS = 25_000
TARGET_TPS = 7_000_000


def make_parquet(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(16, 512, size=n)  # OpenOrca-like prompt lengths
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = rng.integers(1, 32000, size=int(offsets[-1]), dtype=np.int32)
    tok_input = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    pq.write_table(pa.table({"tok_input": tok_input}), path)


class ZeroCostSubmitEngine:
    """The asynchronous Engine contract at zero cost: ``submit`` answers at once, on the caller's
    thread (the SUT's own per-sample path, with nothing between it and the engine)."""

    def __init__(self, output_len: int, max_batch_size: int):
        self.max_in_flight = max_batch_size
        self.output = list(range(1, output_len + 1))

    def submit(self, prompt, max_new_tokens, *, on_done, on_error, on_first_token=None):
        out = self.output[:max_new_tokens]
        if on_first_token is not None and out:
            on_first_token(out[0])
        on_done(out)

    def close(self):
        pass


class ZeroCostEngine:
    """A blocking ``generate`` at zero cost: the harness runs it through ``BatchedEngine``."""

    def __init__(self, output_len: int, max_batch_size: int):
        self.max_batch_size = max_batch_size
        self.output = list(range(1, output_len + 1))

    def generate(self, prompts, max_new_tokens):
        out = self.output[:max_new_tokens]
        return [out] * len(prompts)

    def close(self):
        pass


def _summary_rates(outdir: Path) -> tuple[float | None, float | None]:
    from rackbench.harness import parse_summary

    parsed = parse_summary((outdir / "mlperf_log_summary.txt").read_text())
    return parsed["samples_per_second"], parsed["tokens_per_second"]


def loadgen_alone(n: int, output_len: int, outdir: Path) -> dict:
    import mlperf_loadgen as lg

    data = np.arange(1, output_len + 1, dtype=np.int32)
    ptr, size = data.ctypes.data, data.nbytes
    response = lg.QuerySampleResponse

    times = {}

    def issue(query_samples):  # timed like the harness: first issue .. last completion
        times.setdefault("first", time.time())
        lg.QuerySamplesComplete([response(q.id, ptr, size, output_len) for q in query_samples])
        times["last"] = time.time()

    qsl = lg.ConstructQSL(n, n, lambda s: None, lambda s: None)
    settings = lg.TestSettings()
    settings.scenario = lg.TestScenario.Offline
    settings.FromConfig("", "llama2-70b", "Offline", 0)
    settings.mode = lg.TestMode.PerformanceOnly
    settings.min_duration_ms = 0
    settings.min_query_count = n
    settings.offline_expected_qps = 10
    settings.performance_sample_count_override = n
    log_output = lg.LogOutputSettings()
    log_output.outdir = str(outdir)
    log_output.copy_summary_to_stdout = False
    log_settings = lg.LogSettings()
    log_settings.log_output = log_output
    outdir.mkdir(parents=True, exist_ok=True)
    sut = lg.ConstructSUT(issue, lambda: None)
    t0 = time.perf_counter()
    lg.StartTestWithLogSettings(sut, qsl, settings, log_settings)
    run_wall = time.perf_counter() - t0
    wall = times["last"] - times["first"]
    lg.DestroyQSL(qsl)
    lg.DestroySUT(sut)
    sps, tps = _summary_rates(outdir)
    return {
        "wall_s": wall,
        "run_wall_s": run_wall,
        "samples": n,
        "tokens": n * output_len,
        "lg_sps": sps,
        "lg_tps": tps,
    }


def harness(parquet: Path, n: int, output_len: int, batch_size: int, outdir: Path, profile: bool, engine_cls) -> dict:
    from rackbench.harness import run_shard

    engine = engine_cls(output_len, max_batch_size=batch_size)
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    record = run_shard(
        engine,
        samples_parquet=parquet,
        out_dir=outdir,
        mode="performance",
        shard_index=0,
        num_shards=1,
        shard_mode="split",
        batch_size=batch_size,
        max_new_tokens=output_len,
        min_duration_ms=0,
        min_query_count=n,
        offline_expected_qps=10,
        metadata={},
        progress_interval_s=0,
        log=lambda m: None,
    )
    if profiler:
        profiler.disable()
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(25)
        print(buf.getvalue(), file=sys.stderr)
    lg = record["loadgen"]
    return {
        "wall_s": record["last_complete_at"] - record["first_issue_at"],
        "run_wall_s": record["finished_at"] - record["started_at"],
        "samples": record["completed_samples"],
        "tokens": record["output_tokens"],
        "lg_sps": lg["samples_per_second"],
        "lg_tps": lg["tokens_per_second"],
    }


def _line(name: str, r: dict) -> str:
    sps, tps = r["samples"] / r["wall_s"], r["tokens"] / r["wall_s"]
    return (
        f"{name:<24} {r['samples']} samples | issue->done {r['wall_s']:.3f}s: {sps:>9,.0f} samples/s "
        f"{tps:>12,.0f} tok/s | LoadGen summary: {r['lg_sps']:>9,.0f} samples/s {r['lg_tps']:>12,.0f} tok/s | "
        f"whole run incl. QSL load and log setup {r['run_wall_s']:.3f}s: "
        f"{r['samples'] / r['run_wall_s']:,.0f} samples/s"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=24576)
    p.add_argument("--output-len", type=int, default=294, help="tokens per output (MLPerf reference mean: 294.45)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--profile", action="store_true", help="cProfile the harness run (to stderr)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="harness-overhead-") as tmp:
        tmp = Path(tmp)
        parquet = tmp / "samples.parquet"
        make_parquet(parquet, args.samples)
        alone = loadgen_alone(args.samples, args.output_len, tmp / "loadgen_alone")
        ours = harness(
            parquet, args.samples, args.output_len, args.batch_size, tmp / "harness", args.profile, ZeroCostSubmitEngine
        )
        batched = harness(
            parquet, args.samples, args.output_len, args.batch_size, tmp / "batched", args.profile, ZeroCostEngine
        )
    print(f"harness overhead: {args.samples} samples, {args.output_len} tokens each, batch size {args.batch_size}")
    print(_line("LoadGen alone", alone))
    print(_line("LoadGen + rackbench SUT", ours))
    print(_line("  same, via BatchedEngine", batched))
    sps = ours["samples"] / ours["wall_s"]
    tps = ours["tokens"] / ours["wall_s"]
    ok = sps >= TARGET_SPS and tps >= TARGET_TPS
    print(
        f"targets: >= {TARGET_SPS:,} samples/s and >= {TARGET_TPS:,} output tok/s (issue->done): "
        f"{'MET' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
