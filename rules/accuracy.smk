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
        reference=lambda wc: as_json(MODELS[wc.model]["accuracy"]["reference"]),
        fraction=lambda wc: MODELS[wc.model]["accuracy"]["target_fraction"],
        tolerance=lambda wc: MODELS[wc.model]["accuracy"].get("tokens_per_sample_tolerance", 0.1),
    log:
        "results/logs/accuracy/{model}-{recipe}-{backend}-{gpu}-bs{bs}-{layout}.log",
    conda:
        RUN_ENV
    shell:
        "python -m rackbench.accuracy --dataset {input.dataset} --tokenizer {input.tokenizer}"
        " --shard-dirs {input.shards} --reference-json {params.reference}"
        " --target-fraction {params.fraction} --tokens-tolerance {params.tolerance}"
        " --out-json {output.json} --out-txt {output.txt} > {log} 2>&1"
