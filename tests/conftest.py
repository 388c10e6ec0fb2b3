"""Shared fixtures: copies of the workflow to run Snakemake in, and one demo run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A planted token: the demo runs with it set and nothing may ever contain it.
PLANTED_TOKEN = "hf_" + "PlantedSecretForLeakScan9f8e7d6c5b4a"


def copy_workflow(dest: Path) -> Path:
    """The tracked (and untracked, not ignored) files of this checkout, without results/."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def snakemake(workdir: Path, *args, timeout=900, env=None, check=True):
    """Run Snakemake in ``workdir``; returns the CompletedProcess (output captured)."""
    proc = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=workdir, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The embedded demo run once, end to end, exactly as the README's command runs it
    (plus a planted HF_TOKEN); tests that change things work on copies."""
    workdir = copy_workflow(tmp_path_factory.mktemp("demo"))
    proc = snakemake(workdir, "--cores", "2", env={"HF_TOKEN": PLANTED_TOKEN})
    return workdir, proc


@pytest.fixture
def demo_copy(demo_run, tmp_path):
    """A private copy of the finished demo (results and .snakemake metadata included)."""
    src, _ = demo_run
    dest = tmp_path / "demo"
    shutil.copytree(src, dest, symlinks=True)
    return dest


def ensure_debian_package(binary: str, package: str) -> str | None:
    """Path of ``binary``, apt-installing Debian's ``package`` first where it is
    missing and we may (root, apt-get present); None where it cannot be had."""
    found = shutil.which(binary)
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=900"]
    for cmd in (["apt-get", *lock, "update", "-q"],
                ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", package]):
        if subprocess.run(cmd, capture_output=True, env=env, timeout=1500).returncode != 0:
            return None
    return shutil.which(binary)


@pytest.fixture(scope="session")
def chromium():
    """Debian's headless Chromium, installed if missing (the HTML report tests)."""
    path = ensure_debian_package("chromium", "chromium")
    if path is None:
        pytest.skip("Debian chromium is not installed and cannot be installed here")
    return path
