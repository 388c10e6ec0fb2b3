# accuracy: ROUGE-1/2/L and tokens/sample over the accuracy-mode shards, as
# MLPerf's evaluate-accuracy.py computes them, gated against the model's targets.


rule accuracy:
    input:
        shards=accuracy_shard_inputs,
        dataset=lambda wc: f"results/datasets/{dataset_of(wc.model)}/samples.parquet",
        tokenizer=lambda wc: snapshot_dir(wc.model),
    output:
        json=report(
            "results/accuracy/{model}/{recipe}/{backend}/{gpu}/bs{bs}/{layout}/accuracy.json",
            caption="../report/accuracy.rst",
            category="accuracy",
            subcategory="{model}/{recipe}/{backend}/{gpu}/bs{bs}/{layout}",
        ),
        txt="results/accuracy/{model}/{recipe}/{backend}/{gpu}/bs{bs}/{layout}/accuracy.txt",
    params:
        accuracy=lambda wc: as_json(MODELS[wc.model]["accuracy"]),
    log:
        "results/logs/accuracy/{model}-{recipe}-{backend}-{gpu}-bs{bs}-{layout}.log",
    conda:
        RUN_ENV
    shell:
        "python -m rackbench.accuracy --dataset {input.dataset} --tokenizer {input.tokenizer}"
        " --shard-dirs {input.shards} --accuracy-json {params.accuracy}"
        " --out-json {output.json} --out-txt {output.txt} > {log} 2>&1"
