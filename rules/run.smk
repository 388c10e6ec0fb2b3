# run_shard: one MLPerf LoadGen run per shard and mode (the per-shard method), each its own
# job (its own Slurm job on a cluster), so all shards of a configuration can run at once.

from rackbench.trtllm_launch import launch_prefix  # noqa: E402


rule run_shard:
    input:
        engine=lambda wc: configuration_of(wc).engine_dir,
        dataset=lambda wc: configuration_of(wc).dataset_file("samples"),
        orphans=settle_orphaned_slurm_jobs,  # a shard as target: wait for an earlier run's jobs first
    output:
        directory(paths.SHARD_PATTERN),
    log:
        paths.log_file("run_shard"),
    # before the rack session, which needs the same GPUs (cores, on a CPU host) all at once: by
    # priority, not by a file dependency, so a redone shard never makes Snakemake redo the session
    priority: 1
    conda:
        RUN_ENV
    container:
        engine_container
    threads: shard_threads
    resources:
        **job_resources(lambda wc: wc.gpu_type, shard_gpus),
    params:
        launch=lambda wc: launch_prefix(wc.backend),  # trtllm-llmapi-launch for TensorRT-LLM (rackbench.trtllm_launch)
        num_shards=lambda wc: parse_layout(wc.layout)[0],
        gpus_per_shard=shard_gpus,
        shard_mode=shard_mode,
        max_new_tokens=RUN["max_new_tokens"],
        min_duration_ms=RUN["min_duration_ms"],
        min_query_count=RUN["min_query_count"],
        expected_qps=RUN["offline_expected_qps"],
        progress_s=RUN["progress_interval_s"],
        gpu_types=lambda wc: as_json({wc.gpu_type: GPU_TYPES[wc.gpu_type]}),
        engine_settings=lambda wc: as_json(config["engines"][wc.backend]),
        placement=lambda wc: placement(wc, shard_gpus(wc)),
        meta=lambda wc: as_json({**fields_of(wc), "variant": wc.variant}),
        settings=write_settings("run_shard"),
        barrier=shard_start_barrier_args,
    message:
        "run_shard {wildcards.mode} shard {wildcards.shard} of {wildcards.model}/{wildcards.recipe} on"
        " {wildcards.backend}/{wildcards.gpu_type} (layout {wildcards.layout}, batch {wildcards.batch_size}):"
        " {params.placement}"
    shell:
        "{params.settings} > {log} 2>&1 && {params.launch}python -m rackbench.harness --engine-dir {input.engine}"
        " --dataset {input.dataset} --out {output}"
        " --mode {wildcards.mode} --shard-index {wildcards.shard} --num-shards {params.num_shards}"
        " --shard-mode {params.shard_mode} --gpus-per-shard {params.gpus_per_shard}"
        " --batch-size {wildcards.batch_size} --max-new-tokens {params.max_new_tokens}"
        " --min-duration-ms {params.min_duration_ms} --min-query-count {params.min_query_count}"
        " --offline-expected-qps {params.expected_qps} --progress-interval-s {params.progress_s}"
        " --gpu-types-json {params.gpu_types} --engine-settings-json {params.engine_settings}"
        " --meta-json {params.meta} {params.barrier} >> {log} 2>&1"
