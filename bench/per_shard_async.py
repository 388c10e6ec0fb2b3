"""Benchmark (issue 10, benchmark 3): per-shard mode before and after the asynchronous engine contract.

Same samples, same engine, same LoadGen settings; only the way the SUT feeds the engine differs:

* **before** (static batches, the old contract): ``rackbench.engines.BatchedEngine`` over the
  engine's blocking ``generate``: the SUT hands the engine ``batch`` prompts and waits for the
  slowest of them before the next ``batch`` go in, so the tail of every wave runs a shrinking
  batch;
* **after** (the submit contract): the SUT hands each sample to ``ReferenceEngine.submit`` as
  LoadGen issues it, at most ``batch`` in flight, and a finished row's successor joins the
  running batch at the next step (continuous batching).

The engine is the demo's (its model, dataset, NVFP4 + FP8-KV checkpoint and reference engine,
made by the workflow's own commands with config.yaml's settings: see bench/reference_engine.py),
run through ``rackbench.harness.run_shard`` (Offline, performance mode) on the demo's shards
(``--num-shards`` of the 48 samples, split; each shard run in turn, in this one process).

Prints, per mode: LoadGen's tokens/s and samples/s summed over the shards, the timed span
(first issue .. last completion) and CPU time, and checks that both modes give each sample
the same number of tokens. Fastest of ``--repeats`` runs (the machine may be shared).

    python bench/per_shard_async.py [--repeats 3] [--batch 16] [--num-shards 2] [--threads 1] [--assets DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def run_mode(engine, mode: str, parquet: Path, out: Path, *, batch: int, num_shards: int, max_new: int) -> dict:
    import pyarrow.parquet as pq

    from rackbench.engines import BatchedEngine
    from rackbench.harness import run_shard

    fed = BatchedEngine(engine.generate, batch) if mode == "before" else engine
    tps = sps = span = 0.0
    lengths = {}
    cpu0 = time.process_time()
    try:
        for shard in range(num_shards):
            d = out / f"{mode}-shard{shard}"
            rec = run_shard(
                fed,
                samples_parquet=parquet,
                out_dir=d,
                mode="performance",
                shard_index=shard,
                num_shards=num_shards,
                shard_mode="split",
                batch_size=batch,
                max_new_tokens=max_new,
                min_duration_ms=0,
                min_query_count=1,
                offline_expected_qps=1,
                metadata={},
                progress_interval_s=0,
                log=lambda m: None,
            )
            tps += rec["loadgen"]["tokens_per_second"]
            sps += rec["loadgen"]["samples_per_second"]
            span += rec["last_complete_at"] - rec["first_issue_at"]
            for row in pq.read_table(d / "samples.parquet").to_pylist():
                lengths.setdefault(row["sample_index"], row["output_tokens"])
    finally:
        if fed is not engine:
            fed.close()
    return {
        "tokens_per_second": tps,
        "samples_per_second": sps,
        "span_s": span,
        "cpu_s": time.process_time() - cpu0,
        "lengths": lengths,
    }


def main() -> None:
    from reference_engine import demo_engine_and_samples

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "config.yaml"))
    ap.add_argument("--batch", type=int, default=None, help="default: config benchmarks.batch_sizes[0]")
    ap.add_argument("--num-shards", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="default: engines.reference.torch_threads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--assets", help="keep/reuse the demo assets in this dir")
    args = ap.parse_args()

    import torch

    from rackbench import demo
    from rackbench.engines import reference

    config = yaml.safe_load(Path(args.config).read_text())
    settings = dict(config["engines"]["reference"])
    threads = args.threads or settings.get("torch_threads") or 1
    batch = args.batch or config["benchmarks"]["batch_sizes"][0]
    max_new = config["run"]["max_new_tokens"]
    torch.set_num_threads(threads)
    tmp = tempfile.TemporaryDirectory(prefix="rb-per-shard-")
    root = Path(args.assets or tmp.name)
    engine_dir, parquet = demo_engine_and_samples(root, config)
    engine = reference.load(engine_dir, record={}, gpu_ids=[], settings={**settings, "torch_threads": threads})
    print(
        f"per-shard Offline, {args.num_shards} shards (split) of the demo's {demo.__name__} dataset, "
        f"batch / max in flight {batch}, max_new_tokens {max_new}, engine max_batch_size "
        f"{engine.max_batch_size}, {threads} thread(s), load average {os.getloadavg()[0]:.2f}"
    )
    best = {}
    try:
        engine.generate([[1, 2, 3]], 2)  # warm-up
        for _ in range(args.repeats):
            for mode in ("before", "after"):
                with tempfile.TemporaryDirectory(prefix=f"rb-{mode}-") as out:
                    res = run_mode(
                        engine, mode, parquet, Path(out), batch=batch, num_shards=args.num_shards, max_new=max_new
                    )
                if mode not in best or res["span_s"] < best[mode]["span_s"]:
                    best[mode] = res
    finally:
        engine.close()
    if best["before"]["lengths"] != best["after"]["lengths"]:
        raise SystemExit("the two modes gave different output lengths: the benchmark compares different work")
    tokens = sum(best["after"]["lengths"].values())
    for mode, label in (
        ("before", "before: static batches (BatchedEngine)"),
        ("after", "after: submit, continuous batching"),
    ):
        b = best[mode]
        print(
            f"{label:40s} LoadGen {b['tokens_per_second']:8.1f} tok/s {b['samples_per_second']:6.2f} samples/s "
            f"(sum over shards) | span {b['span_s']:.3f} s, {tokens / b['span_s']:.1f} tok/s | cpu {b['cpu_s']:.2f} s"
        )
    gain = best["after"]["tokens_per_second"] / best["before"]["tokens_per_second"]
    print(
        f"gain (LoadGen tokens/s, after / before): {gain:.2f}x; same {tokens} output tokens in both modes; "
        f"load average now {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
