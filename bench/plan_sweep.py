"""Benchmark 3: planning time of a rack sweep.

`snakemake -n` for 3 GPU types x 4 batch sizes x 2 recipes x 72 one-GPU shards
(1,728 performance shard jobs, plus as many accuracy shards) on the real config.
Target: <= 15 s. Prints the wall time and the planned job counts.

    python bench/plan_sweep.py
"""

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def sweep_config(tmp: Path) -> Path:
    config = yaml.safe_load((ROOT / "config" / "llama2-70b-gb300.yaml").read_text())
    for name, dataset in config["datasets"].items():  # stand-ins for the MLPerf data
        for part in ("samples", "calibration"):
            for key in ("path", "sha256_file"):
                if key in dataset[part]:
                    stand_in = tmp / f"{name}-{part}-{key}"
                    stand_in.write_bytes(b"stand-in")
                    dataset[part][key] = str(stand_in)
    config["benchmarks"].update(
        gpu_types=["B200", "GB200", "GB300"],
        batch_sizes=[256, 512, 1024, 2048],
        recipes=["nvfp4", "fp8"],
        gpus_per_shard=[1],
    )
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        config = sweep_config(Path(tmp))
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "--configfile", str(config)],
                              cwd=ROOT, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr)
        return 1
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", proc.stdout, re.M)}
    print(f"planned jobs: {counts}")
    print(f"run_shard jobs: {counts.get('run_shard')} (performance + accuracy)")
    print(f"snakemake -n wall time: {elapsed:.1f} s (target <= 15 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
