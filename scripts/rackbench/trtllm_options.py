"""TensorRT-LLM options checked at config time against the facts in ``rackbench/contracts/``.

The facts (trtllm-build flags and their choices, LLM-API fields, ModelOpt names) live once,
as package data; the contract tests assert that the data matches the TensorRT-LLM source it
cites and that the backend emits only what the data allows. ``check_engine_options`` runs the
same checks on a config's ``engines.tensorrt-llm`` settings before any job is planned, so an
unknown option or a value outside its choices is refused at once, naming the option and what
is allowed, instead of failing on a GPU node after the queue wait.

``python -m rackbench.trtllm_options CONFIG.yaml`` checks one config file by hand.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

import yaml

CONTRACTS_DIR = Path(__file__).parent / "contracts"
TRTLLM_CONTRACT = "trtllm_1_2"
CONFIG_KEY = "engines.tensorrt-llm"
SET_BY_RACKBENCH = ("checkpoint_dir", "output_dir")  # trtllm-build flags the backend sets from the workflow's paths


class OptionError(ValueError):
    """A TensorRT-LLM option the contract does not allow; the message names it and the allowed values."""


@functools.lru_cache(maxsize=None)
def load_contract(name: str) -> dict:
    """One contract file of package data (``contracts/<name>.yaml``), parsed."""
    return yaml.safe_load((CONTRACTS_DIR / f"{name}.yaml").read_text())


def trtllm_contract() -> dict:
    return load_contract(TRTLLM_CONTRACT)


def build_flag_spec() -> dict:
    return trtllm_contract()["trtllm_build"]["flags"]


def llm_args_fields() -> dict:
    return trtllm_contract()["llm_args"]["fields"]


def choices(path: str) -> tuple:
    """The allowed values of an LLM-API choice field, e.g. ``scheduler_config.capacity_scheduler_policy``."""
    fields = llm_args_fields()
    parts = path.split(".")
    for part in parts[:-1]:
        fields = fields[part]["fields"]
    return tuple(fields[parts[-1]]["choices"])


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_build_flag(flag: str, value: Any, where: str) -> None:
    """Refuse a ``trtllm-build --flag value`` the 1.2 CLI does not accept."""
    spec = build_flag_spec()
    contract = trtllm_contract()["trtllm_build"]
    if flag in SET_BY_RACKBENCH:
        raise OptionError(f"{where}.{flag}: set by rackbench itself, not a config option")
    if flag not in spec:
        hint = (
            " (a TensorRT-LLM PluginConfig field, but not a trtllm-build argument)"
            if flag in contract.get("not_flags", [])
            else ""
        )
        raise OptionError(
            f"{where}.{flag}: not a trtllm-build {trtllm_contract()['version']} flag{hint}; "
            f"allowed flags: {', '.join(sorted(set(spec) - set(SET_BY_RACKBENCH)))}"
        )
    kind = spec[flag]["type"]
    if kind == "int" and not (_is_int(value) or (isinstance(value, str) and value.isdigit())):
        raise OptionError(f"{where}.{flag}: {value!r} is not an integer")
    if kind == "enable_disable" and value not in ("enable", "disable"):
        raise OptionError(f"{where}.{flag}: {value!r} is not one of enable, disable")
    if kind == "choice" and value not in spec[flag]["choices"]:
        raise OptionError(f"{where}.{flag}: {value!r} is not one of {', '.join(map(str, spec[flag]['choices']))}")


def check_llm_api_values(values: dict, where: str, fields: dict | None = None) -> None:
    """Refuse LLM-API arguments (``extra_llm_api_options`` keys) that TorchLlmArgs would reject."""
    fields = llm_args_fields() if fields is None else fields
    for key, value in values.items():
        name = f"{where}.{key}"
        if key not in fields:
            raise OptionError(
                f"{name}: not a TensorRT-LLM {trtllm_contract()['version']} LLM-API field; "
                f"allowed: {', '.join(sorted(fields))}"
            )
        spec = fields[key]
        kind = spec["type"]
        if value is None and (spec.get("nullable") or kind in ("path_or_null",)):
            continue
        if kind == "object":
            if not isinstance(value, dict):
                raise OptionError(f"{name}: must be a mapping with keys among {', '.join(sorted(spec['fields']))}")
            check_llm_api_values(value, name, spec["fields"])
        elif kind == "choice" and value not in spec["choices"]:
            raise OptionError(f"{name}: {value!r} is not one of {', '.join(map(str, spec['choices']))}")
        elif kind == "int" and not _is_int(value):
            raise OptionError(f"{name}: {value!r} is not an integer")
        elif kind == "int_list" and not (
            isinstance(value, list) and value and all(_is_int(v) and v > 0 for v in value)
        ):
            raise OptionError(f"{name}: {value!r} is not a non-empty list of positive integers")
        elif kind == "bool" and not isinstance(value, bool):
            raise OptionError(f"{name}: {value!r} is not true or false")
        elif kind == "float":
            lo, hi = spec.get("min", float("-inf")), spec.get("max", float("inf"))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value <= hi:
                raise OptionError(f"{name}: {value!r} is not a number in ({lo}, {hi}]")


def check_engine_options(settings: dict, where: str = CONFIG_KEY) -> None:
    """Every TensorRT-LLM option a config's ``engines.tensorrt-llm`` produces, checked against the contract.

    * ``trtllm_build_extra_flags``: each flag and value against trtllm-build's flags (tensorrt mode);
    * the flags and LLM-API arguments rackbench derives from the other settings, as the build will
      emit them (so a value the contract does not allow is refused here, not on the GPU node).
    Raises ``OptionError``.
    """
    from rackbench.engines import tensorrt_llm as trt

    extra = settings.get("trtllm_build_extra_flags") or {}
    if not isinstance(extra, dict):
        raise OptionError(f"{where}.trtllm_build_extra_flags: must be a mapping flag -> value")
    for flag, value in extra.items():
        check_build_flag(str(flag), value, f"{where}.trtllm_build_extra_flags")
    try:
        resolved = trt.resolve_settings(settings)
    except ValueError as err:
        raise OptionError(f"{where}: {err}") from None
    if resolved["mode"] == "tensorrt":
        for flag, value in trt.trtllm_build_flags(resolved).items():
            check_build_flag(flag, value, f"{where} (trtllm-build --{flag})")
    check_llm_api_values(trt.llm_api_options(resolved), f"{where} (LLM-API)")


def refuse_bad_options(settings: dict) -> None:
    """``check_engine_options`` for ``rackbench.config.check_config``: raises its ``ConfigError``."""
    from rackbench.config import ConfigError

    try:
        check_engine_options(settings)
    except OptionError as err:
        raise ConfigError(str(err)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rackbench.trtllm_options",
        description="Check a config's engines.tensorrt-llm options against the TensorRT-LLM 1.2.1 facts.",
    )
    parser.add_argument("config", help="a rackbench config file (YAML)")
    argv = [parser.parse_args(argv).config]
    path = Path(argv[0])
    if not path.is_file():
        parser.error(f"{path}: no such config file")
    config = yaml.safe_load(path.read_text())
    settings = (config.get("engines") or {}).get("tensorrt-llm")
    if settings is None:
        print(f"{argv[0]}: no engines.tensorrt-llm section")
        return 0
    try:
        check_engine_options(settings)
    except OptionError as err:
        print(f"{argv[0]}: {err}", file=sys.stderr)
        return 2
    print(
        f"{argv[0]}: engines.tensorrt-llm options match the TensorRT-LLM {trtllm_contract()['target_release']} contract"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
