"""Atomic outputs and checksums.

Every step writes to a temporary sibling path and renames it into place only
when complete, so a step killed at any point (even SIGKILL) never leaves an
output that a later run would take as done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

_CHUNK = 1 << 20


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
    tmp = _tmp_sibling(final, "dir" if directory else "file")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise
    _fault_injection_pause(final)
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
    # RACKBENCH_FAULT_PAUSE_ONLY names one output path to hold (others go on).
    pause = os.environ.get("RACKBENCH_FAULT_PAUSE_BEFORE_RENAME_S")
    only = os.environ.get("RACKBENCH_FAULT_PAUSE_ONLY")
    if pause and (not only or final.resolve() == Path(only).resolve()):
        time.sleep(float(pause))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
