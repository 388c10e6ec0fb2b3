# build_engine, per GPU type: an engine directory recording what it was built
# for (GPU type, compute capability, software versions, build settings). The
# run step refuses it anywhere else. TensorRT-LLM builds run in its container.

from rackbench.trtllm_launch import launch_prefix  # noqa: E402


rule build_engine:
    input:
        checkpoint="results/quantized/{model}/{recipe}/checkpoint",
        base_model=engine_base_model,
    output:
        directory("results/engines/{model}/{recipe}/{backend}/{gpu}/engine"),
    params:
        launch=lambda wc: launch_prefix(wc.backend),  # trtllm-llmapi-launch for TensorRT-LLM (rackbench.trtllm_launch)
        gpu_spec=lambda wc: as_json(GPU_TYPES[wc.gpu]),
        settings=lambda wc, input: as_json(engine_settings(wc, input)),
        placement=lambda wc: placement(wc, engine_gpus(wc)),
    message:
        "build_engine {wildcards.backend} engine of {wildcards.model}/{wildcards.recipe} for {wildcards.gpu}:"
        " {params.placement}"
    log:
        "results/logs/build_engine/{model}-{recipe}-{backend}-{gpu}.log",
    resources:
        **job_resources(lambda wc: wc.gpu, engine_gpus),
    conda:
        RUN_ENV
    container:
        engine_container
    shell:
        "{params.launch}python -m rackbench.build_engine --checkpoint {input.checkpoint} --out {output}"
        " --backend {wildcards.backend} --model {wildcards.model} --recipe {wildcards.recipe}"
        " --gpu-type {wildcards.gpu} --gpu-spec-json {params.gpu_spec}"
        " --settings-json {params.settings} > {log} 2>&1"
