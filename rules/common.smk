# Shared set-up: config validation and the input and resource functions
# that the rules use. Logic beyond lookups lives in rackbench.

import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

SCRIPTS_DIR = str(Path(workflow.basedir) / "scripts")
sys.path.insert(0, SCRIPTS_DIR)
# Jobs (local, Slurm, or in a container) import rackbench from this checkout.
# (Snakemake formats the prefix too, hence the doubled braces.)
shell.prefix("set -euo pipefail; export PYTHONPATH=%s${{PYTHONPATH:+:$PYTHONPATH}}; " % SCRIPTS_DIR)

from rackbench.config import ConfigError, check_config, configurations, dataset_size  # noqa: E402
from rackbench.shards import parse_layout  # noqa: E402

try:
    check_config(config)
except ConfigError as err:
    sys.exit(f"invalid config: {err}")
# Snakemake's own validation as well: it fills in the schema's defaults.
validate(config, "../scripts/rackbench/schemas/config.schema.yaml")

CONFIGURATIONS = configurations(config)
MODELS = config["models"]
GPU_TYPES = config["gpu_types"]
RUN = config["run"]
RUN_ENV = "../envs/rackbench.yaml"


def as_json(obj):
    """A config fragment as a shell-quoted JSON argument."""
    import json
    import shlex

    return shlex.quote(json.dumps(obj, sort_keys=True))


# ---- paths ---------------------------------------------------------------
def snapshot_dir(model):
    return f"results/models/{model}/snapshot"


def dataset_of(model):
    return MODELS[model]["dataset"]


def engine_dir(model, recipe, backend, gpu):
    return f"results/engines/{model}/{recipe}/{backend}/{gpu}/engine"


def shard_dirs(cfg, mode):
    """All shard output directories of one configuration in one LoadGen mode."""
    shards, _ = parse_layout(cfg.layout)
    return [f"results/runs/{cfg.key}/{mode}/shard{i}" for i in range(shards)]


def accuracy_json(cfg):
    return f"results/accuracy/{cfg.key}/accuracy.json"


def configuration_of(wildcards):
    for cfg in CONFIGURATIONS:
        if (cfg.model, cfg.recipe, cfg.backend, cfg.gpu, str(cfg.bs), cfg.layout) == (
            wildcards.model, wildcards.recipe, wildcards.backend, wildcards.gpu, wildcards.bs, wildcards.layout):
            return cfg
    raise WorkflowError(f"no configured benchmark matches {dict(wildcards)}")


# ---- input functions ------------------------------------------------------
def model_source_input(wildcards):
    """A local source made by the workflow itself (the demo) is an input; others are not."""
    local = MODELS[wildcards.model]["source"].get("local")
    return [local] if local and local.startswith("results/") else []


def model_source_args(wildcards):
    source = MODELS[wildcards.model]["source"]
    if "local" in source:
        return f"--local {source['local']}"
    return f"--repo-id {source['repo_id']} --revision {source['revision']}"


def dataset_file(wildcards, part):
    return config["datasets"][wildcards.dataset][part]["path"]


def dataset_checksum_inputs(wildcards):
    entries = [config["datasets"][wildcards.dataset][part] for part in ("samples", "calibration")]
    return sorted({e["sha256_file"] for e in entries if "sha256_file" in e})


def dataset_checksum_arg(wildcards, part):
    entry = config["datasets"][wildcards.dataset][part]
    return f"sha256:{entry['sha256']}" if "sha256" in entry else f"file:{entry['sha256_file']}"


def accuracy_shard_inputs(wildcards):
    return shard_dirs(configuration_of(wildcards), "accuracy")


def report_inputs():
    return {
        "shards": [d for cfg in CONFIGURATIONS for d in shard_dirs(cfg, "performance")],
        "accuracy": [accuracy_json(cfg) for cfg in CONFIGURATIONS],
    }


# ---- resources ------------------------------------------------------------
# GPU rules take their Slurm requests from the GPU-type table in the config, so
# a site changes config, not rules. CPU "GPU types" (the demo) request no GPU.
def gpus_of(gpu, count):
    return count if GPU_TYPES[gpu]["kind"] == "gpu" else 0


def slurm_resources(gpu, count):
    spec = GPU_TYPES[gpu]
    slurm = spec["slurm"]
    workers = max(count, 1)
    resources = {
        "mem_mb": slurm["mem_mb_per_gpu"] * workers,
        "runtime": slurm["runtime_min"],
    }
    if spec["kind"] == "gpu":
        resources.update(gpu=count, gpu_model=slurm["gpu_model"], cpus_per_gpu=slurm["cpus_per_gpu"])
    else:
        resources.update(cpus_per_task=slurm["cpus_per_gpu"] * workers)
    if slurm.get("partition"):
        resources["slurm_partition"] = slurm["partition"]
    return resources


def shard_gpus(wildcards):
    return parse_layout(wildcards.layout)[1]


def engine_gpus(wildcards):
    if wildcards.backend == "tensorrt-llm":
        settings = config["engines"]["tensorrt-llm"]
        return settings.get("tensor_parallel_size", 1) * settings.get("pipeline_parallel_size", 1)
    return 1


def job_resources(gpu_of, count_of):
    """Per-job Slurm resources, used as ``**job_resources(...)`` in a resources block.

    ``gpu_of`` and ``count_of`` map a job's wildcards to its GPU type and GPU
    count; a resource that is None stays unset, so CPU jobs request no GPU.
    """

    def lookup(key):
        if key == "runtime":  # a retry (after a time limit, say) asks for more time: runtime x attempt
            return lambda wildcards, attempt: slurm_resources(gpu_of(wildcards), count_of(wildcards))[key] * attempt
        return lambda wildcards: slurm_resources(gpu_of(wildcards), count_of(wildcards)).get(key)

    keys = ("gpu", "gpu_model", "cpus_per_gpu", "cpus_per_task", "mem_mb", "runtime", "slurm_partition")
    return {key: lookup(key) for key in keys}


def engine_container(wildcards):
    if wildcards.backend == "tensorrt-llm":
        return config["engines"]["tensorrt-llm"].get("container")
    return None


def engine_base_model(wildcards):
    """TensorRT-LLM's engine-build mode re-exports from the base model (with the
    saved ModelOpt state), so its builds read the downloaded snapshot too."""
    return [snapshot_dir(wildcards.model)] if wildcards.backend == "tensorrt-llm" else []


def engine_settings(wildcards, input):
    settings = dict(config["engines"][wildcards.backend])
    if input.base_model:
        settings["base_model_dir"] = input.base_model[0]
    return settings


def placement(wildcards, count):
    """Where a job runs, for its dry-run message: GPU request and container."""
    spec = GPU_TYPES[wildcards.gpu]
    where = f"{count} x {spec['slurm']['gpu_model']} GPU(s)" if spec["kind"] == "gpu" else "CPU"
    return f"{where}, container {engine_container(wildcards) or 'none (conda env)'}"


def shard_mode(wildcards):
    # Accuracy runs always split, so every sample is scored exactly once.
    return "split" if wildcards.mode == "accuracy" else RUN.get("performance_shard_mode", "split")


def shard_threads(wildcards):
    spec = GPU_TYPES[wildcards.gpu]
    if spec["kind"] == "cpu":
        return config["engines"].get("reference", {}).get("torch_threads", 1)
    return spec["slurm"]["cpus_per_gpu"] * shard_gpus(wildcards)


QUANT_GPU = config.get("quantization", {}).get("gpu_type") or next(iter(GPU_TYPES))


# ---- orphaned Slurm jobs (rackbench.slurm_jobs) ----------------------------
# A run killed while its Slurm jobs ran leaves them running. Before Snakemake
# checks incomplete outputs (input functions run while the DAG is built, after
# the executor is known, so dry runs and --unlock are told apart), wait for
# them: each that completes records its own output as done, so it is adopted,
# not submitted a second time. Skipped where the directory is locked (a live
# run's jobs are not orphans; Snakemake then refuses this run anyway).
_ORPHANS_SETTLED = []


def settle_orphaned_slurm_jobs(wildcards):
    if not _ORPHANS_SETTLED and workflow.is_main_process and not workflow.dryrun:
        _ORPHANS_SETTLED.append(True)
        if not any(Path(".snakemake", "locks").glob("*.lock")):
            from snakemake.logging import logger

            from rackbench.slurm_jobs import settle_orphans

            settle_orphans(os.getcwd(), log=logger.info)
    return []
