# report: aggregate every configuration's shards into tables and figures under
# results/report/. A localrule and a target (`snakemake report`): it reads
# results/ only and never reruns anything upstream by itself. Outputs are marked
# report() so `snakemake --report results/report.html` shows them with captions.
# The report is told each configuration's fields and paths (it parses no path).


rule report:
    input:
        **report_inputs(),
        **mlcommons_report_inputs(),  # TEST06 and the checker's verdicts (rules/mlcommons.smk)
    output:
        throughput=report(paths.report_file("throughput"), caption="../report/throughput.rst", category="throughput"),
        shards=report(paths.report_file("shards"), caption="../report/shards.rst", category="throughput"),
        variants=paths.report_file("variants"),
        markdown=report(paths.report_file("markdown"), caption="../report/report_md.rst", category="throughput"),
        provenance=report(paths.report_file("provenance"), caption="../report/provenance.rst", category="provenance"),
        rack=paths.report_file("rack"),
        server_sweep=multiext(paths.report_figure("server_sweep"), *paths.FIGURE_FORMATS),
        shard_throughput=report(
            multiext(paths.report_figure("shard_throughput"), *paths.FIGURE_FORMATS),
            caption="../report/shard_throughput.rst",
            category="throughput",
        ),
        shard_timeline=report(
            multiext(paths.report_figure("shard_timeline"), *paths.FIGURE_FORMATS),
            caption="../report/shard_timeline.rst",
            category="throughput",
        ),
        records=report(
            multiext(paths.report_figure("records"), *paths.FIGURE_FORMATS),
            caption="../report/records.rst",
            category="throughput",
        ),
        efficiency=report(
            multiext(paths.report_figure("efficiency"), *paths.FIGURE_FORMATS),
            caption="../report/efficiency.rst",
            category="throughput",
        ),
    log:
        paths.log_file("report"),
    localrule: True
    conda:
        RUN_ENV
    params:
        configurations=as_json([cfg.report_entry() for cfg in CONFIGURATIONS]),
        gpu_types=as_json(GPU_TYPES),
        models=as_json(MODELS),
        out_dir=lambda wc, output: os.path.dirname(output.markdown),
        results=lambda wc: paths.RESULTS,
        mlcommons=mlcommons_report_args,
    shell:
        "python -m rackbench.report --configurations-json {params.configurations} --results {params.results}"
        " --gpu-types-json {params.gpu_types} --models-json {params.models} --out {params.out_dir}"
        " {params.mlcommons} > {log} 2>&1"
