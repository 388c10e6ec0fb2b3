"""The rack client's own cost: one LoadGen process driving 72 zero-cost HTTP endpoints.

One stub process (``python -m rackbench.serve --backend instant``: the real server code
around an engine that answers at once) serves all 72 ports from one event loop. This
process runs one LoadGen and a minimal SUT that hands every issued sample to
``rackbench.endpoints.EndpointPool.submit`` and completes it with
``lg.QuerySamplesComplete`` (and, in Server mode, ``lg.FirstTokenComplete`` from the
first streamed chunk).

Targets (issue 10): >= 20,000 samples/s Offline, >= 8,000 samples/s Server with
first-token events. Figures are LoadGen's own (mlperf_log_summary.txt), so they count
only completed samples over LoadGen's timed span.

    python bench/rack_client.py [--endpoints 72] [--offline-samples 200000] [--offline-batch 256]
                                [--server-qps 8000] [--server-seconds 20] [--server-batch 32] [--profile]

``--offline-batch`` / ``--server-batch``: samples waiting for one endpoint go out as
one completions request with a list of prompts (the OpenAI API allows it; trtllm-serve's
CompletionRequest takes List[List[int]]); 1 = one HTTP request per sample.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from rackbench.endpoints import EndpointPool  # noqa: E402
from rackbench.launch import free_ports  # noqa: E402

TARGET_OFFLINE = 20_000
TARGET_SERVER = 8_000


class PoolSUT:
    """The smallest LoadGen SUT over an Engine: submit on issue; the engine's callbacks only
    queue (id, tokens); a completer thread hands LoadGen everything queued in one
    ``QuerySamplesComplete`` / ``FirstTokenComplete`` call per pass (every ``flush_s``).
    One call per sample costs a GIL release and re-acquire each, against LoadGen's own
    threads; batching them is what keeps the per-sample cost low."""

    def __init__(self, lg, engine, prompts, max_new_tokens: int, first_token: bool, flush_s: float = 0.001):
        import collections

        self.lg = lg
        self.engine = engine
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.first_token = first_token
        self.flush_s = flush_s
        self.errors: list[BaseException] = []
        self._done: collections.deque = collections.deque()
        self._first: collections.deque = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._complete_loop, name="completer", daemon=True)
        self._thread.start()

    def issue_query(self, query_samples):
        prompts, submit, n = self.prompts, self.engine.submit, self.max_new_tokens
        done, first = self._done.append, self._first.append
        for qs in query_samples:
            rid = qs.id
            submit(
                prompts[qs.index],
                n,
                on_done=lambda tokens, rid=rid: done((rid, tokens)),
                on_error=lambda exc, rid=rid: (self.errors.append(exc), done((rid, []))),
                on_first_token=(lambda tok, rid=rid: first((rid, tok))) if self.first_token else None,
            )

    def _complete_loop(self):
        lg = self.lg
        response = lg.QuerySampleResponse
        while True:
            stop = self._stop.is_set()
            if self._first:
                items = [self._first.popleft() for _ in range(len(self._first))]
                arr = np.fromiter((t for _, t in items), dtype=np.int32, count=len(items))
                base, size = arr.ctypes.data, arr.itemsize
                lg.FirstTokenComplete([response(rid, base + k * size, size, 1) for k, (rid, _) in enumerate(items)])
            if self._done:
                items = [self._done.popleft() for _ in range(len(self._done))]
                arrays = [np.asarray(t, dtype=np.int32) for _, t in items]
                lg.QuerySamplesComplete(
                    [response(rid, a.ctypes.data, a.nbytes, len(a)) for (rid, _), a in zip(items, arrays)]
                )
            if stop:
                return
            time.sleep(self.flush_s)

    def close(self):
        self._stop.set()
        self._thread.join(timeout=10)

    def flush_queries(self):
        pass


def summary_figure(summary: str, key: str) -> float | None:
    m = re.search(rf"^{re.escape(key)}\s*:\s*([0-9.eE+-]+)", summary, re.M)
    return float(m.group(1)) if m else None


def run_scenario(
    lg,
    urls,
    prompts,
    *,
    scenario: str,
    batch: int,
    concurrency: int,
    offline_samples: int,
    server_qps: float,
    server_seconds: float,
    output_len: int,
    profile: bool,
    stub_pid: int,
):
    import psutil

    stub = psutil.Process(stub_pid)
    stream = scenario == "Server"
    pool = EndpointPool(urls, stream=stream, balance="isl", batch_size=batch, concurrency=concurrency)
    pool.wait_ready(30)
    sut_impl = PoolSUT(lg, pool, prompts, output_len, first_token=stream)
    settings = lg.TestSettings()
    settings.mode = lg.TestMode.PerformanceOnly
    if scenario == "Offline":
        settings.scenario = lg.TestScenario.Offline
        settings.offline_expected_qps = 1
        settings.min_duration_ms = 1000
        settings.min_query_count = offline_samples
    else:
        settings.scenario = lg.TestScenario.Server
        settings.server_target_qps = server_qps
        settings.min_duration_ms = int(server_seconds * 1000)
        settings.min_query_count = int(server_qps * server_seconds)
        settings.use_token_latencies = True
        settings.ttft_latency = 2_000_000_000  # llama2-70b Server limits (mlperf.conf)
        settings.tpot_latency = 200_000_000
    with tempfile.TemporaryDirectory(prefix=f"rack_client_{scenario}_") as out:
        log_output = lg.LogOutputSettings()
        log_output.outdir = out
        log_output.copy_summary_to_stdout = False
        log_settings = lg.LogSettings()
        log_settings.log_output = log_output
        sut = lg.ConstructSUT(sut_impl.issue_query, sut_impl.flush_queries)
        qsl = lg.ConstructQSL(len(prompts), len(prompts), lambda s: None, lambda s: None)
        prof = cProfile.Profile() if profile else None
        cpu0 = time.process_time()
        stub0 = sum(stub.cpu_times()[:2])
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        lg.StartTestWithLogSettings(sut, qsl, settings, log_settings)
        if prof:
            prof.disable()
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        stub_cpu = sum(stub.cpu_times()[:2]) - stub0
        sut_impl.close()
        lg.DestroyQSL(qsl)
        lg.DestroySUT(sut)
        summary = (Path(out) / "mlperf_log_summary.txt").read_text()
    stats = pool.stats()
    pool.close()
    if sut_impl.errors:
        raise SystemExit(f"{scenario}: {len(sut_impl.errors)} request errors, first: {sut_impl.errors[0]}")
    key = "Samples per second" if scenario == "Offline" else "Completed samples per second"
    sps = summary_figure(summary, key)
    valid = re.search(r"^Result is\s*:\s*(\S+)", summary, re.M)
    samples = sum(s["samples"] for s in stats)
    requests = sum(s["requests"] for s in stats)
    busiest = max(s["samples"] for s in stats)
    idlest = min(s["samples"] for s in stats)
    print(
        f"{scenario}: LoadGen {key.lower()}: {sps:,.0f}  ({valid.group(1) if valid else '?'}; "
        f"{samples:,} samples in {requests:,} HTTP requests, batch {batch}, "
        f"per-endpoint samples {idlest:,}..{busiest:,}; StartTest wall {wall:.1f} s, "
        f"client process CPU {cpu:.1f} s = {cpu / wall:.2f} cores, stub process CPU {stub_cpu:.1f} s)",
        flush=True,
    )
    # The two processes are single-threaded in effect (GIL), one core each on an idle 2-core
    # machine; so the busier one bounds the rate. A projection from CPU time, not a measurement.
    print(
        f"{scenario}: CPU per sample: client {1e6 * cpu / samples:.0f} us, stub {1e6 * stub_cpu / samples:.0f} us; "
        f"projected on 2 idle cores: {samples / max(cpu, stub_cpu):,.0f} samples/s",
        flush=True,
    )
    if prof:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        print(s.getvalue())
    return sps


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
    p.add_argument("--scenarios", default="Offline,Server")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--switch-interval", type=float, default=0.0, help="sys.setswitchinterval (0: keep Python's)")
    args = p.parse_args(argv)

    import mlperf_loadgen as lg

    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)

    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 32000, size=int(n)).tolist() for n in rng.integers(16, 512, size=args.num_prompts)]
    ports = free_ports(args.endpoints)
    stub = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rackbench.serve",
            "--backend",
            "instant",
            "--host",
            "127.0.0.1",
            "--settings",
            f'{{"output_len": {args.output_len}}}',
            *[a for port in ports for a in ("--port", str(port))],
        ],
        env=dict(os.environ, PYTHONPATH=str(ROOT / "scripts")),
        start_new_session=True,
    )
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    load = os.getloadavg()
    print(
        f"{args.endpoints} stub endpoints in one process (pid {stub.pid}); machine load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores",
        flush=True,
    )
    results = {}
    try:
        for scenario in args.scenarios.split(","):
            if scenario == "Offline":
                batch, conc = args.offline_batch, args.offline_concurrency
            else:
                batch, conc = args.server_batch, args.server_concurrency
            results[scenario] = run_scenario(
                lg,
                urls,
                prompts,
                scenario=scenario,
                batch=batch,
                concurrency=conc,
                offline_samples=args.offline_samples,
                server_qps=args.server_qps,
                server_seconds=args.server_seconds,
                output_len=args.output_len,
                profile=args.profile,
                stub_pid=stub.pid,
            )
    finally:
        stub.terminate()
        stub.wait(timeout=30)
    for scenario, target in (("Offline", TARGET_OFFLINE), ("Server", TARGET_SERVER)):
        if scenario in results:
            ok = results[scenario] >= target
            print(f"{scenario}: {results[scenario]:,.0f} samples/s vs target {target:,}: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
