# download_model: a pinned Hugging Face revision (or a local directory) with a
# verified sha256 manifest. A localrule: login nodes have the network.
# The token comes from $HF_TOKEN in the environment and is never a parameter.


rule download_model:
    input:
        model_source_input,
    output:
        directory(paths.SNAPSHOT_PATTERN),
    log:
        paths.log_file("download_model"),
    localrule: True
    conda:
        RUN_ENV
    params:
        source=model_source_args,
        settings=write_settings("download_model"),
    shell:
        "{params.settings} > {log} 2>&1" " && python -m rackbench.download {params.source} --out {output} >> {log} 2>&1"
