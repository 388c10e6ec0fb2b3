"""The rack-wide run: one engine server per engine replica, one LoadGen over all of them.

This is how every verified MLPerf rack result was made (issue 10): one LoadGen instance
(one SUT) drives all endpoints, so its figure may be called an MLPerf result, unlike a
sum of per-shard LoadGens.

``python -m rackbench.rack --engine-dir DIR --dataset PARQUET --out SESSION_DIR
--runs-json RUNS | --scenario Offline|Server|Interactive [--target-qps X] --servers N ...``

One session (one Snakemake job, one Slurm allocation) starts the servers once and makes
every run of the configuration against them, one LoadGen at a time:

1. starts the servers (``rackbench.launch.ServerGroup``): local processes, or inside a
   Slurm allocation one ``srun --exact`` step per server (``launch.slurm_specs``);
   kinds ``rackbench`` (``python -m rackbench.serve``), ``trtllm-serve``, ``command``
   (a template from config) or ``urls`` (already running, not launched);
2. waits until every ``/health`` answers (``--ready-timeout``; a server that exits
   first fails at once, naming it);
3. per run (``Offline``, ``Server-qps<X>``, ...) and per mode (performance, accuracy,
   and TEST06: a performance run under TEST06's ``--audit-config``): an ``EndpointPool``
   over all URLs (``--balance``; streamed for Server/Interactive) and
   ``harness.run_shard(pool, num_shards=1, ...)`` into ``<run>/<mode>/``; the pool's
   per-endpoint counters go to ``<run>/<mode>/endpoints.json``;
4. tears every server down: on success, on failure and on SIGTERM/SIGINT (scancel).

The whole ``SESSION_DIR`` is written to a temporary sibling and renamed into place only
when every run is done (``rackbench.atomic``): a failed session leaves an earlier result
as it was. A server that dies mid-run makes the session fail with a ``RackError`` naming
the endpoint (its URL, server name and exit status) instead of a result; LoadGen's
remaining samples fail fast on the dead endpoint or go to the live ones, so it never hangs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from rackbench import launch, paths
from rackbench.args import json_arg
from rackbench.atomic import atomic_path

SERVER_KINDS = ("rackbench", "trtllm-serve", "command", "urls")
LAUNCHERS = ("auto", "local", "slurm")


class RackError(RuntimeError):
    """A rack run that cannot give a valid result; the message names the endpoint or setting."""


def _log(message: str) -> None:
    print(f"rackbench.rack: {message}", file=sys.stderr, flush=True)


def server_specs(
    *,
    kind: str,
    servers: int,
    gpus_per_server: int,
    launcher: str,
    engine_dir=None,
    backend: str = "reference",
    engine_settings: dict | None = None,
    command: str | None = None,
    urls: Sequence[str] = (),
    server_model=None,
    tokenizer=None,
    extra_llm_api_options=None,
    max_batch_size: int | None = None,
    max_num_tokens: int | None = None,
    trtllm_backend: str = "pytorch",
    base_port: int = 8000,
    cpus_per_server: int | None = None,
    mem_per_server: str | None = None,
    log_dir=None,
    env=os.environ,
) -> list[launch.ServerSpec]:
    """The servers of one rack run, as ``launch.ServerSpec``s."""
    if kind not in SERVER_KINDS:
        raise RackError(f"unknown server kind {kind!r}; known: {list(SERVER_KINDS)}")
    if kind == "urls":
        if not urls:
            raise RackError("server kind 'urls' needs --urls")
        return launch.url_specs(urls)
    if launcher == "auto":
        launcher = "slurm" if launch.in_allocation(env) else "local"
    if launcher not in ("local", "slurm"):
        raise RackError(f"unknown launcher {launcher!r}; known: {list(LAUNCHERS)}")

    def argv(host: str, port: int, gpus: Sequence[int]) -> list[str]:
        if kind == "rackbench":
            return launch.rackbench_serve_command(
                engine_dir, host=host, port=port, backend=backend, settings=engine_settings, gpu_ids=gpus
            )
        if kind == "trtllm-serve":
            return launch.trtllm_serve_command(
                server_model or engine_dir,
                host=host,
                port=port,
                backend=trtllm_backend,
                tp_size=gpus_per_server,
                max_batch_size=max_batch_size,
                max_num_tokens=max_num_tokens,
                extra_llm_api_options=extra_llm_api_options,
                tokenizer=tokenizer,
            )
        if not command:
            raise RackError("server kind 'command' needs --server-command (a template with {host} {port} ...)")
        return launch.template_command(command, host=host, port=port, model=str(server_model or engine_dir), gpus=gpus)

    if launcher == "slurm":
        nodes = launch.allocation_nodes(env)
        if servers % len(nodes):
            raise RackError(f"{servers} servers do not spread evenly over the allocation's {len(nodes)} nodes")
        per_node = servers // len(nodes)
        return launch.slurm_specs(
            lambda host, port: argv(host, port, list(range(gpus_per_server))),
            nodes=nodes,
            servers_per_node=per_node,
            gpus_per_server=gpus_per_server,
            base_port=base_port,
            cpus_per_server=cpus_per_server,
            mem_per_server=mem_per_server,
            log_dir=log_dir,
        )
    host = "127.0.0.1"
    ports = launch.free_ports(servers, host)
    specs = []
    for i, port in enumerate(ports):
        gpus = list(range(i * gpus_per_server, (i + 1) * gpus_per_server)) if gpus_per_server else []
        local_ids = list(range(len(gpus)))  # as the server sees them (CUDA_VISIBLE_DEVICES is set per server)
        specs.append(launch.ServerSpec(f"server{i}", argv(host, port, local_ids), host, port, gpus=gpus))
    return specs


def _endpoint_of(exc: BaseException | None) -> str | None:
    while exc is not None:
        url = getattr(exc, "url", None)
        if url:
            return url
        exc = exc.__cause__
    return None


def _in_thread(fn: Callable[[], dict], poll: Callable[[], None]) -> dict:
    """Run ``fn`` (LoadGen's blocking test) in a worker thread, so the main thread stays in
    Python: SIGTERM becomes SystemExit at once (ServerGroup's handler) and tears servers down."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the main thread
            box["error"] = exc

    worker = threading.Thread(target=target, name="rack-loadgen", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
        poll()
    if "error" in box:
        raise box["error"]
    return box["result"]


def run_list(scenario: str, target_qps: float | None, *, accuracy: bool = True) -> list[dict]:
    """One run, as ``--runs-json`` lists them (the CLI's ``--scenario`` shorthand)."""
    modes = ["performance", "accuracy"] if accuracy else ["performance"]
    return [
        {
            "name": paths.rack_run_name(scenario, target_qps),
            "scenario": scenario,
            "target_qps": target_qps,
            "modes": modes,
        }
    ]


def _check_runs(runs: Sequence[dict], audit_config) -> None:
    if not runs:
        raise RackError("a rack session needs at least one run")
    names = [run["name"] for run in runs]
    if len(set(names)) != len(names):
        raise RackError(f"rack run names repeat: {names}")
    for run in runs:
        if paths.rack_run_name(run["scenario"], run.get("target_qps")) != run["name"]:
            raise RackError(f"rack run {run['name']!r} does not match its scenario/target QPS {run}")
        unknown = set(run["modes"]) - set(RUN_MODES)
        if unknown or "performance" not in run["modes"]:
            raise RackError(
                f"rack run {run['name']}: modes {run['modes']} (known: {list(RUN_MODES)}, performance needed)"
            )
        if paths.RACK_TEST06_MODE in run["modes"] and not audit_config:
            raise RackError(f"rack run {run['name']} asks for a TEST06 run but no --audit-config was given")


# LoadGen modes a rack run can make; TEST06 is a performance run under TEST06's audit.config
RUN_MODES = ("performance", "accuracy", paths.RACK_TEST06_MODE)


def run_rack(
    group: launch.ServerGroup,
    *,
    dataset,
    out_dir,
    runs: Sequence[dict],
    batch_size: int,
    audit_config=None,
    max_in_flight: int | None = None,
    prompts_per_request: dict | None = None,
    max_new_tokens: int,
    balance: str = "isl",
    ready_timeout: float = 1800.0,
    min_duration_ms: int | None = None,
    min_query_count: int | None = None,
    offline_expected_qps: float | None = None,
    model_name: str = "rackbench",
    metadata: dict | None = None,
    progress_interval_s: float = 30.0,
    request_timeout: float | None = None,
) -> dict:
    """Start ``group`` once, make every run of ``runs`` (each mode one LoadGen over all its
    endpoints, one after another), tear down; returns {run name: {mode: shard.json record}}.

    ``runs``: dicts with ``name``, ``scenario``, ``target_qps`` and ``modes`` (``RUN_MODES``),
    as ``paths.one_loadgen_runs`` lists them. ``out_dir`` (``<run>/<mode>/`` for each) appears
    only when every run succeeded. Starting the servers once matters on a rack: loading a 70B
    engine on 72 GPUs takes minutes, a LoadGen run of the sweep far less."""
    from rackbench import compliance, harness
    from rackbench.endpoints import EndpointPool, stream_for

    _check_runs(runs, audit_config)
    _check_connections(group, runs, batch_size, max_in_flight, prompts_per_request)
    out_dir = Path(out_dir)
    records: dict = {}
    with group:
        started = time.monotonic()
        urls = group.wait_ready(ready_timeout)
        _log(f"{len(urls)} endpoint(s) ready in {time.monotonic() - started:.1f} s: {' '.join(urls)}")
        reported: set = set()

        def watch():
            for line in group.dead():
                if line not in reported:
                    reported.add(line)
                    _log(f"server down during the run: {line}")

        with atomic_path(out_dir, directory=True) as tmp:
            for run in runs:
                scenario, target_qps = run["scenario"], run.get("target_qps")
                records[run["name"]] = {}
                for mode in run["modes"]:
                    test06 = mode == paths.RACK_TEST06_MODE
                    in_flight = max_in_flight or batch_size * len(urls)
                    per_request = (prompts_per_request or {}).get(scenario, 1)
                    pool = EndpointPool(
                        urls,
                        model=model_name,
                        stream=stream_for(scenario),
                        balance=balance,
                        # a server's share of the samples in flight, in requests of per_request
                        concurrency=max(1, -(-in_flight // (len(urls) * per_request))),
                        batch_size=per_request,
                        request_timeout=request_timeout,
                    )
                    mode_dir = tmp / run["name"] / mode
                    try:
                        meta = {
                            # the configuration's batch size bounds each server here, not one engine
                            **{k: v for k, v in (metadata or {}).items() if k != "batch_size"},
                            "server_batch_size": batch_size,
                            "method": "one_loadgen",
                            "rack_run": run["name"],
                            "servers": len(urls),
                            "endpoints": urls,
                            "balance": balance,
                            "prompts_per_request": per_request,
                            **({"test": compliance.TEST06} if test06 else {}),
                        }
                        record = _in_thread(
                            functools.partial(
                                harness.run_shard,
                                pool,
                                samples_parquet=dataset,
                                out_dir=mode_dir,
                                mode="performance" if test06 else mode,
                                shard_index=0,
                                num_shards=1,
                                shard_mode="split",
                                batch_size=None,
                                max_in_flight=in_flight,
                                max_new_tokens=max_new_tokens,
                                scenario=scenario,
                                target_qps=target_qps,
                                min_duration_ms=min_duration_ms,
                                min_query_count=min_query_count,
                                offline_expected_qps=offline_expected_qps,
                                metadata=meta,
                                progress_interval_s=progress_interval_s,
                                audit_config=Path(audit_config).resolve() if test06 else None,
                                log=_log,
                            ),
                            watch,
                        )
                    except harness.HarnessError as exc:
                        url = _endpoint_of(exc)
                        if url is None:
                            raise
                        why = group.exited(url) or "its requests failed"
                        raise RackError(
                            f"{run['name']} {mode} run INVALID: endpoint {url} failed mid-run ({why}); "
                            f"first error: {exc.__cause__ or exc}"
                        ) from exc
                    finally:
                        if mode_dir.is_dir():
                            pool.write_stats(mode_dir / paths.ENDPOINTS_FILE)
                        pool.close()
                    if test06:  # TEST06's README: check that LoadGen found audit.config
                        if not compliance.audit_config_read(mode_dir / "mlperf_log_detail.txt"):
                            raise RackError(f"{run['name']} TEST06 run: LoadGen did not apply {audit_config}")
                        shutil.copy2(audit_config, mode_dir / compliance.AUDIT_CONFIG)
                    records[run["name"]][mode] = record
                    dead = group.dead()
                    if dead:  # a server gone after its last request still makes the run suspect
                        raise RackError(
                            f"{run['name']} {mode} run INVALID: server(s) down at its end: {'; '.join(dead)}"
                        )
                    _log(
                        f"{run['name']} {mode}: {record['loadgen']['result']}, "
                        f"{record['loadgen']['tokens_per_second']} tokens/s over {len(urls)} endpoint(s)"
                    )
    return records


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rackbench.rack", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine-dir", type=Path, help="the built engine (served by kind rackbench)")
    p.add_argument("--dataset", required=True, help="dataset parquet (tok_input column)")
    p.add_argument("--out", required=True, help="the session's directory: <run>/<mode>/ each (created atomically)")
    p.add_argument(
        "--runs-json",
        default=None,
        help="the runs, in order: [{name, scenario, target_qps, modes}] (JSON or file; paths.one_loadgen_runs)",
    )
    p.add_argument("--scenario", choices=("Offline", "Server", "Interactive"), help="one run (without --runs-json)")
    p.add_argument("--target-qps", type=float, default=None, help="Server/Interactive: the whole rack's target QPS")
    p.add_argument("--no-accuracy", action="store_true", help="with --scenario: performance mode only")
    p.add_argument("--audit-config", default=None, help="TEST06's audit.config, for runs with a TEST06 mode")
    p.add_argument("--servers", type=int, required=True, help="engine servers (one per engine replica)")
    p.add_argument("--gpus-per-server", type=int, default=0, help="0 on CPU")
    p.add_argument("--server-kind", choices=SERVER_KINDS, default="rackbench")
    p.add_argument("--server-command", default=None, help="kind command: template with {host} {port} {model} {gpus}")
    p.add_argument("--urls", nargs="*", default=[], help="kind urls: the servers' base URLs")
    p.add_argument("--launcher", choices=LAUNCHERS, default="auto", help="auto: srun steps inside a Slurm allocation")
    p.add_argument("--backend", default="reference", help="kind rackbench: the engine backend")
    p.add_argument("--engine-settings-json", default="{}", help="kind rackbench: engine settings (JSON or file)")
    p.add_argument("--server-model", default=None, help="trtllm-serve/command: the model or engine the server loads")
    p.add_argument("--tokenizer", default=None, help="trtllm-serve: --tokenizer")
    p.add_argument("--extra-llm-api-options", default=None, help="trtllm-serve: the LLM-API options YAML")
    p.add_argument("--trtllm-backend", default="pytorch", choices=("pytorch", "tensorrt"))
    p.add_argument("--max-num-tokens", type=int, default=None, help="trtllm-serve: --max_num_tokens")
    p.add_argument("--base-port", type=int, default=8000, help="srun steps: port of a node's first server")
    p.add_argument("--cpus-per-server", type=int, default=None)
    p.add_argument("--mem-per-server", default=None, help="srun --mem of each server step")
    p.add_argument("--batch-size", type=int, required=True, help="requests open per server at once")
    p.add_argument("--max-in-flight", type=int, default=None, help="rack-wide bound; default batch size x servers")
    p.add_argument(
        "--prompts-per-request-json",
        default="{}",
        help='most samples per completions request, per scenario (JSON, e.g. {"Offline": 64}); default 1',
    )
    p.add_argument("--balance", choices=("isl", "round_robin", "least_pending"), default="isl")
    p.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds for every server to become ready")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds without data on a request")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--min-duration-ms", type=int, default=None)
    p.add_argument("--min-query-count", type=int, default=None)
    p.add_argument("--offline-expected-qps", type=float, default=None)
    p.add_argument("--progress-interval-s", type=float, default=30.0)
    p.add_argument("--server-log-dir", type=Path, default=None, help="one log per server (default: beside --out)")
    p.add_argument("--meta-json", default="{}", help="configuration fields for shard.json (JSON or file)")
    return p


# descriptors the LoadGen process needs besides its connections (logs, parquet, pipes)
FILE_DESCRIPTOR_MARGIN = 1024


def _check_connections(group, runs, batch_size, max_in_flight, prompts_per_request) -> None:
    """Each open request is one connection (HTTP/1.1): raise this process's open-file limit
    to what the runs need, up to the hard limit, or say at once which settings to change."""
    import resource

    servers = max(1, len(group.specs))
    in_flight = max_in_flight or batch_size * servers
    per_request = min((prompts_per_request or {}).get(run["scenario"], 1) for run in runs)
    needed = -(-in_flight // per_request) + servers + FILE_DESCRIPTOR_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise RackError(
                f"{in_flight} samples in flight in requests of {per_request} need ~{needed} open files, over this "
                f"process's hard limit {hard} (ulimit -Hn): raise it, or set rack_run.prompts_per_request "
                "(fewer, larger requests) or rack_run.max_in_flight"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _prompts_per_request(value) -> dict:
    """{scenario: samples per request} from the CLI's JSON; RackError names what is wrong."""
    from rackbench.harness import SCENARIOS

    if not isinstance(value, dict):
        raise RackError(f"--prompts-per-request-json must be an object of scenario: count, got {value!r}")
    for scenario, count in value.items():
        if scenario not in SCENARIOS:
            raise RackError(f"--prompts-per-request-json: unknown scenario {scenario!r}; known: {list(SCENARIOS)}")
        if type(count) is not int or count < 1:
            raise RackError(f"--prompts-per-request-json: {scenario} must be an integer >= 1, got {count!r}")
    return value


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    log_dir = args.server_log_dir or out.parent / f".{out.name}.servers"
    try:
        if args.server_kind == "rackbench" and args.engine_dir is None:
            raise RackError("server kind rackbench needs --engine-dir")
        if (args.runs_json is None) == (args.scenario is None):
            raise RackError("give either --runs-json or --scenario (one run)")
        runs = (
            json_arg(args.runs_json)
            if args.runs_json is not None
            else run_list(args.scenario, args.target_qps, accuracy=not args.no_accuracy)
        )
        specs = server_specs(
            kind=args.server_kind,
            servers=args.servers,
            gpus_per_server=args.gpus_per_server,
            launcher=args.launcher,
            engine_dir=args.engine_dir,
            backend=args.backend,
            engine_settings=json_arg(args.engine_settings_json),
            command=args.server_command,
            urls=args.urls,
            server_model=args.server_model,
            tokenizer=args.tokenizer,
            extra_llm_api_options=args.extra_llm_api_options,
            max_batch_size=args.batch_size,
            max_num_tokens=args.max_num_tokens,
            trtllm_backend=args.trtllm_backend,
            base_port=args.base_port,
            cpus_per_server=args.cpus_per_server,
            mem_per_server=args.mem_per_server,
            log_dir=log_dir,
        )
        if args.server_kind != "urls" and len(specs) != args.servers:
            raise RackError(f"{len(specs)} server specs for --servers {args.servers}")
        records = run_rack(
            launch.ServerGroup(specs, log_dir=log_dir),
            dataset=args.dataset,
            out_dir=out,
            runs=runs,
            audit_config=args.audit_config,
            batch_size=args.batch_size,
            max_in_flight=args.max_in_flight,
            prompts_per_request=_prompts_per_request(json_arg(args.prompts_per_request_json)),
            max_new_tokens=args.max_new_tokens,
            balance=args.balance,
            ready_timeout=args.ready_timeout,
            min_duration_ms=args.min_duration_ms,
            min_query_count=args.min_query_count,
            offline_expected_qps=args.offline_expected_qps,
            metadata=json_arg(args.meta_json),
            progress_interval_s=args.progress_interval_s,
            request_timeout=args.request_timeout,
        )
    except (RackError, launch.LaunchError) as exc:
        _log(f"error: {exc}")
        return 2
    except Exception as exc:
        from rackbench.endpoints import EndpointError

        if isinstance(exc, EndpointError):
            _log(f"error: {exc}")
            return 2
        raise
    _log(
        json.dumps(
            {name: {mode: rec["loadgen"]["result"] for mode, rec in modes.items()} for name, modes in records.items()}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
