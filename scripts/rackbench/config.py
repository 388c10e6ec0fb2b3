"""Config validation and the benchmark plan derived from it.

``check_config`` runs before any job is planned, once: secrets, then the JSON
schema, which also fills in every default (the schema is the only place defaults
are written), then the checks a schema cannot express (cross references, what a
GPU type can run, shard counts). Every later reader sees a complete config.

The plan: ``configurations`` lists what is benchmarked, and the ``*_settings``
functions give the full settings that shape each step's result; their hash is the
result's ``{variant}`` (``rackbench.paths``).
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jsonschema
import yaml

from rackbench import paths
from rackbench.shards import layout_name, parse_layout

SCHEMA_PATH = Path(__file__).parent / "schemas" / "config.schema.yaml"
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{20,}")
SECRET_KEYS = {"token", "hf_token", "api_key", "password", "secret"}


class ConfigError(ValueError):
    """A config problem; the message names the key and what is wrong."""


@lru_cache(maxsize=1)
def _schema_text() -> str:
    return SCHEMA_PATH.read_text()


def load_schema() -> dict:
    return yaml.safe_load(_schema_text())


def _with_defaults(validator_class):
    """A validator that fills each missing property's schema default as it validates."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_FillingValidator = _with_defaults(jsonschema.Draft202012Validator)


def fill_defaults(config: dict) -> dict:
    """``config`` with the schema's defaults filled in place (errors are check_config's business)."""
    for _ in _FillingValidator(load_schema()).iter_errors(config):
        pass
    return config


def schema_defaults(*keys: str) -> dict:
    """The defaults of the object at ``keys`` in the schema (e.g. "engines", "tensorrt-llm")."""
    node = load_schema()
    for key in keys:
        node = node["properties"][key]
    return fill_defaults_of(node)


def fill_defaults_of(schema: dict) -> dict:
    out = {}
    for name, sub in schema.get("properties", {}).items():
        if "default" in sub:
            out[name] = copy.deepcopy(sub["default"])
            if isinstance(out[name], dict) and "properties" in sub:
                out[name] = {**fill_defaults_of(sub), **out[name]}
    return out


def _key_path(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _schema_message(error: jsonschema.ValidationError) -> str:
    key = _key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return f"{key}: unknown key(s) {', '.join(map(repr, extra))}"
    if error.validator == "required":
        return f"{key}: {error.message}"
    if error.validator == "oneOf" and isinstance(error.instance, dict):
        options = [" + ".join(s.get("required", [])) for s in error.schema["oneOf"]]
        return f"{key}: give exactly one of: {'; '.join(options)}"
    if error.validator == "pattern" and key.endswith("revision"):
        return f"{key}: {error.instance!r} is not a pinned 40-hex commit"
    return f"{key}: {error.message}"


def _validate_schema(config: dict) -> None:
    validator = _FillingValidator(load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), _key_path(e.absolute_path)))
    if errors:
        # the most specific error of the first failing key is the useful one
        best = jsonschema.exceptions.best_match(errors)
        raise ConfigError(_schema_message(best))


def _find_secrets(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            if str(key).lower() in SECRET_KEYS and value:
                yield _key_path(path + (key,))
            else:
                yield from _find_secrets(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _find_secrets(value, path + (i,))
    elif isinstance(node, str) and TOKEN_PATTERN.search(node):
        yield _key_path(path)


def _is_produced_by_workflow(path: str, config: dict) -> bool:
    # The demo makes its own model and dataset under results/demo/; download_dataset its files.
    from rackbench.dataset_download import is_downloaded

    demo = bool(config.get("demo", {}).get("enabled")) and Path(path).as_posix().startswith(paths.DEMO_SOURCE + "/")
    return demo or is_downloaded(path, config)


def num_shards(config: dict, gpus_per_shard: int) -> int:
    return config["rack"]["nodes"] * config["rack"]["gpus_per_node"] // gpus_per_shard


def dataset_size(config: dict, dataset: str) -> int | None:
    declared = config["datasets"][dataset].get("num_samples")
    if declared:
        return declared
    demo = config.get("demo", {})
    if demo.get("enabled") and _is_produced_by_workflow(config["datasets"][dataset]["samples"]["path"], config):
        return demo.get("num_samples")
    return None


def _semantic_checks(config: dict) -> None:
    bench = config["benchmarks"]
    for name in bench["models"]:
        if name not in config["models"]:
            raise ConfigError(f"benchmarks.models: unknown model {name!r}; defined: {sorted(config['models'])}")
    for name, model in config["models"].items():
        if model["dataset"] not in config["datasets"]:
            raise ConfigError(
                f"models.{name}.dataset: unknown dataset {model['dataset']!r}; defined: {sorted(config['datasets'])}"
            )
        local = model["source"].get("local")
        if local and not Path(local).is_dir() and not _is_produced_by_workflow(local, config):
            raise ConfigError(f"models.{name}.source.local: directory {local} does not exist")
    for name, dataset in config["datasets"].items():
        for part in ("samples", "calibration"):
            entry = dataset[part]
            for key in ("path", "sha256_file"):
                value = entry.get(key)
                if value and not Path(value).exists() and not _is_produced_by_workflow(value, config):
                    raise ConfigError(f"datasets.{name}.{part}.{key}: {value} does not exist")
                if value and Path(value).is_dir():
                    raise ConfigError(f"datasets.{name}.{part}.{key}: {value} is a directory, not a file")

    gpu_types = config["gpu_types"]
    for gpu in bench["gpu_types"]:
        if gpu not in gpu_types:
            raise ConfigError(f"benchmarks.gpu_types: unknown GPU type {gpu!r}; known: {sorted(gpu_types)}")
        spec = gpu_types[gpu]
        if "nvfp4" in bench["recipes"] and spec["kind"] == "gpu" and not spec["runs_nvfp4"]:
            raise ConfigError(
                f"benchmarks.recipes: nvfp4 cannot run on GPU type {gpu} (NVFP4 needs Blackwell); use recipe fp8 for it"
            )
        if spec["kind"] == "gpu" and not spec["slurm"].get("gpu_model"):
            raise ConfigError(f"gpu_types.{gpu}.slurm.gpu_model: required for a GPU type")
        if spec["kind"] == "cpu" and "tensorrt-llm" in bench["backends"]:
            raise ConfigError(f"benchmarks.backends: tensorrt-llm needs NVIDIA GPUs, but GPU type {gpu} is a CPU")

    quant_gpu = config.get("quantization", {}).get("gpu_type")
    if quant_gpu is not None and quant_gpu not in gpu_types:
        raise ConfigError(f"quantization.gpu_type: unknown GPU type {quant_gpu!r}; known: {sorted(gpu_types)}")

    rack_gpus = config["rack"]["nodes"] * config["rack"]["gpus_per_node"]
    for gps in bench["gpus_per_shard"]:
        if gps > config["rack"]["gpus_per_node"]:
            raise ConfigError(
                f"benchmarks.gpus_per_shard: {gps} is more than rack.gpus_per_node "
                f"({config['rack']['gpus_per_node']}); a shard runs on one node"
            )
        if rack_gpus % gps:
            raise ConfigError(f"benchmarks.gpus_per_shard: {gps} does not divide the rack's {rack_gpus} GPUs")
        shards = rack_gpus // gps
        for name in bench["models"]:
            size = dataset_size(config, config["models"][name]["dataset"])
            if size is not None and shards > size:
                raise ConfigError(
                    f"benchmarks.gpus_per_shard: {gps} GPUs per shard makes {shards} shards, "
                    f"more than the {size} samples of dataset {config['models'][name]['dataset']}"
                )

    engines = config.get("engines", {})
    for backend in bench["backends"]:
        if backend not in engines:
            raise ConfigError(f"engines.{backend}: settings missing for a benchmarked backend")
        limit = engines[backend].get("max_batch_size")
        for bs in bench["batch_sizes"]:
            if limit is not None and bs > limit:
                raise ConfigError(
                    f"benchmarks.batch_sizes: {bs} is larger than engines.{backend}.max_batch_size ({limit})"
                )

    if "tensorrt-llm" in bench["backends"]:
        _check_trtllm(engines["tensorrt-llm"], config)

    max_new = config["run"]["max_new_tokens"]
    demo = config["demo"]
    if demo["enabled"] and demo["reference_max_new_tokens"] < max_new:
        raise ConfigError(
            f"run.max_new_tokens: {max_new} exceeds demo.reference_max_new_tokens "
            f"({demo['reference_max_new_tokens']}): the references would be cut shorter than the outputs"
        )
    _check_rack_run(config)


def _check_rack_run(config: dict) -> None:
    rack = config["rack_run"]
    if not rack["enabled"]:
        return
    targets = config["run"].get("rack_target_qps") or {}
    for scenario in rack["scenarios"]:
        if scenario != "Offline" and scenario not in targets:
            raise ConfigError(f"run.rack_target_qps.{scenario}: required for the rack run's {scenario} scenario")
    server = rack["server"]
    if server["kind"] == "command" and not server["command"]:
        raise ConfigError("rack_run.server.command: required for server kind 'command'")
    if server["kind"] == "urls" and not server["urls"]:
        raise ConfigError("rack_run.server.urls: required for server kind 'urls'")
    if server["kind"] == "trtllm-serve" and "tensorrt-llm" not in config["benchmarks"]["backends"]:
        raise ConfigError(
            "rack_run.server.kind: trtllm-serve serves the tensorrt-llm backend, which is not benchmarked"
        )
    if rack["configurations"] is not None:
        known = {paths.config_key(fields) for fields in _config_fields(config)}
        for key in rack["configurations"]:
            if key not in known:
                raise ConfigError(f"rack_run.configurations: {key!r} is not a configuration; known: {sorted(known)}")


def _check_trtllm(settings: dict, config: dict) -> None:
    """Backend options that contradict each other or the run."""
    from rackbench.engines.tensorrt_llm import replica_size, resolve_settings
    from rackbench.trtllm_options import refuse_bad_options

    refuse_bad_options(settings)  # every option against the TensorRT-LLM contract data (package data)
    try:
        resolved = resolve_settings(settings)
    except ValueError as err:
        raise ConfigError(f"engines.tensorrt-llm: {err}") from None
    replica = replica_size(resolved)
    for gps in config["benchmarks"]["gpus_per_shard"]:
        if gps % replica:
            raise ConfigError(
                f"engines.tensorrt-llm: a replica needs tensor_parallel_size x pipeline_parallel_size = "
                f"{replica} GPUs, which does not divide benchmarks.gpus_per_shard {gps}"
            )
    max_new = config["run"]["max_new_tokens"]
    if resolved["max_input_len"] + max_new > resolved["max_seq_len"]:
        raise ConfigError(
            f"engines.tensorrt-llm.max_seq_len: {resolved['max_seq_len']} is shorter than "
            f"max_input_len {resolved['max_input_len']} + run.max_new_tokens {max_new}"
        )
    if not resolved["enable_chunked_prefill"] and resolved["max_num_tokens"] < resolved["max_input_len"]:
        raise ConfigError(
            f"engines.tensorrt-llm.max_num_tokens: {resolved['max_num_tokens']} is below max_input_len "
            f"{resolved['max_input_len']} with enable_chunked_prefill off: long prompts cannot be scheduled"
        )
    if resolved["mode"] == "pytorch" and resolved["trtllm_build_extra_flags"]:
        raise ConfigError(
            "engines.tensorrt-llm.trtllm_build_extra_flags: trtllm-build flags given, but mode is "
            "pytorch (no engine build); use mode: tensorrt or remove them"
        )


def check_config(config: dict) -> None:
    """Raise ConfigError with a one-line message naming the key and the problem.

    Fills the schema's defaults into ``config`` in place, before the semantic checks."""
    # Secrets first: a token under an unknown key must be reported as a token.
    secrets = list(_find_secrets(config))
    if secrets:
        raise ConfigError(
            f"{secrets[0]}: looks like a secret token written in the config; "
            "put the Hugging Face token in the HF_TOKEN environment variable instead"
        )
    _validate_schema(config)
    _semantic_checks(config)


# ---- the plan: what each result is made from ------------------------------------
# Settings of GPU types that change where and how fast a job runs, never its result.
GPU_TYPE_SCHEDULING_KEYS = ("slurm", "published", "peak_dense_flops")
# Run settings that change only what the job prints, or how long a shard waits for the others.
RUN_REPORTING_KEYS = ("progress_interval_s", "start_barrier_timeout_s")


def _demo_settings(config: dict, path: str) -> dict:
    """The demo block, for an input the demo makes (it decides that input's content)."""
    return {"demo": config["demo"]} if _is_produced_by_workflow(path, config) else {}


def snapshot_settings(config: dict, model: str) -> dict:
    source = config["models"][model]["source"]
    return {
        "step": "download_model",
        "model": model,
        "source": source,
        **_demo_settings(config, source.get("local", "")),
    }


def dataset_settings(config: dict, dataset: str) -> dict:
    entry = config["datasets"][dataset]
    return {"step": "prepare_dataset", "dataset": dataset, **entry, **_demo_settings(config, entry["samples"]["path"])}


def checkpoint_settings(config: dict, model: str, recipe: str) -> dict:
    dataset = config["models"][model]["dataset"]
    return {
        "step": "quantize",
        "model": model,
        "recipe": recipe,
        "snapshot_variant": paths.variant_id(snapshot_settings(config, model)),
        "dataset_variant": paths.variant_id(dataset_settings(config, dataset)),
        "quantization": config["quantization"],
    }


def engine_settings(config: dict, model: str, recipe: str, backend: str, gpu_type: str) -> dict:
    spec = config["gpu_types"][gpu_type]
    settings = {
        "step": "build_engine",
        "model": model,
        "recipe": recipe,
        "backend": backend,
        "gpu_type": gpu_type,
        "gpu_spec": {k: v for k, v in spec.items() if k not in GPU_TYPE_SCHEDULING_KEYS},
        "checkpoint_variant": paths.variant_id(checkpoint_settings(config, model, recipe)),
        "engine": config["engines"][backend],
    }
    if backend == "tensorrt-llm":  # its engine build re-exports from the base model too
        settings["snapshot_variant"] = paths.variant_id(snapshot_settings(config, model))
    return settings


def run_settings(config: dict, fields: dict) -> dict:
    dataset = config["models"][fields["model"]]["dataset"]
    engine = engine_settings(config, fields["model"], fields["recipe"], fields["backend"], fields["gpu_type"])
    return {
        "step": "run_shard",
        **fields,
        "engine_variant": paths.variant_id(engine),
        "dataset_variant": paths.variant_id(dataset_settings(config, dataset)),
        "run": {k: v for k, v in config["run"].items() if k not in RUN_REPORTING_KEYS},
    }


def accuracy_settings(config: dict, fields: dict) -> dict:
    model = config["models"][fields["model"]]
    return {
        "step": "accuracy",
        **fields,
        "run_variant": paths.variant_id(run_settings(config, fields)),
        "snapshot_variant": paths.variant_id(snapshot_settings(config, fields["model"])),
        "dataset_variant": paths.variant_id(dataset_settings(config, model["dataset"])),
        "accuracy": model["accuracy"],
    }


def mlcommons_settings(config: dict, fields: dict) -> dict:
    """TEST06, the submission tree and the checker's verdict of one configuration (one variant)."""
    return {
        "step": "mlcommons",
        **fields,
        # the rack session it checks (which makes TEST06 runs: these steps exist only then)
        "rack_variant": paths.variant_id(rack_settings(config, fields, test06=True)),
        "accuracy": config["models"][fields["model"]]["accuracy"],
        "mlcommons": config["mlcommons"],
    }


def system_name(config: dict, gpu_type: str) -> str:
    """The submission's system_desc_id: mlcommons.system_name, else rackbench_<gpu_type>_x<rack GPUs>."""
    rack = config["rack"]
    return config["mlcommons"].get("system_name") or f"rackbench_{gpu_type}_x{rack['nodes'] * rack['gpus_per_node']}"


# rack_run keys that change where or when the session happens, not its results (which runs
# it makes, from scenarios and server_qps_sweep, is in its settings as "runs")
RACK_RUN_SCHEDULING_KEYS = (
    "enabled",
    "configurations",
    "scenarios",
    "server_qps_sweep",
    "ready_timeout_s",
    "base_port",
    "client_mem_mb",
)


def replica_gpus(config: dict, backend: str) -> int:
    """GPUs of one engine replica (one engine server): tp x pp for TensorRT-LLM, else 1."""
    if backend == "tensorrt-llm":
        settings = config["engines"]["tensorrt-llm"]
        return settings["tensor_parallel_size"] * settings["pipeline_parallel_size"]
    return 1


def rack_servers(config: dict, backend: str) -> int:
    """Engine servers of a rack run: one per engine replica over the whole rack."""
    return config["rack"]["nodes"] * config["rack"]["gpus_per_node"] // replica_gpus(config, backend)


def rack_settings(config: dict, fields: dict, *, test06: bool = False) -> dict:
    """The settings that shape a rack session's results (its ``{variant}``): one job starts the
    servers once and makes every run of ``rack_runs`` (and, with ``test06``, each accuracy-checked
    run's TEST06 run), so the list of runs is part of it."""
    dataset = config["models"][fields["model"]]["dataset"]
    engine = engine_settings(config, fields["model"], fields["recipe"], fields["backend"], fields["gpu_type"])
    run = {k: v for k, v in config["run"].items() if k not in RUN_REPORTING_KEYS + ("rack_target_qps",)}
    return {
        "step": "rack_run",
        **fields,
        "engine_variant": paths.variant_id(engine),
        "dataset_variant": paths.variant_id(dataset_settings(config, dataset)),
        "run": run,
        "rack": config["rack"],
        "servers": rack_servers(config, fields["backend"]),
        "rack_run": {k: v for k, v in config["rack_run"].items() if k not in RACK_RUN_SCHEDULING_KEYS},
        "runs": [list(run) for run in rack_runs(config, fields)],
        "test06": test06,
        "accuracy": config["models"][fields["model"]]["accuracy"],  # the gate beside the run
    }


def rack_runs(config: dict, fields: dict) -> tuple:
    """(scenario, target QPS or None, with_accuracy) of every rack run of a configuration;
    () where it gets none (``paths.one_loadgen_runs`` turns them into directories)."""
    rack = config["rack_run"]
    if not rack["enabled"]:
        return ()
    if rack["configurations"] is not None and paths.config_key(fields) not in rack["configurations"]:
        return ()
    targets = config["run"].get("rack_target_qps") or {}
    runs = [(s, None if s == "Offline" else float(targets[s]), True) for s in rack["scenarios"]]
    taken = {paths.rack_run_name(s, q) for s, q, _ in runs}
    for qps in rack["server_qps_sweep"]:
        if paths.rack_run_name("Server", qps) not in taken:
            taken.add(paths.rack_run_name("Server", qps))
            runs.append(("Server", float(qps), False))
    return tuple(runs)


# The fields of a configuration: the workflow's wildcards, shard.json's keys and the
# report's columns, by the same names.
CONFIG_FIELDS = ("model", "recipe", "backend", "gpu_type", "batch_size", "layout")


@dataclass(frozen=True)
class Configuration:
    """One benchmarked combination and the variants of every result it is made from."""

    model: str
    recipe: str
    backend: str
    gpu_type: str
    batch_size: int
    layout: str
    dataset: str
    snapshot_variant: str
    dataset_variant: str
    checkpoint_variant: str
    engine_variant: str
    run_variant: str
    accuracy_variant: str
    rack_variant: str = ""
    rack_runs: tuple = ()  # (scenario, target QPS or None, with_accuracy): rackbench.config.rack_runs
    rack_test06: bool = False  # the rack session also makes TEST06 runs (an MLCommons checkout is configured)

    @property
    def fields(self) -> dict:
        return {k: getattr(self, k) for k in CONFIG_FIELDS}

    @property
    def key(self) -> str:
        return paths.config_key(self.fields)

    @property
    def num_shards(self) -> int:
        return parse_layout(self.layout)[0]

    @property
    def snapshot_dir(self) -> str:
        return paths.snapshot_dir(self.model, self.snapshot_variant)

    def dataset_file(self, part: str) -> str:
        return paths.dataset_file(self.dataset, self.dataset_variant, part)

    @property
    def checkpoint_dir(self) -> str:
        return paths.checkpoint_dir(self.model, self.recipe, self.checkpoint_variant)

    @property
    def engine_dir(self) -> str:
        return paths.engine_dir(self.model, self.recipe, self.backend, self.gpu_type, self.engine_variant)

    @property
    def run_dir(self) -> str:
        return paths.run_dir(self.fields, self.run_variant)

    def shard_dirs(self, mode: str) -> list[str]:
        """All shard output directories of this configuration in one LoadGen mode."""
        return [paths.shard_dir(self.fields, self.run_variant, mode, i) for i in range(self.num_shards)]

    @property
    def accuracy_json(self) -> str:
        return paths.accuracy_json(self.fields, self.accuracy_variant)

    def one_loadgen_runs(self) -> list[dict]:
        """This configuration's one-LoadGen (MLPerf's method) runs: ``paths.one_loadgen_runs``."""
        return paths.one_loadgen_runs(self.fields, self.rack_variant, self.rack_runs, test06=self.rack_test06)

    @property
    def rack_session_dir(self) -> str | None:
        """The rack_run job's output (every one-LoadGen run of this configuration), or None."""
        return paths.rack_session_dir(self.fields, self.rack_variant) if self.rack_runs else None

    def report_entry(self) -> dict:
        """What the report is given about this configuration (it never parses paths back)."""
        return {
            **self.fields,
            "key": self.key,
            "variant": self.run_variant,
            "accuracy_variant": self.accuracy_variant,
            "rack_variant": self.rack_variant,
            "shard_dirs": self.shard_dirs("performance"),
            "accuracy_json": self.accuracy_json,
            "run_dir": self.run_dir,
            "engine_dir": self.engine_dir,
            "checkpoint_dir": self.checkpoint_dir,
            "snapshot_dir": self.snapshot_dir,
            "one_loadgen_runs": self.one_loadgen_runs(),
        }


def configurations(config: dict, *, test06: bool = False) -> list[Configuration]:
    """Every configuration of ``config``; ``test06``: the rack sessions make TEST06 runs (the
    workflow says so where ``mlcommons.inference_dir`` is a checkout)."""
    config = fill_defaults(copy.deepcopy(config))
    out = []
    for fields in _config_fields(config):
        model, recipe, backend, gpu_type = fields["model"], fields["recipe"], fields["backend"], fields["gpu_type"]
        dataset = config["models"][model]["dataset"]
        out.append(
            Configuration(
                **fields,
                dataset=dataset,
                snapshot_variant=paths.variant_id(snapshot_settings(config, model)),
                dataset_variant=paths.variant_id(dataset_settings(config, dataset)),
                checkpoint_variant=paths.variant_id(checkpoint_settings(config, model, recipe)),
                engine_variant=paths.variant_id(engine_settings(config, model, recipe, backend, gpu_type)),
                run_variant=paths.variant_id(run_settings(config, fields)),
                accuracy_variant=paths.variant_id(accuracy_settings(config, fields)),
                rack_variant=paths.variant_id(rack_settings(config, fields, test06=test06)),
                rack_runs=rack_runs(config, fields),
                rack_test06=test06,
            )
        )
    return out


def _config_fields(config: dict) -> list[dict]:
    bench = config["benchmarks"]
    out = []
    for model, recipe, backend, gpu_type, batch_size, gps in itertools.product(
        bench["models"],
        bench["recipes"],
        bench["backends"],
        bench["gpu_types"],
        bench["batch_sizes"],
        bench["gpus_per_shard"],
    ):
        out.append(
            {
                "model": model,
                "recipe": recipe,
                "backend": backend,
                "gpu_type": gpu_type,
                "batch_size": batch_size,
                "layout": layout_name(num_shards(config, gps), gps),
            }
        )
    return out


def main(argv=None) -> int:
    """``python -m rackbench.config CONFIG.yaml [...]``: check, then list configurations and variants."""
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m rackbench.config",
        description="Check a rackbench config as the workflow does (schema with "
        "defaults filled, then the semantic checks) and list what it benchmarks.",
    )
    parser.add_argument("configfile", nargs="+", help="config YAML file(s); later ones are merged over earlier ones")
    parser.add_argument("--show-defaults", action="store_true", help="print the whole config, defaults filled")
    args = parser.parse_args(argv)
    config: dict = {}
    for name in args.configfile:
        merge_configs(config, yaml.safe_load(Path(name).read_text()) or {})
    try:
        check_config(config)
    except ConfigError as err:
        raise SystemExit(f"invalid config: {err}") from None
    if args.show_defaults:
        print(json.dumps(config, indent=2, sort_keys=True))
    for cfg in configurations(config):
        print(f"{cfg.key}  run variant {cfg.run_variant}  -> {cfg.run_dir}")
    return 0


def merge_configs(into: dict, update: dict) -> None:
    """Snakemake's merge of several config files: nested mappings merge, the rest is replaced."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge_configs(into[key], value)
        else:
            into[key] = value


if __name__ == "__main__":
    raise SystemExit(main())
