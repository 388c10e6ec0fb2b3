# run_shard: one MLPerf LoadGen Offline run per shard, each its own job (its own
# Slurm job on a cluster), so all shards of a configuration can run at once.


rule run_shard:
    input:
        engine=lambda wc: engine_dir(wc.model, wc.recipe, wc.backend, wc.gpu),
        dataset=lambda wc: f"results/datasets/{dataset_of(wc.model)}/samples.parquet",
        orphans=settle_orphaned_slurm_jobs,  # a shard as target: wait for an earlier run's jobs first
    output:
        directory("results/runs/{model}/{recipe}/{backend}/{gpu}/bs{bs}/{layout}/{mode}/shard{shard}"),
    params:
        num_shards=lambda wc: parse_layout(wc.layout)[0],
        gpus_per_shard=shard_gpus,
        shard_mode=shard_mode,
        max_new_tokens=RUN.get("max_new_tokens", 1024),
        min_duration_ms=RUN.get("min_duration_ms", 600000),
        min_query_count=RUN.get("min_query_count", 1),
        expected_qps=RUN.get("offline_expected_qps", 1),
        progress_s=RUN.get("progress_interval_s", 30),
        gpu_types=lambda wc: as_json({wc.gpu: GPU_TYPES[wc.gpu]}),
        settings=lambda wc: as_json(config["engines"][wc.backend]),
        placement=lambda wc: placement(wc, shard_gpus(wc)),
        meta=lambda wc: as_json({k: wc[k] for k in ("model", "recipe", "backend", "gpu", "bs", "layout")}),
    message:
        "run_shard {wildcards.mode} shard {wildcards.shard} of {wildcards.model}/{wildcards.recipe} on"
        " {wildcards.backend}/{wildcards.gpu} (layout {wildcards.layout}, batch {wildcards.bs}): {params.placement}"
    log:
        "results/logs/run_shard/{model}-{recipe}-{backend}-{gpu}-bs{bs}-{layout}-{mode}-shard{shard}.log",
    threads: shard_threads
    resources:
        **job_resources(lambda wc: wc.gpu, shard_gpus),
    conda:
        RUN_ENV
    container:
        engine_container
    shell:
        "python -m rackbench.harness --engine-dir {input.engine} --dataset {input.dataset} --out {output}"
        " --mode {wildcards.mode} --shard-index {wildcards.shard} --num-shards {params.num_shards}"
        " --shard-mode {params.shard_mode} --gpus-per-shard {params.gpus_per_shard}"
        " --batch-size {wildcards.bs} --max-new-tokens {params.max_new_tokens}"
        " --min-duration-ms {params.min_duration_ms} --min-query-count {params.min_query_count}"
        " --offline-expected-qps {params.expected_qps} --progress-interval-s {params.progress_s}"
        " --gpu-types-json {params.gpu_types} --engine-settings-json {params.settings}"
        " --meta-json {params.meta} > {log} 2>&1"
