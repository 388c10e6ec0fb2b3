# report: aggregate every configuration's shards into tables and figures under
# results/report/. A localrule and a target (`snakemake report`): it reads
# results/ only and never reruns anything upstream by itself. Outputs are marked
# report() so `snakemake --report results/report.html` shows them with captions.


rule report:
    input:
        **report_inputs(),
    output:
        throughput=report("results/report/throughput.csv", caption="../report/throughput.rst", category="throughput"),
        shards=report("results/report/shards.csv", caption="../report/shards.rst", category="throughput"),
        markdown=report("results/report/report.md", caption="../report/report_md.rst", category="throughput"),
        provenance=report("results/report/provenance.csv", caption="../report/provenance.rst", category="provenance"),
        shard_throughput=report(
            multiext("results/report/shard_throughput", ".pdf", ".svg", ".png"),
            caption="../report/shard_throughput.rst",
            category="throughput",
        ),
        shard_timeline=report(
            multiext("results/report/shard_timeline", ".pdf", ".svg", ".png"),
            caption="../report/shard_timeline.rst",
            category="throughput",
        ),
        records=report(
            multiext("results/report/records", ".pdf", ".svg", ".png"),
            caption="../report/records.rst",
            category="throughput",
        ),
        efficiency=report(
            multiext("results/report/efficiency", ".pdf", ".svg", ".png"),
            caption="../report/efficiency.rst",
            category="throughput",
        ),
    params:
        gpu_types=as_json(GPU_TYPES),
        models=as_json(MODELS),
        out_dir=lambda wc, output: os.path.dirname(output.markdown),
    log:
        "results/logs/report.log",
    localrule: True
    conda:
        RUN_ENV
    shell:
        "python -m rackbench.report --shard-dirs {input.shards} --accuracy {input.accuracy}"
        " --gpu-types-json {params.gpu_types} --models-json {params.models} --out {params.out_dir} > {log} 2>&1"
