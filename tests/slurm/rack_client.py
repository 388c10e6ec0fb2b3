"""The one LoadGen of a test rack run: rackbench.harness.run_shard over every endpoint in
$RACKBENCH_ENDPOINTS (set by ``python -m rackbench.launch slurm ... -- <this>``), through
rackbench.endpoints.EndpointPool. A stand-in for the rack module's driver in
tests/test_slurm_rack.py; writes OUT (LoadGen's logs) and OUT/../endpoints.json (per-endpoint stats).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rackbench.endpoints import EndpointPool, urls_from_env
from rackbench.harness import run_shard


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mode", default="accuracy")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--min-query-count", type=int, default=1)
    p.add_argument("--max-in-flight", type=int, default=None)
    a = p.parse_args()
    urls = urls_from_env()
    print(f"rack_client: one LoadGen over {len(urls)} endpoint(s): {' '.join(urls)}", file=sys.stderr, flush=True)
    with EndpointPool(urls, stream=False, balance="isl") as pool:
        try:
            run_shard(
                pool,
                samples_parquet=a.samples,
                out_dir=a.out,
                mode=a.mode,
                shard_index=0,
                num_shards=1,
                shard_mode="split",
                batch_size=None,
                max_new_tokens=a.max_new_tokens,
                max_in_flight=a.max_in_flight,
                min_duration_ms=0,
                min_query_count=a.min_query_count,
                offline_expected_qps=10,
                metadata={
                    "model": "demo",
                    "recipe": "none",
                    "backend": "http",
                    "gpu_type": "gb300",
                    "gpus_per_shard": 1,
                },
                progress_interval_s=0,
            )
        finally:
            pool.write_stats(a.out.parent / "endpoints.json")
    print("rack_client: done", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
