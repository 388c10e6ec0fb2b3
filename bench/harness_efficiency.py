"""Benchmark (issue 10, benchmark 2): harness efficiency on the demo.

Rack-wide output tokens/s (N ``python -m rackbench.serve`` servers of the demo's engine,
``rackbench.endpoints.EndpointPool`` over them, ONE LoadGen through ``harness.run_shard``, as
``rackbench.rack`` runs it: Offline, isl balancing, at most ``batch`` requests per server)
against the same engines fed directly: N processes, each loading the same engine with the
same settings and calling its ``submit()`` with at most ``batch`` in flight, no LoadGen and no
HTTP; all N start together. Same samples in the same order: the demo's 48 prompts,
``--copies`` times each, in the order LoadGen issues them in the rack run (recorded by the same
``run_shard`` call over a zero-cost engine; the order matters to a continuous-batching engine:
in dataset order the direct feed was 1.3-1.5x slower), split between the direct engines by the
pool's cumulative-input-length rule.

Rack tokens/s is LoadGen's (mlperf_log_summary.txt: output tokens over its timed span); the
direct figure is output tokens over first submit .. last completion across the N processes.
Target: rack >= 95 % of direct. The direct processes and the servers are loaded once and
stay up (``--warmup`` unmeasured runs of each first); each repeat then runs both, back to back
in alternating order, so that a pair sees the same host. The script prints the median of the
repeats' ratios (the verdict), all repeats' tokens over all their spans, and the best of each
(the host's noise is large: the same direct run varies by +-20 % from one run to the next on
the build VM).

``--rack-in-flight N`` keeps N samples in flight per server on the rack path (default: as the
direct feed). Above the engine's ``--max-batch-size``, each server's engine keeps a queue, so a
row that finishes is refilled at once instead of one HTTP round trip later (BENCHMARKS note 9).

``--engine-process inline`` serves the engine in the server's own process (the layout before
``rackbench.serve`` moved it to a child process), for a before/after.

``--pin``: each engine (the direct process; a server's engine thread) on a core of its own,
and the client (LoadGen, SUT, pool) and the servers' HTTP threads on the core(s) left: on 2
cores, ``--servers 1 --pin``. On a GPU rack the harness and trtllm-serve's HTTP run on host
cores while the engines run on GPUs; unpinned on 2 cores, the client's and the servers' HTTP
CPU time comes straight out of the 2 engines' compute, which measures this VM's core count as
much as the harness (BENCHMARKS note 9). Each rack run also prints its CPU split (engine
threads, servers' HTTP threads, client), measured within the run, so the host's noise cancels.

    python bench/harness_efficiency.py [--servers 2] [--copies 4] [--repeats 3] [--pin] [--assets DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET = 0.95


def isl_split(prompts: list[list[int]], n: int) -> list[list[int]]:
    """Sample indices per engine: each to the engine with the least input dispatched so far."""
    loads, parts = [0] * n, [[] for _ in range(n)]
    for k, p in enumerate(prompts):
        i = min(range(n), key=loads.__getitem__)
        loads[i] += len(p)
        parts[i].append(k)
    return parts


def direct_worker(
    engine_dir: str, settings_json: str, prompts_json: str, batch: int, max_new: int, feed_mode: str, cpu: str
):
    """One direct-feed process: load the engine, say ready, wait for 'go', feed, print the timings.

    ``feed_mode`` "callback": each finished request's successor is submitted from its ``on_done``
    (on the engine's thread, before its next step); "thread": a feeder thread submits it, as
    requests arrive at a server from outside the engine's thread."""
    if cpu != "-":
        os.sched_setaffinity(0, {int(cpu)})  # before torch starts any thread
    from rackbench.serve import load_engine

    settings = json.loads(settings_json)
    prompts = json.loads(Path(prompts_json).read_text())
    engine = load_engine("reference", engine_dir, settings=settings)  # exactly as each server loads it
    engine.submit([1, 2, 3], 2, on_done=lambda t: None, on_error=lambda e: None)  # warm-up
    time.sleep(0.5)
    print("ready", flush=True)
    while sys.stdin.readline().strip() == "go":  # one feed of every prompt per "go"; EOF or "quit" ends
        print(json.dumps(feed_all(engine, prompts, batch, max_new, feed_mode)), flush=True)
    engine.close()


def feed_all(engine, prompts, batch, max_new, feed_mode) -> dict:
    """Every prompt through ``engine.submit``, at most ``batch`` in flight; the timings."""
    import queue

    lock, done = threading.Lock(), threading.Event()
    state = {"next": 0, "left": len(prompts), "tokens": 0, "errors": []}

    def feed():
        with lock:
            k = state["next"]
            if k >= len(prompts):
                return
            state["next"] = k + 1
        engine.submit(prompts[k], max_new, on_done=finished, on_error=failed)

    wake: queue.SimpleQueue = queue.SimpleQueue()

    def feeder():
        while wake.get():
            feed()

    if feed_mode == "thread":
        threading.Thread(target=feeder, daemon=True).start()

    def finished(tokens):
        with lock:
            state["tokens"] += len(tokens)
            state["left"] -= 1
            last = state["left"] == 0
        if last:
            state["end"] = time.time()
            done.set()
        elif feed_mode == "thread":
            wake.put(True)
        else:
            feed()

    def failed(exc):
        state["errors"].append(repr(exc))
        finished([])

    state["start"] = time.time()
    cpu0 = time.process_time()
    for _ in range(min(batch, len(prompts))):
        feed()
    done.wait()
    state["cpu_s"] = time.process_time() - cpu0
    wake.put(False)
    return {k: state[k] for k in ("start", "end", "tokens", "errors", "cpu_s")}


class DirectFeed:
    """N direct-feed processes, loaded once; ``run()`` feeds all of them at once, again each call."""

    def __init__(self, engine_dir, settings, parts, prompts, batch, max_new, tmp: Path, feed_mode: str, cpus):
        self.procs = []
        env = dict(os.environ, PYTHONPATH=str(ROOT / "scripts"))
        for i, part in enumerate(parts):
            f = tmp / f"direct{i}.json"
            f.write_text(json.dumps([prompts[k] for k in part]))
            cmd = [sys.executable, __file__, "--direct-worker", str(engine_dir), json.dumps(settings), str(f)]
            cmd += [str(batch), str(max_new), feed_mode, str(cpus[i]) if cpus else "-"]
            self.procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
        for p in self.procs:
            if p.stdout.readline().strip() != "ready":
                raise SystemExit("a direct-feed worker failed to start")

    def run(self) -> dict:
        for p in self.procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [json.loads(p.stdout.readline()) for p in self.procs]
        if any(r["errors"] for r in results):
            raise SystemExit(f"direct feed errors: {[r['errors'][:1] for r in results]}")
        tokens = sum(r["tokens"] for r in results)
        span = max(r["end"] for r in results) - min(r["start"] for r in results)
        cpu = sum(r["cpu_s"] for r in results)
        return {"tokens": tokens, "span_s": span, "tokens_per_second": tokens / span, "cpu_s": cpu}

    def close(self):
        for p in self.procs:
            p.stdin.close()
        for p in self.procs:
            p.wait(timeout=60)


class _OrderRecorder:
    """A zero-cost engine that records the prompts in the order the SUT submits them."""

    max_in_flight = 1 << 30

    def __init__(self):
        self.prompts: list[list[int]] = []

    def submit(self, prompt, max_new_tokens, *, on_done, on_error, on_first_token=None):
        self.prompts.append(list(prompt))
        on_done([1, 2])

    def close(self):
        pass


def loadgen_order(parquet, n_samples, batch, servers, max_new, tmp: Path) -> list[list[int]]:
    """The prompts in the order LoadGen issues them in the rack run (same settings, same seeds):
    the order matters to a continuous-batching engine (which prompts share a batch)."""
    rec = _OrderRecorder()
    _run_shard(rec, parquet, n_samples, batch * servers, max_new, tmp)
    return rec.prompts


def _run_shard(engine, parquet, n_samples, max_in_flight, max_new, tmp: Path) -> dict:
    from rackbench import harness

    return harness.run_shard(
        engine,
        samples_parquet=parquet,
        out_dir=tmp / f"rack-{time.monotonic_ns()}",
        mode="performance",
        shard_index=0,
        num_shards=1,
        shard_mode="split",
        batch_size=None,
        max_in_flight=max_in_flight,
        max_new_tokens=max_new,
        scenario="Offline",
        min_duration_ms=0,
        min_query_count=n_samples,
        offline_expected_qps=1,
        metadata={},
        progress_interval_s=0,
        log=lambda m: None,
    )


def engine_processes(proc) -> list:
    """A server's engine process(es): the children ``rackbench.serve`` spawned (not the
    resource tracker); none when the engine runs inline."""
    return [c for c in proc.children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]


def pin_server_threads(pids, engine_cpus, client_cpus) -> None:
    """``--pin`` for the servers, once loaded: each server's engine on its own core (its child
    process; inline, every thread of the server but the main one), its HTTP event loop on the
    client's cores, as a GPU server's HTTP runs on host cores beside the GPU's engine."""
    import psutil

    for pid, core in zip(pids, engine_cpus):
        server = psutil.Process(pid)
        children = engine_processes(server)
        for thread in server.threads():
            os.sched_setaffinity(thread.id, client_cpus if children or thread.id == pid else {core})
        for child in children:
            for thread in child.threads():
                os.sched_setaffinity(thread.id, {core})


def run_rack(urls, parquet, n_samples, in_flight, max_new, tmp: Path, server_pids, prompts_per_request=1) -> dict:
    import psutil

    from rackbench.endpoints import EndpointPool

    servers = [psutil.Process(pid) for pid in server_pids]
    pool = EndpointPool(
        urls,
        stream=False,
        balance="isl",
        concurrency=-(-in_flight // prompts_per_request),  # open requests per server
        batch_size=prompts_per_request,
    )

    def threads_cpu(proc) -> dict:  # the server's threads and its engine process's
        return {t.id: t.user_time + t.system_time for q in (proc, *engine_processes(proc)) for t in q.threads()}

    try:
        t0, c0 = [threads_cpu(p) for p in servers], time.process_time()
        rec = _run_shard(pool, parquet, n_samples, in_flight * len(urls), max_new, tmp)
        client_cpu = time.process_time() - c0  # includes run_shard's setup and output files
        deltas = [{k: v - before.get(k, 0.0) for k, v in threads_cpu(p).items()} for p, before in zip(servers, t0)]
    finally:
        pool.close()
    server_cpu = sum(sum(d.values()) for d in deltas)
    # within the same run, so the host's noise cancels: each server's busiest thread is its
    # engine's; the rest is its HTTP (aiohttp, JSON, the engine's callbacks onto the loop)
    engine_cpu = sum(max(d.values()) for d in deltas)
    return {
        "tokens": rec["output_tokens"],
        "samples": rec["completed_samples"],
        "span_s": rec["last_complete_at"] - rec["first_issue_at"],
        "tokens_per_second": rec["loadgen"]["tokens_per_second"],
        "result": rec["loadgen"]["result"],
        "server_cpu_s": server_cpu,
        "engine_cpu_s": engine_cpu,
        "client_cpu_s": client_cpu,
        "cpu_s": server_cpu + client_cpu,
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--direct-worker":
        engine_dir, settings_json, prompts_json, batch, max_new, feed_mode, cpu = sys.argv[2:9]
        direct_worker(engine_dir, settings_json, prompts_json, int(batch), int(max_new), feed_mode, cpu)
        return 0
    from reference_engine import demo_engine_and_samples

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "config.yaml"))
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="requests per server; default benchmarks.batch_sizes[0]")
    ap.add_argument("--copies", type=int, default=4, help="each of the demo's samples this many times")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured runs of each side first")
    ap.add_argument("--assets", help="keep/reuse the demo assets in this dir")
    ap.add_argument("--direct-feed", choices=("callback", "thread"), default="callback")
    ap.add_argument("--prompts-per-request", type=int, default=1, help="the pool's batch_size (rack_run knob)")
    ap.add_argument("--max-batch-size", type=int, default=None, help="the engine's max_batch_size (default config's)")
    ap.add_argument(
        "--rack-in-flight",
        type=int,
        default=None,
        help="samples in flight per server on the rack path (rack_run.max_in_flight / servers); default --batch, "
        "as the direct feed. Above the engine's max_batch_size, the server's engine keeps a queue that hides the "
        "HTTP round trip of each refill",
    )
    ap.add_argument("--pin", action="store_true", help="each engine on its own core, the client on the rest")
    ap.add_argument(
        "--engine-process",
        choices=("child", "inline"),
        default="child",
        help="the servers' engines in child processes (rackbench.serve's default) or inline (before)",
    )
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    engine_cpus = client_cpus = None
    if args.pin:
        if len(cpus) <= args.servers:
            raise SystemExit(f"--pin needs more cores than --servers ({len(cpus)} cores here)")
        engine_cpus = cpus[: args.servers]
        client_cpus = set(cpus[args.servers :])
        os.sched_setaffinity(0, set(cpus[args.servers :]))  # the client: LoadGen, SUT, pool threads

    import pyarrow.parquet as pq

    from rackbench import launch

    config = yaml.safe_load(Path(args.config).read_text())
    settings = dict(config["engines"]["reference"])
    if args.max_batch_size:
        settings["max_batch_size"] = args.max_batch_size
    batch = args.batch or config["benchmarks"]["batch_sizes"][0]
    rack_in_flight = args.rack_in_flight or batch
    max_new = config["run"]["max_new_tokens"]
    tmpdir = tempfile.TemporaryDirectory(prefix="rb-efficiency-")
    tmp = Path(tmpdir.name)
    root = Path(args.assets or tmp / "assets")
    engine_dir, parquet = demo_engine_and_samples(root, config)
    base = [list(map(int, p)) for p in pq.read_table(parquet, columns=["tok_input"]).column("tok_input").to_pylist()]
    n_samples = len(base) * args.copies
    prompts = loadgen_order(parquet, n_samples, batch, args.servers, max_new, tmp)
    if sorted(map(tuple, prompts)) != sorted(map(tuple, base * args.copies)):
        raise SystemExit(f"LoadGen issued {len(prompts)} samples, not each of the {len(base)} {args.copies} times")
    parts = isl_split(prompts, args.servers)
    pinning = "not pinned"
    if args.pin:
        pinning = f"engines pinned to cores {engine_cpus}, the client to {sorted(os.sched_getaffinity(0))}"
    print(
        f"harness efficiency: {args.servers} demo engine(s), {n_samples} samples ({len(base)} x {args.copies}), "
        f"{batch} in flight per engine (rack: {rack_in_flight} per server), max_new_tokens {max_new}, "
        f"engine settings {settings}; "
        f"{pinning}; servers' engines {args.engine_process}; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    runs: dict = {}
    ratios, shares = [], []
    specs = launch.local_rackbench_specs(args.servers, engine_dir, settings=settings)
    for spec in specs:
        spec.argv += ["--engine-process", args.engine_process]
    direct_feed = DirectFeed(engine_dir, settings, parts, prompts, batch, max_new, tmp, args.direct_feed, engine_cpus)
    with launch.ServerGroup(specs, log_dir=tmp / "logs") as group, contextlib.closing(direct_feed):
        urls = group.wait_ready(300)
        pids = [p.pid for p in group.procs.values()]
        if engine_cpus:
            pin_server_threads(pids, engine_cpus, client_cpus)
        for _ in range(args.warmup):  # each side once, not counted: both then run warm
            direct_feed.run()
            run_rack(urls, parquet, n_samples, rack_in_flight, max_new, tmp, pids, args.prompts_per_request)
        for rep in range(args.repeats):

            def rack_run():
                return run_rack(urls, parquet, n_samples, rack_in_flight, max_new, tmp, pids, args.prompts_per_request)

            if rep % 2 == 0:  # alternate the order: the host's noise drifts
                direct, rack = direct_feed.run(), rack_run()
            else:
                rack, direct = rack_run(), direct_feed.run()
            report_pair(rep, direct, rack, ratios, shares, runs)
    summarize(args, runs, ratios, shares)
    return 0


def report_pair(rep, direct, rack, ratios, shares, runs) -> None:
    ratios.append(rack["tokens_per_second"] / direct["tokens_per_second"])
    shares.append(rack["engine_cpu_s"] / rack["cpu_s"])
    print(
        f"run {rep + 1}: direct {direct['tokens_per_second']:,.1f} tok/s ({direct['tokens']:,} tokens in "
        f"{direct['span_s']:.2f} s) | rack {rack['tokens_per_second']:,.1f} tok/s LoadGen ({rack['result']}; "
        f"{rack['tokens']:,} tokens, {rack['samples']} samples in {rack['span_s']:.2f} s) | ratio "
        f"{rack['tokens_per_second'] / direct['tokens_per_second']:.1%} | CPU: direct {direct['cpu_s']:.2f} s, "
        f"rack {rack['cpu_s']:.2f} s (servers {rack['server_cpu_s']:.2f} + client {rack['client_cpu_s']:.2f}): "
        f"direct/rack {direct['cpu_s'] / rack['cpu_s']:.1%} | rack CPU split: engine threads "
        f"{rack['engine_cpu_s']:.2f} s, servers' HTTP {rack['server_cpu_s'] - rack['engine_cpu_s']:.2f} s, client "
        f"{rack['client_cpu_s']:.2f} s: engines' share {rack['engine_cpu_s'] / rack['cpu_s']:.1%} | "
        f"load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    for name, r in (("direct", direct), ("rack", rack)):
        runs.setdefault(name, []).append(r)


def summarize(args, runs, ratios, shares) -> None:
    def overall(name):  # every repeat's tokens over every repeat's span
        return sum(r["tokens"] for r in runs[name]) / sum(r["span_s"] for r in runs[name])

    best = {name: max(runs[name], key=lambda r: r["tokens_per_second"]) for name in runs}
    if best["rack"]["tokens"] != best["direct"]["tokens"]:
        print(f"note: rack generated {best['rack']['tokens']} tokens, direct {best['direct']['tokens']}")
    ratio = best["rack"]["tokens_per_second"] / best["direct"]["tokens_per_second"]
    median = statistics.median(ratios)
    print(
        f"best of {args.repeats}: direct {best['direct']['tokens_per_second']:,.1f} tok/s, rack (one LoadGen + HTTP) "
        f"{best['rack']['tokens_per_second']:,.1f} tok/s: {ratio:.1%}; all repeats together: direct "
        f"{overall('direct'):,.1f}, rack {overall('rack'):,.1f} tok/s: {overall('rack') / overall('direct'):.1%}; "
        f"median of the {len(ratios)} repeats' ratios {median:.1%} vs target {TARGET:.0%}: "
        f"{'met' if median >= TARGET else 'NOT met'}; engines' share of the rack path's CPU (median, within each "
        f"run) {statistics.median(shares):.1%}; load average now {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    sys.exit(main())
