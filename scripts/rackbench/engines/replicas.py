"""Several engine replicas behind one Engine, for any backend.

A shard that owns ``n * gpus_per_replica`` GPUs runs ``n`` replicas, each in
its own worker process with ``CUDA_VISIBLE_DEVICES`` set to its GPUs *before*
the backend (and so CUDA) is imported. The pool is one Engine (the asynchronous
contract of ``rackbench.engines``): each submitted request goes to the replica
with the fewest pending, and its callbacks come back from that replica, so the
one LoadGen in front sees one engine.

Workers are started with the ``spawn`` method: no CUDA state is inherited.

``rackbench.serve`` runs its engine as a pool of one replica (no GPUs: one CPU replica),
so that its HTTP event loop does not share the engine's process and GIL (BENCHMARKS note 9).
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import signal
import threading
import traceback
from typing import Sequence


def visible_devices(gpu_ids: Sequence[int], parent_visible: str | None) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a worker owning ``gpu_ids`` (indices as the shard sees them).

    If the shard itself runs under ``CUDA_VISIBLE_DEVICES`` (as Slurm sets it),
    the indices are positions in that list.
    """
    if parent_visible is not None and parent_visible.strip() != "":
        physical = [d.strip() for d in parent_visible.split(",") if d.strip() != ""]
        try:
            return ",".join(physical[i] for i in gpu_ids)
        except IndexError:
            raise ValueError(f"GPU indices {list(gpu_ids)} outside CUDA_VISIBLE_DEVICES={parent_visible!r}") from None
    return ",".join(str(i) for i in gpu_ids)


def _worker_main(
    conn, backend: str, loader: str, engine_dir, record, settings, n_gpus: int, cuda_visible: str | None
) -> None:
    # The parent closes its workers through the pipe, and a parent that dies closes the pipe
    # (EOF below); a signal to the whole process group (Ctrl-C, a launcher's SIGTERM) must not
    # kill a worker first, or the parent would report it as a replica that died.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if cuda_visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible
    os.environ["RACKBENCH_REPLICA_DEVICES"] = cuda_visible or ""
    from rackbench.engines import BatchedEngine, max_in_flight

    engine = None
    try:
        module = importlib.import_module(backend)
        load = getattr(module, loader)
        if loader == "load":
            engine = load(
                engine_dir, record=record, gpu_ids=list(range(n_gpus)), settings={**settings, "in_process": True}
            )
        else:
            engine = load(engine_dir, record=record, settings=settings)
        engine = BatchedEngine.wrap(engine, owns=True)
        conn.send(("ready", max_in_flight(engine), int(getattr(engine, "max_batch_size", max_in_flight(engine)))))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        conn.close()
        return
    send_lock = threading.Lock()

    def send(message) -> None:  # from the engine's threads
        try:
            with send_lock:
                conn.send(message)
        except (OSError, ValueError):  # the parent is gone: nobody to tell
            pass

    def callbacks(rid: int, want_first: bool):
        def on_error(exc):
            send(("error", rid, "".join(traceback.format_exception(exc))))

        return {
            "on_done": lambda tokens: send(("done", rid, list(tokens))),
            "on_error": on_error,
            "on_first_token": (lambda token: send(("first", rid, int(token)))) if want_first else None,
        }

    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                break
            if msg[0] == "close":
                break
            _, rid, prompt, max_new_tokens, want_first = msg
            cbs = callbacks(rid, want_first)
            try:
                engine.submit(prompt, max_new_tokens, **cbs)
            except BaseException as exc:
                cbs["on_error"](exc)
    finally:
        try:
            engine.close()
        finally:
            conn.close()


class ReplicaError(RuntimeError):
    pass


class ReplicaPool:
    """An Engine made of ``len(gpu_ids) // gpus_per_replica`` replicas of ``backend``.

    ``backend`` is a module name; each worker calls ``<backend>.<loader>``:
    ``loader="load"`` calls ``load(engine_dir, record=, gpu_ids=[0..k-1], settings=)``
    (the worker only sees its own GPUs); any other name is called as
    ``loader(engine_dir, record=, settings=)``. A worker whose engine has only a blocking
    ``generate`` runs it through ``rackbench.engines.BatchedEngine``.

    ``submit`` sends each request to the live replica with the fewest requests pending
    (ties: the lowest index); one reader thread per replica calls the request's callbacks
    as the replica reports them. A replica that dies fails its pending requests with a
    ReplicaError naming it; the others go on, and ``on_replica_exit(r, why)`` (if given) is
    called from its reader thread.

    ``gpu_ids=[]`` with ``gpus_per_replica=0``: one replica that sees no GPUs (a CPU engine;
    ``CUDA_VISIBLE_DEVICES`` is left as it is).
    """

    def __init__(
        self,
        backend: str,
        engine_dir,
        *,
        record: dict,
        settings: dict,
        gpu_ids: Sequence[int],
        gpus_per_replica: int,
        loader: str = "load",
        start_timeout_s: float | None = None,
        on_replica_exit=None,
    ):
        gpu_ids = list(gpu_ids)
        cpu_only = not gpu_ids and gpus_per_replica == 0
        if gpus_per_replica < 1 and not cpu_only:
            raise ValueError("gpus_per_replica must be >= 1 (0 only with no GPUs: one CPU replica)")
        if not cpu_only and (not gpu_ids or len(gpu_ids) % gpus_per_replica):
            raise ValueError(f"{len(gpu_ids)} GPUs do not divide into replicas of {gpus_per_replica}")
        self.on_replica_exit = on_replica_exit
        ctx = mp.get_context("spawn")
        parent_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.replica_devices: list[str] = []
        self._procs, self._conns, self._readers = [], [], []
        self._lock = threading.Lock()
        self._pending: list[dict[int, tuple]] = []
        self._send_locks: list[threading.Lock] = []
        self._alive: list[bool] = []
        self._next_id = 0
        self._closing = False
        try:
            for r in range(1 if cpu_only else len(gpu_ids) // gpus_per_replica):
                ids = gpu_ids[r * gpus_per_replica : (r + 1) * gpus_per_replica]
                devices = None if cpu_only else visible_devices(ids, parent_visible)
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_worker_main,
                    name=f"replica{r}[{devices}]",
                    args=(child, backend, loader, str(engine_dir), record, settings, len(ids), devices),
                    daemon=True,
                )
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
                self.replica_devices.append("cpu" if devices is None else devices)
            in_flight, batch = [], []
            for r, conn in enumerate(self._conns):
                if start_timeout_s is not None and not conn.poll(start_timeout_s):
                    raise ReplicaError(f"replica {r} did not start within {start_timeout_s}s")
                reply = self._recv(r)
                if reply[0] != "ready":
                    raise ReplicaError(f"replica {r} ({self.replica_devices[r]}) failed to load:\n{reply[1]}")
                in_flight.append(reply[1])
                batch.append(reply[2])
        except BaseException:
            self.close()
            raise
        n = len(self._conns)
        self._pending = [{} for _ in range(n)]
        self._send_locks = [threading.Lock() for _ in range(n)]
        self._alive = [True] * n
        self.replica_max_in_flight = in_flight
        self.max_in_flight = sum(in_flight)
        self.replica_max_batch_size = min(batch)
        self.max_batch_size = self.replica_max_batch_size * n
        for r in range(n):
            reader = threading.Thread(target=self._read, args=(r,), name=f"rackbench-replica{r}-reader", daemon=True)
            reader.start()
            self._readers.append(reader)

    @property
    def num_replicas(self) -> int:
        return len(self._conns)

    def pending(self) -> list[int]:
        """Requests pending on each replica."""
        with self._lock:
            return [len(p) for p in self._pending]

    def _recv(self, r: int):
        try:
            return self._conns[r].recv()
        except (EOFError, OSError):
            code = self._procs[r].exitcode
            return ("error", f"replica {r} exited (exit code {code}) without answering")

    # ---- the Engine contract

    def submit(self, prompt, max_new_tokens, *, on_done, on_error, on_first_token=None) -> None:
        with self._lock:
            live = [r for r in range(len(self._conns)) if self._alive[r]]
            if self._closing or not live:
                raise ReplicaError("the replica pool is closed" if self._closing else "no replica is left")
            r = min(live, key=lambda i: len(self._pending[i]))
            rid = self._next_id
            self._next_id += 1
            self._pending[r][rid] = (on_done, on_error, on_first_token)
        message = ("submit", rid, [int(t) for t in prompt], int(max_new_tokens), on_first_token is not None)
        try:
            with self._send_locks[r]:
                self._conns[r].send(message)
        except (OSError, ValueError) as exc:  # the replica died meanwhile: its reader fails the rest
            with self._lock:
                lost = self._pending[r].pop(rid, None)
            if lost is not None:
                on_error(ReplicaError(f"replica {r} ({self.replica_devices[r]}): {exc!r}"))

    def _read(self, r: int) -> None:
        conn, pending = self._conns[r], self._pending[r]
        while True:
            try:
                kind, rid, payload = conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                cbs = pending.get(rid) if kind == "first" else pending.pop(rid, None)
            if cbs is None:
                continue
            if kind == "first":
                cbs[2](payload)
            elif kind == "done":
                cbs[0](payload)
            else:
                cbs[1](ReplicaError(f"replica {r} ({self.replica_devices[r]}):\n{payload}"))
        with self._lock:
            self._alive[r] = False
            lost = list(pending.values())
            pending.clear()
        if lost:
            self._procs[r].join(timeout=5)
            why = "closed" if self._closing else f"exited (exit code {self._procs[r].exitcode})"
            for cbs in lost:
                cbs[1](ReplicaError(f"replica {r} ({self.replica_devices[r]}) {why} with the request pending"))
        if not self._closing and self.on_replica_exit is not None:
            self._procs[r].join(timeout=5)
            code = self._procs[r].exitcode
            self.on_replica_exit(r, f"replica {r} ({self.replica_devices[r]}) exited (exit code {code})")

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Blocking: every prompt's tokens, in order (``rackbench.engines.generate``)."""
        from rackbench.engines import generate

        return generate(self, prompts, max_new_tokens)

    def close(self) -> None:
        with self._lock:
            self._closing = True
        for r, conn in enumerate(self._conns):
            try:
                if self._send_locks:
                    with self._send_locks[r]:
                        conn.send(("close",))
                else:
                    conn.send(("close",))
            except (OSError, BrokenPipeError, ValueError):
                pass
        for proc in self._procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
        for reader in self._readers:
            reader.join(timeout=10)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns, self._readers = [], [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
