"""What produced a result: software versions, hardware, workflow commit, config hash.

Every step writes ``provenance.json`` beside its output with
``write_provenance(path, step=..., config_fragment=...)``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import socket
import subprocess
import sys
from pathlib import Path

from rackbench.atomic import write_json_atomic

PACKAGES = ("torch", "transformers", "nvidia-modelopt", "mlcommons-loadgen", "tensorrt-llm",
            "snakemake", "pandas", "matplotlib", "rouge-score", "numpy")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def config_hash(fragment) -> str:
    canonical = json.dumps(fragment, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def git_state(repo: Path | None = None) -> dict:
    repo = repo or Path(__file__).resolve().parents[2]
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}


def cuda_info() -> dict:
    info = {"cuda": None, "driver": None, "gpus": []}
    try:
        import torch
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            info["driver"] = out.stdout.splitlines()[0].strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def collect(step: str, config_fragment=None) -> dict:
    return {
        "step": step,
        "python": sys.version.split()[0],
        "packages": package_versions(),
        **cuda_info(),
        "git": git_state(),
        "config_sha256": config_hash(config_fragment if config_fragment is not None else {}),
        "host": socket.gethostname(),
        "platform": platform.platform(),
    }


def write_provenance(path, *, step: str, config_fragment=None) -> dict:
    record = collect(step, config_fragment)
    write_json_atomic(path, record)
    return record
