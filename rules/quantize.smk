# quantize: NVIDIA ModelOpt post-training quantization calibrated on the
# calibration set, exported with export_hf_checkpoint. CPU for the demo; a GPU
# node of quantization.gpu_type for the real model.


rule quantize:
    input:
        model=lambda wc: snapshot_of(wc.model),
        calibration=lambda wc: dataset_file_of(wc.model, "calibration"),
    output:
        directory(paths.CHECKPOINT_PATTERN),
    log:
        paths.log_file("quantize"),
    conda:
        RUN_ENV
    container:
        QUANT["container"]
    threads: 2
    resources:
        **job_resources(lambda wc: QUANT_GPU, lambda wc: QUANT["gpus"]),
    params:
        samples=QUANT["calibration_samples"],
        batch_size=QUANT["calibration_batch_size"],
        max_seq_len=QUANT["calibration_max_seq_len"],
        device=QUANT["device"],
        settings=write_settings("quantize"),
    shell:
        "{params.settings} > {log} 2>&1 && python -m rackbench.quantize --model-dir {input.model}"
        " --calibration {input.calibration} --recipe {wildcards.recipe} --out {output}"
        " --calib-samples {params.samples} --calib-batch-size {params.batch_size}"
        " --calib-max-seq-len {params.max_seq_len} --device {params.device} >> {log} 2>&1"
