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

    def submit(self, prompt: Sequence[int], max_new_tokens: int, *,
               on_done: Callable[[list[int]], None],
               on_error: Callable[[BaseException], None],
               on_first_token: Callable[[int], None] | None = None) -> None: ...

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


def backend_module(name: str):
    try:
        return importlib.import_module(BACKENDS[name])
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {sorted(BACKENDS)}") from None
