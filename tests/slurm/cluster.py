"""A real Slurm cluster for rackbench's tests, from Debian's packages (two slurmd on one machine).

    python tests/slurm/cluster.py start [--no-accounting]   # idempotent
    python tests/slurm/cluster.py status
    python tests/slurm/cluster.py stop                       # only what this module started

From pytest: ``cluster.start()`` returns a :class:`Cluster`; ``cluster.stop(c.started)``
stops, by PID, exactly the daemons that call started (a running cluster is reused
and left alone).

What it sets up (Slurm 22.05 on a box without systemd or cgroups, e.g. CI's 2 cores):

* munged (as user munge), and with accounting mariadbd + slurmdbd (so ``sacct``, the
  Snakemake plugin's default status command, works as on a real cluster);
* slurmctld + slurmd with one node ``$(hostname -s)`` advertising ``CPUS`` CPUs
  (``SlurmdParameters=config_overrides``) and ``GPUS`` fake typed GPUs
  ``gpu:gb300`` whose device files are symlinks to /dev/null, so that
  ``--gpus=gb300:1`` schedules and each job step gets its own CUDA_VISIBLE_DEVICES;
* one default partition ``gpu`` (that node only);
* a second slurmd (``slurmd -N HOST-n1``, its own port, ``EXTRA_NODE_GPUS`` fake GPUs;
  Debian's build has MULTIPLE_SLURMD) and partition ``rack`` of both nodes, for
  multi-node allocations (tests/test_slurm_rack.py).

Without accounting (``accounting=False``) slurm.conf uses accounting_storage/none:
``sacct`` then fails and Snakemake must be told ``--slurm-status-command squeue``
(``MinJobAge`` is 300 s, above the plugin's 120 s threshold).

If Slurm cannot be installed or started, :class:`ClusterUnavailable` says why; the
tests turn that into a skip.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent

CLUSTER_NAME = "rackbench"
PARTITION = "gpu"
GPU_TYPE = "gb300"
GPUS = 4
CPUS = 4
MIN_JOB_AGE = 300
# A second slurmd on this machine (Debian's slurmd 22.05 is built with
# --enable-multiple-slurmd: `scontrol show config` says MULTIPLE_SLURMD = Yes), as node
# "$(hostname -s)-n1" listening on its own port, in partition RACK_PARTITION (with the
# first node) only, so that jobs of the default partition never land on it.
EXTRA_NODES = 1
EXTRA_NODE_GPUS = 2
EXTRA_SLURMD_PORT = 6828  # the first node's slurmd keeps Slurm's default 6818
RACK_PARTITION = "rack"

CONF_DIR = Path(os.environ.get("RACKBENCH_SLURM_CONF_DIR", "/etc/slurm"))
STATE_DIR = Path("/var/lib/slurm")
LOG_DIR = Path("/var/log/slurm")
RUN_DIR = Path("/run/slurm")
FAKE_GPU_DIR = STATE_DIR / "fake-gpus"
# What this module started (name -> pid), and the hash of the config they run with.
BOOK = STATE_DIR / "rackbench-cluster.json"
DB_PASSWORD_FILE = STATE_DIR / "rackbench-db-password"
MARKER = "rackbench-test-cluster"

PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client", "slurmdbd", "mariadb-server"]
BINARIES = {
    "munged": "/usr/sbin/munged",
    "slurmctld": "/usr/sbin/slurmctld",
    "slurmd": "/usr/sbin/slurmd",
    "sbatch": "/usr/bin/sbatch",
    "slurmdbd": "/usr/sbin/slurmdbd",
    "mariadbd": "/usr/sbin/mariadbd",
}
# Start order; stop goes the other way.
DAEMONS = ["munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd"]
PIDFILES = {
    "munged": Path("/run/munge/munged.pid"),
    "mariadbd": None,  # does not daemonize itself; we keep its PID
    "slurmdbd": RUN_DIR / "slurmdbd.pid",
    "slurmctld": RUN_DIR / "slurmctld.pid",
    # SlurmdPidFile has %n (the node name): one pidfile per slurmd on this machine
    "slurmd": RUN_DIR / f"slurmd-{socket.gethostname().split('.')[0]}.pid",
}
MYSQL_SOCKET = Path("/run/mysqld/mysqld.sock")


class ClusterUnavailable(RuntimeError):
    """Slurm cannot be installed or started on this machine (the reason is the message)."""


@dataclass
class Cluster:
    host: str
    accounting: bool
    partition: str = PARTITION
    gpu_type: str = GPU_TYPE
    gpus: int = GPUS
    cpus: int = CPUS
    # daemons (name -> pid) that this start() call launched; stop(started) stops them
    started: dict = field(default_factory=dict)

    def env(self) -> dict:
        """Environment for Slurm clients (the config is at Slurm's default path)."""
        e = dict(os.environ)
        if CONF_DIR != Path("/etc/slurm"):
            e["SLURM_CONF"] = str(CONF_DIR / "slurm.conf")
        return e


# ----------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[slurm-cluster] {msg}", file=sys.stderr, flush=True)


def sh(cmd, *, check=True, timeout=60, input=None, env=None) -> subprocess.CompletedProcess:
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, input=input, env=env, shell=isinstance(cmd, str)
    )
    if check and p.returncode != 0:
        raise ClusterUnavailable(
            f"{cmd if isinstance(cmd, str) else ' '.join(cmd)} failed ({p.returncode}): "
            f"{(p.stderr or p.stdout).strip()[-2000:]}"
        )
    return p


def ok(cmd, timeout=20) -> bool:
    try:
        return sh(cmd, check=False, timeout=timeout).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


def wait_for(what: str, pred, timeout: float, log_file: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.5)
    tail = ""
    if log_file and log_file.exists():
        tail = "\n" + "\n".join(log_file.read_text(errors="replace").splitlines()[-25:])
    raise ClusterUnavailable(f"timed out after {timeout:.0f}s waiting for {what}{tail}")


def pid_alive(pid: int | None, name: str) -> bool:
    """True if `pid` is a live (not zombie) process whose command line names `name`."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    name = name.split(":")[0]  # "slurmd:NODE": the slurmd of an extra node
    return state not in ("Z", "X") and name in cmdline


def pidfile_pid(name: str) -> int | None:
    pf = PIDFILES.get(name)
    if name.startswith("slurmd:"):
        pf = RUN_DIR / f"slurmd-{name.split(':', 1)[1]}.pid"
    if pf is None or not pf.exists():
        return None
    try:
        return int(pf.read_text().split()[0])
    except (ValueError, IndexError, OSError):
        return None


def read_book() -> dict:
    try:
        return json.loads(BOOK.read_text())
    except (OSError, ValueError):
        return {"pids": {}, "conf_hash": None}


def write_book(book: dict) -> None:
    BOOK.parent.mkdir(parents=True, exist_ok=True)
    BOOK.write_text(json.dumps(book, indent=1))


def running_pid(name: str) -> int | None:
    """PID of a running `name` daemon: from its pidfile, else from our book."""
    pid = pidfile_pid(name)
    if pid_alive(pid, name):
        return pid
    pid = read_book()["pids"].get(name)
    if pid_alive(pid, name):
        return pid
    return None


_children: dict[int, subprocess.Popen] = {}
# Every daemon this process started (name -> pid), across all start() calls (a restart in
# another configuration included), so that teardown stops them all, whichever fixture or
# test started them.
_started_here: dict[str, int] = {}
# Process names of what the test cluster runs (slurmstepd: one per job step still alive).
DAEMON_NAMES = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "slurmstepd")
# Each test session's id, in the environment of what it starts (set by tests/conftest.py;
# daemons inherit it): whose daemons are whose (daemons_with_env, stale_daemons).
SESSION_ENV = "RACKBENCH_TEST_SESSION"


def kill_pid(name: str, pid: int, timeout: float = 30) -> None:
    if not pid_alive(pid, name):
        return
    log(f"stopping {name} (pid {pid})")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid in _children:
            _children[pid].poll()
        if not pid_alive(pid, name):
            break
        time.sleep(0.2)
    else:
        log(f"{name} (pid {pid}) ignored SIGTERM; SIGKILL")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if pid in _children:
        try:
            _children.pop(pid).wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    if _started_here.get(name) == pid:
        _started_here.pop(name)


# ----------------------------------------------------------------------------- install


def missing_binaries() -> list[str]:
    return [n for n, p in BINARIES.items() if not Path(p).exists()]


def ensure_installed() -> None:
    missing = missing_binaries()
    if not missing:
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"Slurm is not installed ({', '.join(missing)} missing) and installing needs root")
    if not shutil.which("apt-get"):
        raise ClusterUnavailable(f"Slurm is not installed ({', '.join(missing)} missing) and there is no apt-get")
    log(f"installing {' '.join(PACKAGES)} (missing: {', '.join(missing)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=900"]
    for cmd in (
        ["apt-get", *lock, "update"],
        ["apt-get", *lock, "install", "-y", "--no-install-recommends", *PACKAGES],
    ):
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
        if p.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed: {p.stderr.strip()[-1500:]}")
    still = missing_binaries()
    if still:
        raise ClusterUnavailable(f"after apt-get install, still missing: {', '.join(still)}")


# ----------------------------------------------------------------------------- config


def hostname() -> str:
    return socket.gethostname().split(".")[0]


def real_memory() -> int:
    out = sh([BINARIES["slurmd"], "-C"]).stdout
    for tok in out.split():
        if tok.startswith("RealMemory="):
            return int(tok.split("=", 1)[1])
    raise ClusterUnavailable(f"slurmd -C reports no RealMemory: {out!r}")


def extra_node_names(host: str) -> list[str]:
    return [f"{host}-n{i + 1}" for i in range(EXTRA_NODES)]


def db_password() -> str:
    if DB_PASSWORD_FILE.exists():
        return DB_PASSWORD_FILE.read_text().strip()
    DB_PASSWORD_FILE.parent.mkdir(parents=True, exist_ok=True)
    pw = secrets.token_hex(12)
    DB_PASSWORD_FILE.write_text(pw)
    DB_PASSWORD_FILE.chmod(0o600)
    return pw


def render(accounting: bool, host: str) -> dict[str, str]:
    v = dict(
        cluster_name=CLUSTER_NAME,
        host=host,
        state_dir=STATE_DIR,
        log_dir=LOG_DIR,
        min_job_age=MIN_JOB_AGE,
        cpus=CPUS,
        real_memory=real_memory(),
        gpu_type=GPU_TYPE,
        gpus=GPUS,
        last_gpu=GPUS - 1,
        partition=PARTITION,
        fake_gpu_dir=FAKE_GPU_DIR,
        dbd_port=6819,
        db_password=db_password(),
        extra_nodes="\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={EXTRA_SLURMD_PORT + i} CPUs={CPUS} "
            f"RealMemory={real_memory()} Gres=gpu:{GPU_TYPE}:{EXTRA_NODE_GPUS} State=UNKNOWN"
            for i, n in enumerate(extra_node_names(host))
        ),
        extra_gres="\n".join(
            f"NodeName={n} Name=gpu Type={GPU_TYPE} File={FAKE_GPU_DIR}/{n}-nvidia[0-{EXTRA_NODE_GPUS - 1}]"
            for n in extra_node_names(host)
        ),
        rack_partition=RACK_PARTITION,
        rack_nodes=",".join([host, *extra_node_names(host)]),
    )
    if accounting:
        v.update(
            accounting_storage="accounting_storage/slurmdbd",
            jobacct_gather="jobacct_gather/linux",
            accounting_extra="\n".join(
                [
                    "AccountingStorageHost=localhost",
                    "AccountingStoragePort=6819",
                    # record GPUs per job (sacct AllocTRES / ReqTRES: gres/gpu:gb300=N)
                    f"AccountingStorageTRES=gres/gpu,gres/gpu:{GPU_TYPE}",
                    # keep --comment (the plugin puts rule and wildcards there)
                    "AccountingStoreFlags=job_comment",
                ]
            ),
        )
    else:
        v.update(
            accounting_storage="accounting_storage/none", jobacct_gather="jobacct_gather/none", accounting_extra=""
        )
    out = {}
    for name in ("slurm.conf", "gres.conf") + (("slurmdbd.conf",) if accounting else ()):
        out[name] = string.Template((HERE / f"{name}.in").read_text()).substitute(v)
    return out


def conf_hash(files: dict[str, str]) -> str:
    h = hashlib.sha256()
    for k in sorted(files):
        if k != "slurmdbd.conf":
            h.update(k.encode() + b"\0" + files[k].encode() + b"\0")
    return h.hexdigest()


def install_conf(files: dict[str, str]) -> None:
    existing = CONF_DIR / "slurm.conf"
    if existing.exists() and MARKER not in existing.read_text(errors="replace"):
        raise ClusterUnavailable(
            f"{existing} exists and is not rackbench's test config; "
            "refusing to overwrite a real cluster's configuration"
        )
    CONF_DIR.mkdir(parents=True, exist_ok=True)
    slurm = pwd.getpwnam("slurm")
    for name, text in files.items():
        p = CONF_DIR / name
        if not p.exists() or p.read_text() != text:
            p.write_text(text)
        if name == "slurmdbd.conf":
            os.chown(p, slurm.pw_uid, slurm.pw_gid)
            p.chmod(0o600)
        else:
            p.chmod(0o644)


def prepare_dirs() -> None:
    slurm = pwd.getpwnam("slurm")
    nodes = [hostname(), *extra_node_names(hostname())]
    for d in (STATE_DIR / "slurmctld", *(STATE_DIR / f"slurmd-{n}" for n in nodes), LOG_DIR, RUN_DIR):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, slurm.pw_uid, slurm.pw_gid)
        d.chmod(0o755)
    FAKE_GPU_DIR.mkdir(parents=True, exist_ok=True)
    devs = [FAKE_GPU_DIR / f"nvidia{i}" for i in range(GPUS)]
    devs += [FAKE_GPU_DIR / f"{n}-nvidia{i}" for n in extra_node_names(hostname()) for i in range(EXTRA_NODE_GPUS)]
    for dev in devs:
        if not dev.is_symlink():
            if dev.exists():
                dev.unlink()
            dev.symlink_to("/dev/null")


# ----------------------------------------------------------------------------- daemons


def munge_ok() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        return (
            cred.returncode == 0
            and subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def clear_unhealthy(name: str, healthy, grace: float = 15) -> None:
    """A running ``name`` that does not answer within ``grace`` seconds (hung, or left
    half-started) is stopped when this module started it, so that start() starts a
    fresh one instead of timing out beside it; a foreign one is an error."""
    pid = running_pid(name)
    if not pid:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if healthy():
            return
        time.sleep(0.5)
    if read_book()["pids"].get(name) != pid:
        raise ClusterUnavailable(f"{name} (pid {pid}) runs but does not answer, and this module did not start it")
    log(f"{name} (pid {pid}) runs but does not answer; stopping it")
    kill_pid(name, pid)


def start_munged(book: dict) -> int | None:
    if munge_ok():
        return None
    clear_unhealthy("munged", munge_ok)
    munge = pwd.getpwnam("munge")
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        if shutil.which("mungekey"):
            sh(["mungekey", "--create", "--keyfile", str(key)])
        else:
            key.write_bytes(os.urandom(1024))
    os.chown(key, munge.pw_uid, munge.pw_gid)
    key.chmod(0o400)
    for d in (Path("/run/munge"), Path("/var/lib/munge"), Path("/var/log/munge")):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, munge.pw_uid, munge.pw_gid)
    Path("/run/munge").chmod(0o755)
    sh(["runuser", "-u", "munge", "--", BINARIES["munged"]])
    wait_for("munged", munge_ok, 30, Path("/var/log/munge/munged.log"))
    return pidfile_pid("munged")


def mysql_ok() -> bool:
    return ok(["mariadb-admin", f"--socket={MYSQL_SOCKET}", "ping"], timeout=10)


def start_mariadbd() -> int | None:
    if mysql_ok():
        return None
    mysql = pwd.getpwnam("mysql")
    MYSQL_SOCKET.parent.mkdir(parents=True, exist_ok=True)
    os.chown(MYSQL_SOCKET.parent, mysql.pw_uid, mysql.pw_gid)
    datadir = Path("/var/lib/mysql")
    if not (datadir / "mysql").is_dir():
        sh(["mariadb-install-db", "--user=mysql", f"--datadir={datadir}"], timeout=300)
    logf = LOG_DIR / "mariadbd.log"
    out = open(logf, "ab")
    p = subprocess.Popen(
        [
            BINARIES["mariadbd"],
            "--user=mysql",
            f"--datadir={datadir}",
            f"--socket={MYSQL_SOCKET}",
            "--bind-address=127.0.0.1",
            "--innodb-buffer-pool-size=64M",
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    out.close()
    _children[p.pid] = p
    wait_for("mariadbd", lambda: p.poll() is None and mysql_ok(), 120, logf)
    return p.pid


def setup_database() -> None:
    pw = db_password()
    sql = (
        "CREATE DATABASE IF NOT EXISTS slurm_acct_db;"
        f"CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '{pw}';"
        f"ALTER USER 'slurm'@'localhost' IDENTIFIED BY '{pw}';"
        "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
        "FLUSH PRIVILEGES;"
    )
    sh(["mariadb", f"--socket={MYSQL_SOCKET}", "-u", "root", "-e", sql])


def sacctmgr_ok() -> bool:
    return ok(["sacctmgr", "-n", "-P", "list", "cluster"], timeout=15)


def start_daemon(name: str, healthy, timeout: float) -> int | None:
    """Start Slurm daemon ``name`` (slurmdbd, slurmctld: it forks and writes its pid file)
    unless one runs and answers, and wait until ``healthy()``; its pid, None if it ran."""
    if running_pid(name) and healthy():
        return None
    clear_unhealthy(name, healthy)
    sh([BINARIES[name]])
    wait_for(name, healthy, timeout, LOG_DIR / f"{name}.log")
    return pidfile_pid(name)


def setup_accounts() -> None:
    def add(*args):
        p = sh(["sacctmgr", "-i", "add", *args], check=False)
        text = (p.stdout + p.stderr).lower()
        if p.returncode != 0 and "already exist" not in text and "nothing new" not in text:
            raise ClusterUnavailable(f"sacctmgr add {' '.join(args)}: {text.strip()}")

    add("cluster", CLUSTER_NAME)
    add("account", "rackbench", f"Cluster={CLUSTER_NAME}", "Description=rackbench tests", "Organization=rackbench")
    add("user", "root", "Account=rackbench", f"Cluster={CLUSTER_NAME}")


def ctld_ok() -> bool:
    try:
        return "UP" in sh(["scontrol", "ping"], check=False, timeout=10).stdout
    except (subprocess.TimeoutExpired, OSError):
        return False


def node_state(host: str) -> str:
    try:
        p = sh(["sinfo", "-h", "-N", "-n", host, "-o", "%T"], check=False, timeout=10)
    except (subprocess.TimeoutExpired, OSError):
        return ""
    lines = p.stdout.strip().lower().splitlines()
    return lines[0] if lines else ""  # one line per partition the node is in


def slurmd_log(node: str) -> Path:
    return LOG_DIR / f"slurmd-{node}.log"  # SlurmdLogFile has %n


def start_slurmd(key: str = "slurmd", node: str | None = None) -> int | None:
    """The slurmd of ``node`` (default: this host's node), under book key ``key``."""
    node = node or hostname()
    if running_pid(key):
        return None
    sh([BINARIES["slurmd"], "-N", node])
    wait_for(f"slurmd of {node}", lambda: pid_alive(pidfile_pid(key), "slurmd"), 30, slurmd_log(node))
    return pidfile_pid(key)


def node_ready(host: str, timeout: float = 60) -> None:
    """Wait for the node to be schedulable; resume it if an earlier bad config drained it."""
    deadline = time.monotonic() + timeout
    resumed = False
    while time.monotonic() < deadline:
        st = node_state(host)
        base = st.rstrip("*~#!%$@^-")
        if base in ("idle", "mixed", "allocated", "completing"):
            return
        if ("drain" in st or base == "down") and not resumed:
            log(f"node {host} is {st}; resuming it")
            sh(["scontrol", "update", f"nodename={host}", "state=resume"], check=False)
            resumed = True
        time.sleep(1)
    reason = sh(["sinfo", "-h", "-N", "-n", host, "-o", "%T %E"], check=False).stdout.strip()
    tail = ""
    lf = slurmd_log(host)
    if lf.exists():
        tail = "\n" + "\n".join(lf.read_text(errors="replace").splitlines()[-15:])
    raise ClusterUnavailable(f"node {host} not schedulable: {reason!r}{tail}")


# ----------------------------------------------------------------------------- API


def start(accounting: bool = True, install: bool = True) -> Cluster:
    """Start the cluster (or reuse a running one). Raises ClusterUnavailable."""
    if sys.platform != "linux":
        raise ClusterUnavailable("the test cluster needs Linux")
    if os.geteuid() != 0:
        raise ClusterUnavailable("starting Slurm daemons needs root")
    if install:
        ensure_installed()
    elif missing_binaries():
        raise ClusterUnavailable(f"Slurm is not installed: {', '.join(missing_binaries())}")
    for u in ("slurm", "munge") + (("mysql",) if accounting else ()):
        try:
            pwd.getpwnam(u)
        except KeyError:
            raise ClusterUnavailable(f"system user {u!r} is missing (package install incomplete)") from None

    stale = stale_daemons()
    if stale:  # a killed test session's cluster: nobody would stop it, so this one restarts it
        log(f"stopping daemons of a test session that has ended: {stale}")
        stop(stale)
    host = hostname()
    prepare_dirs()
    files = render(accounting, host)
    want_hash = conf_hash(files)
    book = read_book()
    started: dict[str, int] = {}

    # A running controller with another configuration (e.g. the other accounting
    # mode) is restarted if we started it; a foreign one is left alone.
    ctld = running_pid("slurmctld")
    if ctld and book.get("conf_hash") != want_hash:
        slurmds = ["slurmd", *(f"slurmd:{n}" for n in extra_node_names(host))]
        for name in (*slurmds, "slurmctld"):
            pid = running_pid(name)
            if pid and book["pids"].get(name) != pid:
                raise ClusterUnavailable(
                    f"{name} (pid {pid}) is running with another configuration and was "
                    "not started by tests/slurm/cluster.py; stop it first"
                )
        for name in (*slurmds, "slurmctld"):
            pid = running_pid(name)
            if pid:
                kill_pid(name, pid)
                book["pids"].pop(name, None)
    install_conf(files)

    def note(name, pid):
        if pid:
            started[name] = pid
            _started_here[name] = pid
            book["pids"][name] = pid
            write_book(book)
            log(f"started {name} (pid {pid})")

    note("munged", start_munged(book))
    if accounting:
        note("mariadbd", start_mariadbd())
        setup_database()
        note("slurmdbd", start_daemon("slurmdbd", sacctmgr_ok, 90))
        setup_accounts()
    note("slurmctld", start_daemon("slurmctld", ctld_ok, 60))
    book["conf_hash"] = want_hash
    write_book(book)
    note("slurmd", start_slurmd())
    for n in extra_node_names(host):
        note(f"slurmd:{n}", start_slurmd(f"slurmd:{n}", n))
    for n in [host, *extra_node_names(host)]:
        node_ready(n)
    c = Cluster(host=host, accounting=accounting, started=started)
    if accounting:
        wait_for("sacct", lambda: ok(["sacct", "-n", "-X", "-j", "1"]), 30)
    return c


def cancel_all_jobs(timeout: float = 30) -> None:
    """scancel every job on the test cluster and wait for their job steps (slurmstepd) to end."""
    if not ctld_ok():
        return
    ids = sh(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
    if ids:
        log(f"cancelling job(s) {' '.join(ids)}")
        sh(["scancel", *ids], check=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (
        processes_named("slurmstepd") or sh(["squeue", "-h", "-t", "PD,R,CG", "-o", "%i"], check=False).stdout.strip()
    ):
        time.sleep(0.5)


def stop(pids: dict[str, int] | None = None) -> None:
    """Stop, by PID, the given daemons (default: everything this module started).

    Jobs still on the cluster are cancelled first, when the controller is among them."""
    book = read_book()
    if pids is None:
        pids = dict(book["pids"])
    if "slurmctld" in pids and pid_alive(pids["slurmctld"], "slurmctld"):
        cancel_all_jobs()
    extra = sorted(k for k in pids if k.startswith("slurmd:"))  # extra nodes' slurmd first
    for name in [*extra, *reversed(DAEMONS)]:
        pid = pids.get(name)
        if pid:
            kill_pid(name, pid)
            if book["pids"].get(name) == pid:
                book["pids"].pop(name)
    write_book(book)


def started_here() -> dict[str, int]:
    """The daemons this process started and that still run (name -> pid)."""
    return {name: pid for name, pid in _started_here.items() if pid_alive(pid, name)}


def stop_started_here() -> None:
    if _started_here:
        stop(dict(_started_here))


_at_exit = {"registered": False}


def stop_at_exit() -> None:
    """From now on, whatever this process starts is stopped when it ends: normally (atexit),
    or on SIGTERM / SIGHUP (then the signal's previous action follows). SIGINT reaches
    pytest as KeyboardInterrupt, which still runs fixture teardown and atexit. Only
    SIGKILL escapes; tests/conftest.py's session-finish check reports what is left."""
    if _at_exit["registered"]:
        return
    _at_exit["registered"] = True
    atexit.register(stop_started_here)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(signum)

        def handler(sig, frame, previous=previous):
            stop_started_here()
            if callable(previous):
                previous(sig, frame)
            else:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
                os.kill(os.getpid(), sig)

        signal.signal(signum, handler)


def processes_named(*names: str) -> dict[int, str]:
    """Live processes whose command name is one of `names` (pid -> name)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            comm = (proc / "comm").read_text().strip()
        except OSError:
            continue
        if comm in names and pid_alive(int(proc.name), comm):
            found[int(proc.name)] = comm
    return found


def daemons_with_env(key: str, value: str) -> dict[int, str]:
    """Test-cluster daemons (DAEMON_NAMES) whose environment has key=value: those a process
    with that environment started, directly or through another daemon."""
    return {pid: comm for pid, comm in processes_named(*DAEMON_NAMES).items() if process_env(pid).get(key) == value}


def process_env(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def stale_daemons() -> dict[str, int]:
    """Booked daemons (started by this module) still running for a test session that has
    ended without stopping them (killed with SIGKILL, say): name -> pid. Their session is
    the SESSION_ENV value they inherited; it has ended when no other process has it. A
    cluster started by hand (no SESSION_ENV) or kept on purpose (RACKBENCH_SLURM_KEEP) is
    not stale."""
    booked = {name: pid for name, pid in read_book()["pids"].items() if pid_alive(pid, name)}
    if not booked:
        return {}
    live_sessions = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) not in booked.values():
            try:
                comm = (proc / "comm").read_text().strip()
            except OSError:
                continue
            if comm not in DAEMON_NAMES:
                marker = process_env(int(proc.name)).get(SESSION_ENV)
                if marker:
                    live_sessions.add(marker)
    stale = {}
    for name, pid in booked.items():
        env = process_env(pid)
        if env.get(SESSION_ENV) and not env.get("RACKBENCH_SLURM_KEEP") and env[SESSION_ENV] not in live_sessions:
            stale[name] = pid
    return stale


def status() -> dict:
    keys = [*DAEMONS, *(f"slurmd:{n}" for n in extra_node_names(hostname()))]
    return {name: running_pid(name) for name in keys}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start")
    s.add_argument(
        "--no-accounting", action="store_true", help="accounting_storage/none (use --slurm-status-command squeue)"
    )
    s.add_argument("--no-install", action="store_true")
    sub.add_parser("stop")
    sub.add_parser("status")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "start":
            c = start(accounting=not a.no_accounting, install=not a.no_install)
            print(json.dumps({"host": c.host, "accounting": c.accounting, "started": c.started, "running": status()}))
        elif a.cmd == "stop":
            stop()
        else:
            print(json.dumps(status()))
    except ClusterUnavailable as e:
        print(f"slurm cluster unavailable: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
