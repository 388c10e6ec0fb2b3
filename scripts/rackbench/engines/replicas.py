"""Several engine replicas behind one Engine, for any backend.

A shard that owns ``n * gpus_per_replica`` GPUs runs ``n`` replicas, each in
its own worker process with ``CUDA_VISIBLE_DEVICES`` set to its GPUs *before*
the backend (and so CUDA) is imported. ``generate`` splits a batch into
contiguous chunks, sends them to all replicas at once, and concatenates the
answers in input order, so the one LoadGen in front sees one engine.

Workers are started with the ``spawn`` method: no CUDA state is inherited.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
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


def split_batch(n_items: int, n_parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) chunks, sizes differing by at most one; empty ones dropped."""
    base, extra = divmod(n_items, n_parts)
    bounds, start = [], 0
    for i in range(n_parts):
        stop = start + base + (1 if i < extra else 0)
        if stop > start:
            bounds.append((start, stop))
        start = stop
    return bounds


def _worker_main(conn, backend: str, loader: str, engine_dir, record, settings,
                 n_gpus: int, cuda_visible: str | None) -> None:
    if cuda_visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible
    os.environ["RACKBENCH_REPLICA_DEVICES"] = cuda_visible or ""
    engine = None
    try:
        module = importlib.import_module(backend)
        load = getattr(module, loader)
        if loader == "load":
            engine = load(engine_dir, record=record, gpu_ids=list(range(n_gpus)),
                          settings={**settings, "in_process": True})
        else:
            engine = load(engine_dir, record=record, settings=settings)
        conn.send(("ready", int(engine.max_batch_size)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        conn.close()
        return
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                break
            if msg[0] == "close":
                break
            _, prompts, max_new_tokens = msg
            try:
                conn.send(("ok", engine.generate(prompts, max_new_tokens)))
            except BaseException:
                conn.send(("error", traceback.format_exc()))
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
    ``loader(engine_dir, record=, settings=)``.
    """

    def __init__(self, backend: str, engine_dir, *, record: dict, settings: dict,
                 gpu_ids: Sequence[int], gpus_per_replica: int, loader: str = "load",
                 start_timeout_s: float | None = None):
        gpu_ids = list(gpu_ids)
        if gpus_per_replica < 1:
            raise ValueError("gpus_per_replica must be >= 1")
        if not gpu_ids or len(gpu_ids) % gpus_per_replica:
            raise ValueError(f"{len(gpu_ids)} GPUs do not divide into replicas of {gpus_per_replica}")
        ctx = mp.get_context("spawn")
        parent_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.replica_devices: list[str] = []
        self._procs, self._conns = [], []
        try:
            for r in range(len(gpu_ids) // gpus_per_replica):
                ids = gpu_ids[r * gpus_per_replica:(r + 1) * gpus_per_replica]
                devices = visible_devices(ids, parent_visible)
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, name=f"replica{r}[{devices}]",
                                   args=(child, backend, loader, str(engine_dir), record, settings,
                                         len(ids), devices), daemon=True)
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
                self.replica_devices.append(devices)
            sizes = []
            for r, conn in enumerate(self._conns):
                if start_timeout_s is not None and not conn.poll(start_timeout_s):
                    raise ReplicaError(f"replica {r} did not start within {start_timeout_s}s")
                kind, payload = self._recv(r)
                if kind != "ready":
                    raise ReplicaError(f"replica {r} ({self.replica_devices[r]}) failed to load:\n{payload}")
                sizes.append(payload)
        except BaseException:
            self.close()
            raise
        self.replica_max_batch_size = min(sizes)
        self.max_batch_size = self.replica_max_batch_size * len(self._conns)

    @property
    def num_replicas(self) -> int:
        return len(self._conns)

    def _recv(self, r: int):
        try:
            return self._conns[r].recv()
        except EOFError:
            code = self._procs[r].exitcode
            return ("error", f"replica {r} exited (exit code {code}) without answering")

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            return []
        chunks = split_batch(len(prompts), len(self._conns))
        for r, (a, b) in enumerate(chunks):      # all replicas work at once
            self._conns[r].send(("generate", prompts[a:b], int(max_new_tokens)))
        results, errors = [], []
        for r, (a, b) in enumerate(chunks):      # collect every answer, in order
            kind, payload = self._recv(r)
            if kind != "ok":
                errors.append(f"replica {r} ({self.replica_devices[r]}):\n{payload}")
            elif len(payload) != b - a:
                errors.append(f"replica {r} returned {len(payload)} outputs for {b - a} prompts")
            else:
                results.extend(payload)
        if errors:
            raise ReplicaError("\n".join(errors))
        return results

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(("close",))
            except (OSError, BrokenPipeError):
                pass
        for proc in self._procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
