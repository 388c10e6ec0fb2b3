"""What a step does on SIGTERM: say why in its log, drop its partial output, exit.

Slurm ends a job past its time limit with SIGTERM, then SIGKILL ``KillWait``
seconds later (scancel, preemption and node shutdown send SIGTERM too). A step
writing an output through :func:`rackbench.atomic.atomic_path` registers the
temporary path here; on SIGTERM it

* writes one line to stderr (the rule's log) and, in a Slurm job, to the job's
  own Slurm log (squeue's StdOut), naming the output and the cause: the time limit
  when the job has used all of it (squeue TimeUsed >= TimeLimit), else SIGTERM;
* removes the registered temporary paths, so nothing of the step counts as done;
* exits with status 143 (128 + SIGTERM).

The main thread may sit in native code (LoadGen's StartTest) where Python's own
signal handlers do not run; so the signal also wakes a watcher thread (through
``signal.set_wakeup_fd``) that does the same at once. Installed only in the main
thread, and only where SIGTERM has its default action (Snakemake's own process
keeps its handler).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

EXIT_STATUS = 128 + signal.SIGTERM
_lock = threading.Lock()  # held while a temporary is renamed into place
_temporaries: dict[Path, Path] = {}  # temporary path -> the final output it becomes
_installed = {"previous": None, "wakeup_fd": None, "depth": 0}
_handled = threading.Event()


def _slurm_seconds(text: str) -> int | None:
    """Slurm's [days-][hours:]minutes:seconds as seconds (None for UNLIMITED and the like)."""
    days, _, rest = text.strip().rpartition("-")
    try:
        parts = [int(p) for p in rest.split(":")]
        while len(parts) < 3:
            parts.insert(0, 0)
        return int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    except ValueError:
        return None


def _slurm_job_view(job_id: str) -> tuple[str, str, str]:
    """(time limit, time used, stdout path) of this Slurm job, '' where unknown."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-O", "TimeLimit:|,TimeUsed:|,Name:|,StdOut:4096"],
            capture_output=True,
            text=True,
            timeout=3,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "", "", ""
    limit, used, name, stdout = [f.strip() for f in (out.strip().split("|") + ["", "", "", ""])[:4]]
    # squeue shows the --output pattern; fill in the placeholders a job's log name uses
    for placeholder, value in (
        ("%j", job_id),
        ("%A", job_id),
        ("%x", name),
        ("%N", socket.gethostname().split(".")[0]),
        ("%u", getpass.getuser()),
    ):
        stdout = stdout.replace(placeholder, value)
    return limit, used, stdout if "%" not in stdout else ""


def cause_line(outputs: list[str]) -> tuple[str, str]:
    """The line to log, and the job's Slurm log path ('' outside Slurm)."""
    what = ", ".join(outputs) or "this step"
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return f"rackbench: received SIGTERM: {what} not finished; partial output removed, nothing counts as done", ""
    limit, used, stdout = _slurm_job_view(job_id)
    limit_s, used_s = _slurm_seconds(limit), _slurm_seconds(used)
    if limit_s is not None and used_s is not None and used_s >= limit_s:
        cause = (
            f"Slurm job {job_id} hit its time limit ({limit}; ran {used}): {what} not finished; "
            "partial output removed, nothing counts as done; a retry asks for more time (runtime x attempt)"
        )
    else:
        cause = (
            f"Slurm job {job_id} received SIGTERM (cancelled, preempted or node going down; ran {used or '?'}"
            f" of {limit or '?'}): {what} not finished; partial output removed, nothing counts as done"
        )
    return f"rackbench: {cause}", stdout


def _python_handler(_signum, _frame) -> None:
    # The watcher thread, woken through the wakeup fd, does the work; this thread
    # may be halfway through a rename, which must finish first.
    if _installed["wakeup_fd"] is None:
        _on_sigterm()


def _on_sigterm() -> None:
    if _handled.is_set():
        return
    _handled.set()
    _lock.acquire(timeout=5)  # let a rename in progress finish
    outputs = [str(final) for final in _temporaries.values()]
    line, slurm_log = cause_line(outputs)
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
    if slurm_log and os.path.isfile(slurm_log):
        try:
            same = os.path.samefile(slurm_log, "/proc/self/fd/2")
        except OSError:
            same = False
        if not same:
            with open(slurm_log, "a") as handle:
                handle.write(line + "\n")
    for tmp in list(_temporaries):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    os._exit(EXIT_STATUS)


def _watch(read_fd: int) -> None:
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        if not data:
            return
        if signal.SIGTERM in data:
            _on_sigterm()


def _install() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    if _installed["depth"] == 0:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        _installed["previous"] = signal.signal(signal.SIGTERM, _python_handler)
        if _installed["wakeup_fd"] is None:
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)
            try:
                other = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            except ValueError:
                other = None
            if other is None or other != -1:  # failed, or someone else's (an event loop's): leave theirs
                if other is not None:
                    signal.set_wakeup_fd(other)
                os.close(read_fd)
                os.close(write_fd)
            else:
                _installed["wakeup_fd"] = write_fd
                threading.Thread(target=_watch, args=(read_fd,), name="rackbench-sigterm", daemon=True).start()
    _installed["depth"] += 1


def _uninstall() -> None:
    if threading.current_thread() is not threading.main_thread() or _installed["depth"] == 0:
        return
    _installed["depth"] -= 1
    if _installed["depth"] == 0:
        signal.signal(signal.SIGTERM, _installed["previous"] or signal.SIG_DFL)


def register(tmp: Path, final: Path) -> None:
    """Watch for SIGTERM while ``tmp`` (to become ``final``) is being written."""
    with _lock:
        _temporaries[Path(tmp)] = Path(final)
    _install()


def unregister(tmp: Path) -> None:
    with _lock:
        _temporaries.pop(Path(tmp), None)
    _uninstall()


def forget(tmp: Path) -> None:
    """``tmp`` has been renamed into place (call while holding :func:`renaming`)."""
    _temporaries.pop(Path(tmp), None)


def renaming():
    """Hold while renaming a finished output into place, so SIGTERM does not remove it halfway."""
    return _lock
