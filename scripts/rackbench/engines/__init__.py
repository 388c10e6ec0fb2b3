"""The engine interface: the harness knows nothing about engines beyond this.

A backend is a module with two functions:

``build(checkpoint_dir, engine_dir, *, gpu_type, gpu_spec, settings) -> dict``
    Populate ``engine_dir`` (a fresh temporary directory the caller renames
    into place) and return backend-specific facts for the engine record.

``load(engine_dir, *, record, gpu_ids, settings) -> Engine``
    Open the engine for a shard that owns ``gpu_ids`` (device indices as the
    shard sees them; empty on CPU).

Backends are imported lazily, so CPU code never imports ``tensorrt_llm``.
"""

from __future__ import annotations

import importlib
import threading
from typing import Callable, Protocol, Sequence

BACKENDS = {
    "reference": "rackbench.engines.reference",
    "tensorrt-llm": "rackbench.engines.tensorrt_llm",
}


class Engine(Protocol):
    """What the harness's SUT and the engine server drive: an asynchronous engine.

    ``submit`` hands the engine one request and returns at once; the engine's own
    in-flight batching decides what runs together. For each request it calls,
    from any thread, exactly one of:

    * ``on_done(tokens)``: the generated token ids only (no prompt tokens, no
      padding, not the end-of-sequence token itself), at most ``max_new_tokens``;
    * ``on_error(exc)``: the request failed; the engine stays usable for others
      unless ``exc`` says it is dead.

    and, before ``on_done`` and only if given, ``on_first_token(token_id)`` as soon
    as the first output token is known (Server/Interactive TTFT). A request that
    ends with no token gets no ``on_first_token``.

    ``max_in_flight`` is how many submitted, unfinished requests the engine wants
    at most (its batch capacity); callers bound themselves by it or by config.
    Callbacks must be cheap: they run on the engine's thread.
    """

    max_in_flight: int

    def submit(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        *,
        on_done: Callable[[list[int]], None],
        on_error: Callable[[BaseException], None],
        on_first_token: Callable[[int], None] | None = None,
    ) -> None: ...

    def close(self) -> None: ...


def generate(engine: Engine, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Blocking convenience over ``submit``: every prompt's tokens, in order.

    For the demo, accuracy checks and tests; the harness uses ``submit`` directly.
    Raises the first request error.
    """
    results: list = [None] * len(prompts)
    errors: list[BaseException] = []
    pending = threading.Semaphore(0)

    def done(i):
        def on_done(tokens):
            results[i] = list(tokens)
            pending.release()

        def on_error(exc):
            errors.append(exc)
            pending.release()

        return on_done, on_error

    for i, prompt in enumerate(prompts):
        on_done, on_error = done(i)
        engine.submit(prompt, max_new_tokens, on_done=on_done, on_error=on_error)
    for _ in prompts:
        pending.acquire()
    if errors:
        raise errors[0]
    return results


def max_in_flight(engine) -> int:
    """The engine's ``max_in_flight``; older blocking engines give their ``max_batch_size``."""
    value = getattr(engine, "max_in_flight", None)
    if value is None:
        value = getattr(engine, "max_batch_size", None)
    if value is None:
        raise TypeError(f"{type(engine).__name__} says neither max_in_flight nor max_batch_size")
    return int(value)


class BatchedEngine:
    """The Engine contract over a blocking ``generate(prompts, max_new_tokens)`` function.

    One worker thread takes whatever requests are waiting (at most ``max_batch_size``,
    those of one ``max_new_tokens``), runs them as one blocking batch, and completes
    them all when the batch returns: static batching, the engine contract's behaviour
    before in-flight batching. For engines that only offer a blocking ``generate``
    (test doubles, older backends) and for measuring what in-flight batching gains.
    There are no first-token events before the batch ends: ``on_first_token`` is called
    just before ``on_done``.
    """

    def __init__(
        self,
        generate_batch: Callable[[list, int], list],
        max_batch_size: int,
        *,
        close=None,
        name: str = "rackbench-batched-engine",
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self._generate_batch = generate_batch
        self.max_batch_size = self.max_in_flight = int(max_batch_size)
        self._close = close
        self._waiting: list = []
        self._cond = threading.Condition()
        self._closed = False
        self.batches: list[int] = []  # sizes of the batches run, for tests and benchmarks
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @classmethod
    def wrap(cls, engine, *, owns: bool = False):
        """``engine`` itself if it has ``submit``; else a BatchedEngine over its ``generate``
        (whose ``close`` also closes ``engine`` only if it ``owns`` it)."""
        if hasattr(engine, "submit"):
            return engine
        return cls(engine.generate, max_in_flight(engine), close=engine.close if owns else None)

    def submit(self, prompt, max_new_tokens, *, on_done, on_error, on_first_token=None) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("engine is closed")
            self._waiting.append((list(prompt), int(max_new_tokens), on_done, on_error, on_first_token))
            self._cond.notify()

    def _take(self) -> list | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if not self._waiting:
                return None
            n = self._waiting[0][1]
            batch = [r for r in self._waiting if r[1] == n][: self.max_batch_size]
            taken = set(map(id, batch))
            self._waiting = [r for r in self._waiting if id(r) not in taken]
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            self.batches.append(len(batch))
            try:
                outputs = self._generate_batch([r[0] for r in batch], batch[0][1])
                if len(outputs) != len(batch):
                    raise RuntimeError(f"engine returned {len(outputs)} outputs for {len(batch)} prompts")
            except BaseException as exc:
                for r in batch:
                    r[3](exc)
                continue
            for (_, _, on_done, _, on_first_token), tokens in zip(batch, outputs):
                tokens = tokens if isinstance(tokens, list) else list(tokens)
                if on_first_token is not None and tokens:
                    on_first_token(tokens[0])
                on_done(tokens)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        if self._close is not None:
            self._close()


def backend_module(name: str):
    try:
        return importlib.import_module(BACKENDS[name])
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {sorted(BACKENDS)}") from None
