"""Benchmark 3: planning time of a rack sweep.

`snakemake -n` for 3 GPU types x 4 batch sizes x 2 recipes x 72 one-GPU shards
(1,728 performance shard jobs, plus as many accuracy shards) on the real config.
Target: <= 15 s. Prints the wall time and the planned job counts, and the start-up
time of a bare `snakemake --version` inside it: snakemake-executor-plugin-slurm runs
`scontrol show config` whenever Snakemake starts, which on a machine with Slurm
installed but no controller answering waits out a 10 s timeout.

    python bench/plan_sweep.py
"""

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import real_config_with_local_data  # noqa: E402  (stand-ins for the MLPerf data)


def sweep_config(tmp: Path) -> Path:
    return real_config_with_local_data(
        tmp,
        **{
            "benchmarks.gpu_types": ["B200", "GB200", "GB300"],
            "benchmarks.batch_sizes": [256, 512, 1024, 2048],
            "benchmarks.recipes": ["nvfp4", "fp8"],
            "benchmarks.gpus_per_shard": [1],
        },
    )


def main() -> int:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "--version"], cwd=ROOT, capture_output=True, check=True)
    startup = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        config = sweep_config(Path(tmp))
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "--configfile", str(config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr)
        return 1
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", proc.stdout, re.M)}
    print(f"planned jobs: {counts}")
    print(f"run_shard jobs: {counts.get('run_shard')} (performance + accuracy)")
    print(
        f"snakemake -n wall time: {elapsed:.1f} s (target <= 15 s); of it Snakemake's start-up, "
        f"as `snakemake --version` takes here: {startup:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
