"""EndpointPool over real HTTP: balancing, counters, and faults (dead, killed, never ready).

The servers are rackbench.serve processes with the zero-cost ``instant`` engine (no model,
so they start in about a second), and for the never-ready case a small aiohttp app whose
/health answers 503.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time

import pytest
from aiohttp import web

from helpers import alive, python_env
from rackbench import launch
from rackbench.endpoints import (
    EndpointError,
    EndpointPool,
    EndpointStats,
    choose_endpoint,
    stream_for,
    urls_from_env,
    wait_ready,
)


def _instant_group(n, tmp_path, **settings):
    specs = launch.local_rackbench_specs(n, None, backend="instant", settings={"output_len": 3, **settings})
    for spec in specs:
        spec.env = python_env()
    return launch.ServerGroup(specs, log_dir=tmp_path, term_grace_s=5)


def _run_all(pool, prompts, n=3, timeout=60, stream_first=False):
    """Submit every prompt; wait for every callback; (results-or-errors, first tokens)."""
    out: dict = {}
    firsts: dict = {}
    lock = threading.Lock()
    all_done = threading.Event()

    def cb(i):
        def settle(value):
            with lock:
                out[i] = value
                if len(out) == len(prompts):
                    all_done.set()

        return settle

    for i, p in enumerate(prompts):
        pool.submit(
            p,
            n,
            on_done=cb(i),
            on_error=cb(i),
            on_first_token=(lambda t, i=i: firsts.__setitem__(i, t)) if stream_first else None,
        )
    assert all_done.wait(timeout), f"only {len(out)} of {len(prompts)} requests finished within {timeout} s (hang)"
    return [out[i] for i in range(len(prompts))], firsts


def _stats(*dispatched, pending=None, dead=None):
    rows = [EndpointStats(f"http://e{i}", dispatched_input_tokens=d) for i, d in enumerate(dispatched)]
    for i, p in enumerate(pending or []):
        rows[i].pending = p
    for i in dead or []:
        rows[i].dead = "killed"
    return rows


def test_balancers_pick_as_documented():
    assert choose_endpoint(_stats(300, 100, 200), "isl", 0) == 1
    assert choose_endpoint(_stats(300, 100, 200, dead=[1]), "isl", 0) == 2  # dead ones skipped
    assert choose_endpoint(_stats(0, 0, 0, pending=[5, 2, 9]), "least_pending", 0) == 1
    assert [choose_endpoint(_stats(0, 0, 0), "round_robin", k) for k in range(4)] == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="unknown balance"):
        choose_endpoint(_stats(0), "random", 0)
    with pytest.raises(ValueError, match="tokenizer"):
        EndpointPool(["http://x"], api="text")
    assert [stream_for(s) for s in ("Offline", "Server", "Interactive")] == [False, True, True]
    with pytest.raises(ValueError, match="unknown scenario"):
        stream_for("SingleStream")
    assert urls_from_env({launch.ENDPOINTS_ENV: "http://a:1,http://b:2"}) == ["http://a:1", "http://b:2"]
    with pytest.raises(ValueError, match="RACKBENCH_ENDPOINTS"):
        urls_from_env({})


def test_isl_balancing_and_counters_over_http(tmp_path):
    prompts = [[7] * n for n in [500, 20, 30, 400, 15, 60, 250, 90, 10, 300, 45, 120]]
    with _instant_group(3, tmp_path) as group, EndpointPool(group.urls, balance="isl") as pool:
        pool.wait_ready(60)
        results, _ = _run_all(pool, prompts)
        stats = pool.stats()
        pool.write_stats(tmp_path / "endpoints.json")
    assert results == [[8, 9, 10]] * len(prompts)  # the instant engine: last id + 1, + 2, + 3
    loads = [s["input_tokens"] for s in stats]
    assert sum(loads) == sum(map(len, prompts))
    assert max(loads) - min(loads) <= max(map(len, prompts))  # isl: no endpoint ahead by more than one prompt
    assert [s["dispatched_input_tokens"] for s in stats] == loads
    assert sum(s["samples"] for s in stats) == len(prompts)
    assert all(s["pending"] == 0 and s["open_requests"] == 0 for s in stats)
    assert sum(s["output_tokens"] for s in stats) == 3 * len(prompts)
    written = json.loads((tmp_path / "endpoints.json").read_text())
    assert written["balance"] == "isl" and [e["url"] for e in written["endpoints"]] == group.urls


def test_streamed_first_tokens_and_batches(tmp_path):
    prompts = [[i + 1] * 5 for i in range(40)]
    with (
        _instant_group(2, tmp_path) as group,
        EndpointPool(group.urls, stream=True, batch_size=8, concurrency=1) as pool,
    ):
        pool.wait_ready(60)
        bursts = []
        pool.add_burst_listener(lambda: bursts.append(threading.get_ident()))
        results, firsts = _run_all(pool, prompts, stream_first=True)
        stats = pool.stats()  # runs on the pool's thread, after the bursts that delivered those callbacks
    assert results == [[p[-1] + 1, p[-1] + 2, p[-1] + 3] for p in prompts]
    assert firsts == {i: p[-1] + 1 for i, p in enumerate(prompts)}
    assert sum(s["requests"] for s in stats) < len(prompts)
    # burst ends (where the SUT completes with LoadGen) on the pool's thread, fewer than callbacks
    assert 0 < len(bursts) < 2 * len(prompts) and len(set(bursts)) == 1 and bursts[0] != threading.get_ident()


def test_unreachable_endpoint_fails_fast_naming_it():
    port = launch.free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with EndpointPool([url]) as pool:
        results, _ = _run_all(pool, [[1, 2, 3]] * 4, timeout=20)
        stats = pool.stats()[0]
    assert time.monotonic() - t0 < 20
    assert all(isinstance(r, EndpointError) and url in str(r) for r in results)
    assert stats["dead"] and stats["errors"] == 4


@pytest.mark.parametrize("stream", [False, True], ids=["offline", "streamed"])
def test_server_killed_mid_run_gives_errors_naming_it_and_no_hang(tmp_path, stream):
    prompts = [[i + 1] * 4 for i in range(24)]
    group = _instant_group(2, tmp_path, delay_s=3.0)  # requests stay open for 3 s
    with group, EndpointPool(group.urls, balance="round_robin", stream=stream) as pool:
        pool.wait_ready(60)
        victim = group.specs[1]
        results: dict = {}
        done = threading.Event()

        def cb(i):
            def settle(v):
                results[i] = v
                if len(results) == len(prompts):
                    done.set()

            return settle

        for i, p in enumerate(prompts):
            pool.submit(p, 3, on_done=cb(i), on_error=cb(i))
        time.sleep(1.0)
        os.killpg(group.procs[victim.name].pid, signal.SIGKILL)
        assert done.wait(30), "requests to the killed server hung"
        assert group.exited(victim.url) is not None
        assert victim.url in "; ".join(group.dead())
    errors = [results[i] for i in range(1, len(prompts), 2)]
    oks = [results[i] for i in range(0, len(prompts), 2)]
    assert all(isinstance(e, EndpointError) and victim.url in str(e) for e in errors)
    assert all(r == [p[-1] + 1, p[-1] + 2, p[-1] + 3] for r, p in zip(oks, prompts[0::2]))
    pids = [p.pid for p in group.procs.values()]
    assert not alive(pids), "a server outlived the teardown"


class _AppOnThread:
    """An aiohttp server on a thread of this process, with the routes ``add_routes(router)`` adds."""

    def __init__(self, add_routes):
        self.port = launch.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(add_routes, started), daemon=True)
        self.thread.start()
        started.wait()

    def _run(self, add_routes, started):
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        add_routes(app.router)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        started.set()
        self.loop.run_forever()

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _never_ready(router):
    async def health(request):
        return web.Response(status=503)

    router.add_get("/health", health)


def test_never_ready_endpoint_times_out_with_a_clear_error():
    srv = _AppOnThread(_never_ready)
    url = srv.url
    try:
        t0 = time.monotonic()
        with pytest.raises(EndpointError) as err:
            asyncio.run(wait_ready([url], 2.0, poll_interval=0.2))
        elapsed = time.monotonic() - t0
    finally:
        srv.stop()
    assert 2.0 <= elapsed < 6.0
    assert url in str(err.value) and "not ready after 2 s" in str(err.value) and "HTTP 503" in str(err.value)


def test_a_server_process_that_exits_fails_readiness_at_once(tmp_path):
    spec = launch.ServerSpec(
        "server0", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], "127.0.0.1", launch.free_port()
    )
    group = launch.ServerGroup([spec], log_dir=tmp_path)
    t0 = time.monotonic()
    with group, pytest.raises(EndpointError) as err:
        group.wait_ready(60)
    assert time.monotonic() - t0 < 30
    assert spec.url in str(err.value) and "exited with code 3" in str(err.value) and "boom" in str(err.value)


STAGGER_S = 0.4  # a streamed request's choice k finishes (k + 1) x this after the request came


def _staggered_stream(requests: list, drop_after_first_of_several: bool = False):
    """/v1/completions streaming each prompt's one-token answer (its last id + 1) at its own
    time, as an engine whose rows finish at different steps; optionally the connection drops
    once the first choice of a request of several prompts has finished."""

    async def completions(request):
        body = await request.json()
        prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
        requests.append(len(prompts))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for k, p in enumerate(prompts):
            await asyncio.sleep(STAGGER_S)
            choice = {"index": k, "text": "", "token_ids": [p[-1] + 1], "finish_reason": "length"}
            await resp.write(b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n")
            if drop_after_first_of_several and len(prompts) > 1:
                request.transport.close()  # the server dies mid-request
                return resp
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def add_routes(router):
        router.add_post("/v1/completions", completions)

    return add_routes


def _submit_behind_a_first_request(pool, requests, prompts):
    """prompts[0] alone, then the rest while it runs: with one open request per endpoint they
    wait, and go out together as one request of several prompts."""
    done_at, results = {}, {}
    finished = threading.Semaphore(0)

    def settle(i):
        def cb(value):
            assert i not in results, f"sample {i} completed twice"
            results[i], done_at[i] = value, time.monotonic()
            finished.release()

        return cb

    def submit(i):
        pool.submit(prompts[i], 1, on_done=settle(i), on_error=settle(i))

    submit(0)
    deadline = time.monotonic() + 10
    while not requests and time.monotonic() < deadline:
        time.sleep(0.01)
    for i in range(1, len(prompts)):
        submit(i)
    for _ in prompts:
        assert finished.acquire(timeout=30), "a sample never completed (hang)"
    return results, done_at


def _staggered_run(drop_after_first_of_several: bool = False):
    """Three one-token samples through a one-request-per-endpoint streamed pool over the
    staggering server: (request sizes, results, completion times, the endpoint's stats, url)."""
    requests: list = []
    srv = _AppOnThread(_staggered_stream(requests, drop_after_first_of_several))
    try:
        with EndpointPool([srv.url], stream=True, batch_size=8, concurrency=1) as pool:
            results, done_at = _submit_behind_a_first_request(pool, requests, [[10], [20], [30]])
            stats = pool.stats()[0]
    finally:
        srv.stop()
    return requests, results, done_at, stats, srv.url


def test_streamed_samples_of_one_request_complete_as_their_own_choices_finish():
    """Server/Interactive: a sample's completion (its latency, so LoadGen's TPOT) is its own,
    not its request's slowest prompt's."""
    requests, results, done_at, stats, _ = _staggered_run()
    assert requests == [1, 2], requests  # the last two shared one request
    assert results == {0: [11], 1: [21], 2: [31]}
    assert done_at[2] - done_at[1] >= 0.75 * STAGGER_S  # not both at the request's end
    assert stats["samples"] == 3 and stats["output_tokens"] == 3 and stats["pending"] == 0


def test_a_stream_that_dies_after_one_choice_keeps_that_sample_and_fails_the_rest_once():
    requests, results, _, stats, url = _staggered_run(drop_after_first_of_several=True)
    assert requests == [1, 2], requests
    assert results[0] == [11] and results[1] == [21]  # finished before the drop: kept
    assert isinstance(results[2], EndpointError) and url in str(results[2])
    assert stats["samples"] == 2 and stats["errors"] == 1 and stats["pending"] == 0 and stats["dead"]
