# rack_run: one LoadGen over every engine server of the rack (MLPerf's method; rackbench.rack).
# One job = one Slurm allocation of the layout's nodes: inside it one srun step per engine
# server, then the LoadGen on the first node. Locally the same servers run as local processes.
# rack_accuracy: the accuracy gate (rackbench.accuracy, as rules/accuracy.smk) on its accuracy run.


def rack_configuration_of(wildcards):
    cfg = configuration_of(wildcards)
    if wildcards.variant != cfg.rack_variant:
        raise WorkflowError(
            f"rack variant {wildcards.variant} of {cfg.key} is not the one this config makes ({cfg.rack_variant})"
        )
    return cfg


def rack_run_entry(wildcards):
    cfg = rack_configuration_of(wildcards)
    for entry in cfg.one_loadgen_runs():
        if entry["name"] == wildcards.rack_run:
            return entry
    raise WorkflowError(f"{wildcards.rack_run} is not one of {cfg.key}'s rack runs (rack_run in the config)")


def rack_nodes(wildcards):
    return config["rack"]["nodes"]


def rack_resources():
    """The allocation of the whole rack: every node, every GPU of each (GPU-type table)."""

    def spec(wc):
        return GPU_TYPES[wc.gpu_type]

    per_node = config["rack"]["gpus_per_node"]

    def gres(wc):
        s = spec(wc)
        return f"gpu:{s['slurm']['gpu_model']}:{per_node}" if s["kind"] == "gpu" else None

    def cpus(wc):
        return spec(wc)["slurm"]["cpus_per_gpu"] * per_node

    return {
        "nodes": rack_nodes,
        "gres": gres,
        "cpus_per_task": cpus,
        "mem_mb": lambda wc: spec(wc)["slurm"]["mem_mb_per_gpu"] * per_node,
        "runtime": lambda wc, attempt: spec(wc)["slurm"]["runtime_min"] * attempt,
        "slurm_partition": lambda wc: spec(wc)["slurm"].get("partition"),
    }


def rack_placement(wildcards):
    """The allocation, for the dry-run message: nodes, GPUs per node, container."""
    spec = GPU_TYPES[wildcards.gpu_type]
    per_node = config["rack"]["gpus_per_node"]
    if spec["kind"] != "gpu":
        return "CPU: servers as local processes (srun steps inside a Slurm allocation)"
    return (
        f"one Slurm allocation of {rack_nodes(wildcards)} node(s) x {per_node} {spec['slurm']['gpu_model']} GPU(s),"
        f" one srun --exact step per server, container {engine_container(wildcards) or 'none (conda env)'}"
    )


def rack_server_args(wildcards, input):
    """The server kind's arguments (rackbench.rack): what each engine server loads."""
    server = RACK_RUN["server"]
    args = [f"--server-kind {server['kind']}"]
    if server["kind"] == "command":
        args.append(f"--server-command {shlex.quote(server['command'])}")
    if server["kind"] == "urls":
        args.append("--urls " + " ".join(shlex.quote(u) for u in server["urls"]))
    if server["kind"] in ("trtllm-serve", "command") and wildcards.backend == "tensorrt-llm":
        trt = config["engines"]["tensorrt-llm"]
        args.append(f"--server-model {checkpoint_of(wildcards.model, wildcards.recipe)}")
        args.append(f"--tokenizer {snapshot_of(wildcards.model)}")
        args.append(f"--extra-llm-api-options {input.engine}/extra_llm_api_options.yaml")
        args.append(f"--trtllm-backend {trt['mode']} --max-num-tokens {trt['max_num_tokens']}")
    return " ".join(args)


def rack_scenario_args(wildcards):
    entry = rack_run_entry(wildcards)
    args = [f"--scenario {entry['scenario']}"]
    if entry["target_qps"] is not None:
        args.append(f"--target-qps {entry['target_qps']}")
    elif "Offline" in (RUN.get("rack_target_qps") or {}):
        args.append(f"--offline-expected-qps {RUN['rack_target_qps']['Offline']}")
    else:
        args.append(
            f"--offline-expected-qps {RUN['offline_expected_qps'] * plan.rack_servers(config, wildcards.backend)}"
        )
    if entry["accuracy"] is None:
        args.append("--no-accuracy")
    return " ".join(args)


def rack_threads(wildcards):
    if GPU_TYPES[wildcards.gpu_type]["kind"] == "cpu":  # the servers' engines and the LoadGen share the cores
        return config["engines"]["reference"]["torch_threads"] * plan.rack_servers(config, wildcards.backend)
    return GPU_TYPES[wildcards.gpu_type]["slurm"]["cpus_per_gpu"] * config["rack"]["gpus_per_node"]


RACK_RUN = config["rack_run"]


rule rack_run:
    input:
        engine=lambda wc: configuration_of(wc).engine_dir,
        dataset=lambda wc: configuration_of(wc).dataset_file("samples"),
        orphans=settle_orphaned_slurm_jobs,
        after=measured_before,  # on a CPU host: after the per-shard runs (the same cores)
    output:
        directory(paths.RACK_RUN_PATTERN),
    log:
        paths.log_file("rack_run"),
    conda:
        RUN_ENV
    container:
        engine_container
    threads: rack_threads
    resources:
        **rack_resources(),
    params:
        check=rack_run_entry,
        servers=lambda wc: plan.rack_servers(config, wc.backend),
        gpus_per_server=lambda wc: (
            plan.replica_gpus(config, wc.backend) if GPU_TYPES[wc.gpu_type]["kind"] == "gpu" else 0
        ),
        server=rack_server_args,
        scenario=rack_scenario_args,
        engine_settings=lambda wc: as_json(config["engines"][wc.backend]),
        cpus_per_server=lambda wc: GPU_TYPES[wc.gpu_type]["slurm"]["cpus_per_gpu"]
        * plan.replica_gpus(config, wc.backend),
        mem_per_server=lambda wc: f"{GPU_TYPES[wc.gpu_type]['slurm']['mem_mb_per_gpu'] * plan.replica_gpus(config, wc.backend)}M",
        max_in_flight=lambda wc: f"--max-in-flight {RACK_RUN['max_in_flight']}" if RACK_RUN["max_in_flight"] else "",
        meta=lambda wc: as_json({**fields_of(wc), "variant": wc.variant, "rack_run": wc.rack_run}),
        settings=write_settings("rack_run"),
        placement=lambda wc: rack_placement(wc),
    message:
        "rack_run {wildcards.rack_run} of {wildcards.model}/{wildcards.recipe} on {wildcards.backend}/{wildcards.gpu_type}:"
        " one LoadGen over {params.servers} engine server(s) ({params.server}); {params.placement}"
    shell:
        "{params.settings} > {log} 2>&1 && python -m rackbench.rack --engine-dir {input.engine}"
        " --dataset {input.dataset} --out {output} {params.scenario} --servers {params.servers}"
        " --gpus-per-server {params.gpus_per_server} {params.server} --backend {wildcards.backend}"
        " --engine-settings-json {params.engine_settings} --base-port {RACK_RUN[base_port]}"
        " --cpus-per-server {params.cpus_per_server} --mem-per-server {params.mem_per_server}"
        " --batch-size {wildcards.batch_size} {params.max_in_flight} --balance {RACK_RUN[balance]}"
        " --ready-timeout {RACK_RUN[ready_timeout_s]} --max-new-tokens {RUN[max_new_tokens]}"
        " --min-duration-ms {RUN[min_duration_ms]} --min-query-count {RUN[min_query_count]}"
        " --progress-interval-s {RUN[progress_interval_s]} --meta-json {params.meta} >> {log} 2>&1"


rule rack_accuracy:
    input:
        run=paths.RACK_RUN_PATTERN,
        dataset=lambda wc: dataset_file_of(wc.model, "samples"),
        tokenizer=lambda wc: snapshot_of(wc.model),
    output:
        json=paths.RACK_ACCURACY_JSON_PATTERN,
        txt=paths.RACK_ACCURACY_TXT_PATTERN,
    log:
        paths.log_file("rack_accuracy"),
    conda:
        RUN_ENV
    params:
        accuracy=lambda wc: as_json(MODELS[wc.model]["accuracy"]),
    shell:
        "python -m rackbench.accuracy --dataset {input.dataset} --tokenizer {input.tokenizer}"
        " --shard-dirs {input.run}/accuracy --accuracy-json {params.accuracy}"
        " --out-json {output.json} --out-txt {output.txt} > {log} 2>&1"
