"""ReplicaPool with a tiny picklable test backend (this module, imported by name in spawned workers)."""

import os
import signal
import threading
import time

import pytest

from rackbench.engines.replicas import ReplicaError, ReplicaPool, visible_devices

BACKEND = __name__


class _EchoEngine:
    """Answers each prompt with [replica device id, len(prompt), sum(prompt)] capped at max_new_tokens."""

    def __init__(self, fail_on=None):
        self.device = int(os.environ["CUDA_VISIBLE_DEVICES"].split(",")[0])
        self.max_batch_size = 3
        self.fail_on = fail_on

    def generate(self, prompts, max_new_tokens):
        if prompts and prompts[0] == [-1]:  # a slow request, to keep a replica busy
            time.sleep(1.0)
        if self.fail_on is not None and any(self.fail_on in p for p in prompts):
            raise ValueError("poisoned prompt")
        return [[self.device, len(p), sum(p)][:max_new_tokens] for p in prompts]

    def close(self):
        pass


def load(engine_dir, *, record, gpu_ids, settings):
    assert gpu_ids == list(range(settings["per"])), gpu_ids  # workers see only their GPUs, renumbered
    if settings["per"]:
        assert len(os.environ["CUDA_VISIBLE_DEVICES"].split(",")) == settings["per"]
    if settings.get("fail_load"):
        raise RuntimeError("cannot load")
    return _EchoEngine(settings.get("fail_on"))


def test_visible_devices_maps_through_parent_list():
    assert visible_devices([0, 1], None) == "0,1"
    assert visible_devices([2, 3], "4,5,6,7") == "6,7"
    with pytest.raises(ValueError):
        visible_devices([4], "0,1")


def test_pool_dispatches_in_order_across_replicas(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "10,11,12,13")
    with ReplicaPool(
        BACKEND, tmp_path, record={}, settings={"per": 2}, gpu_ids=[0, 1, 2, 3], gpus_per_replica=2
    ) as pool:
        assert pool.num_replicas == 2 and pool.replica_devices == ["10,11", "12,13"]
        assert pool.max_batch_size == 6 and pool.max_in_flight == 6
        # The slow first prompt keeps replica 0 pending for a second, so least-pending must send
        # the next one to replica 1 (with fast prompts only, replica 0 may finish each before the
        # next is submitted and take them all: seen once in CI).
        prompts = [[-1]] + [[i] * (i + 1) for i in range(1, 5)]
        out = pool.generate(prompts, 3)
        assert [o[1:] for o in out] == [[len(p), sum(p)] for p in prompts]  # each answer its own prompt's
        assert out[0][0] == 10 and out[1][0] == 12  # spread over both replicas
        assert pool.generate([[9]], 1)[0][0] in (10, 12)
        assert pool.generate([], 5) == []
        assert pool.pending() == [0, 0]


def test_pool_routes_to_the_least_pending_replica_and_forwards_first_tokens(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4")
    with ReplicaPool(BACKEND, tmp_path, record={}, settings={"per": 1}, gpu_ids=[0, 1], gpus_per_replica=1) as pool:
        done, first = [], []
        finished = threading.Semaphore(0)

        def callbacks(i):
            return dict(
                on_done=lambda t: (done.append((i, t)), finished.release()),
                on_error=lambda e: (done.append((i, e)), finished.release()),
                on_first_token=lambda tok: first.append((i, tok)),
            )

        pool.submit([-1], 3, **callbacks("slow"))  # replica 0 is busy for a second
        for i in range(3):
            pool.submit([i + 1], 3, **callbacks(i))
            finished.acquire()  # each quick one goes to the idle replica 1
        assert [d for d in done] == [(0, [4, 1, 1]), (1, [4, 1, 2]), (2, [4, 1, 3])]
        finished.acquire()
        assert done[-1] == ("slow", [3, 1, -1])
        assert set(first) == {(0, 4), (1, 4), (2, 4), ("slow", 3)} and len(first) == 4


def test_a_dead_replica_fails_its_requests_and_the_others_go_on(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with ReplicaPool(BACKEND, tmp_path, record={}, settings={"per": 1}, gpu_ids=[0, 1], gpus_per_replica=1) as pool:
        errors = []
        failed = threading.Event()
        pool.submit([-1], 3, on_done=lambda t: None, on_error=lambda e: (errors.append(e), failed.set()))
        time.sleep(0.2)
        pool._procs[0].kill()
        assert failed.wait(10)
        assert isinstance(errors[0], ReplicaError) and "replica 0" in str(errors[0]) and "exited" in str(errors[0])
        assert pool.generate([[5], [6]], 3) == [[1, 1, 5], [1, 1, 6]]  # all on replica 1


def test_pool_reports_load_and_generate_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ReplicaError, match="cannot load"):
        ReplicaPool(
            BACKEND, tmp_path, record={}, settings={"per": 1, "fail_load": True}, gpu_ids=[0, 1], gpus_per_replica=1
        )
    with ReplicaPool(
        BACKEND, tmp_path, record={}, settings={"per": 1, "fail_on": 666}, gpu_ids=[0, 1], gpus_per_replica=1
    ) as pool:
        with pytest.raises(ReplicaError, match="poisoned"):
            pool.generate([[1], [666]], 4)
        out = pool.generate([[1], [2]], 4)  # still usable (which replica answers is timing's choice)
        assert [o[1:] for o in out] == [[1, 1], [1, 2]] and {o[0] for o in out} <= {0, 1}


def test_pool_rejects_bad_layouts(tmp_path):
    with pytest.raises(ValueError):
        ReplicaPool(BACKEND, tmp_path, record={}, settings={}, gpu_ids=[0, 1, 2], gpus_per_replica=2)


def test_one_cpu_replica_leaves_devices_alone_ignores_group_signals_and_reports_its_exit(tmp_path, monkeypatch):
    """rackbench.serve's engine process: gpu_ids=[] with gpus_per_replica=0."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")  # the worker must not change it
    exits = []
    with ReplicaPool(
        BACKEND,
        tmp_path,
        record={},
        settings={"per": 0},
        gpu_ids=[],
        gpus_per_replica=0,
        on_replica_exit=lambda r, why: exits.append((r, why)),
    ) as pool:
        assert pool.num_replicas == 1 and pool.replica_devices == ["cpu"]
        assert pool.generate([[1, 2]], 3) == [[7, 2, 3]]
        worker = pool._procs[0]
        os.kill(worker.pid, signal.SIGTERM)  # as a launcher's SIGTERM to the server's process group
        os.kill(worker.pid, signal.SIGINT)
        time.sleep(0.3)
        assert worker.is_alive() and pool.generate([[4]], 3) == [[7, 1, 4]]
        assert exits == []
        worker.kill()
        deadline = time.monotonic() + 10
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)
        assert exits == [(0, "replica 0 (cpu) exited (exit code -9)")]
        with pytest.raises(ReplicaError, match="no replica is left"):
            pool.submit([1], 1, on_done=print, on_error=print)
    assert exits == [(0, "replica 0 (cpu) exited (exit code -9)")]  # closing is not an exit to report
