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
from typing import Protocol, Sequence

BACKENDS = {
    "reference": "rackbench.engines.reference",
    "tensorrt-llm": "rackbench.engines.tensorrt_llm",
}


class Engine(Protocol):
    """What the harness's SUT drives.

    ``generate`` decodes greedily and returns, for each prompt, the generated
    token ids only: no prompt tokens, no padding, and not the end-of-sequence
    token itself. At most ``max_new_tokens`` per prompt.
    """

    max_batch_size: int

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]: ...

    def close(self) -> None: ...


def backend_module(name: str):
    try:
        return importlib.import_module(BACKENDS[name])
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {sorted(BACKENDS)}") from None
