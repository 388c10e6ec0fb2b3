"""Config validation and the benchmark plan derived from it.

``check_config`` runs before any job is planned: the JSON schema first (with a
one-line message naming the key), then the checks a schema cannot express
(cross references, what a GPU type can run, shard counts, secrets).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import yaml

from rackbench.shards import layout_name

SCHEMA_PATH = Path(__file__).parent / "schemas" / "config.schema.yaml"
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{20,}")
SECRET_KEYS = {"token", "hf_token", "api_key", "password", "secret"}


class ConfigError(ValueError):
    """A config problem; the message names the key and what is wrong."""


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


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
    validator = jsonschema.Draft202012Validator(load_schema())
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
    # The demo makes its own model and dataset under results/demo/.
    return bool(config.get("demo", {}).get("enabled")) and Path(path).as_posix().startswith("results/demo/")


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
            raise ConfigError(f"models.{name}.dataset: unknown dataset {model['dataset']!r}; "
                              f"defined: {sorted(config['datasets'])}")
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
            raise ConfigError(f"benchmarks.recipes: nvfp4 cannot run on GPU type {gpu} (NVFP4 needs Blackwell); "
                              "use recipe fp8 for it")
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
            raise ConfigError(f"benchmarks.gpus_per_shard: {gps} is more than rack.gpus_per_node "
                              f"({config['rack']['gpus_per_node']}); a shard runs on one node")
        if rack_gpus % gps:
            raise ConfigError(f"benchmarks.gpus_per_shard: {gps} does not divide the rack's {rack_gpus} GPUs")
        shards = rack_gpus // gps
        for name in bench["models"]:
            size = dataset_size(config, config["models"][name]["dataset"])
            if size is not None and shards > size:
                raise ConfigError(f"benchmarks.gpus_per_shard: {gps} GPUs per shard makes {shards} shards, "
                                  f"more than the {size} samples of dataset {config['models'][name]['dataset']}")

    engines = config.get("engines", {})
    for backend in bench["backends"]:
        if backend not in engines:
            raise ConfigError(f"engines.{backend}: settings missing for a benchmarked backend")
        limit = engines[backend].get("max_batch_size")
        for bs in bench["batch_sizes"]:
            if limit is not None and bs > limit:
                raise ConfigError(f"benchmarks.batch_sizes: {bs} is larger than engines.{backend}.max_batch_size ({limit})")

    if "tensorrt-llm" in bench["backends"]:
        _check_trtllm(engines["tensorrt-llm"], config)

    max_new = config["run"].get("max_new_tokens", 1024)
    demo = config.get("demo", {})
    if demo.get("enabled") and demo.get("reference_max_new_tokens") and demo["reference_max_new_tokens"] < max_new:
        raise ConfigError(f"run.max_new_tokens: {max_new} exceeds demo.reference_max_new_tokens "
                          f"({demo['reference_max_new_tokens']}): the references would be cut shorter than the outputs")


def _check_trtllm(settings: dict, config: dict) -> None:
    """Backend options that contradict each other or the run."""
    from rackbench.engines.tensorrt_llm import replica_size, resolve_settings

    try:
        resolved = resolve_settings(settings)
    except ValueError as err:
        raise ConfigError(f"engines.tensorrt-llm: {err}") from None
    replica = replica_size(resolved)
    for gps in config["benchmarks"]["gpus_per_shard"]:
        if gps % replica:
            raise ConfigError(f"engines.tensorrt-llm: a replica needs tensor_parallel_size x pipeline_parallel_size = "
                              f"{replica} GPUs, which does not divide benchmarks.gpus_per_shard {gps}")
    max_new = config["run"].get("max_new_tokens", 1024)
    if resolved["max_input_len"] + max_new > resolved["max_seq_len"]:
        raise ConfigError(f"engines.tensorrt-llm.max_seq_len: {resolved['max_seq_len']} is shorter than "
                          f"max_input_len {resolved['max_input_len']} + run.max_new_tokens {max_new}")
    if not resolved["enable_chunked_prefill"] and resolved["max_num_tokens"] < resolved["max_input_len"]:
        raise ConfigError(f"engines.tensorrt-llm.max_num_tokens: {resolved['max_num_tokens']} is below max_input_len "
                          f"{resolved['max_input_len']} with enable_chunked_prefill off: long prompts cannot be scheduled")
    if resolved["mode"] == "pytorch" and resolved["trtllm_build_extra_flags"]:
        raise ConfigError("engines.tensorrt-llm.trtllm_build_extra_flags: trtllm-build flags given, but mode is "
                          "pytorch (no engine build); use mode: tensorrt or remove them")


def check_config(config: dict) -> None:
    """Raise ConfigError with a one-line message naming the key and the problem."""
    # Secrets first: a token under an unknown key must be reported as a token.
    secrets = list(_find_secrets(config))
    if secrets:
        raise ConfigError(f"{secrets[0]}: looks like a secret token written in the config; "
                          "put the Hugging Face token in the HF_TOKEN environment variable instead")
    _validate_schema(config)
    _semantic_checks(config)


@dataclass(frozen=True)
class Configuration:
    """One benchmarked combination; its fields are the workflow's wildcards."""

    model: str
    recipe: str
    backend: str
    gpu: str
    bs: int
    layout: str

    @property
    def key(self) -> str:
        return f"{self.model}/{self.recipe}/{self.backend}/{self.gpu}/bs{self.bs}/{self.layout}"


def configurations(config: dict) -> list[Configuration]:
    bench = config["benchmarks"]
    return [
        Configuration(model, recipe, backend, gpu, bs, layout_name(num_shards(config, gps), gps))
        for model, recipe, backend, gpu, bs, gps in itertools.product(
            bench["models"], bench["recipes"], bench["backends"], bench["gpu_types"],
            bench["batch_sizes"], bench["gpus_per_shard"])
    ]
