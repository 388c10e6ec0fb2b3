# MLCommons' own checks on one-LoadGen runs (issue 13), with the tools of the user's
# mlcommons/inference checkout (config mlcommons.inference_dir):
#   test06            LoadGen with TEST06's audit.config, then run_verification.py
#                     (per configuration and scenario; rackbench.compliance)
#   submission_tree   closed/<submitter>/{systems,results,src} (rackbench.submission build)
#   submission_check  MLCommons' submission checker; its verdict is data (exit 0 either way)
# and the report shows all three. Not planned where no checkout is configured (or it is
# not one); the report then says so and why.

from rackbench import benchmarks, compliance, submission  # noqa: E402


def mlcommons_checkout():
    """(the checkout's absolute path, None), or (None, why TEST06 and the checker do not run)."""
    configured = config["mlcommons"]["inference_dir"]
    if configured is None:
        return None, (
            "mlcommons.inference_dir is null, so TEST06, the submission tree and MLCommons' submission "
            "checker were not run (set it to your clone of https://github.com/mlcommons/inference)"
        )
    path = Path(configured)
    if not path.is_absolute():  # relative to the workflow's folder, as config.yaml says
        path = Path(workflow.basedir) / path
    try:
        return str(compliance.checkout(path)), None
    except compliance.ComplianceError as err:
        return None, f"mlcommons.inference_dir {configured!r}: {err}; TEST06 and the checker were not run"


MLCOMMONS_DIR, MLCOMMONS_SKIPPED = mlcommons_checkout()
ONE_LOADGEN_METHOD = "the per-shard sum (method a)"


# ---- the input side: which runs are one LoadGen for the whole system --------------
# The one place that says it (the rack-wide runs re-point these two functions).
def one_loadgen_runs(cfg):
    """{scenario: {"performance": run dir, "accuracy": run dir}} of configuration ``cfg``'s
    one-LoadGen runs. A per-shard layout is one LoadGen for the system only with ONE
    shard (1xG); any other layout gives {} (a sum of LoadGen runs: no tree)."""
    if cfg.num_shards != 1:
        return {}
    return {"Offline": {mode: cfg.shard_dirs(mode)[0] for mode in ("performance", "accuracy")}}


def test06_harness_args(wildcards):
    """rackbench.harness arguments of the TEST06 run (it adds --mode performance and --out):
    the one-LoadGen run of ``one_loadgen_runs``, with the run step's settings."""
    cfg = configuration_of(wildcards)
    return " ".join(
        [
            f"--engine-dir {cfg.engine_dir} --dataset {cfg.dataset_file('samples')}",
            f"--shard-index 0 --num-shards 1 --shard-mode {RUN['performance_shard_mode']}",
            f"--gpus-per-shard {shard_gpus(wildcards)} --batch-size {cfg.batch_size}",
            f"--max-new-tokens {RUN['max_new_tokens']} --min-duration-ms {RUN['min_duration_ms']}",
            f"--min-query-count {RUN['min_query_count']} --offline-expected-qps {RUN['offline_expected_qps']}",
            f"--progress-interval-s {RUN['progress_interval_s']}",
            f"--gpu-types-json {as_json({cfg.gpu_type: GPU_TYPES[cfg.gpu_type]})}",
            f"--engine-settings-json {as_json(config['engines'][cfg.backend])}",
            f"--meta-json {as_json({**cfg.fields, 'variant': wildcards.variant, 'test': compliance.TEST06})}",
        ]
    )


# ---- what is planned --------------------------------------------------------------
def mlcommons_variant(cfg):
    return step_variant("mlcommons", *cfg.fields.values())


def mlcommons_configurations():
    return [cfg for cfg in CONFIGURATIONS if one_loadgen_runs(cfg)] if MLCOMMONS_DIR else []


def one_loadgen_runs_of(wildcards):
    runs = one_loadgen_runs(configuration_of(wildcards))
    if not runs:
        raise WorkflowError(f"{dict(wildcards)} has no one-LoadGen run: no TEST06 or submission tree")
    return runs


def checked_scenario(wildcards):
    if wildcards.scenario not in one_loadgen_runs_of(wildcards):
        raise WorkflowError(f"{dict(wildcards)}: no one-LoadGen {wildcards.scenario} run to test")
    return wildcards.scenario


def test06_dirs_of(cfg):
    return {s: paths.test06_dir(cfg.fields, mlcommons_variant(cfg), s) for s in one_loadgen_runs(cfg)}


def submission_inputs(wildcards):
    cfg = configuration_of(wildcards)
    inputs = {"accuracy_txt": paths.accuracy_txt(cfg.fields, cfg.accuracy_variant)}
    for scenario, runs in one_loadgen_runs_of(wildcards).items():
        inputs.update({f"{scenario}_{mode}": run for mode, run in runs.items()})
    inputs.update({f"{scenario}_test06": d for scenario, d in test06_dirs_of(cfg).items()})
    return inputs


def submission_runs_json(wildcards, input):
    return as_json(
        {
            scenario: {
                "performance": input[f"{scenario}_performance"],
                "accuracy": input[f"{scenario}_accuracy"],
                "accuracy_txt": input.accuracy_txt,
                "test06": f"{input[scenario + '_test06']}/{compliance.TEST06}",
            }
            for scenario in one_loadgen_runs_of(wildcards)
        }
    )


def benchmark_of(model):
    return MODELS[model]["accuracy"].get("benchmark") or benchmarks.DEFAULT_BENCHMARK


def mlcommons_report_inputs():
    cfgs = mlcommons_configurations()
    return {
        "test06": [d for cfg in cfgs for d in test06_dirs_of(cfg).values()],
        "checker_verdicts": [paths.checker_verdict(cfg.fields, mlcommons_variant(cfg)) for cfg in cfgs],
    }


def mlcommons_report_args(wildcards, input):
    """The report's arguments for MLCommons' checks: TEST06 folders, verdicts, why no tree, or why not run."""
    if MLCOMMONS_SKIPPED:
        return f"--mlcommons-skipped {shlex.quote(MLCOMMONS_SKIPPED)}"
    no_tree = {
        cfg.key: submission.no_tree_reason(ONE_LOADGEN_METHOD, cfg.num_shards)
        for cfg in CONFIGURATIONS
        if not one_loadgen_runs(cfg)
    }
    test06 = " ".join(f"{d}/{compliance.TEST06}" for d in input.test06)
    return f"--test06 {test06} --checker-verdicts {' '.join(input.checker_verdicts)} --no-tree-json {as_json(no_tree)}"


# ---- rules ------------------------------------------------------------------------
rule test06:
    input:
        engine=lambda wc: configuration_of(wc).engine_dir,
        dataset=lambda wc: configuration_of(wc).dataset_file("samples"),
    output:
        run=directory(paths.TEST06_RUN_PATTERN),
        test06=directory(paths.TEST06_PATTERN),
    log:
        paths.log_file("test06"),
    conda:
        RUN_ENV
    container:
        engine_container
    threads: shard_threads
    resources:
        **job_resources(lambda wc: wc.gpu_type, shard_gpus),
    params:
        launch=lambda wc: launch_prefix(wc.backend),
        inference_dir=MLCOMMONS_DIR,
        harness=test06_harness_args,
        scenario=lambda wc: checked_scenario(wc),
        settings=write_settings("mlcommons"),
    message:
        "TEST06 {wildcards.scenario} of {wildcards.model}/{wildcards.recipe} on {wildcards.backend}/{wildcards.gpu_type}"
        " (layout {wildcards.layout}, batch {wildcards.batch_size})"
    shell:
        "{params.settings} > {log} 2>&1 && {params.launch}python -m rackbench.compliance test06"
        " --inference-dir {params.inference_dir} --scenario {params.scenario} --run-dir {output.run}"
        " --out {output.test06} -- {params.harness} >> {log} 2>&1"


rule submission_tree:
    input:
        unpack(submission_inputs),
    output:
        directory(paths.SUBMISSION_TREE_PATTERN),
    log:
        paths.log_file("submission_tree"),
    localrule: True
    conda:
        RUN_ENV
    params:
        inference_dir=MLCOMMONS_DIR,
        runs=submission_runs_json,
        submitter=config["mlcommons"]["submitter"],
        system_name=lambda wc: plan.system_name(config, wc.gpu_type),
        benchmark=lambda wc: benchmark_of(wc.model),
        gpu_type=lambda wc: as_json(GPU_TYPES[wc.gpu_type]),
        rack=lambda wc: f"--nodes {config['rack']['nodes']} --gpus-per-node {config['rack']['gpus_per_node']}",
        model_source=lambda wc: as_json(MODELS[wc.model]["source"]),
        status=config["mlcommons"]["status"],
        settings=write_settings("mlcommons"),
    shell:
        "{params.settings} > {log} 2>&1 && python -m rackbench.submission build --out {output}"
        " --inference-dir {params.inference_dir} --submitter {params.submitter} --system-name {params.system_name}"
        " --benchmark {params.benchmark} --runs-json {params.runs} --gpu-type {wildcards.gpu_type}"
        " --gpu-type-json {params.gpu_type} {params.rack} --recipe {wildcards.recipe} --backend {wildcards.backend}"
        " --model-source-json {params.model_source} --status {params.status} >> {log} 2>&1"


# The last step before the report. The verdict (pass or refused, every message) is data:
# the step succeeds either way; it fails only where the checker gives no verdict at all.
rule submission_check:
    input:
        tree=paths.SUBMISSION_TREE_PATTERN,
    output:
        verdict=paths.CHECKER_VERDICT_PATTERN,
    log:
        paths.log_file("submission_check"),
    localrule: True
    conda:
        RUN_ENV
    params:
        inference_dir=MLCOMMONS_DIR,
        version=lambda wc: benchmarks.round_for(benchmark_of(wc.model)),
        submitter=config["mlcommons"]["submitter"],
        csv=lambda wc, output: os.path.splitext(output.verdict)[0] + ".csv",
        settings=write_settings("mlcommons"),
    shell:
        "{params.settings} > {log} 2>&1 && python -m rackbench.submission check --tree {input.tree}"
        " --inference-dir {params.inference_dir} --version {params.version} --submitter {params.submitter}"
        " --csv {params.csv} --out-json {output.verdict} >> {log} 2>&1"
