"""A start barrier for the per-shard method: every shard of a configuration starts LoadGen
at the same moment, once all of them have loaded their engines.

The per-shard sum (a) is a rack throughput only where the shards ran at the same time
(the report's overlap test). Shards are separate jobs (separate Slurm jobs on a cluster):
they start when the scheduler starts them and load their engines at different speeds, so
without a barrier a short run can finish before the next shard has begun. Each shard
writes ``shard<i>.ready`` (its clock time) into a folder the shards share (beside their
outputs, on the shared file system) and waits until every shard's ready file is there.
Then every shard starts at the same moment: the last ready time plus ``lead_s``. Starting
as each shard happens to notice the last file (it polls) would put up to a poll interval,
plus whatever the scheduler adds, between the shards' starts: 90 ms of a 0.8 s demo run was
seen, enough to fail the report's overlap test.

A ready file counts only if it was written within ``timeout_s`` before this shard's own
(an older one is a previous run's), and each shard removes its own once its LoadGen run is
over (``leave``), so that a rerun soon after does not meet the last run's files. If the
others do not come within ``timeout_s`` (too
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


def leave(folder, shard_index: int) -> None:
    """Remove this shard's ready file: its run is over (every other shard saw it long ago)."""
    ready_file(folder, shard_index).unlink(missing_ok=True)


def _ready_time(path: Path) -> float:
    """The clock time a ready file holds (its mtime if it holds none: written by hand)."""
    try:
        return float(path.read_text().split()[0])
    except (ValueError, IndexError):
        return path.stat().st_mtime


def wait_for_shards(
    folder,
    *,
    shard_index: int,
    num_shards: int,
    timeout_s: float,
    poll_s: float = 0.05,
    lead_s: float = 0.5,
    log: Callable[[str], None] = print,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Mark shard ``shard_index`` ready in ``folder`` and wait for all ``num_shards``, then
    until the common start (the last ready time + ``lead_s``, which must exceed ``poll_s``
    so that every shard has seen the last file by then; on a cluster the shards' clocks are
    the nodes' NTP-synchronised ones). True when all came, False when ``timeout_s`` passed
    first (the shard then starts alone)."""
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
            start = max(_ready_time(ready_file(folder, i)) for i in range(num_shards)) + lead_s
            wait = start - clock()
            log(f"start barrier: all {num_shards} shards ready; starting together in {max(wait, 0):.2f} s")
            if wait > 0:
                sleep(wait)
            return True
        if clock() >= deadline:
            log(
                f"start barrier: shard(s) {missing} not ready after {timeout_s:g} s; shard {shard_index} starts "
                "alone (the report's overlap test will show the shards did not run together)"
            )
            return False
        sleep(poll_s)
