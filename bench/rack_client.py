"""The rack client's own cost: one LoadGen process driving 72 zero-cost HTTP endpoints.

What the rack run does (``rackbench.rack``), minus the engines: ``harness.run_shard`` (the
harness's SUT, one LoadGen) over ``rackbench.endpoints.EndpointPool`` over N endpoints on
localhost. The endpoints are zero-cost stubs (``bench/stub_endpoints.py``: a minimal asyncio
protocol server, all ports in one process, answering at once); ``--stub serve`` uses
``python -m rackbench.serve --backend instant`` instead (the product's aiohttp server around
a zero-cost engine; several times dearer per request, so it measures the stub more than the
client on 2 shared cores).

Targets (issue 10): >= 20,000 samples/s Offline (not streamed), >= 8,000 samples/s Server
(streamed, each first chunk a ``FirstTokenComplete``). Figures are LoadGen's own
(mlperf_log_summary.txt). The script also prints each process's CPU time per sample, and
checks, in a short accuracy-mode run per scenario, that every output LoadGen recorded is
exactly what the stub sent.

    python bench/rack_client.py [--endpoints 72] [--offline-samples 200000] [--offline-batch 256]
                                [--server-qps 8000] [--server-seconds 20] [--server-batch 32] [--stub fast|serve]

``--offline-batch`` / ``--server-batch``: the pool's ``batch_size``: samples already waiting
for one endpoint go out as one completions request with a list of prompts (the OpenAI API
allows it; trtllm-serve's CompletionRequest takes List[List[int]]); 1 = one request per sample.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "bench"))

from stub_endpoints import expected_tokens  # noqa: E402

from rackbench import harness  # noqa: E402
from rackbench.endpoints import EndpointPool, wait_ready  # noqa: E402
from rackbench.launch import free_ports  # noqa: E402

TARGET_OFFLINE = 20_000
TARGET_SERVER = 8_000


def make_parquet(path: Path, n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 32000, size=int(k)).tolist() for k in rng.integers(16, 512, size=n)]
    pq.write_table(pa.table({"tok_input": pa.array(prompts, pa.list_(pa.int32()))}), path)
    return prompts


def start_stubs(kind: str, ports: list[int], output_len: int, procs: int) -> list[subprocess.Popen]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "scripts"))
    groups = [ports[i::procs] for i in range(procs)]
    out = []
    for group in groups:
        if kind == "fast":
            cmd = [sys.executable, str(ROOT / "bench" / "stub_endpoints.py"), "--output-len", str(output_len)]
        else:
            cmd = [sys.executable, "-m", "rackbench.serve", "--backend", "instant", "--host", "127.0.0.1"]
            cmd += ["--settings", f'{{"output_len": {output_len}}}']
        cmd += [a for port in group for a in ("--port", str(port))]
        out.append(subprocess.Popen(cmd, env=env, start_new_session=True))
    return out


class CpuSampler:
    """(wall time, this process's CPU time, the stubs' CPU time) every ``interval`` s, so the CPU
    spent over LoadGen's timed span (first issue .. last completion) can be read off, without the
    QSL load, LoadGen's setup and the output files around it."""

    def __init__(self, stub_ps, interval=0.02):
        import threading

        self.stub_ps, self.interval, self.points = stub_ps, interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self):
        stubs = sum(sum(p.cpu_times()[:2]) for p in self.stub_ps)
        self.points.append((time.time(), time.process_time(), stubs))

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self):
        self._stop.set()
        self._thread.join()
        self._sample()

    def between(self, t0, t1) -> tuple[float, float]:
        ts = np.array([p[0] for p in self.points])
        out = []
        for k in (1, 2):
            v = np.array([p[k] for p in self.points])
            out.append(float(np.interp(t1, ts, v) - np.interp(t0, ts, v)))
        return out[0], out[1]


def run_scenario(urls, parquet, *, scenario, mode, batch, concurrency, n_samples, qps, seconds, output_len, stubs):
    import psutil

    stub_ps = [psutil.Process(s.pid) for s in stubs]
    stream = scenario != "Offline"
    pool = EndpointPool(urls, stream=stream, balance="isl", batch_size=batch, concurrency=concurrency)
    kwargs = {}
    if mode == "accuracy":
        kwargs.update(min_duration_ms=0, target_qps=qps if stream else None)
    elif scenario == "Offline":
        kwargs.update(offline_expected_qps=1, min_duration_ms=1000, min_query_count=n_samples)
    else:
        kwargs.update(target_qps=qps, min_duration_ms=int(seconds * 1000), min_query_count=int(qps * seconds))
    try:
        with tempfile.TemporaryDirectory(prefix=f"rack_client_{scenario}_") as tmp:
            sampler = CpuSampler(stub_ps)
            record = harness.run_shard(
                pool,
                samples_parquet=parquet,
                out_dir=Path(tmp) / "run",
                mode=mode,
                shard_index=0,
                num_shards=1,
                shard_mode="split",
                batch_size=None,
                max_in_flight=pool.max_in_flight,
                max_new_tokens=output_len,
                scenario=scenario,
                metadata={},
                progress_interval_s=0,
                log=lambda m: None,
                **kwargs,
            )
            sampler.stop()
            cpu, stub_cpu = sampler.between(record["first_issue_at"], record["last_complete_at"])
            table = pq.read_table(Path(tmp) / "run" / "samples.parquet")
        stats = pool.stats()
    finally:
        pool.close()
    return record, table, stats, cpu, stub_cpu


def check_outputs(table, prompts, output_len) -> int:
    """Samples whose recorded output differs from what the stub sent (accuracy mode)."""
    bad = 0
    for idx, out in zip(table.column("sample_index").to_pylist(), table.column("output_ids").to_pylist()):
        bad += out != expected_tokens(prompts[idx], output_len, output_len)
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoints", type=int, default=72)
    p.add_argument("--offline-samples", type=int, default=200_000)
    p.add_argument("--offline-batch", type=int, default=256)
    p.add_argument("--offline-concurrency", type=int, default=1, help="open requests per endpoint, Offline")
    p.add_argument("--server-qps", type=float, default=8_000)
    p.add_argument("--server-seconds", type=float, default=20)
    p.add_argument("--server-batch", type=int, default=32)
    p.add_argument("--server-concurrency", type=int, default=64, help="open requests per endpoint, Server")
    p.add_argument("--output-len", type=int, default=2, help="tokens each stub answers (>= 2: first + rest)")
    p.add_argument("--num-prompts", type=int, default=24_576)
    p.add_argument("--check-prompts", type=int, default=4_096, help="accuracy-mode output check (0: skip)")
    p.add_argument("--scenarios", default="Offline,Server")
    p.add_argument("--stub", choices=("fast", "serve"), default="fast")
    p.add_argument("--stub-procs", type=int, default=1, help="stub processes (ports split between them)")
    args = p.parse_args(argv)

    ports = free_ports(args.endpoints)
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    stubs = start_stubs(args.stub, ports, args.output_len, args.stub_procs)
    results = {}
    try:
        import asyncio

        asyncio.run(wait_ready(urls, 60, poll_interval=0.2))
        with tempfile.TemporaryDirectory(prefix="rack_client_") as tmp:
            parquet, check_parquet = Path(tmp) / "samples.parquet", Path(tmp) / "check.parquet"
            make_parquet(parquet, args.num_prompts)
            check = make_parquet(check_parquet, args.check_prompts, seed=1) if args.check_prompts else None
            for scenario in args.scenarios.split(","):
                offline = scenario == "Offline"
                batch = args.offline_batch if offline else args.server_batch
                conc = args.offline_concurrency if offline else args.server_concurrency
                common = dict(
                    scenario=scenario,
                    batch=batch,
                    concurrency=conc,
                    n_samples=args.offline_samples,
                    qps=args.server_qps,
                    seconds=args.server_seconds,
                    output_len=args.output_len,
                    stubs=stubs,
                )
                if check is not None:
                    _, table, _, _, _ = run_scenario(urls, check_parquet, mode="accuracy", **common)
                    bad = check_outputs(table, check, args.output_len)
                    print(
                        f"{scenario}: output check (accuracy mode, {table.num_rows:,} samples): "
                        f"{'every output equals what the stub sent' if bad == 0 else f'{bad} outputs DIFFER'}",
                        flush=True,
                    )
                    if bad:
                        return 1
                load = os.getloadavg()
                record, _, stats, cpu, stub_cpu = run_scenario(urls, parquet, mode="performance", **common)
                lg = record["loadgen"]
                samples = record["completed_samples"]
                wall = record["last_complete_at"] - record["first_issue_at"]
                requests = sum(s["requests"] for s in stats)
                per = [s["samples"] for s in stats]
                results[scenario] = lg["samples_per_second"]
                print(
                    f"{scenario}: LoadGen samples/s {lg['samples_per_second']:,.0f} ({lg['result']}; "
                    f"{samples:,} samples in {requests:,} HTTP requests, batch {batch}, per-endpoint samples "
                    f"{min(per):,}..{max(per):,}; p99 TTFT {(lg['ttft_p99_ns'] or 0) / 1e6:.1f} ms) "
                    f"load before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
                    flush=True,
                )
                print(
                    f"{scenario}: CPU per sample over LoadGen's timed span ({wall:.1f} s): client "
                    f"{1e6 * cpu / samples:.0f} us ({cpu / wall:.2f} cores), stubs {1e6 * stub_cpu / samples:.0f} us "
                    f"({stub_cpu / wall:.2f} cores)",
                    flush=True,
                )
    finally:
        for s in stubs:
            s.terminate()
        for s in stubs:
            s.wait(timeout=30)
    print(f"machine load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    for scenario, target in (("Offline", TARGET_OFFLINE), ("Server", TARGET_SERVER)):
        if scenario in results:
            ok = results[scenario] >= target
            print(f"{scenario}: {results[scenario]:,.0f} samples/s vs target {target:,}: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
