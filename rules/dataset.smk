# prepare_dataset: the MLPerf OpenOrca pickles, checksum-verified, as parquet.


rule prepare_dataset:
    input:
        samples=lambda wc: dataset_file(wc, "samples"),
        calibration=lambda wc: dataset_file(wc, "calibration"),
        checksums=dataset_checksum_inputs,
    output:
        samples="results/datasets/{dataset}/samples.parquet",
        calibration="results/datasets/{dataset}/calibration.parquet",
    params:
        samples_checksum=lambda wc: dataset_checksum_arg(wc, "samples"),
        calibration_checksum=lambda wc: dataset_checksum_arg(wc, "calibration"),
        expect_rows=lambda wc: config["datasets"][wc.dataset].get("num_samples", 0),
    log:
        "results/logs/prepare_dataset/{dataset}.log",
    conda:
        RUN_ENV
    shell:
        "python -m rackbench.dataset"
        " --pickle {input.samples} --out {output.samples} --checksum {params.samples_checksum}"
        " --expect-rows {params.expect_rows}"
        " --pickle {input.calibration} --out {output.calibration} --checksum {params.calibration_checksum}"
        " --expect-rows 0 > {log} 2>&1"
