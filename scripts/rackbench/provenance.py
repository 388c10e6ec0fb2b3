"""What produced a result: software versions, hardware, workflow commit, config hash.

Every step writes ``provenance.json`` beside its output with
``write_provenance(path, step=..., config_fragment=...)``. The record holds:
the Python packages the step may use (``None`` when not installed: torch,
transformers, ModelOpt ``nvidia-modelopt``, LoadGen ``mlcommons-loadgen``,
TensorRT-LLM ``tensorrt-llm``/``tensorrt_llm``, ...), CUDA (torch's build) and
the NVIDIA driver, the workflow's git commit and whether the tree was dirty,
the sha256 of the canonical JSON of the config fragment, the host, and the GPU
inventory (``nvidia-smi -q`` parsed, plus its raw text, when nvidia-smi exists).

``find_provenance(paths)`` and ``summarize(record)`` are what the report uses
to build its provenance table.
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

PACKAGES = (
    "torch",
    "transformers",
    "nvidia-modelopt",
    "mlcommons-loadgen",
    "tensorrt-llm",
    "snakemake",
    "pandas",
    "matplotlib",
    "rouge-score",
    "numpy",
)


# distributions published under more than one name
_ALIASES = {
    "tensorrt-llm": ("tensorrt-llm", "tensorrt_llm"),
    "mlcommons-loadgen": ("mlcommons-loadgen", "mlcommons_loadgen", "mlperf-loadgen"),
}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        versions[name] = None
        for dist in _ALIASES.get(name, (name,)):
            try:
                versions[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
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
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if out.returncode == 0 and out.stdout.strip():
            info["driver"] = out.stdout.splitlines()[0].strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def parse_nvidia_smi_q(text: str) -> dict:
    """The parts of ``nvidia-smi -q`` that identify the hardware and driver.

    Returns ``{"driver": ..., "cuda": ..., "gpus": [{"name", "serial", "uuid",
    "bus_id", "vbios", "memory_total", "mig_mode", ...}]}``.
    """
    out: dict = {"driver": None, "cuda": None, "gpus": []}
    current = None
    section = None
    fields = {
        "Product Name": "name",
        "Serial Number": "serial",
        "GPU UUID": "uuid",
        "VBIOS Version": "vbios",
        "Bus Id": "bus_id",
        "Product Architecture": "architecture",
        "Current": "mig_mode",
        "Total": "memory_total",
    }
    for raw in text.splitlines():
        if not raw.strip():
            continue
        indent = len(raw) - len(raw.lstrip())
        key, sep, value = raw.strip().partition(":")
        key, value = key.strip(), value.strip()
        if indent == 0 and raw.startswith("GPU "):
            current = {"pci": raw.strip()[4:]}
            out["gpus"].append(current)
            section = None
            continue
        if current is not None and not value:
            section = key  # "FB Memory Usage", "MIG Mode", "PCI", ... (no colon or empty)
            continue
        if not sep:
            continue
        if current is None:
            if key == "Driver Version":
                out["driver"] = value
            elif key == "CUDA Version":
                out["cuda"] = value
            continue
        name = fields.get(key)
        if name is None or name in current:
            continue
        if key == "Current" and section != "MIG Mode":
            continue
        if key == "Total" and section != "FB Memory Usage":
            continue
        if key == "Bus Id" and section != "PCI":
            continue
        current[name] = value
    return out


def gpu_inventory() -> dict | None:
    """``nvidia-smi -q``, parsed and raw; ``None`` where there is no nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "-q"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()[:2000], "gpus": []}
    parsed = parse_nvidia_smi_q(out.stdout)
    parsed["nvidia_smi_q"] = out.stdout
    return parsed


def collect(step: str, config_fragment=None) -> dict:
    info = cuda_info()
    inventory = gpu_inventory()
    if inventory:
        info["driver"] = info["driver"] or inventory.get("driver")
        info["cuda_driver_api"] = inventory.get("cuda")
    return {
        "step": step,
        "python": sys.version.split()[0],
        "packages": package_versions(),
        **info,
        "gpu_inventory": inventory,
        "git": git_state(),
        "config_sha256": config_hash(config_fragment if config_fragment is not None else {}),
        "host": socket.gethostname(),
        "platform": platform.platform(),
    }


def write_provenance(path, *, step: str, config_fragment=None) -> dict:
    record = collect(step, config_fragment)
    write_json_atomic(path, record)
    return record


# --- reading records back (the report's provenance table) -------------------


def find_provenance(paths, *, parents: int = 1) -> list[Path]:
    """``provenance.json`` files in each of ``paths`` (a dir, or a file's dir) and up to
    ``parents`` levels above; sorted and de-duplicated."""
    found = set()
    for path in paths:
        path = Path(path)
        base = path if path.is_dir() else path.parent
        for level, directory in enumerate([base, *base.parents]):
            if level > parents:
                break
            candidate = directory / "provenance.json"
            if candidate.is_file():
                found.add(candidate)
    return sorted(found, key=lambda p: p.as_posix())


SUMMARY_COLUMNS = (
    "file",
    "step",
    "git_commit",
    "git_dirty",
    "config_sha256",
    "host",
    "python",
    "torch",
    "transformers",
    "modelopt",
    "loadgen",
    "tensorrt_llm",
    "cuda",
    "driver",
    "gpus",
)


def summarize(record: dict, file: str | None = None) -> dict:
    """One flat row of a provenance record (missing fields are None)."""
    packages = record.get("packages") or {}
    git = record.get("git") or {}
    inventory = record.get("gpu_inventory") or {}
    gpus = [g.get("name") for g in inventory.get("gpus") or [] if g.get("name")] or record.get("gpus") or []
    if gpus:
        names = sorted(set(gpus))
        gpus_text = ", ".join(f"{gpus.count(n)} x {n}" for n in names)
    else:
        gpus_text = "none"
    commit = git.get("commit")
    return {
        "file": file,
        "step": record.get("step"),
        "git_commit": commit[:12] if commit else None,
        "git_dirty": git.get("dirty"),
        "config_sha256": (record.get("config_sha256") or "")[:12] or None,
        "host": record.get("host"),
        "python": record.get("python"),
        "torch": packages.get("torch"),
        "transformers": packages.get("transformers"),
        "modelopt": packages.get("nvidia-modelopt"),
        "loadgen": packages.get("mlcommons-loadgen"),
        "tensorrt_llm": packages.get("tensorrt-llm"),
        "cuda": record.get("cuda"),
        "driver": record.get("driver"),
        "gpus": gpus_text,
    }
