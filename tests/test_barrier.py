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
    assert max(starts) - min(starts) < 0.5, starts  # the first waited ~2 s for the last


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
