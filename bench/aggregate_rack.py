"""Benchmark the report step at rack scale on synthetic shard dirs.

Builds 18 shard dirs x 1,056,768 per-sample rows (the shape of 18 replicated
Llama-2-70B Offline runs) in a temp dir, runs ``python -m rackbench.report`` on
them in a child process, and prints its wall time and peak RSS. Budget: 60 s, 4 GB.

    python bench/aggregate_rack.py [--shards 18] [--rows 1056768] [--keep DIR]

``write_shard`` is also what the tests use to make small synthetic shard dirs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rackbench import paths
from rackbench.config import CONFIG_FIELDS
from rackbench.shards import layout_name

SUMMARY_TEMPLATE = """================================================
MLPerf Results Summary
================================================
SUT name : rackbench-synthetic
Scenario : Offline
Mode     : PerformanceOnly
Samples per second: {sps}
Tokens per second: {tps}
Result is : {result}
  Min duration satisfied : {mindur}
  Min queries satisfied : Yes
  Early stopping satisfied: Yes

================================================
Additional Stats
================================================
Max latency (ns)                : {maxlat}

================================================
Test Parameters Used
================================================
samples_per_query : {n}
min_duration (ms): 0
min_query_count : 1

No warnings encountered during test.

No errors encountered during test.
"""


SYNTHETIC_VARIANT = "5e7e7e7e"  # the variant directory synthetic results are written under
# The configuration synthetic results belong to unless a call names other fields (the layout
# comes from each call).
SYNTHETIC_FIELDS = {
    "model": "llama2-70b",
    "recipe": "nvfp4",
    "backend": "tensorrt-llm",
    "gpu_type": "GB300",
    "batch_size": 16,
}


def _fields(overrides: dict, layout: str) -> dict:
    """The configuration's fields (config.CONFIG_FIELDS); any other name is a caller's typo."""
    unknown = set(overrides) - (set(CONFIG_FIELDS) - {"layout"})
    if unknown:
        raise TypeError(f"not a configuration field other than the layout: {sorted(unknown)}")
    return {**SYNTHETIC_FIELDS, **overrides, "layout": layout}


def configuration_entry(shard_dirs, accuracy_json=None) -> dict:
    """What the workflow tells the report about one configuration (Configuration.report_entry),
    for synthetic shard dirs of one configuration (their fields from the first shard.json)."""
    meta = json.loads((Path(shard_dirs[0]) / "shard.json").read_text())
    fields = {k: meta[k] for k in CONFIG_FIELDS}
    return {
        **fields,
        "key": paths.config_key(fields),
        "variant": SYNTHETIC_VARIANT,
        "shard_dirs": [str(d) for d in shard_dirs],
        "accuracy_json": str(accuracy_json) if accuracy_json else None,
    }


def write_shard(
    root,
    *,
    num_shards=2,
    gpus_per_shard=4,
    shard=0,
    rows=100,
    started_at=1.7e9,
    duration=100.0,
    out_tokens_per_sample=10,
    in_tokens_per_sample=100,
    result="VALID",
    loadgen_tps=None,
    accuracy_log="[]",
    seed=0,
    **fields,
):
    """Write one synthetic performance shard dir in the ARCHITECTURE.md layout; return its path.

    ``fields``: configuration fields other than the layout (``gpu_type="cpu"``, ...), else
    ``SYNTHETIC_FIELDS``. The LoadGen summary's tokens/s is output_tokens/duration unless
    ``loadgen_tps`` is given.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = _fields(fields, layout_name(num_shards, gpus_per_shard))
    d = Path(root).parent / paths.shard_dir(fields, SYNTHETIC_VARIANT, "performance", shard)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + shard)
    out_tok = np.full(rows, out_tokens_per_sample, dtype=np.int32)
    in_tok = np.full(rows, in_tokens_per_sample, dtype=np.int32)
    completed = started_at + np.sort(rng.uniform(0.0, duration, rows))
    completed[-1] = started_at + duration
    table = pa.table(
        {
            "qsl_index": pa.array(np.arange(rows, dtype=np.int64)),
            "sample_index": pa.array(np.arange(rows, dtype=np.int64) % 24576),
            "input_tokens": pa.array(in_tok),
            "output_tokens": pa.array(out_tok),
            "completed_at": pa.array(completed),
        }
    )
    pq.write_table(table, d / "samples.parquet")
    total_out = int(out_tok.sum())
    tps = loadgen_tps if loadgen_tps is not None else f"{total_out / duration:g}"
    (d / "mlperf_log_summary.txt").write_text(
        SUMMARY_TEMPLATE.format(
            sps=f"{rows / duration:g}",
            tps=tps,
            result=result,
            mindur="Yes" if result == "VALID" else "No",
            maxlat=int(duration * 1e9),
            n=rows,
        )
    )
    (d / "mlperf_log_accuracy.json").write_text(accuracy_log)
    meta = {
        **fields,
        "mode": "performance",
        "shard_index": shard,
        "num_shards": num_shards,
        "shard_mode": "replicate",
        "gpus_per_shard": gpus_per_shard,
        "num_samples": rows,
        "sample_indices": None,
        "started_at": started_at,
        "finished_at": started_at + duration,
        "output_tokens": total_out,
        "input_tokens": int(in_tok.sum()),
        "completed_samples": rows,
        "loadgen": {"result": result, "tokens_per_second": float(tps)},
        "cuda_visible_devices": ",".join(map(str, range(gpus_per_shard))),
        "hostname": f"node{shard:02d}",
        "slurm_job_id": None,
    }
    (d / "shard.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return d


def write_accuracy(root, *, layout="2x4", valid=True, rouge1=44.4, with_txt=True, **fields):
    """Write a synthetic accuracy.json (and .txt) of one configuration (``fields`` as in write_shard)."""
    fields = _fields(fields, layout)
    d = (Path(root).parent / paths.accuracy_json(fields, SYNTHETIC_VARIANT)).parent
    d.mkdir(parents=True, exist_ok=True)
    data = {
        "rouge1": rouge1,
        "rouge2": 22.0,
        "rougeL": 28.6,
        "rougeLsum": 42.0,
        "tokens_per_sample": 294.4,
        "gen_num": 24576,
        "gen_len": 7234567,
        "targets": {"rouge1": 43.99, "rouge2": 21.81, "rougeL": 28.33, "tokens_per_sample": [265.0, 323.8]},
        "valid": valid,
        "failures": [] if valid else [f"rouge1 {rouge1} < 43.99"],
    }
    (d / "accuracy.json").write_text(json.dumps(data, indent=2, sort_keys=True))
    if with_txt:
        (d / "accuracy.txt").write_text(
            "\nResults\n\n"
            + str(
                {
                    k: data[k]
                    for k in ("rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len", "gen_num", "tokens_per_sample")
                }
            )
            + "\n"
        )
    return d / "accuracy.json"


GPU_TYPES = {
    "GB300": {
        "kind": "gpu",
        "compute_capability": "10.3",
        "memory_gb": 288,
        "runs_nvfp4": True,
        "peak_dense_flops": {"fp8": 5.0e15, "fp4": 1.5e16, "source": "NVIDIA GB300 datasheet"},
        "published": {"tokens_per_s_per_gpu": 15291, "source": "Azure, unverified"},
    },
    "cpu": {"kind": "cpu", "compute_capability": None, "memory_gb": None, "runs_nvfp4": True},
}
MODELS = {"llama2-70b": {"parameters": 7.0e10}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=18)
    parser.add_argument("--rows", type=int, default=1_056_768)
    parser.add_argument("--keep", help="build in this dir and keep it")
    args = parser.parse_args(argv)
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="rackbench-bench-")
    root = Path(args.keep or tmp.name) / paths.RESULTS
    t0 = time.perf_counter()
    dirs = [
        write_shard(
            root,
            shard=i,
            num_shards=args.shards,
            rows=args.rows,
            started_at=1.7e9 + i,
            duration=2400.0 + 7 * i,
            out_tokens_per_sample=290,
            in_tokens_per_sample=180,
        )
        for i in range(args.shards)
    ]
    acc = write_accuracy(root, layout=f"{args.shards}x4")
    print(f"built {args.shards} shards x {args.rows} rows in {time.perf_counter() - t0:.1f} s under {root}")
    (root / "gpu_types.json").write_text(json.dumps(GPU_TYPES))
    (root / "models.json").write_text(json.dumps(MODELS))
    (root / "configurations.json").write_text(json.dumps([configuration_entry(dirs, acc)]))
    cmd = [
        sys.executable,
        "-m",
        "rackbench.report",
        "--configurations-json",
        str(root / "configurations.json"),
        "--gpu-types-json",
        str(root / "gpu_types.json"),
        "--models-json",
        str(root / "models.json"),
        "--out",
        str(root / "report"),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(proc.stdout, end="")
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return proc.returncode
    ok = wall <= 60 and rss_kb <= 4 * 1024 * 1024
    print(
        f"report step: wall {wall:.2f} s, peak RSS {rss_kb / 1024:.0f} MiB "
        f"({'within' if ok else 'OVER'} budget: 60 s, 4096 MiB)"
    )
    if tmp:
        tmp.cleanup()
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
