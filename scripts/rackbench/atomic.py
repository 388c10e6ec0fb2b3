"""Atomic outputs and checksums.

Every step writes to a temporary sibling path and renames it into place only
when complete, so a step killed at any point (even SIGKILL) never leaves an
output that a later run would take as done.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from rackbench import sigterm

_CHUNK = 1 << 20


class DiskFullError(OSError):
    """A step ran out of disk space (or quota) while writing an output; nothing of it is kept."""

    def __init__(self, final: Path, cause: BaseException):
        code = cause.errno if isinstance(cause, OSError) and cause.errno else errno.ENOSPC
        super().__init__(
            code,
            f"no space left on the filesystem of {final.parent} while writing {final} "
            f"({type(cause).__name__}: {cause}); the partial output was removed, earlier "
            "results are untouched; free space there and rerun",
        )
        self.final = final


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_stale_temporaries(final: Path) -> None:
    """Leftovers of an earlier attempt that was killed before its rename.

    Only one job writes a given output at a time (Snakemake's lock and DAG
    ensure that), so any temporary sibling found now is dead.
    """
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def _tmp_sibling(final: Path, kind: str) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final)
    if kind == "dir":
        return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on success rename it to ``final``, on error remove it.

    For directories an existing ``final`` is replaced only after the new one is
    complete.
    """
    final = Path(final)
    try:
        tmp = _tmp_sibling(final, "dir" if directory else "file")
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(final, err) from err
        raise
    # SIGTERM (a Slurm time limit, scancel): log why, remove tmp, exit (rackbench.sigterm).
    sigterm.register(tmp, final)
    try:
        try:
            yield tmp
        except BaseException as err:
            full = _out_of_space(err, final)  # looked at before the partial output frees the space
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            if full:
                raise DiskFullError(final, err) from err
            raise
        _fault_injection_pause(final)
        with sigterm.renaming():
            _rename_into_place(tmp, final, directory)
            sigterm.forget(tmp)
    finally:
        sigterm.unregister(tmp)


# Below this many free bytes the filesystem counts as full: torch.save reports ENOSPC as
# "file write failed", in an error that is no OSError and names no errno.
FULL_BELOW_BYTES = 1 << 20


# How writers that wrap the OS error say ENOSPC / EDQUOT (safetensors: "I/O error: No space
# left on device (os error 28)", and it removes its partial file, so the space is free again).
_FULL_MESSAGES = (
    os.strerror(errno.ENOSPC),
    os.strerror(errno.EDQUOT),
    f"os error {errno.ENOSPC}",
    f"os error {errno.EDQUOT}",
)


def _out_of_space(err: BaseException, final: Path) -> bool:
    if not isinstance(err, Exception):
        return False  # KeyboardInterrupt, SystemExit: not a write failure
    cause = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(cause) for text in _FULL_MESSAGES):
            return True
        cause = cause.__cause__ or cause.__context__
    try:
        return shutil.disk_usage(final.parent).free < FULL_BELOW_BYTES
    except OSError:
        return False


def _rename_into_place(tmp: Path, final: Path, directory: bool) -> None:
    if directory:
        os.chmod(tmp, 0o755)
        if final.exists():
            trash = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
    else:
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)


def _fault_injection_pause(final: Path) -> None:
    # Fault injection for the reliability tests: hold a finished output just
    # before its rename, the last moment a kill can strike. Unset in real runs.
    # RACKBENCH_FAULT_PAUSE_ONLY names the output paths to hold (others go on):
    # absolute paths or glob patterns, separated by os.pathsep.
    # RACKBENCH_FAULT_PAUSE_ONCE names a marker file: only the first output to get
    # here pauses (it creates the marker), so a retry runs at full speed.
    pause = os.environ.get("RACKBENCH_FAULT_PAUSE_BEFORE_RENAME_S")
    only = [p for p in os.environ.get("RACKBENCH_FAULT_PAUSE_ONLY", "").split(os.pathsep) if p]
    once = os.environ.get("RACKBENCH_FAULT_PAUSE_ONCE")
    if not pause or (only and not any(fnmatch.fnmatchcase(str(final.resolve()), str(Path(p).resolve())) for p in only)):
        return
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    time.sleep(float(pause))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
