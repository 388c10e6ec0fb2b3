"""rackbench.barrier: the per-shard start barrier, with real processes meeting in a folder."""

import os
import subprocess
import sys
import time

from rackbench.barrier import ready_file, wait_for_shards

SHARD = """
import sys, time
from rackbench.barrier import wait_for_shards
time.sleep(float(sys.argv[3]))  # loading the engine
ok = wait_for_shards(sys.argv[1], shard_index=int(sys.argv[2]), num_shards=3, timeout_s=30, log=lambda m: None)
print(ok, time.time())
"""


def test_shards_that_load_at_different_speeds_start_together(tmp_path):
    procs = [
        subprocess.Popen([sys.executable, "-c", SHARD, str(tmp_path), str(i), str(delay)], stdout=subprocess.PIPE)
        for i, delay in enumerate((0.0, 1.0, 2.0))
    ]
    outs = [p.communicate(timeout=60)[0].decode().split() for p in procs]
    assert [o[0] for o in outs] == ["True"] * 3
    starts = [float(o[1]) for o in outs]
    # one common start (the last ready time + lead), not each shard's next poll: within the
    # wake-up jitter of sleeping processes, well under the 50 ms poll interval
    assert max(starts) - min(starts) < 0.04, starts
    last_ready = max(float(ready_file(tmp_path, i).read_text()) for i in range(3))
    assert min(starts) >= last_ready + 0.5, (starts, last_ready)  # the first waited ~2 s for the last


def test_the_common_start_is_the_last_ready_time_plus_the_lead(tmp_path):
    """Shards 1 and 2 are ready at t=100 and t=103; shard 0, ready last at t=104.2 by its own
    clock, sleeps until 104.2 + lead, whatever its polls see."""
    for i, t in ((1, 100.0), (2, 103.0)):
        ready_file(tmp_path, i).write_text(f"{t}\n")
    now, slept = [104.2], []

    def sleep(s):
        slept.append(s)
        now[0] += s

    assert wait_for_shards(
        tmp_path,
        shard_index=0,
        num_shards=3,
        timeout_s=3600,
        lead_s=0.75,
        log=lambda m: None,
        clock=lambda: now[0],
        sleep=sleep,
    )
    assert abs(now[0] - (104.2 + 0.75)) < 1e-9 and len(slept) == 1


def test_a_shard_alone_waits_out_the_timeout_then_starts_and_says_so(tmp_path):
    said = []
    started = time.monotonic()
    assert not wait_for_shards(tmp_path, shard_index=0, num_shards=2, timeout_s=0.5, log=said.append)
    assert 0.5 <= time.monotonic() - started < 5
    assert "shard(s) [1] not ready" in said[0] and "starts alone" in said[0]


def test_an_old_ready_file_is_a_previous_run_not_a_waiting_shard(tmp_path):
    ready_file(tmp_path, 1).write_text("old\n")
    old = time.time() - 3600
    os.utime(ready_file(tmp_path, 1), (old, old))
    assert not wait_for_shards(tmp_path, shard_index=0, num_shards=2, timeout_s=0.3, log=lambda m: None)
    ready_file(tmp_path, 1).write_text("fresh\n")  # shard 1 of this run
    assert wait_for_shards(tmp_path, shard_index=0, num_shards=2, timeout_s=5, log=lambda m: None)


def test_one_shard_never_waits(tmp_path):
    assert wait_for_shards(tmp_path / "none", shard_index=0, num_shards=1, timeout_s=100, log=print)
    assert not (tmp_path / "none").exists()


def test_a_finished_run_leaves_no_ready_file_for_the_next_run_to_meet(tmp_path):
    """Two shards meet and run, each leaving the barrier when its run is over; a rerun of
    shard 0 a moment later (well within the timeout) must wait for shard 1 again."""
    from rackbench.barrier import leave

    ready_file(tmp_path, 1).write_text(f"{time.time()}\n")  # shard 1 of this run, already waiting
    assert wait_for_shards(tmp_path, shard_index=0, num_shards=2, timeout_s=60, lead_s=0.01, log=lambda m: None)
    for i in (0, 1):
        leave(tmp_path, i)
    assert not any(tmp_path.iterdir())
    assert not wait_for_shards(tmp_path, shard_index=0, num_shards=2, timeout_s=0.3, log=lambda m: None)
