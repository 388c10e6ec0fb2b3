"""rackbench.serve around the demo's reference engine, driven by EndpointPool over real HTTP,
and the same pool against `transformers serve` (an OpenAI-compatible server rackbench did not write).

One tiny demo model (rackbench.demo) and two rackbench.serve processes serve every test
here; the tokens that come back must equal the engine's own, generated in-process.
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest
import requests

from helpers import alive, make_demo_model, python_env, wait_gone
from rackbench import launch
from rackbench.endpoints import EndpointPool
from rackbench.engines import generate

READY_TIMEOUT = 240  # model load on 2 busy cores
SETTINGS = {"torch_threads": 1}


def _env():
    return python_env(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    return make_demo_model(tmp_path_factory.mktemp("serve") / "model", env=_env())


@pytest.fixture(scope="module")
def prompts(demo_model):
    from tokenizers import Tokenizer

    from rackbench.demo import corpus

    tok = Tokenizer.from_file(str(demo_model / "tokenizer.json"))
    texts = [" ".join(doc.split()[:n]) for doc, n in zip(corpus(0)[:10], range(3, 40, 4))]
    return [[1] + tok.encode(t, add_special_tokens=False).ids for t in texts]  # <s> + text, like the dataset


@pytest.fixture(scope="module")
def direct(demo_model, prompts):
    """The engine's own tokens, in this process, without the server's adapter (16 new tokens per prompt)."""
    from rackbench.engines import reference

    engine = reference.load(demo_model, record={}, gpu_ids=[], settings=SETTINGS)
    try:
        return engine.generate(prompts, 16) if hasattr(engine, "generate") else generate(engine, prompts, 16)
    finally:
        engine.close()


def test_blocking_engine_adapter_gives_the_engine_tokens(demo_model, prompts, direct):
    from rackbench.engines import reference
    from rackbench.serve import BlockingEngineAdapter

    engine = reference.load(demo_model, record={}, gpu_ids=[], settings=SETTINGS)
    if not hasattr(engine, "generate"):
        pytest.skip("the reference engine has no blocking generate() any more; the adapter is not used")
    adapter = BlockingEngineAdapter(engine)
    try:
        firsts = {}
        got = [None] * len(prompts)
        import threading

        left = threading.Semaphore(0)
        for i, p in enumerate(prompts):
            adapter.submit(
                p,
                16,
                on_done=lambda t, i=i: (got.__setitem__(i, t), left.release()),
                on_error=lambda e: (got.append(e), left.release()),
                on_first_token=lambda tok, i=i: firsts.__setitem__(i, tok),
            )
        for _ in prompts:
            assert left.acquire(timeout=120)
    finally:
        adapter.close()
    assert got == direct
    assert firsts == {i: t[0] for i, t in enumerate(direct) if t}


def engine_children(pid) -> list[psutil.Process]:
    """The processes a server spawned for its engine (multiprocessing's spawn_main; not its resource tracker)."""
    return [c for c in psutil.Process(pid).children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]


def maps_libtorch(pid) -> bool:
    return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()


@pytest.fixture(scope="module")
def servers(demo_model, tmp_path_factory):
    specs = launch.local_rackbench_specs(2, demo_model, settings=SETTINGS)
    group = launch.ServerGroup(specs, log_dir=tmp_path_factory.mktemp("serve-logs"))
    with group:
        group.wait_ready(READY_TIMEOUT)
        family = [c.pid for p in group.procs.values() for c in psutil.Process(p.pid).children(recursive=True)]
        yield group
    pids = [p.pid for p in group.procs.values()] + family
    left = wait_gone(pids, 10)
    assert not left, "servers or their engine processes left running after teardown: " + str(
        {pid: " ".join(psutil.Process(pid).cmdline())[:200] for pid in left}
    )
    for name, path in group.logs.items():
        assert "exited" not in path.read_text(), f"{name}: a clean teardown reported its engine as exited"


def test_each_server_runs_its_engine_in_a_child_process(servers):
    """The HTTP loop must not share the engine's process (and GIL): BENCHMARKS note 9."""
    for proc in servers.procs.values():
        children = engine_children(proc.pid)
        assert len(children) == 1, f"server {proc.pid}: engine processes {children}"
        assert maps_libtorch(children[0].pid), "the engine process has no torch loaded"
        assert not maps_libtorch(proc.pid), "the server's own process loaded torch: the engine runs inline"


def test_offline_round_trip_equals_the_engine(servers, prompts, direct):
    assert any(direct), "the demo model should continue at least one prompt"
    with EndpointPool(servers.urls, stream=False, balance="isl") as pool:
        got = generate(pool, prompts, 16)
        stats = pool.stats()
    assert got == direct
    assert sum(s["samples"] for s in stats) == len(prompts)
    assert sum(s["input_tokens"] for s in stats) == sum(map(len, prompts))
    assert sum(s["output_tokens"] for s in stats) == sum(map(len, direct))
    assert all(s["samples"] > 0 and s["busy_s"] > 0 for s in stats), stats  # isl spread them over both
    assert all(s["errors"] == 0 and s["dead"] is None for s in stats)


def test_streamed_round_trip_reports_the_first_token(servers, prompts, direct):
    firsts: dict[int, int] = {}
    done: dict[int, list] = {}
    errors = []
    with EndpointPool(servers.urls, stream=True, balance="round_robin") as pool:
        for i, p in enumerate(prompts):
            pool.submit(
                p,
                16,
                on_done=lambda t, i=i: done.__setitem__(i, t),
                on_error=errors.append,
                on_first_token=lambda tok, i=i: firsts.__setitem__(i, tok),
            )
        deadline = time.monotonic() + 120
        while len(done) + len(errors) < len(prompts) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not errors
    assert [done[i] for i in range(len(prompts))] == direct
    assert firsts == {i: t[0] for i, t in enumerate(direct) if t}


def test_a_list_of_prompts_in_one_request(servers, prompts, direct):
    with EndpointPool(servers.urls[:1], batch_size=4, concurrency=1) as pool:
        got = generate(pool, prompts, 16)
        stats = pool.stats()[0]
    assert got == direct
    assert stats["requests"] < len(prompts)  # batched: fewer HTTP requests than samples


def test_bad_requests_are_named(servers):
    url = servers.urls[0] + "/v1/completions"
    r = requests.post(url, json={"model": "m", "prompt": "text", "max_tokens": 4}, timeout=30)
    assert r.status_code == 400 and "token ids" in r.json()["message"]
    r = requests.post(url, json={"model": "m", "prompt": [1, 2], "max_tokens": 4, "logprobs": 1}, timeout=30)
    assert r.status_code == 400 and "logprobs" in r.json()["message"]
    r = requests.post(url, json={"model": "m", "prompt": [1, 2], "max_tokens": 4, "temperature": 0.7}, timeout=30)
    assert r.status_code == 400 and "greedily" in r.json()["message"]
    r = requests.post(url, json={"model": "m", "prompt": [1, 2], "max_tokens": 2, "detokenize": True}, timeout=30)
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    assert choice["token_ids"] is None and isinstance(choice["text"], str)  # trtllm-serve's detokenize semantics
    assert requests.get(servers.urls[0] + "/health", timeout=10).status_code == 200


@pytest.mark.slow
def test_the_pool_against_transformers_serve(demo_model, prompts, direct, tmp_path):
    """`transformers serve` takes text prompts only: the pool decodes the token ids with the
    model's tokenizer and re-encodes the returned text (NVIDIA's client does the same)."""
    exe = shutil.which("transformers")
    if exe is None:
        pytest.skip("the `transformers` CLI is not installed")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"`transformers serve` needs transformers[serving]: {exc}")
    port = launch.free_port()
    spec = launch.ServerSpec(
        "transformers-serve",
        [exe, "serve", str(demo_model), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        "127.0.0.1",
        port,
        env={"OMP_NUM_THREADS": "1"},
    )
    group = launch.ServerGroup([spec], log_dir=tmp_path)
    with group:
        group.wait_ready(READY_TIMEOUT)
        for stream in (False, True):
            firsts = {}
            with EndpointPool(
                group.urls, model=str(demo_model), stream=stream, api="text", tokenizer=demo_model, concurrency=2
            ) as pool:
                got = []
                for i, p in enumerate(prompts):
                    # transformers serve has no ignore_eos/stop control; the engine and it both stop at </s>
                    got.append(_one(pool, p, 16, firsts, i))
            assert got == direct, f"stream={stream}"
            if stream:
                assert firsts == {i: t[0] for i, t in enumerate(direct) if t}
    assert not alive([p.pid for p in group.procs.values()])


def _one(pool, prompt, n, firsts, i):
    import threading

    box, ev = [], threading.Event()
    pool.submit(
        prompt,
        n,
        on_done=lambda t: (box.append(t), ev.set()),
        on_error=lambda e: (box.append(e), ev.set()),
        on_first_token=lambda tok: firsts.__setitem__(i, tok),
    )
    assert ev.wait(120), "no answer within 120 s"
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def test_a_server_whose_engine_process_dies_stops_and_names_it(demo_model, tmp_path):
    (spec,) = launch.local_rackbench_specs(1, demo_model, settings=SETTINGS)
    group = launch.ServerGroup([spec], log_dir=tmp_path)
    with group:
        (url,) = group.wait_ready(READY_TIMEOUT)
        server = group.procs[spec.name]
        (engine,) = engine_children(server.pid)
        engine.send_signal(signal.SIGKILL)
        assert server.wait(timeout=60) == 1, "the server should exit, failing, once its engine is gone"
    log = group.logs[spec.name].read_text()
    assert "replica 0 (cpu) exited (exit code -9); stopping" in log, log
