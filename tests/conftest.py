"""Shared fixtures: copies of the workflow to run Snakemake in, and one demo run."""

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from rackbench import compliance, paths
from rackbench.config import configurations
from slurm import cluster

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


# ---- the demo, run once per test session (all pytest-xdist workers share it) ----
# The first worker to get DEMO_LOCK runs it in the background as soon as collection
# shows a test that needs it (so other tests run meanwhile), and writes DEMO_RECORD;
# the others wait on the lock and read the record. Nothing writes into the shared
# directory afterwards: tests that change things work on copies (demo_copy).
DEMO_DIR, DEMO_LOCK, DEMO_RECORD = "shared-demo", "shared-demo.lock", "shared-demo.json"
DEMO_TIMEOUT_S = 1800  # a hang still fails; 3 workers on 2 cores slow the demo down
_demo_thread: dict = {}


def shared_tmp(config) -> Path:
    """The base temp folder every xdist worker of this session shares (each worker's own
    base temp is a folder inside it); without xdist, the session's own base temp."""
    base = config._tmp_path_factory.getbasetemp()
    return base.parent if hasattr(config, "workerinput") else base


def _run_demo(shared: Path) -> None:
    """Run the demo into shared/DEMO_DIR and write shared/DEMO_RECORD (also on failure)."""
    workdir = shared / DEMO_DIR
    try:
        if workdir.exists():  # left by a worker that died mid-run
            shutil.rmtree(workdir)
        workdir.mkdir()
        copy_workflow(workdir)
        proc = snakemake(workdir, "--cores", "2", env={"HF_TOKEN": PLANTED_TOKEN}, timeout=DEMO_TIMEOUT_S, check=False)
        record = {"args": proc.args, "returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
        record["manifest"] = demo_manifest(workdir)
    except Exception as e:  # the other workers must see the failure, not run it again
        record = {"error": f"{type(e).__name__}: {e}"}
    tmp = shared / (DEMO_RECORD + ".tmp")
    tmp.write_text(json.dumps(record))
    tmp.rename(shared / DEMO_RECORD)


def demo_manifest(workdir: Path) -> dict[str, list[int]]:
    """Every file under the shared demo (relative path -> [size, mtime_ns]): what the
    session-end check compares, so that a test writing into it is caught."""
    return {
        str(f.relative_to(workdir)): [f.lstat().st_size, f.lstat().st_mtime_ns]
        for f in workdir.rglob("*")
        if f.is_file() or f.is_symlink()
    }


def demo_changes(config) -> list[str]:
    """Paths of the shared demo that changed after its run (empty where it did not run)."""
    record_file = shared_tmp(config) / DEMO_RECORD
    if not record_file.exists():
        return []
    before = json.loads(record_file.read_text()).get("manifest")
    if before is None:
        return []
    after = demo_manifest(shared_tmp(config) / DEMO_DIR)
    return sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))


def _start_demo(config) -> None:
    """Run the demo in a background thread of this process, unless another worker has it."""
    from filelock import FileLock, Timeout

    shared = shared_tmp(config)

    def run():
        lock = FileLock(shared / DEMO_LOCK)  # taken and released in this thread
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return  # another worker runs it (or this worker's demo_run does)
        try:
            if not (shared / DEMO_RECORD).exists():
                _run_demo(shared)
        finally:
            lock.release()

    if not (shared / DEMO_RECORD).exists():
        _demo_thread["thread"] = threading.Thread(target=run, name="demo-run", daemon=True)
        _demo_thread["thread"].start()


def _needs_demo(item) -> bool:
    """Whether the item uses this file's demo_run (test_slurm.py has its own, through Slurm)."""
    defs = getattr(item, "_fixtureinfo", None) and item._fixtureinfo.name2fixturedefs.get("demo_run")
    return bool(defs) and getattr(defs[-1].func, "__module__", None) == __name__


def pytest_collection_finish(session):
    if any(_needs_demo(item) for item in session.items):
        _start_demo(session.config)


@pytest.fixture(scope="session")
def demo_run(request):
    """The embedded demo run once, end to end, exactly as the README's command runs it
    (plus a planted HF_TOKEN); tests that change things work on copies."""
    from filelock import FileLock

    shared = shared_tmp(request.config)
    if not (shared / DEMO_RECORD).exists():
        with FileLock(shared / DEMO_LOCK):  # waits for the worker that runs it
            if not (shared / DEMO_RECORD).exists():
                _run_demo(shared)
    record = json.loads((shared / DEMO_RECORD).read_text())
    if "error" in record:
        raise AssertionError(f"the demo run failed: {record['error']}")
    proc = subprocess.CompletedProcess(record["args"], record["returncode"], record["stdout"], record["stderr"])
    if proc.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(proc.args[3:])} failed ({proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return shared / DEMO_DIR, proc


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


# ---- pytest-xdist: one Slurm test cluster at a time ----
@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    # One group runs on one worker, in order: only one test cluster exists at a time
    # (they all use /etc/slurm, /var/lib/slurm and Slurm's ports), and the group's
    # daemons are the ones that worker started and stops.
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))


# ---- no test-cluster daemon outlives the test run (tests/slurm/cluster.py) ----
# Daemons inherit this marker from the session that started them (directly or
# through another daemon), so the check sees this session's leftovers only, not a
# cluster someone else runs on the same machine. Under pytest-xdist the controller
# makes the marker and hands it to its workers; it alone checks, after they all end.
SESSION_MARKER = cluster.SESSION_ENV


def pytest_sessionstart(session):
    import uuid

    worker = getattr(session.config, "workerinput", None)
    os.environ[SESSION_MARKER] = worker[SESSION_MARKER] if worker else uuid.uuid4().hex


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):  # pytest-xdist, on the controller, for each worker
    node.workerinput[SESSION_MARKER] = os.environ[SESSION_MARKER]


# Engine servers the tests start (rackbench.serve, `transformers serve`), by command line.
SERVER_COMMANDS = ("-m rackbench.serve", "transformers serve")


def servers_with_env(key: str, value: str) -> dict[int, str]:
    """Live engine-server processes (SERVER_COMMANDS) whose environment has key=value."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        server = next((c for c in SERVER_COMMANDS if c in cmdline), None)
        if server and cluster.pid_alive(int(proc.name), "") and cluster.process_env(int(proc.name)).get(key) == value:
            found[int(proc.name)] = server.split()[-1]
    return found


@pytest.hookimpl(trylast=True)  # after the session fixtures' teardown
def pytest_sessionfinish(session, exitstatus):
    thread = _demo_thread.pop("thread", None)
    if thread is not None:  # this worker runs the demo the others wait for: see it through
        thread.join()
    if hasattr(session.config, "workerinput"):
        return  # a worker: the controller checks once every worker has ended
    changed = demo_changes(session.config)
    if changed:  # tests must work on copies (demo_copy)
        print(f"\nERROR: tests wrote into the shared demo run: {', '.join(changed[:20])}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
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
    servers = servers_with_env(SESSION_MARKER, os.environ[SESSION_MARKER])
    if servers:
        listing = ", ".join(f"{name} (pid {pid})" for pid, name in sorted(servers.items()))
        print(f"\nERROR: the test run left engine servers running: {listing}; stopping them now", file=sys.stderr)
        for pid, name in servers.items():
            cluster.kill_pid(name, pid)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
