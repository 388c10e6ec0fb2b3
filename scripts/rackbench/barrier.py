"""A start barrier for the per-shard method: every shard of a configuration starts LoadGen
at the same moment, once all of them have loaded their engines.

The per-shard sum (a) is a rack throughput only where the shards ran at the same time
(the report's overlap test). Shards are separate jobs (separate Slurm jobs on a cluster):
they start when the scheduler starts them and load their engines at different speeds, so
without a barrier a short run can finish before the next shard has begun. Each shard
writes ``shard<i>.ready`` into a folder the shards share (beside their outputs, on the
shared file system) and waits until every shard's ready file is there, then starts.

A ready file counts only if it was written within ``timeout_s`` before this shard's own
(an older one is a previous run's). If the others do not come within ``timeout_s`` (too
few free GPUs to run all shards at once, or one failed), the shard starts anyway and says
so: the report's overlap test then shows that the shards did not overlap.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable


def ready_file(folder, shard_index: int) -> Path:
    return Path(folder) / f"shard{shard_index}.ready"


def wait_for_shards(
    folder,
    *,
    shard_index: int,
    num_shards: int,
    timeout_s: float,
    poll_s: float = 0.05,
    log: Callable[[str], None] = print,
    clock: Callable[[], float] = time.time,
) -> bool:
    """Mark shard ``shard_index`` ready in ``folder`` and wait for all ``num_shards``;
    True when all came, False when ``timeout_s`` passed first (the shard then starts alone)."""
    if num_shards <= 1:
        return True
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mine = ready_file(folder, shard_index)
    tmp = mine.with_name(f".{mine.name}.{os.getpid()}")
    tmp.write_text(f"{clock()}\n")
    os.replace(tmp, mine)  # a fresh mtime: this run's mark
    since = mine.stat().st_mtime - timeout_s
    deadline = clock() + timeout_s
    while True:
        missing = [
            i
            for i in range(num_shards)
            if not (ready_file(folder, i).is_file() and ready_file(folder, i).stat().st_mtime >= since)
        ]
        if not missing:
            log(f"start barrier: all {num_shards} shards ready")
            return True
        if clock() >= deadline:
            log(
                f"start barrier: shard(s) {missing} not ready after {timeout_s:g} s; shard {shard_index} starts "
                "alone (the report's overlap test will show the shards did not run together)"
            )
            return False
        time.sleep(poll_s)
