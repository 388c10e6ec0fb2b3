# Shared set-up: config validation and the input and resource functions that the
# rules use. Paths come from rackbench.paths, the plan from rackbench.config;
# logic beyond lookups lives in rackbench.

import functools
import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

SCRIPTS_DIR = str(Path(workflow.basedir) / "scripts")
sys.path.insert(0, SCRIPTS_DIR)
# Jobs (local, Slurm, or in a container) import rackbench from this checkout.
# (Snakemake formats the prefix too, hence the doubled braces.)
shell.prefix("set -euo pipefail; export PYTHONPATH=%s${{PYTHONPATH:+:$PYTHONPATH}}; " % SCRIPTS_DIR)

from rackbench import config as plan  # noqa: E402
from rackbench import paths  # noqa: E402
from rackbench.shards import parse_layout  # noqa: E402

# One validation, which also fills in the schema's defaults, then the semantic checks.
try:
    plan.check_config(config)
except plan.ConfigError as err:
    sys.exit(f"invalid config: {err}")

# MLCommons' own tools (TEST06, the submission checker) come from the user's checkout
# (mlcommons.inference_dir); where it is not one, their steps are not planned and the report
# says why. The rack sessions make TEST06 runs only where it is.
from rackbench import benchmarks, compliance, submission  # noqa: E402

MLCOMMONS_DIR, MLCOMMONS_SKIPPED = compliance.configured_checkout(
    config["mlcommons"]["inference_dir"], workflow.basedir
)


CONFIGURATIONS = plan.configurations(config, test06=MLCOMMONS_DIR is not None)
MODELS = config["models"]
GPU_TYPES = config["gpu_types"]
RUN = config["run"]
QUANT = config["quantization"]
DEMO = config["demo"]
RUN_ENV = "../envs/rackbench.yaml"


def as_json(obj):
    """A config fragment as a shell-quoted JSON argument."""
    return shlex.quote(json.dumps(obj, sort_keys=True))


# ---- variants: each rule's output carries the hash of the settings that make it ----
# The plan's settings, computed once per step (planning a 3,456-job sweep asks often).
@functools.lru_cache(maxsize=None)
def step_settings_json(step, *key):
    """The canonical JSON of one step's settings; ``key``: the step's own wildcards."""
    if step in FIELD_STEP_SETTINGS:
        settings = FIELD_STEP_SETTINGS[step](config, dict(zip(plan.CONFIG_FIELDS, key)))
    else:
        settings = STEP_SETTINGS[step](config, *key)
    return paths.canonical_json(settings)


STEP_SETTINGS = {
    "download_model": plan.snapshot_settings,
    "prepare_dataset": plan.dataset_settings,
    "quantize": plan.checkpoint_settings,
    "build_engine": plan.engine_settings,
}
# steps keyed by a configuration's fields
FIELD_STEP_SETTINGS = {
    "run_shard": plan.run_settings,
    "accuracy": plan.accuracy_settings,
    "mlcommons": plan.mlcommons_settings,  # test06, submission_tree, submission_check (rules/mlcommons.smk)
    "rack_run": functools.partial(plan.rack_settings, test06=MLCOMMONS_DIR is not None),
}
STEP_KEYS = {
    "download_model": ("model",),
    "prepare_dataset": ("dataset",),
    "quantize": ("model", "recipe"),
    "build_engine": ("model", "recipe", "backend", "gpu_type"),
    "run_shard": plan.CONFIG_FIELDS,
    "accuracy": plan.CONFIG_FIELDS,
    "mlcommons": plan.CONFIG_FIELDS,
    "rack_run": plan.CONFIG_FIELDS,
}


@functools.lru_cache(maxsize=None)
def step_variant(step, *key):
    return paths.variant_id(json.loads(step_settings_json(step, *key)))


def step_key(step, wildcards):
    return tuple(int(wildcards[k]) if k == "batch_size" else wildcards[k] for k in STEP_KEYS[step])


def write_settings(step):
    """A params function: the shell command that writes the job's settings.json first.
    A {variant} that is not the one this config makes is refused (an old variant is
    never remade with other settings; its own are in its settings.json)."""

    def command(wildcards, output):
        key = step_key(step, wildcards)
        if step_variant(step, *key) != wildcards.variant:
            raise WorkflowError(
                f"variant {wildcards.variant} of {dict(wildcards)} is not the one this config makes "
                f"({step_variant(step, *key)}); its settings are in its settings.json"
            )
        return (
            f"python -m rackbench.paths write-settings --out {output[0]}"
            f" --settings-json {shlex.quote(step_settings_json(step, *key))}"
        )

    return command


CONFIGURATION_BY_FIELDS = {tuple(cfg.fields.values()): cfg for cfg in CONFIGURATIONS}


def fields_of(wildcards):
    return dict(zip(plan.CONFIG_FIELDS, step_key("run_shard", wildcards)))


def configuration_of(wildcards):
    try:
        return CONFIGURATION_BY_FIELDS[step_key("run_shard", wildcards)]
    except KeyError:
        raise WorkflowError(f"no configured benchmark matches {dict(wildcards)}") from None


def dataset_of(model):
    return MODELS[model]["dataset"]


def snapshot_of(model):
    return paths.snapshot_dir(model, step_variant("download_model", model))


def dataset_file_of(model, part):
    dataset = dataset_of(model)
    return paths.dataset_file(dataset, step_variant("prepare_dataset", dataset), part)


def checkpoint_of(model, recipe):
    return paths.checkpoint_dir(model, recipe, step_variant("quantize", model, recipe))


# ---- input functions ------------------------------------------------------
def model_source_input(wildcards):
    """A local source made by the workflow itself (the demo) is an input; others are not."""
    local = MODELS[wildcards.model]["source"].get("local")
    return [local] if local and local.startswith(f"{paths.RESULTS}/") else []


def model_source_args(wildcards):
    source = MODELS[wildcards.model]["source"]
    if "local" in source:
        return f"--local {source['local']}"
    return f"--repo-id {source['repo_id']} --revision {source['revision']}"


def dataset_source(wildcards, part):
    return config["datasets"][wildcards.dataset][part]["path"]


def dataset_checksum_inputs(wildcards):
    entries = [config["datasets"][wildcards.dataset][part] for part in ("samples", "calibration")]
    return sorted({e["sha256_file"] for e in entries if "sha256_file" in e})


def dataset_checksum_arg(wildcards, part):
    entry = config["datasets"][wildcards.dataset][part]
    return f"sha256:{entry['sha256']}" if "sha256" in entry else f"file:{entry['sha256_file']}"


def expected_rows(wildcards):
    # no num_samples declared: the row count is not checked
    return config["datasets"][wildcards.dataset].get("num_samples") or 0


def shard_start_barrier_args(wildcards):
    """The performance shards of a configuration start LoadGen together (rackbench.barrier):
    the per-shard sum is a rack throughput only where they overlap. Accuracy shards need not."""
    if wildcards.mode != "performance" or parse_layout(wildcards.layout)[0] == 1:
        return ""
    folder = paths.start_barrier_dir(fields_of(wildcards), wildcards.variant)
    return f"--start-barrier {folder} --start-barrier-timeout-s {RUN['start_barrier_timeout_s']}"


def accuracy_shard_inputs(wildcards):
    return configuration_of(wildcards).shard_dirs("accuracy")


def report_inputs():
    return {
        "shards": [d for cfg in CONFIGURATIONS for d in cfg.shard_dirs("performance")],
        "accuracy": [cfg.accuracy_json for cfg in CONFIGURATIONS],
        # the rack sessions (one LoadGen per run) and their runs' accuracy gates (rules/rack.smk)
        "rack_sessions": [cfg.rack_session_dir for cfg in CONFIGURATIONS if cfg.rack_session_dir],
        "rack_accuracy": [
            run["accuracy_json"] for cfg in CONFIGURATIONS for run in cfg.one_loadgen_runs() if run["accuracy_json"]
        ],
    }


# ---- resources ------------------------------------------------------------
# GPU rules take their Slurm requests from the GPU-type table in the config, so
# a site changes config, not rules. CPU "GPU types" (the demo) request no GPU.
def slurm_resources(gpu_type, count):
    spec = GPU_TYPES[gpu_type]
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
        return settings["tensor_parallel_size"] * settings["pipeline_parallel_size"]
    return 1


def job_resources(gpu_type_of, count_of):
    """Per-job Slurm resources, used as ``**job_resources(...)`` in a resources block.

    ``gpu_type_of`` and ``count_of`` map a job's wildcards to its GPU type and GPU
    count; a resource that is None stays unset, so CPU jobs request no GPU.
    """

    def lookup(key):
        if key == "runtime":  # a retry (after a time limit, say) asks for more time: runtime x attempt
            return (
                lambda wildcards, attempt: slurm_resources(gpu_type_of(wildcards), count_of(wildcards))[key] * attempt
            )
        return lambda wildcards: slurm_resources(gpu_type_of(wildcards), count_of(wildcards)).get(key)

    keys = ("gpu", "gpu_model", "cpus_per_gpu", "cpus_per_task", "mem_mb", "runtime", "slurm_partition")
    return {key: lookup(key) for key in keys}


def engine_container(wildcards):
    if wildcards.backend == "tensorrt-llm":
        return config["engines"]["tensorrt-llm"]["container"]
    return None


def engine_base_model(wildcards):
    """TensorRT-LLM's engine-build mode re-exports from the base model (with the
    saved ModelOpt state), so its builds read the downloaded snapshot too."""
    return [snapshot_of(wildcards.model)] if wildcards.backend == "tensorrt-llm" else []


def engine_build_settings(wildcards, input):
    settings = dict(config["engines"][wildcards.backend])
    if input.base_model:
        settings["base_model_dir"] = input.base_model[0]
    return settings


def placement(wildcards, count):
    """Where a job runs, for its dry-run message: GPU request and container."""
    spec = GPU_TYPES[wildcards.gpu_type]
    where = f"{count} x {spec['slurm']['gpu_model']} GPU(s)" if spec["kind"] == "gpu" else "CPU"
    return f"{where}, container {engine_container(wildcards) or 'none (conda env)'}"


def shard_mode(wildcards):
    # Accuracy runs always split, so every sample is scored exactly once.
    return "split" if wildcards.mode == "accuracy" else RUN["performance_shard_mode"]


def shard_threads(wildcards):
    spec = GPU_TYPES[wildcards.gpu_type]
    if spec["kind"] == "cpu":
        return config["engines"]["reference"]["torch_threads"]
    return spec["slurm"]["cpus_per_gpu"] * shard_gpus(wildcards)


QUANT_GPU = QUANT.get("gpu_type") or next(iter(GPU_TYPES))


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


# ---- the rack-wide run (rules/rack.smk, rackbench.rack) ----------------------
def rack_configuration_of(wildcards):
    cfg = configuration_of(wildcards)
    if wildcards.variant != cfg.rack_variant:
        raise WorkflowError(
            f"rack variant {wildcards.variant} of {cfg.key} is not the one this config makes ({cfg.rack_variant})"
        )
    return cfg


def rack_session_runs(wildcards):
    """The runs of one configuration's rack session (``Configuration.one_loadgen_runs``)."""
    runs = rack_configuration_of(wildcards).one_loadgen_runs()
    if not runs:
        raise WorkflowError(f"{configuration_of(wildcards).key} has no rack runs (rack_run in the config)")
    return runs


def rack_accuracy_run(wildcards):
    """The accuracy mode directory of one rack run, inside its session (rack_accuracy)."""
    for run in rack_session_runs(wildcards):
        if run["name"] == wildcards.rack_run and run["accuracy"]:
            return run["accuracy"]
    raise WorkflowError(f"{wildcards.rack_run} is not one of the accuracy-checked rack runs of {dict(wildcards)}")


def rack_nodes(wildcards):
    return config["rack"]["nodes"]


def rack_resources():
    """The allocation of the whole rack: every node, every GPU of each (GPU-type table)."""

    def spec(wc):
        return GPU_TYPES[wc.gpu_type]

    per_node = config["rack"]["gpus_per_node"]

    def gres(wc):
        s = spec(wc)
        return f"gpu:{s['slurm']['gpu_model']}:{per_node}" if s["kind"] == "gpu" else None

    # One Slurm task per engine server plus one for the LoadGen process: the job starts its own
    # srun steps (rackbench.launch), so it is an "mpi" job to the Slurm executor plugin, which
    # then runs it in the batch step instead of wrapping it in an srun step that would hold
    # every CPU of the allocation (the servers' steps would wait for them forever).
    def tasks(wc):
        return plan.rack_servers(config, wc.backend) + 1

    def cpus_per_server(wc):
        return spec(wc)["slurm"]["cpus_per_gpu"] * max(plan.replica_gpus(config, wc.backend), 1)

    return {
        "nodes": rack_nodes,
        "gres": gres,
        "mpi": "srun",
        "tasks": tasks,
        "tasks_per_gpu": 0,  # 0: no --ntasks-per-gpu, which the plugin would take from tasks
        "cpus_per_task": cpus_per_server,
        "mem_mb": lambda wc: spec(wc)["slurm"]["mem_mb_per_gpu"] * per_node + RACK_RUN["client_mem_mb"],
        "runtime": lambda wc, attempt: spec(wc)["slurm"]["runtime_min"] * attempt,
        "slurm_partition": lambda wc: spec(wc)["slurm"].get("partition"),
    }


def rack_placement(wildcards):
    """The allocation, for the dry-run message: nodes, GPUs per node, container."""
    spec = GPU_TYPES[wildcards.gpu_type]
    per_node = config["rack"]["gpus_per_node"]
    if spec["kind"] != "gpu":
        return "CPU: servers as local processes (srun steps inside a Slurm allocation)"
    return (
        f"one Slurm allocation of {rack_nodes(wildcards)} node(s) x {per_node} {spec['slurm']['gpu_model']} GPU(s),"
        f" one srun --exact step per server, container {engine_container(wildcards) or 'none (conda env)'}"
    )


def rack_server_args(wildcards, input):
    """The server kind's arguments (rackbench.rack): what each engine server loads."""
    server = RACK_RUN["server"]
    args = [f"--server-kind {server['kind']}"]
    if server["kind"] == "command":
        args.append(f"--server-command {shlex.quote(server['command'])}")
    if server["kind"] == "urls":
        args.append(f"--urls {' '.join(shlex.quote(u) for u in server['urls'])}")
    if server["kind"] in ("trtllm-serve", "command") and wildcards.backend == "tensorrt-llm":
        trt = config["engines"]["tensorrt-llm"]
        args.append(f"--server-model {checkpoint_of(wildcards.model, wildcards.recipe)}")
        args.append(f"--tokenizer {snapshot_of(wildcards.model)}")
        args.append(f"--extra-llm-api-options {input.engine}/extra_llm_api_options.yaml")
        args.append(f"--trtllm-backend {trt['mode']} --max-num-tokens {trt['max_num_tokens']}")
    return " ".join(args)


def rack_session_args(wildcards):
    """rackbench.rack's runs (name, scenario, target QPS, LoadGen modes), the Offline expected
    QPS of the whole rack, and TEST06's audit.config where the session makes TEST06 runs."""
    runs = rack_session_runs(wildcards)
    listed = [{key: run[key] for key in ("name", "scenario", "target_qps", "modes")} for run in runs]
    offline_qps = (RUN.get("rack_target_qps") or {}).get("Offline") or (
        RUN["offline_expected_qps"] * plan.rack_servers(config, wildcards.backend)
    )
    args = [f"--runs-json {as_json(listed)}", f"--offline-expected-qps {offline_qps}"]
    if configuration_of(wildcards).rack_test06:
        args.append(f"--audit-config {compliance.audit_config(MLCOMMONS_DIR)}")
    return " ".join(args)


def rack_threads(wildcards):
    if GPU_TYPES[wildcards.gpu_type]["kind"] == "cpu":  # the servers' engines and the LoadGen share the cores
        return config["engines"]["reference"]["torch_threads"] * plan.rack_servers(config, wildcards.backend)
    return GPU_TYPES[wildcards.gpu_type]["slurm"]["cpus_per_gpu"] * config["rack"]["gpus_per_node"]


RACK_RUN = config["rack_run"]


# ---- MLCommons' checks (rules/mlcommons.smk) ---------------------------------
# The input side: which runs are one LoadGen for the whole system. The rack sessions' runs
# with an accuracy run (the scenarios' own, not the sweep points) are; a per-shard sum of
# several LoadGens never is, and a configuration with no rack run gets no tree.
def one_loadgen_runs(cfg):
    """{scenario: run (``Configuration.one_loadgen_runs``)} of ``cfg``'s accuracy-checked
    rack runs, each with its TEST06 run; {} where it has none."""
    return {run["scenario"]: run for run in cfg.one_loadgen_runs() if run["test06"]}


def no_tree_reason(cfg):
    why = submission.no_tree_reason("the per-shard sum", cfg.num_shards) or "no submission tree:"
    return (
        f"{why} No rack-wide run (one LoadGen over every engine server) is configured for {cfg.key}:"
        " rack_run.enabled and rack_run.configurations in the config say which configurations get one."
    )


# ---- what is planned --------------------------------------------------------------
def mlcommons_variant(cfg):
    return step_variant("mlcommons", *cfg.fields.values())


def mlcommons_configurations():
    return [cfg for cfg in CONFIGURATIONS if one_loadgen_runs(cfg)] if MLCOMMONS_DIR else []


def one_loadgen_runs_of(wildcards):
    runs = one_loadgen_runs(configuration_of(wildcards))
    if not runs:
        raise WorkflowError(f"{dict(wildcards)} has no one-LoadGen run: no TEST06 or submission tree")
    return runs


def checked_scenario(wildcards):
    if wildcards.scenario not in one_loadgen_runs_of(wildcards):
        raise WorkflowError(f"{dict(wildcards)}: no one-LoadGen {wildcards.scenario} run to test")
    return wildcards.scenario


def test06_run_of(wildcards):
    """The TEST06 LoadGen run (inside the rack session) that test06 verifies."""
    return one_loadgen_runs_of(wildcards)[checked_scenario(wildcards)]["test06"]


def test06_dirs_of(cfg):
    return {s: paths.test06_dir(cfg.fields, mlcommons_variant(cfg), s) for s in one_loadgen_runs(cfg)}


def submission_inputs(wildcards):
    cfg = configuration_of(wildcards)
    inputs = {"session": cfg.rack_session_dir}
    for scenario, run in one_loadgen_runs_of(wildcards).items():
        inputs[f"{scenario}_accuracy_txt"] = run["accuracy_txt"]
    inputs.update({f"{scenario}_test06": d for scenario, d in test06_dirs_of(cfg).items()})
    return inputs


def submission_runs_json(wildcards, input):
    return as_json(
        {
            scenario: {
                "performance": run["performance"],
                "accuracy": run["accuracy"],
                "accuracy_txt": input[f"{scenario}_accuracy_txt"],
                "test06": f"{input[f'{scenario}_test06']}/{compliance.TEST06}",
            }
            for scenario, run in one_loadgen_runs_of(wildcards).items()
        }
    )


def benchmark_of(model):
    return MODELS[model]["accuracy"].get("benchmark") or benchmarks.DEFAULT_BENCHMARK


def mlcommons_report_inputs():
    cfgs = mlcommons_configurations()
    return {
        "test06": [d for cfg in cfgs for d in test06_dirs_of(cfg).values()],
        "checker_verdicts": [paths.checker_verdict(cfg.fields, mlcommons_variant(cfg)) for cfg in cfgs],
    }


def mlcommons_report_args(wildcards, input):
    """The report's arguments for MLCommons' checks: TEST06 folders, verdicts, why no tree, or why not run."""
    if MLCOMMONS_SKIPPED:
        return f"--mlcommons-skipped {shlex.quote(MLCOMMONS_SKIPPED)}"
    no_tree = {cfg.key: no_tree_reason(cfg) for cfg in CONFIGURATIONS if not one_loadgen_runs(cfg)}
    test06 = " ".join(f"{d}/{compliance.TEST06}" for d in input.test06)
    return f"--test06 {test06} --checker-verdicts {' '.join(input.checker_verdicts)} --no-tree-json {as_json(no_tree)}"
