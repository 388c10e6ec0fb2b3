# download_model: a pinned Hugging Face revision (or a local directory) with a
# verified sha256 manifest. A localrule: login nodes have the network.
# The token comes from $HF_TOKEN in the environment and is never a parameter.


rule download_model:
    input:
        model_source_input,
    output:
        directory("results/models/{model}/snapshot"),
    params:
        source=model_source_args,
    log:
        "results/logs/download_model/{model}.log",
    localrule: True
    conda:
        RUN_ENV
    shell:
        "python -m rackbench.download {params.source} --out {output} > {log} 2>&1"
