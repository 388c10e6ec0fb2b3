# prepare_dataset: the MLPerf OpenOrca pickles, checksum-verified, as parquet.


rule prepare_dataset:
    input:
        samples=lambda wc: dataset_source(wc, "samples"),
        calibration=lambda wc: dataset_source(wc, "calibration"),
        checksums=dataset_checksum_inputs,
    output:
        samples=paths.pattern(paths.DATASET_PATTERN, part="samples"),
        calibration=paths.pattern(paths.DATASET_PATTERN, part="calibration"),
    log:
        paths.log_file("prepare_dataset"),
    conda:
        RUN_ENV
    params:
        samples_checksum=lambda wc: dataset_checksum_arg(wc, "samples"),
        calibration_checksum=lambda wc: dataset_checksum_arg(wc, "calibration"),
        expect_rows=expected_rows,
        settings=write_settings("prepare_dataset"),
    shell:
        "{params.settings} > {log} 2>&1 && python -m rackbench.dataset"
        " --pickle {input.samples} --out {output.samples} --checksum {params.samples_checksum}"
        " --expect-rows {params.expect_rows}"
        " --pickle {input.calibration} --out {output.calibration} --checksum {params.calibration_checksum}"
        " --expect-rows 0 >> {log} 2>&1"
