"""Start the rack's engine servers, wait until each is ready, tear every one down afterwards.

Two ways to start servers, the same servers either way:

* local processes (the demo, tests): ``ServerGroup(specs)`` starts each command as its
  own process group (``start_new_session``), GPUs (if any) through ``CUDA_VISIBLE_DEVICES``;
* Slurm: inside one allocation, each server is one ``srun --exact`` job step on its
  node, bound to its GPUs (``srun_command``); the step is torn down by signalling its
  ``srun`` and, if it lingers, ``scancel JOBID.STEPID``.

Server commands (``*_command`` builders):

* ``rackbench_serve_command``: ``python -m rackbench.serve`` around a rackbench engine;
* ``trtllm_serve_command``: ``trtllm-llmapi-launch trtllm-serve MODEL --host --port
  --backend --tp_size --max_batch_size --max_num_tokens --extra_llm_api_options FILE``
  (flags from TensorRT-LLM 1.2's tensorrt_llm/commands/serve.py; the wrapper is how
  TensorRT-LLM documents running its LLM API under srun; see
  tests/contracts/trtllm_serve_1_2.yaml);
* ``template_command``: any other OpenAI-compatible server (vLLM, SGLang, ...) named in
  config by its launch command, with ``{host}``, ``{port}``, ``{model}``, ``{gpus}``
  placeholders; a server given only by URL is not launched (``url_specs``).

Teardown runs on success, on failure, on SIGTERM (``scancel`` of the allocation sends
it to the batch script) and SIGINT: ``ServerGroup`` is a context manager and installs
handlers that turn those signals into ``SystemExit`` while servers are up.

``python -m rackbench.launch slurm --servers-per-node K --gpus-per-server G --engine-dir DIR -- CMD``
does the same inside an allocation (sbatch/salloc), with the servers as srun steps on every
node of the allocation; CMD (the one LoadGen) runs where the launcher runs (the first node).

``python -m rackbench.launch local --servers N --engine-dir DIR [--backend B] -- CMD ...``
starts N rackbench.serve servers, waits until ready, runs CMD with the endpoint URLs in
``$RACKBENCH_ENDPOINTS`` (comma-separated) and in ``--urls-out`` (JSON), then tears the
servers down and exits with CMD's status (non-zero also if a server died during CMD).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from rackbench.args import json_arg

ENDPOINTS_ENV = "RACKBENCH_ENDPOINTS"
TRTLLM_SERVE = "trtllm-serve"
TRTLLM_LAUNCH_WRAPPER = "trtllm-llmapi-launch"


class LaunchError(RuntimeError):
    pass


# --------------------------------------------------------------------------- ports


# Ports picked now for servers that bind them later come from below the kernel's ephemeral
# range: a port the kernel hands out (bind to port 0) can meanwhile be taken by any outgoing
# connection on the machine (seen on the test cluster: a server step failing with "Address
# already in use" for the port chosen moments before).
SERVER_PORT_FLOOR = 10000
EPHEMERAL_PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_low() -> int:
    try:
        return int(EPHEMERAL_PORT_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, outside the ephemeral range (the server binds it moments later)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1", *, consecutive: bool = False) -> list[int]:
    """``count`` distinct ports free on ``host`` now, below the kernel's ephemeral range (all
    held open while choosing, so none repeats); ``consecutive``: ``p .. p+count-1``."""
    import random

    low, high = SERVER_PORT_FLOOR, _ephemeral_low()
    if high - low < 4 * count:  # an odd ephemeral range: take the kernel's choice
        low, high = 1024, 65535
    rng = random.Random()
    for _ in range(200):
        if consecutive:
            start = rng.randrange(low, high - count)
            ports = list(range(start, start + count))
        else:
            ports = rng.sample(range(low, high), count)
        socks = []
        try:
            for port in ports:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind((host, port))
            return ports
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise LaunchError(f"found no {count} free port(s) on {host} between {low} and {high}")


def ensure_port_free(host: str, port: int) -> None:
    """LaunchError naming host:port if something already listens there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise LaunchError(
                f"port {port} on {host} is already in use ({exc.strerror or exc}); "
                f"stop what holds it or leave the port unset to pick a free one"
            ) from None


# --------------------------------------------------------------------------- commands


def rackbench_serve_command(
    engine_dir,
    *,
    host: str,
    port: int,
    backend: str = "reference",
    settings: dict | None = None,
    gpu_ids: Sequence[int] = (),
    model_name: str | None = None,
    python: str = sys.executable,
) -> list[str]:
    argv = [python, "-m", "rackbench.serve"]
    if engine_dir is not None:  # the zero-cost "instant" backend has none
        argv += ["--engine-dir", str(engine_dir)]
    argv += [
        "--backend",
        backend,
        "--host",
        host,
        "--port",
        str(port),
        "--settings",
        json.dumps(settings or {}, sort_keys=True),
    ]
    if gpu_ids:
        argv += ["--gpu-ids", ",".join(map(str, gpu_ids))]
    if model_name:
        argv += ["--model-name", model_name]
    return argv


def trtllm_serve_command(
    model,
    *,
    host: str,
    port: int,
    backend: str = "pytorch",
    tp_size: int = 1,
    max_batch_size: int | None = None,
    max_num_tokens: int | None = None,
    extra_llm_api_options=None,
    tokenizer=None,
    wrapper: bool = True,
) -> list[str]:
    """``trtllm-serve`` for one endpoint (TensorRT-LLM 1.2 flags; see the contract spec).

    ``model``: an HF checkpoint dir (``backend="pytorch"``) or an engine dir
    (``backend="tensorrt"``). ``extra_llm_api_options``: the LLM-API YAML rackbench
    writes for its engines (the same options the in-process backend uses). ``wrapper``:
    prefix ``trtllm-llmapi-launch`` (needed under srun: it keeps the Slurm/MPI
    environment away from the server process and runs the MPI leader beside it).
    """
    argv = [TRTLLM_LAUNCH_WRAPPER] if wrapper else []
    argv += [
        TRTLLM_SERVE,
        str(model),
        "--host",
        host,
        "--port",
        str(port),
        "--backend",
        backend,
        "--tp_size",
        str(tp_size),
    ]
    if tokenizer is not None:
        argv += ["--tokenizer", str(tokenizer)]
    if max_batch_size is not None:
        argv += ["--max_batch_size", str(max_batch_size)]
    if max_num_tokens is not None:
        argv += ["--max_num_tokens", str(max_num_tokens)]
    if extra_llm_api_options is not None:
        argv += ["--extra_llm_api_options", str(extra_llm_api_options)]
    return argv


def template_command(template: str, *, host: str, port: int, model: str = "", gpus: Sequence[int] = ()) -> list[str]:
    """Any other server's launch command from config, e.g.
    ``"vllm serve {model} --host {host} --port {port}"``; unknown placeholders are an error."""
    try:
        text = template.format(host=host, port=port, model=model, gpus=",".join(map(str, gpus)))
    except (KeyError, IndexError) as exc:
        raise LaunchError(
            f"server command template {template!r}: unknown placeholder {exc}; "
            f"known: {{host}} {{port}} {{model}} {{gpus}}"
        ) from None
    return shlex.split(text)


# The job's own GPU requests, which srun reads from its environment as if given on its
# command line (srun(1), INPUT ENVIRONMENT VARIABLES): a job submitted with --gpus=gb300:2
# (as the Snakemake plugin does) hands every step SLURM_GPUS=gb300:2, and a step asking
# --gres=gpu:1 beside it is refused by Slurm 22.05 ("Invalid GRES specification (with and
# without type identification)"); SLURM_CPUS_PER_GPU clashes with the step's --cpus-per-task.
# Server steps state their own resources, so these are dropped from their environment.
JOB_GPU_ENV = (
    "SLURM_GPUS",
    "SLURM_GPUS_PER_NODE",
    "SLURM_GPUS_PER_SOCKET",
    "SLURM_GPUS_PER_TASK",
    "SLURM_CPUS_PER_GPU",
    "SLURM_MEM_PER_GPU",
    "SLURM_GPU_BIND",
    "SLURM_GPU_FREQ",
    "SLURM_TRES_PER_TASK",
)


def srun_command(
    argv: Sequence[str],
    *,
    node: str,
    gpus: int,
    cpus: int | None = None,
    mem: str | None = None,
    job_name: str = "rackbench-server",
    output=None,
    extra: Sequence[str] = (),
) -> list[str]:
    """One engine server as one job step of the current allocation, on ``node``, with ``gpus`` GPUs.

    ``--exact`` gives the step only what it asks for, so the steps of one node run side
    by side on disjoint GPUs (Slurm sets each step's ``CUDA_VISIBLE_DEVICES``).
    ``mem``: the step's memory (``--mem``); without it Slurm may give a step all the
    node's job memory and hold the next step back. ``--kill-on-bad-exit`` ends the step
    if its task fails.
    """
    cmd = [
        "srun",
        "--exact",
        "--nodes=1",
        "--ntasks=1",
        f"--nodelist={node}",
        f"--gres=gpu:{gpus}",
        f"--job-name={job_name}",
        "--kill-on-bad-exit=1",
    ]
    if cpus is not None:
        cmd.append(f"--cpus-per-task={cpus}")
    if mem is not None:
        cmd.append(f"--mem={mem}")
    if output is not None:
        cmd.append(f"--output={output}")
    return cmd + list(extra) + list(argv)


# Each server step first logs where Slurm put it (one line to its stderr/log), then
# becomes the server (exec: srun's signals reach the server itself).
STEP_BANNER = "rackbench-step"
_BANNER_SCRIPT = (
    'echo "' + STEP_BANNER + ": node=$SLURMD_NODENAME host=$(hostname) job=$SLURM_JOB_ID step=$SLURM_STEP_ID "
    'CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES SLURM_STEP_GPUS=$SLURM_STEP_GPUS" >&2; exec "$@"'
)


def with_step_banner(argv: Sequence[str]) -> list[str]:
    """``argv`` behind ``/bin/sh -c`` that first prints the step's node and GPU binding
    (``rackbench-step: node=... host=... CUDA_VISIBLE_DEVICES=... SLURM_STEP_GPUS=...``), then execs it."""
    return ["/bin/sh", "-c", _BANNER_SCRIPT, STEP_BANNER, *argv]


def parse_step_banner(text: str) -> dict | None:
    """The fields of the first ``rackbench-step:`` line in a server log, or None."""
    for line in text.splitlines():
        if line.startswith(STEP_BANNER + ":"):
            return dict(kv.split("=", 1) for kv in line.split(":", 1)[1].split() if "=" in kv)
    return None


def node_addresses(nodes: Sequence[str]) -> dict[str, str]:
    """Each node's ``NodeAddr`` (``scontrol show node``): the address Slurm itself uses to reach
    it, which is where its servers are reached too (equal to the name on most clusters)."""
    if not nodes:
        return {}
    out = subprocess.run(
        ["scontrol", "show", "node", "--oneliner", ",".join(nodes)], capture_output=True, text=True, timeout=30
    )
    if out.returncode != 0:
        raise LaunchError(f"scontrol show node {','.join(nodes)} failed: {out.stderr.strip()}")
    addresses = {}
    for line in out.stdout.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if "NodeName" in fields:
            addresses[fields["NodeName"]] = fields.get("NodeAddr") or fields["NodeName"]
    return {n: addresses.get(n, n) for n in nodes}


def in_allocation(env=os.environ) -> bool:
    """Inside a Slurm allocation. The Slurm executor plugin's job step keeps only SLURM_JOB_ID
    (and a few more) for nested srun, dropping SLURM_JOB_NODELIST: either says so."""
    return bool(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or env.get("SLURM_JOB_ID"))


def allocation_nodes(env=os.environ) -> list[str]:
    """The nodes of the current Slurm allocation (``scontrol show hostnames``); where only
    SLURM_JOB_ID is set, its node list from ``squeue``."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist and env.get("SLURM_JOB_ID"):
        out = subprocess.run(
            ["squeue", "-h", "-j", env["SLURM_JOB_ID"], "-o", "%N"], capture_output=True, text=True, check=True
        )
        nodelist = out.stdout.strip()
    if not nodelist:
        raise LaunchError("not inside a Slurm allocation (SLURM_JOB_NODELIST and SLURM_JOB_ID are unset)")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


# --------------------------------------------------------------------------- specs


@dataclass
class ServerSpec:
    """One engine server: its argv (port filled in), where it listens, its GPUs."""

    name: str
    argv: list[str] | None  # None: not launched here (a server given by URL)
    host: str
    port: int
    gpus: list[int] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    slurm: bool = False  # argv is an srun step (the GPUs are Slurm's to bind)
    url_override: str | None = None

    @property
    def url(self) -> str:
        return self.url_override or f"http://{self.host}:{self.port}"


def local_rackbench_specs(
    count: int,
    engine_dir,
    *,
    backend: str = "reference",
    settings: dict | None = None,
    host: str = "127.0.0.1",
    ports: Sequence[int] | None = None,
    gpus_per_server: int = 0,
) -> list[ServerSpec]:
    """``count`` local rackbench.serve servers; ports free ones unless given (a taken one: LaunchError)."""
    if ports is not None and len(ports) != count:
        raise LaunchError(f"{count} servers but {len(ports)} ports given")
    if ports is None:
        ports = free_ports(count, host)
    else:
        for port in ports:
            ensure_port_free(host, port)
    specs = []
    for i in range(count):
        port = ports[i]
        gpus = list(range(i * gpus_per_server, (i + 1) * gpus_per_server))
        argv = rackbench_serve_command(
            engine_dir, host=host, port=port, backend=backend, settings=settings, gpu_ids=list(range(len(gpus)))
        )
        specs.append(ServerSpec(f"server{i}", argv, host, port, gpus=gpus))
    return specs


def slurm_specs(
    server_argv,
    *,
    nodes: Sequence[str],
    servers_per_node: int,
    gpus_per_server: int,
    base_port: int,
    cpus_per_server: int | None = None,
    mem_per_server: str | None = None,
    log_dir=None,
    step_banner: bool = True,
    addresses: dict[str, str] | None = None,
) -> list[ServerSpec]:
    """One srun step per server, ``servers_per_node`` on each node; server i listens on
    ``base_port + i`` (distinct across the allocation, so that several slurmd on one
    machine, as on the test cluster, never share a port). ``addresses``: node -> the host
    its URLs use (``node_addresses``; default the node name).

    ``server_argv(host, port)`` builds the server command (``trtllm_serve_command`` or
    ``rackbench_serve_command`` with ``host="0.0.0.0"``: it must listen on the node's
    network; the URL uses the node name). ``step_banner``: each step logs its node and
    GPU binding first (``with_step_banner``; read back with ``parse_step_banner``)."""
    specs = []
    for n, node in enumerate(nodes):
        for slot in range(servers_per_node):
            i = n * servers_per_node + slot
            port = base_port + i
            output = Path(log_dir) / f"server{i}.log" if log_dir else None
            server = server_argv("0.0.0.0", port)
            argv = srun_command(
                with_step_banner(server) if step_banner else server,
                node=node,
                gpus=gpus_per_server,
                cpus=cpus_per_server,
                mem=mem_per_server,
                job_name=f"rackbench-server{i}",
                output=output,
            )
            host = (addresses or {}).get(node, node)
            specs.append(ServerSpec(f"server{i}", argv, host, port, slurm=True))
    return specs


def rackbench_slurm_specs(
    engine_dir,
    *,
    servers_per_node: int,
    gpus_per_server: int = 1,
    backend: str = "reference",
    settings: dict | None = None,
    nodes: Sequence[str] | None = None,
    base_port: int = 8100,
    cpus_per_server: int | None = None,
    mem_per_server: str | None = None,
) -> list[ServerSpec]:
    """``rackbench.serve`` servers as srun steps on the allocation's nodes (default: all of them).

    Each server sees only its step's GPUs (Slurm sets ``CUDA_VISIBLE_DEVICES``), so it is
    told ``--gpu-ids 0..gpus_per_server-1``. The steps' output goes through srun into
    ``ServerGroup(log_dir=...)``'s per-server logs (no ``--output``: one file per server)."""
    nodes = list(nodes) if nodes is not None else allocation_nodes()
    return slurm_specs(
        lambda host, port: rackbench_serve_command(
            engine_dir,
            host=host,
            port=port,
            backend=backend,
            settings=settings,
            gpu_ids=list(range(gpus_per_server)),
        ),
        nodes=nodes,
        servers_per_node=servers_per_node,
        gpus_per_server=gpus_per_server,
        base_port=base_port,
        cpus_per_server=cpus_per_server,
        mem_per_server=mem_per_server,
        addresses=node_addresses(nodes),
    )


def url_specs(urls: Sequence[str]) -> list[ServerSpec]:
    """Servers run by someone else: only polled for readiness and used."""
    return [ServerSpec(f"server{i}", None, "", 0, url_override=u.rstrip("/")) for i, u in enumerate(urls)]


# --------------------------------------------------------------------------- the group


class ServerGroup:
    """Start ``specs``, ``wait_ready``, and ``teardown`` every one (also on exceptions and signals)."""

    def __init__(self, specs: Sequence[ServerSpec], *, log_dir=None, term_grace_s: float = 15.0):
        self.specs = list(specs)
        self.log_dir = Path(log_dir) if log_dir else None
        self.term_grace_s = term_grace_s
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self._old_handlers: dict = {}
        self._torn_down = False

    # -- lifecycle
    def __enter__(self):
        self._install_signal_handlers()
        try:
            self.start()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc):
        self.teardown()

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            raise SystemExit(128 + signum)  # unwinds through __exit__ -> teardown

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self):
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    def start(self):
        for spec in self.specs:
            if spec.argv is None:
                continue
            log = None
            if self.log_dir:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                self.logs[spec.name] = self.log_dir / f"{spec.name}.log"
                log = open(self.logs[spec.name], "ab")
            env = dict(os.environ)
            env.update(spec.env)
            if spec.gpus and not spec.slurm:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, spec.gpus))
            if spec.slurm:
                for key in JOB_GPU_ENV:
                    env.pop(key, None)
            if spec.slurm:  # the exact srun line, for the job's log
                print(
                    f"rackbench.launch: {spec.name} ({spec.url}): {shlex.join(spec.argv)}", file=sys.stderr, flush=True
                )
            try:
                self.procs[spec.name] = subprocess.Popen(
                    spec.argv,
                    stdout=log or subprocess.DEVNULL,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                raise LaunchError(f"{spec.name} ({spec.url}): cannot start {spec.argv[0]!r}: {exc}") from None
            finally:
                if log:
                    log.close()

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.specs]

    def exited(self, url_or_name: str) -> str | None:
        """Why the server behind this URL (or name) is gone, or None while it runs."""
        for spec in self.specs:
            if url_or_name in (spec.url, spec.name):
                proc = self.procs.get(spec.name)
                if proc is None or proc.poll() is None:
                    return None
                return f"{spec.name} exited with code {proc.returncode}{self._log_tail(spec.name)}"
        return None

    def dead(self) -> list[str]:
        """A line per server that has exited, naming its URL."""
        return [f"{s.url}: {why}" for s in self.specs if (why := self.exited(s.name))]

    def _log_tail(self, name, lines=5) -> str:
        path = self.logs.get(name)
        if not path or not path.is_file():
            return ""
        tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
        return f"; log {path}:\n    " + "\n    ".join(tail) if tail else f"; log {path} is empty"

    def wait_ready(self, timeout: float, poll_interval: float = 0.5) -> list[str]:
        from rackbench.endpoints import wait_ready

        asyncio.run(wait_ready(self.urls, timeout, poll_interval=poll_interval, alive=self.exited))
        return self.urls

    def teardown(self):
        """Stop every server: SIGTERM to its process group (srun forwards it to its step),
        SIGKILL after ``term_grace_s``, then ``scancel`` any Slurm step still listed."""
        if self._torn_down:
            return
        self._torn_down = True
        try:
            for proc in self.procs.values():
                if proc.poll() is None:
                    _signal_group(proc, signal.SIGTERM)
            deadline = time.monotonic() + self.term_grace_s
            for proc in self.procs.values():
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait(timeout=10)
                else:
                    _signal_group(proc, signal.SIGKILL)  # stragglers the server left in its group
            if any(s.slurm for s in self.specs):
                # a step whose srun is gone but whose tasks linger (srun SIGKILLed, node slow)
                scancel_steps([f"rackbench-{s.name}" for s in self.specs if s.slurm], wait_s=self.term_grace_s)
        finally:
            self._restore_signal_handlers()


def _signal_group(proc: subprocess.Popen, sig) -> None:
    try:
        os.killpg(proc.pid, sig)  # the server and anything it started (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def listed_steps(step_names: Sequence[str], env=os.environ) -> list[str]:
    """The current job's step ids that ``squeue --steps`` still lists under these names."""
    job = env.get("SLURM_JOB_ID")
    if not job or not step_names:
        return []
    try:
        out = subprocess.run(
            ["squeue", "--steps", f"--jobs={job}", "--noheader", "--format=%i %j"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    wanted = set(step_names)
    return [
        sid
        for sid, name in (line.split(None, 1) for line in out.stdout.splitlines() if " " in line)
        if name.strip() in wanted
    ]


def scancel_steps(step_names: Sequence[str], env=os.environ, wait_s: float = 0.0) -> list[str]:
    """``scancel`` the current job's steps with these names that are still listed; the step ids cancelled.
    ``wait_s``: then wait up to that long until squeue lists none of them any more."""
    steps = listed_steps(step_names, env)
    if steps:
        subprocess.run(["scancel", *steps], capture_output=True, timeout=30)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and listed_steps(step_names, env):
            time.sleep(0.5)
    return steps


# --------------------------------------------------------------------------- CLI


def run_with_servers(
    group: ServerGroup,
    command: Sequence[str],
    *,
    ready_timeout: float,
    urls_out=None,
    server_death_grace_s: float = 30.0,
) -> int:
    """Start the servers, wait until ready, run ``command`` with the URLs, tear down; an exit status."""
    with group:
        urls = group.wait_ready(ready_timeout)
        if urls_out:
            Path(urls_out).write_text(json.dumps({"endpoints": urls}, indent=2) + "\n")
        print(f"rackbench.launch: {len(urls)} endpoint(s) ready: {' '.join(urls)}", file=sys.stderr, flush=True)
        if not command:
            while not group.dead():
                time.sleep(1.0)
            print("rackbench.launch: server died: " + "; ".join(group.dead()), file=sys.stderr)
            return 1
        env = dict(os.environ, **{ENDPOINTS_ENV: ",".join(urls)})
        child = subprocess.Popen(list(command), env=env)
        died_at = None
        try:
            while child.poll() is None:
                if died_at is None and group.dead():
                    died_at = time.monotonic()
                    print(
                        "rackbench.launch: server died during the run: " + "; ".join(group.dead()),
                        file=sys.stderr,
                        flush=True,
                    )
                if died_at is not None and time.monotonic() - died_at > server_death_grace_s:
                    child.terminate()
                time.sleep(0.2)
        finally:
            if child.poll() is None:
                child.terminate()
                child.wait(timeout=30)
        dead = group.dead()
        if dead:
            # ready at the start, so dead now means died during the run (the client may have
            # failed and exited before the loop above saw it)
            print("rackbench.launch: server(s) died during the run: " + "; ".join(dead), file=sys.stderr)
            return child.returncode or 1
        return child.returncode


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(prog="python -m rackbench.launch", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    loc = sub.add_parser("local", help="rackbench.serve servers as local processes")
    loc.add_argument("--servers", type=int, required=True)
    loc.add_argument("--engine-dir", type=Path, required=True)
    loc.add_argument("--backend", default="reference")
    loc.add_argument("--settings", default="{}", help="engine settings as JSON or a JSON file")
    loc.add_argument("--host", default="127.0.0.1")
    loc.add_argument("--ports", default=None, help="comma-separated ports (default: free ones)")
    slm = sub.add_parser("slurm", help="rackbench.serve servers as srun --exact steps of the current allocation")
    slm.add_argument("--engine-dir", type=Path, required=True)
    slm.add_argument("--backend", default="reference")
    slm.add_argument("--settings", default="{}", help="engine settings as JSON or a JSON file")
    slm.add_argument("--servers-per-node", type=int, required=True)
    slm.add_argument("--gpus-per-server", type=int, default=1)
    slm.add_argument("--cpus-per-server", type=int, default=None)
    slm.add_argument("--mem-per-server", default=None, help="srun --mem of each step, e.g. 2G")
    slm.add_argument("--base-port", type=int, default=8100, help="server i listens on base-port + i")
    url = sub.add_parser("urls", help="servers already running elsewhere, by URL")
    url.add_argument("urls", nargs="+")
    for sp in (loc, slm, url):
        sp.add_argument("--ready-timeout", type=float, default=600.0)
        sp.add_argument("--log-dir", type=Path, default=None)
        sp.add_argument("--urls-out", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        if args.mode == "local":
            ports = [int(x) for x in args.ports.split(",")] if args.ports else None
            specs = local_rackbench_specs(
                args.servers,
                args.engine_dir,
                backend=args.backend,
                settings=json_arg(args.settings),
                host=args.host,
                ports=ports,
            )
        elif args.mode == "slurm":
            specs = rackbench_slurm_specs(
                args.engine_dir,
                backend=args.backend,
                settings=json_arg(args.settings),
                servers_per_node=args.servers_per_node,
                gpus_per_server=args.gpus_per_server,
                cpus_per_server=args.cpus_per_server,
                mem_per_server=args.mem_per_server,
                base_port=args.base_port,
            )
        else:
            specs = url_specs(args.urls)
        return run_with_servers(
            ServerGroup(specs, log_dir=args.log_dir), command, ready_timeout=args.ready_timeout, urls_out=args.urls_out
        )
    except (LaunchError, RuntimeError) as exc:
        print(f"rackbench.launch: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
