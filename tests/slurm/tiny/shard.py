"""One fake shard job: records what Slurm gave it; fails on request.

Control files in ./control/ (made by the tests):
  fail-once-N     removed, then exit 3 (a non-zero exit)
  cancel-once-N   removed, partial output written, then `scancel $SLURM_JOB_ID`
  fail-always-N   exit 4 every time
  cancel-always-N partial output written, then `scancel $SLURM_JOB_ID`, every time
The complete output appears atomically (a temp dir renamed into place).
"""

import json
import os
import socket
import subprocess
import sys
import time

out, shard, bs, sleep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
started = time.time()
ctl = "control"


def once(kind):
    p = os.path.join(ctl, f"{kind}-{shard}")
    if os.path.exists(p):
        os.remove(p)
        return True
    return False


if os.path.exists(os.path.join(ctl, f"fail-always-{shard}")):
    sys.exit(4)
if once("fail-once"):
    print("failing on request", flush=True)
    sys.exit(3)
if once("cancel-once") or os.path.exists(os.path.join(ctl, f"cancel-always-{shard}")):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "partial.txt"), "w") as f:
        f.write("partial\n")
    subprocess.run(["scancel", os.environ["SLURM_JOB_ID"]], check=True)
    time.sleep(60)  # scancel ends us long before this
    sys.exit(5)

time.sleep(sleep)
tmp = f"{out}.tmp-{os.getpid()}"
os.makedirs(tmp)
record = {
    "shard": shard,
    "bs": bs,
    "started_at": started,
    "finished_at": time.time(),
    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    "slurm_job_gpus": os.environ.get("SLURM_JOB_GPUS"),
    "fake_gpu_type": os.environ.get("RACKBENCH_FAKE_GPU_TYPE"),
    "hostname": socket.gethostname(),
}
with open(os.path.join(tmp, "shard.json"), "w") as f:
    json.dump(record, f)
os.rename(tmp, out)
