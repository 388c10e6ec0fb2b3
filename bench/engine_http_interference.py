"""Does HTTP traffic in an engine's own process slow the engine? (BENCHMARKS note 9)

The harness-efficiency benchmark found the demo engine 10-30 % slower inside
``rackbench.serve`` than fed directly, for identical work. This isolates one cause: one
process feeds the demo engine directly (each successor submitted from ``on_done``, on the
engine's thread, pinned to core 0), while its main thread (core 1) runs the same aiohttp
server ``rackbench.serve`` does, around a zero-cost engine. In "http" runs a second process
(core 1) sends that server ~70 completions requests/s, about the rate the rack run's server
gets; in "quiet" runs nothing does. The engine's work is the same both ways.

    python bench/engine_http_interference.py [--repeats 4] [--rate 70] [--assets DIR]

Prints each pair's tokens/s and the engine thread's CPU time, then the median ratio.
"""

from __future__ import annotations

import argparse
import asyncio
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

CLIENT = """
import json, os, sys, time, urllib.request
os.sched_setaffinity(0, {int(sys.argv[3])})
body = json.dumps({"model": "x", "prompt": list(range(1, 120)), "max_tokens": 60, "detokenize": False}).encode()
url, pause = sys.argv[1], 1.0 / float(sys.argv[2])
while True:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req).read()
    time.sleep(pause)
"""


def one_run(engine_dir: Path, settings: dict, prompts: list, max_new: int, batch: int, http: bool, rate: float):
    """The worker (``--worker``): feed the engine directly, with or without HTTP traffic."""
    import psutil

    from rackbench.endpoints import new_event_loop
    from rackbench.launch import free_port
    from rackbench.serve import CompletionServer, InstantEngine, bind_socket, load_engine, serve_sockets

    engine = load_engine("reference", engine_dir, settings=settings)
    warm = threading.Event()
    engine.submit([1, 2, 3], 2, on_done=lambda t: warm.set(), on_error=print)
    warm.wait()
    me = psutil.Process()
    cores = sorted(os.sched_getaffinity(0))
    for thread in me.threads():  # the engine thread on the first core, the main (HTTP) thread on the second
        os.sched_setaffinity(thread.id, {cores[1]} if thread.id == me.pid else {cores[0]})
    state = {"next": 0, "left": len(prompts), "tokens": 0}
    done = threading.Event()

    def feed():
        k = state["next"]
        if k < len(prompts):
            state["next"] = k + 1
            engine.submit(prompts[k], max_new, on_done=finished, on_error=print)

    def finished(tokens):
        state["tokens"] += len(tokens)
        state["left"] -= 1
        if state["left"] == 0:
            state["end"] = time.time()
            done.set()
        else:
            feed()

    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    server = CompletionServer("instant")
    server.set_engine(InstantEngine(output_len=60))
    port = free_port()
    sock = bind_socket("127.0.0.1", port)
    url = f"http://127.0.0.1:{port}/v1/completions"
    client = subprocess.Popen([sys.executable, "-c", CLIENT, url, str(rate), str(cores[1])]) if http else None
    stop = asyncio.Event()

    def measure():
        time.sleep(1.0)  # the client under way
        before = {t.id: t.user_time + t.system_time for t in me.threads()}
        state["start"] = time.time()
        for _ in range(batch):
            feed()
        done.wait()
        after = {t.id: t.user_time + t.system_time for t in me.threads()}
        used = {k: v - before.get(k, 0.0) for k, v in after.items()}
        state["engine_cpu_s"] = max(v for k, v in used.items() if k != me.pid)
        state["http_cpu_s"] = used.get(me.pid, 0.0)
        loop.call_soon_threadsafe(stop.set)

    try:
        loop.run_until_complete(
            serve_sockets([(server, sock)], stop, on_started=lambda: threading.Thread(target=measure).start())
        )
    finally:
        if client:
            client.kill()
        engine.close()
    span = state["end"] - state["start"]
    return {
        "tokens_per_second": state["tokens"] / span,
        "tokens": state["tokens"],
        "engine_cpu_s": state["engine_cpu_s"],
        "http_cpu_s": state["http_cpu_s"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "config.yaml"))
    ap.add_argument("--copies", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--rate", type=float, default=70.0, help="HTTP requests per second in 'http' runs")
    ap.add_argument("--assets", help="keep/reuse the demo assets in this dir")
    ap.add_argument("--worker", nargs=2, metavar=("ENGINE_DIR", "JOB_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(Path(args.worker[1]).read_text())
        print(json.dumps(one_run(Path(args.worker[0]), **job)), flush=True)
        return 0
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs 2 cores")
    import pyarrow.parquet as pq
    from reference_engine import demo_engine_and_samples

    config = yaml.safe_load(Path(args.config).read_text())
    tmpdir = tempfile.TemporaryDirectory(prefix="rb-interference-")
    root = Path(args.assets or Path(tmpdir.name) / "assets")
    engine_dir, parquet = demo_engine_and_samples(root, config)
    base = [list(map(int, p)) for p in pq.read_table(parquet, columns=["tok_input"]).column("tok_input").to_pylist()]
    ratios = []
    print(
        f"load average {os.getloadavg()[0]:.2f}; {len(base) * args.copies} samples, {args.rate:g} HTTP req/s",
        flush=True,
    )
    for rep in range(args.repeats):
        results = {}
        for http in (False, True) if rep % 2 == 0 else (True, False):  # alternate the order
            job = Path(tmpdir.name) / "job.json"
            job.write_text(
                json.dumps(
                    {
                        "settings": dict(config["engines"]["reference"]),
                        "prompts": base * args.copies,
                        "max_new": config["run"]["max_new_tokens"],
                        "batch": config["benchmarks"]["batch_sizes"][0],
                        "http": http,
                        "rate": args.rate,
                    }
                )
            )
            out = subprocess.run(
                [sys.executable, __file__, "--worker", str(engine_dir), str(job)],
                capture_output=True,
                text=True,
                check=True,
                env=dict(os.environ, PYTHONPATH=str(ROOT / "scripts")),
            ).stdout
            results[http] = json.loads(out.strip().splitlines()[-1])
        quiet, busy = results[False], results[True]
        ratios.append(busy["tokens_per_second"] / quiet["tokens_per_second"])
        print(
            f"pair {rep + 1}: quiet {quiet['tokens_per_second']:,.0f} tok/s "
            f"(engine thread {quiet['engine_cpu_s']:.2f} s) | with HTTP {busy['tokens_per_second']:,.0f} tok/s "
            f"(engine thread {busy['engine_cpu_s']:.2f} s, HTTP thread {busy['http_cpu_s']:.2f} s) | "
            f"ratio {ratios[-1]:.1%} | load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    print(f"median ratio (with HTTP in the process / quiet): {statistics.median(ratios):.1%} over {len(ratios)} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
