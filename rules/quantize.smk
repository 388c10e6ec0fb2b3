# quantize: NVIDIA ModelOpt post-training quantization calibrated on the
# calibration set, exported with export_hf_checkpoint. CPU for the demo; a GPU
# node of quantization.gpu_type for the real model.

QUANT = config.get("quantization", {})


rule quantize:
    input:
        model=lambda wc: snapshot_dir(wc.model),
        calibration=lambda wc: f"results/datasets/{dataset_of(wc.model)}/calibration.parquet",
    output:
        directory("results/quantized/{model}/{recipe}/checkpoint"),
    params:
        samples=QUANT.get("calibration_samples", 512),
        batch_size=QUANT.get("calibration_batch_size", 1),
        max_seq_len=QUANT.get("calibration_max_seq_len", 1024),
        device=QUANT.get("device", "auto"),
    log:
        "results/logs/quantize/{model}-{recipe}.log",
    threads: 2
    resources:
        **job_resources(lambda wc: QUANT_GPU, lambda wc: QUANT.get("gpus", 1)),
    conda:
        RUN_ENV
    container:
        QUANT.get("container")
    shell:
        "python -m rackbench.quantize --model-dir {input.model} --calibration {input.calibration}"
        " --recipe {wildcards.recipe} --out {output} --calib-samples {params.samples}"
        " --calib-batch-size {params.batch_size} --calib-max-seq-len {params.max_seq_len}"
        " --device {params.device} > {log} 2>&1"
