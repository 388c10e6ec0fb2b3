# rackbench: one declarative workflow from model download to paper-ready report.
#
#   snakemake --cores 2                                   # the embedded CPU demo (config.yaml)
#   snakemake --configfile config/llama2-70b-gb300.yaml \
#       --workflow-profile profiles/slurm                 # the GB300 NVL72 rack
#
# Steps: download_model -> prepare_dataset -> quantize -> build_engine ->
# run_shard (one job per shard) -> accuracy -> [one-LoadGen runs: test06 ->
# submission_tree -> submission_check] -> report. Logic lives in
# scripts/rackbench/; rules only call it.

from snakemake.utils import min_version

min_version("9.0")

# The demo config is the default; a --configfile given on the command line
# replaces it rather than being merged into it.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


include: "rules/common.smk"


# The wildcards and their constraints are rackbench.paths' (one list for all rules).
wildcard_constraints:
    **paths.WILDCARD_CONSTRAINTS,


include: "rules/demo.smk"
include: "rules/download.smk"
include: "rules/dataset_download.smk"
include: "rules/dataset.smk"
include: "rules/quantize.smk"
include: "rules/engine.smk"
include: "rules/run.smk"
include: "rules/accuracy.smk"
include: "rules/rack.smk"
include: "rules/mlcommons.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        rules.report.output,
        settle_orphaned_slurm_jobs,  # first: wait for an earlier run's Slurm jobs (rules/common.smk)
