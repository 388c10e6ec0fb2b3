"""This workflow's own Slurm jobs left running by an earlier, killed Snakemake.

When the login session dies (SIGKILL of ``snakemake``), the jobs it submitted keep
running, and a rerun would submit the same outputs again while the orphans still
write them (``rerun-incomplete``: Snakemake marked them incomplete).

Policy (chosen here): **wait and adopt**. Before Snakemake looks at incomplete
outputs, a rerun waits until every orphan has left the queue. An orphan that
completes finishes its own bookkeeping: its job-side Snakemake (snakemake-executor-
plugin-slurm 2.8.0 runs one per job, on the shared ``.snakemake``) records the
output's metadata and removes its incomplete marker, so the rerun takes the output
as done and does not run it again (its GPU hours are not wasted). An orphan that
fails, is cancelled or times out leaves the output missing or marked incomplete, and
the rerun makes it again. To rerun instead of waiting, scancel the jobs that
``python -m rackbench.slurm_jobs`` lists.

A job counts as this workflow's own when squeue reports this working directory for
it (``%Z``: the plugin submits with ``-D <workdir>``), its name is a plugin run ID
(``[prefix_]<uuid4>``, ``%j``) and its comment names a rule (``rule_<rule>[_wildcards_...]``,
``%k``). Slurm is asked only where Snakemake left incomplete markers
(``.snakemake/incomplete``), as a killed run does; a clean or local run costs one
directory listing.

    python -m rackbench.slurm_jobs [--workdir DIR]   # list them (what a rerun would wait for)
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Slurm states in which a job may still write its outputs.
ACTIVE_STATES = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
    "PREEMPTED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESV_DEL_HOLD",
}
# The plugin names every job of one run by its run ID: an optional prefix, then a uuid4.
RUN_ID = re.compile(r"^(?:[A-Za-z0-9_-]{1,50}_)?[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
POLL_S = 10.0
_SQUEUE_FIELDS = ("%i", "%T", "%j", "%Z", "%k")


@dataclass
class SlurmJob:
    job_id: str
    state: str
    name: str
    workdir: str
    comment: str


def incomplete_markers(workdir: str | os.PathLike) -> dict[str, str | None]:
    """Output path -> Slurm job id (None once the job itself has started), for each output
    Snakemake marked incomplete (``.snakemake/incomplete/<urlsafe base64 of the path>``)."""
    root = Path(workdir) / ".snakemake" / "incomplete"
    found = {}
    if not root.is_dir():
        return found
    for dirpath, _, files in os.walk(root):
        for name in files:
            marker = Path(dirpath, name)
            # Long names are split into nested folders, each part but the last prefixed '@'.
            parts = [p.lstrip("@") for p in marker.relative_to(root).parts]
            try:
                output = base64.urlsafe_b64decode("".join(parts)).decode()
                job_id = json.loads(marker.read_text() or "{}").get("external_jobid")
            except (ValueError, OSError):
                continue  # Snakemake's own migration files and the like
            found[output] = str(job_id) if job_id else None
    return found


def _squeue_jobs(selection: list[str]) -> list[SlurmJob]:
    """The jobs ``squeue -h SELECTION`` lists, with our fields (a line that does not parse is skipped)."""
    sep = "\x1f"
    proc = subprocess.run(
        ["squeue", "-h", *selection, "-o", sep.join(_SQUEUE_FIELDS)], capture_output=True, text=True, timeout=60
    )
    rows = (line.split(sep) for line in proc.stdout.splitlines())
    return [SlurmJob(*(f.strip() for f in fields)) for fields in rows if len(fields) == len(_SQUEUE_FIELDS)]


def squeue(job_ids) -> dict[str, SlurmJob]:
    """What squeue knows of these jobs (finished ones too, for MinJobAge seconds)."""
    job_ids = sorted(set(job_ids))
    if not job_ids or not shutil.which("squeue"):
        return {}
    return {job.job_id: job for job in _squeue_jobs(["--states=all", "-j", ",".join(job_ids)])}


def sacct_states(job_ids) -> dict[str, str]:
    """Final states from accounting, for jobs squeue has already forgotten ({} where there is none)."""
    job_ids = sorted(set(job_ids))
    if not job_ids or not shutil.which("sacct"):
        return {}
    proc = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", "JobIDRaw,State"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    states = {}
    for line in proc.stdout.splitlines():
        job_id, _, state = line.partition("|")
        if state:
            states[job_id] = state.split()[0]  # "CANCELLED by 0" -> "CANCELLED"
    return states


def own_active_jobs(workdir: str | os.PathLike) -> dict[str, SlurmJob]:
    """This workflow's Slurm jobs that are still pending or running, by job id."""
    if not shutil.which("squeue"):
        return {}
    here = os.path.realpath(workdir)
    jobs = {}
    for job in _squeue_jobs(["-u", getpass.getuser()]):
        if (
            job.state in ACTIVE_STATES
            and os.path.realpath(job.workdir) == here
            and RUN_ID.match(job.name)
            and job.comment.startswith(("rule_", "group_"))
        ):
            jobs[job.job_id] = job
    return jobs


def settle_orphans(
    workdir: str | os.PathLike, log: Callable[[str], None] = print, poll_s: float = POLL_S
) -> dict[str, str]:
    """Wait for this workflow's orphaned Slurm jobs to end; returns their final states by job id.

    Returns {} at once, asking Slurm nothing, where Snakemake left no incomplete marker.
    """
    if not incomplete_markers(workdir):
        return {}
    orphans = own_active_jobs(workdir)
    if not orphans:
        return {}
    log(
        f"rackbench: {len(orphans)} Slurm job(s) of an earlier, interrupted run of this workflow are still "
        "pending or running: waiting for them and adopting their outputs, not submitting them again "
        "(scancel them to rerun them instead): "
        + ", ".join(f"{j} ({orphans[j].state}, {orphans[j].comment})" for j in sorted(orphans, key=int))
    )
    pending = set(orphans)
    final: dict[str, str] = {}
    while pending:
        time.sleep(poll_s)
        seen = squeue(pending)
        for job_id in list(pending):
            job = seen.get(job_id)
            if job is None or job.state not in ACTIVE_STATES:
                final[job_id] = job.state if job else ""
                pending.discard(job_id)
        if pending:
            log(f"rackbench: still waiting for Slurm job(s) {', '.join(sorted(pending, key=int))}")
    final.update(sacct_states([j for j, state in final.items() if not state]))
    for job_id in sorted(orphans, key=int):
        state = final.get(job_id) or "UNKNOWN"
        final[job_id] = state
        if state == "COMPLETED":
            log(f"rackbench: Slurm job {job_id} ({orphans[job_id].comment}) COMPLETED: its output is adopted")
        else:
            log(f"rackbench: Slurm job {job_id} ({orphans[job_id].comment}) ended {state}: its output is made again")
    return final


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="List this workflow's Slurm jobs still pending or running (what a rerun waits for)."
    )
    ap.add_argument("--workdir", default=".")
    args = ap.parse_args(argv)
    for job_id, job in sorted(own_active_jobs(args.workdir).items(), key=lambda item: int(item[0])):
        print(f"{job_id}\t{job.state}\t{job.comment}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
