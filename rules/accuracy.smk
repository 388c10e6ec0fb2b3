# accuracy: ROUGE-1/2/L and tokens/sample over the accuracy-mode shards, as
# MLPerf's evaluate-accuracy.py computes them, gated against the model's targets.


rule accuracy:
    input:
        shards=accuracy_shard_inputs,
        dataset=lambda wc: dataset_file_of(wc.model, "samples"),
        tokenizer=lambda wc: snapshot_of(wc.model),
    output:
        json=report(
            paths.ACCURACY_JSON_PATTERN,
            caption="../report/accuracy.rst",
            category="accuracy",
            subcategory=paths.ACCURACY_SUBCATEGORY,
        ),
        txt=paths.ACCURACY_TXT_PATTERN,
    log:
        paths.log_file("accuracy"),
    conda:
        RUN_ENV
    params:
        accuracy=lambda wc: as_json(MODELS[wc.model]["accuracy"]),
        settings=write_settings("accuracy"),
    shell:
        "{params.settings} > {log} 2>&1 && python -m rackbench.accuracy --dataset {input.dataset}"
        " --tokenizer {input.tokenizer} --shard-dirs {input.shards} --accuracy-json {params.accuracy}"
        " --out-json {output.json} --out-txt {output.txt} >> {log} 2>&1"
