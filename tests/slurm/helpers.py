"""Running Snakemake through the real test Slurm cluster, and reading what Slurm saw."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CI_PROFILE = REPO / "profiles" / "ci-slurm"
TINY = Path(__file__).resolve().parent / "tiny"


def snakemake_env(**extra) -> dict:
    env = dict(os.environ)
    # Slurm jobs inherit the submitting environment (--export=ALL): name the fake GPU.
    env["RACKBENCH_FAKE_GPU_TYPE"] = "gb300"
    env.pop("SLURM_JOB_ID", None)
    env.update(extra)
    return env


def run_snakemake(
    args: list[str], cwd: Path, timeout: int, env: dict | None = None, slurm: bool = True
) -> subprocess.CompletedProcess:
    """`snakemake [--executor slurm --workflow-profile profiles/ci-slurm] ARGS` under
    `timeout`, so that a hang fails the test instead of eating CI's time. The
    output goes to cwd/snakemake-<n>.log too."""
    cmd = ["timeout", "--kill-after=30", str(timeout), sys.executable, "-m", "snakemake"]
    if slurm:
        cmd += ["--executor", "slurm", "--workflow-profile", str(CI_PROFILE), "--verbose"]
    cmd += args
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=cwd, env=env or snakemake_env(), capture_output=True, text=True)
    p.elapsed = time.monotonic() - t0
    n = len(list(Path(cwd).glob("snakemake-*.log")))
    Path(cwd, f"snakemake-{n}.log").write_text(
        f"$ {' '.join(cmd)}\n(rc {p.returncode}, {p.elapsed:.0f}s)\n{p.stdout}\n{p.stderr}"
    )
    if p.returncode == 124:
        raise AssertionError(f"snakemake timed out after {timeout}s:\n{tail(p)}")
    return p


def tail(p: subprocess.CompletedProcess, n: int = 60) -> str:
    return "\n".join((p.stdout + p.stderr).splitlines()[-n:])


def slurm_run_id(p: subprocess.CompletedProcess) -> str:
    m = re.search(r"SLURM run ID: (\S+)", p.stdout + p.stderr)
    assert m, f"no SLURM run ID in the output:\n{tail(p)}"
    return m.group(1)


def sbatch_calls(p: subprocess.CompletedProcess) -> list[str]:
    """The plugin's sbatch command lines (logged with --verbose), without the --wrap payload."""
    calls = re.findall(r"sbatch call: (sbatch .*?) --wrap=", p.stdout + p.stderr)
    return [re.sub(r"\s+", " ", c) for c in calls]


def comment_of(call: str) -> str:
    m = re.search(r"--comment (\S+)", call)
    return m.group(1).strip("'") if m else ""


def sacct(run_id: str, wait_s: float = 30) -> list[dict]:
    """This run's Slurm jobs as the accounting database has them."""
    fields = ["JobIDRaw", "State", "Comment", "AllocTRES", "ReqTRES", "Start", "End", "ExitCode"]
    deadline = time.monotonic() + wait_s
    while True:
        out = subprocess.run(
            [
                "sacct",
                "-X",
                "-P",
                "-n",
                "--name",
                run_id,
                "--starttime",
                "now-1days",
                "-o",
                ",".join(f + ("%200" if f.endswith("TRES") else "") for f in fields),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows = [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line]
        # accounting lags the controller by a moment: wait until no job looks unfinished
        if all(r["State"] not in ("PENDING", "RUNNING") for r in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(1)


def copy_tiny(dest: Path) -> Path:
    shutil.copytree(TINY, dest)
    (dest / "control").mkdir()
    return dest


def start_snakemake(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """`snakemake --executor slurm --workflow-profile profiles/ci-slurm ARGS` in the background,
    in its own session (so it can be killed like a lost login shell); output to cwd/snakemake-<n>.log."""
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--executor",
        "slurm",
        "--workflow-profile",
        str(CI_PROFILE),
        "--verbose",
        *args,
    ]
    n = len(list(Path(cwd).glob("snakemake-*.log")))
    out = open(Path(cwd, f"snakemake-{n}.log"), "w")
    out.write(f"$ {' '.join(cmd)} (in the background)\n")
    out.flush()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env or snakemake_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    out.close()
    proc.log_path = Path(cwd, f"snakemake-{n}.log")
    return proc


def queued_jobs(workdir: Path) -> list[dict]:
    """Slurm jobs (pending, running, or finished within MinJobAge) whose working directory is `workdir`."""
    fields = ["JobID", "State", "Name", "WorkDir", "Comment"]
    out = subprocess.run(
        ["squeue", "-h", "--states=all", "-o", "\x1f".join(["%i", "%T", "%j", "%Z", "%k"])],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [dict(zip(fields, line.split("\x1f"))) for line in out.splitlines() if line]
    return [r for r in rows if os.path.realpath(r["WorkDir"]) == os.path.realpath(workdir)]
