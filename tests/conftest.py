"""Shared fixtures: copies of the workflow to run Snakemake in, and one demo run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rackbench import compliance, paths
from rackbench.config import configurations

ROOT = Path(__file__).resolve().parents[1]
# A planted token: the demo runs with it set and nothing may ever contain it.
PLANTED_TOKEN = "hf_" + "PlantedSecretForLeakScan9f8e7d6c5b4a"

# The demo's one configuration, and one output of each kind of step in it, by the
# rule that makes it (upstream first): all from rackbench.paths, through the plan.
DEMO_CONFIG = yaml.safe_load((ROOT / "config.yaml").read_text())
# Copies of the workflow get ../shared beside them, as this checkout has (copy_workflow), so
# the demo's mlcommons.inference_dir resolves in them as here.
DEMO_MLCOMMONS_DIR, _ = compliance.configured_checkout(DEMO_CONFIG["mlcommons"]["inference_dir"], ROOT)
(DEMO_CONFIGURATION,) = configurations(DEMO_CONFIG, test06=DEMO_MLCOMMONS_DIR is not None)
DEMO_KEY = DEMO_CONFIGURATION.key
DEMO_RUN_DIR = DEMO_CONFIGURATION.run_dir
DEMO_STEP_OUTPUTS = {
    "demo_model": paths.DEMO_MODEL_PATTERN,
    "demo_dataset": f"{paths.DEMO_DATASET_DIR}/SHA256SUMS",
    "download_model": DEMO_CONFIGURATION.snapshot_dir,
    "prepare_dataset": DEMO_CONFIGURATION.dataset_file("samples"),
    "quantize": DEMO_CONFIGURATION.checkpoint_dir,
    "build_engine": DEMO_CONFIGURATION.engine_dir,
    "run_shard": DEMO_CONFIGURATION.shard_dirs("performance")[0],
    "accuracy": DEMO_CONFIGURATION.accuracy_json,
    "report": paths.report_file("markdown"),
}


# Environment for Snakemake runs that do not use Slurm: Slurm's clients talk to no
# controller, so the Slurm executor plugin's start-up probe fails at once instead of
# waiting out its timeout (see tests/slurm/no-controller.conf).
LOCAL_SNAKEMAKE_ENV = {"SLURM_CONF": str(ROOT / "tests" / "slurm" / "no-controller.conf")}


def link_shared(dest: Path) -> None:
    """``dest/../shared`` -> this checkout's ``../shared`` (MLCommons' tools, published logs), as a
    clone beside it would see it; nothing where this checkout has none."""
    shared, link = ROOT.parent / "shared", dest.parent / "shared"
    if shared.is_dir() and not link.exists():
        link.symlink_to(shared.resolve(), target_is_directory=True)


def copy_workflow(dest: Path) -> Path:
    """The tracked (and untracked, not ignored) files of this checkout, without results/
    (and ../shared linked beside it: ``link_shared``)."""
    link_shared(dest)
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def snakemake(workdir: Path, *args, timeout=900, env=None, check=True):
    """Run Snakemake in ``workdir``; returns the CompletedProcess (output captured)."""
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **LOCAL_SNAKEMAKE_ENV, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def real_config_with_local_data(tmp_path: Path, **overrides) -> Path:
    """The real config (config/llama2-70b-gb300.yaml) with its dataset paths pointed
    at stand-in files, so the existence checks pass on a machine without the MLPerf
    data (dry runs, planning benchmarks). ``overrides``: dotted key -> value."""
    config = yaml.safe_load((ROOT / "config" / "llama2-70b-gb300.yaml").read_text())
    for name, dataset in config["datasets"].items():
        for part in ("samples", "calibration"):
            for key in ("path", "sha256_file"):
                if key in dataset[part]:
                    stand_in = tmp_path / f"{name}-{Path(dataset[part][key]).name}"
                    stand_in.write_bytes(b"stand-in for a dry run")
                    dataset[part][key] = str(stand_in)
    for dotted, value in overrides.items():
        node = config
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


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
    link_shared(dest)
    return dest


def ensure_debian_package(binary: str, package: str) -> str | None:
    """Path of ``binary``, apt-installing Debian's ``package`` first where it is
    missing and we may (root, apt-get present); None where it cannot be had."""
    found = shutil.which(binary)
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=900"]
    for cmd in (
        ["apt-get", *lock, "update", "-q"],
        ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", package],
    ):
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


# ---- no test-cluster daemon outlives the test run (tests/slurm/cluster.py) ----
# Daemons inherit this marker from the session that started them (directly or
# through another daemon), so the check sees this session's leftovers only, not a
# cluster someone else runs on the same machine.
SESSION_MARKER = "RACKBENCH_TEST_SESSION"


def pytest_sessionstart(session):
    import uuid

    os.environ[SESSION_MARKER] = uuid.uuid4().hex


@pytest.hookimpl(trylast=True)  # after the session fixtures' teardown
def pytest_sessionfinish(session, exitstatus):
    from slurm import cluster

    if os.environ.get("RACKBENCH_SLURM_KEEP"):
        return  # asked to leave the cluster running
    left = cluster.daemons_with_env(SESSION_MARKER, os.environ[SESSION_MARKER])
    if left:
        listing = ", ".join(f"{name} (pid {pid})" for pid, name in sorted(left.items()))
        print(f"\nERROR: the test run left daemons running: {listing}; stopping them now", file=sys.stderr)
        order = ["slurmstepd", *reversed(cluster.DAEMONS)]  # job steps first, munged last
        for pid, name in sorted(left.items(), key=lambda item: order.index(item[1])):
            cluster.kill_pid(name, pid)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
