# MLCommons' own checks on one-LoadGen runs (issue 13), with the tools of the user's
# mlcommons/inference checkout (config mlcommons.inference_dir):
#   test06            run_verification.py on the TEST06 run that the rack session made
#                     with TEST06's audit.config (per configuration and scenario;
#                     rackbench.compliance, rackbench.rack)
#   submission_tree   closed/<submitter>/{systems,results,src} (rackbench.submission build)
#   submission_check  MLCommons' submission checker; its verdict is data (exit 0 either way)
# and the report shows all three. Not planned where no checkout is configured (or it is
# not one); the report then says so and why.

# The input functions and settings of these rules are in rules/common.smk
# ("MLCommons' checks").


# ---- rules ------------------------------------------------------------------------
rule test06:
    input:
        session=lambda wc: configuration_of(wc).rack_session_dir,
    output:
        test06=directory(paths.TEST06_PATTERN),
    log:
        paths.log_file("test06"),
    localrule: True
    conda:
        RUN_ENV
    params:
        inference_dir=MLCOMMONS_DIR,
        run=test06_run_of,
        scenario=lambda wc: checked_scenario(wc),
        settings=write_settings("mlcommons"),
    message:
        "TEST06 {wildcards.scenario} of {wildcards.model}/{wildcards.recipe} on {wildcards.backend}/{wildcards.gpu_type}"
        " (layout {wildcards.layout}, batch {wildcards.batch_size}): run_verification.py on the rack session's TEST06 run"
    shell:
        "{params.settings} > {log} 2>&1 && python -m rackbench.compliance verify"
        " --inference-dir {params.inference_dir} --scenario {params.scenario} --compliance-dir {params.run}"
        " --out {output.test06} >> {log} 2>&1"


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
