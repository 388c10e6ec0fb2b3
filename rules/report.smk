# report: aggregate every configuration's shards into tables and figures under
# results/report/. A localrule and a target (`snakemake report`): it reads
# results/ only and never reruns anything upstream by itself.

FIGURES = ["shard_throughput", "shard_timeline", "records", "efficiency"]


rule report:
    input:
        **report_inputs(),
    output:
        throughput="results/report/throughput.csv",
        shards="results/report/shards.csv",
        markdown="results/report/report.md",
        provenance="results/report/provenance.csv",
        figures=expand("results/report/{figure}.{ext}", figure=FIGURES, ext=["pdf", "svg", "png"]),
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
