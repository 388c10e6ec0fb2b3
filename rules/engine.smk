# build_engine, per GPU type: an engine directory recording what it was built
# for (GPU type, compute capability, software versions, build settings). The
# run step refuses it anywhere else. TensorRT-LLM builds run in its container.

from rackbench.trtllm_launch import launch_prefix  # noqa: E402


rule build_engine:
    input:
        checkpoint=lambda wc: checkpoint_of(wc.model, wc.recipe),
        base_model=engine_base_model,
    output:
        directory(paths.ENGINE_PATTERN),
    log:
        paths.log_file("build_engine"),
    conda:
        RUN_ENV
    container:
        engine_container
    resources:
        **job_resources(lambda wc: wc.gpu_type, engine_gpus),
    params:
        launch=lambda wc: launch_prefix(wc.backend),  # trtllm-llmapi-launch for TensorRT-LLM (rackbench.trtllm_launch)
        gpu_spec=lambda wc: as_json(GPU_TYPES[wc.gpu_type]),
        build_settings=lambda wc, input: as_json(engine_build_settings(wc, input)),
        placement=lambda wc: placement(wc, engine_gpus(wc)),
        settings=write_settings("build_engine"),
    message:
        "build_engine {wildcards.backend} engine of {wildcards.model}/{wildcards.recipe} for"
        " {wildcards.gpu_type}: {params.placement}"
    shell:
        "{params.settings} > {log} 2>&1 && {params.launch}python -m rackbench.build_engine --checkpoint {input.checkpoint}"
        " --out {output} --backend {wildcards.backend} --model {wildcards.model} --recipe {wildcards.recipe}"
        " --gpu-type {wildcards.gpu_type} --gpu-spec-json {params.gpu_spec}"
        " --settings-json {params.build_settings} >> {log} 2>&1"
