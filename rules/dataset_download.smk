# download_dataset: MLPerf's processed OpenOrca files via MLCommons' R2 distribution,
# checked against the published MD5 list (and a recorded SHA-256 where the config pins
# one). A localrule: login nodes have the network. Only for datasets with a `download`
# section whose paths are the files this rule makes; a config naming a local copy skips it.

from rackbench.dataset_download import (  # noqa: E402
    checksum_path,
    download_args,
    download_dir,
    role_path,
)


# The outputs are the module's own paths, with the wildcard left in.
rule download_dataset:
    output:
        samples=role_path("{dataset}", "samples"),
        calibration=role_path("{dataset}", "calibration"),
        checksums=checksum_path("{dataset}"),
    log:
        paths.log_file("download_dataset"),
    localrule: True
    conda:
        RUN_ENV
    params:
        args=lambda wc: download_args(config["datasets"][wc.dataset]["download"]),
        out=lambda wc: download_dir(wc.dataset),
    shell:
        "python -m rackbench.dataset_download {params.args} --out {params.out} > {log} 2>&1"
