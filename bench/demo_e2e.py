"""Benchmark 4: the demo end to end.

Wall time and peak memory of `snakemake --cores 2` from a clean results/ in a
fresh copy of the workflow. Peak memory is the largest sum of resident set
sizes over Snakemake and all its descendant processes, sampled every 0.2 s.
Targets: <= 3 minutes and <= 4 GB.

    python bench/demo_e2e.py
"""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import copy_workflow  # noqa: E402


def tree_rss_peak(proc) -> int:
    """Poll until ``proc`` exits; return the largest summed RSS of it and its descendants."""
    import psutil

    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.2)
    return peak


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = copy_workflow(Path(tmp))
        start = time.perf_counter()
        log = Path(tmp) / "snakemake.log"  # a file, not a pipe: a full pipe would stall the run
        with open(log, "w") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "snakemake", "--cores", "2"], cwd=workdir, stdout=sink, stderr=subprocess.STDOUT
            )
            peak = tree_rss_peak(proc)
        stderr = log.read_text()
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            print(stderr[-3000:])
            return 1
    print(f"demo wall time: {elapsed:.0f} s (target <= 180 s)")
    print(f"peak memory (process tree, summed RSS): {peak / 1024**3:.2f} GiB (target <= 4 GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
