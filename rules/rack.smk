# rack_run: one LoadGen over every engine server of the rack (MLPerf's method; rackbench.rack).
# One job = one Slurm allocation of the layout's nodes: inside it one srun step per engine
# server, started once, then on the first node one LoadGen run after another: every run of
# the configuration (the scenarios' own, the Server sweep points, TEST06). Locally the same
# servers run as local processes.
# rack_accuracy: the accuracy gate (rackbench.accuracy, as rules/accuracy.smk) of one run.


rule rack_run:
    input:
        engine=lambda wc: configuration_of(wc).engine_dir,
        dataset=lambda wc: configuration_of(wc).dataset_file("samples"),
        orphans=settle_orphaned_slurm_jobs,
    output:
        directory(paths.RACK_SESSION_PATTERN),
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
        servers=lambda wc: plan.rack_servers(config, wc.backend),
        gpus_per_server=lambda wc: (
            plan.replica_gpus(config, wc.backend) if GPU_TYPES[wc.gpu_type]["kind"] == "gpu" else 0
        ),
        server=rack_server_args,
        runs=rack_session_args,
        engine_settings=lambda wc: as_json(config["engines"][wc.backend]),
        cpus_per_server=lambda wc: GPU_TYPES[wc.gpu_type]["slurm"]["cpus_per_gpu"]
        * plan.replica_gpus(config, wc.backend),
        mem_per_server=lambda wc: f"{GPU_TYPES[wc.gpu_type]['slurm']['mem_mb_per_gpu'] * plan.replica_gpus(config, wc.backend)}M",
        max_in_flight=lambda wc: f"--max-in-flight {RACK_RUN['max_in_flight']}" if RACK_RUN["max_in_flight"] else "",
        prompts_per_request=as_json(RACK_RUN["prompts_per_request"]),
        meta=lambda wc: as_json({**fields_of(wc), "variant": wc.variant}),
        base_port=RACK_RUN["base_port"],
        balance=RACK_RUN["balance"],
        ready_timeout=RACK_RUN["ready_timeout_s"],
        max_new_tokens=RUN["max_new_tokens"],
        min_duration_ms=RUN["min_duration_ms"],
        min_query_count=RUN["min_query_count"],
        progress_s=RUN["progress_interval_s"],
        settings=write_settings("rack_run"),
        placement=lambda wc: rack_placement(wc),
        run_names=lambda wc: ", ".join(run["name"] for run in rack_session_runs(wc)),
    message:
        "rack_run of {wildcards.model}/{wildcards.recipe} on {wildcards.backend}/{wildcards.gpu_type}:"
        " one LoadGen at a time over {params.servers} engine server(s) ({params.server}); {params.placement};"
        " runs {params.run_names}"
    shell:
        "{params.settings} > {log} 2>&1 && python -m rackbench.rack --engine-dir {input.engine}"
        " --dataset {input.dataset} --out {output} {params.runs} --servers {params.servers}"
        " --gpus-per-server {params.gpus_per_server} {params.server} --backend {wildcards.backend}"
        " --engine-settings-json {params.engine_settings} --base-port {params.base_port}"
        " --cpus-per-server {params.cpus_per_server} --mem-per-server {params.mem_per_server}"
        " --batch-size {wildcards.batch_size} {params.max_in_flight} --balance {params.balance}"
        " --prompts-per-request-json {params.prompts_per_request}"
        " --ready-timeout {params.ready_timeout} --max-new-tokens {params.max_new_tokens}"
        " --min-duration-ms {params.min_duration_ms} --min-query-count {params.min_query_count}"
        " --progress-interval-s {params.progress_s} --meta-json {params.meta} >> {log} 2>&1"


rule rack_accuracy:
    input:
        session=paths.RACK_SESSION_PATTERN,
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
        run=rack_accuracy_run,
    shell:
        "python -m rackbench.accuracy --dataset {input.dataset} --tokenizer {input.tokenizer}"
        " --shard-dirs {params.run} --accuracy-json {params.accuracy}"
        " --out-json {output.json} --out-txt {output.txt} > {log} 2>&1"
