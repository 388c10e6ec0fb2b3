"""Where every result lives: the one definition of the results/ layout.

Rules take their output patterns from here (the ``*_PATTERN`` strings, whose
``{wildcards}`` are the workflow's wildcards), and ``Configuration``, the report,
the tests and docs/ARCHITECTURE.md use the functions, which fill the same patterns.

Every result's path carries every setting that changes it:

- a readable key for the main axes (model, recipe, backend, GPU type, batch size,
  layout), as directories;
- ``{variant}``: 8 hex digits of the sha256 of the canonical JSON of all the other
  settings that shape that step and everything upstream of it (``variant_id``),
  written in full beside the output as ``settings.json`` (``SETTINGS_FILE``).

So a changed knob makes a new variant directory beside the old one: Snakemake never
deletes a finished result to redo it with other settings, and switching back costs
nothing. Logs carry the same key and variant.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

RESULTS = "results"
SETTINGS_FILE = "settings.json"
VARIANT_LENGTH = 8
VARIANT_REGEX = rf"[0-9a-f]{{{VARIANT_LENGTH}}}"

# The wildcards of the workflow, with their constraints (Snakefile's wildcard_constraints).
WILDCARD_CONSTRAINTS = {
    "model": r"[^/]+",
    "dataset": r"[^/]+",
    "recipe": r"nvfp4|fp8|none",
    "backend": r"reference|tensorrt-llm",
    "gpu_type": r"[^/]+",
    "batch_size": r"\d+",
    "layout": r"\d+x\d+",
    "mode": r"performance|accuracy",
    "shard": r"\d+",
    "variant": VARIANT_REGEX,
    "rack_run": r"Offline|(?:Server|Interactive)-qps[0-9]+(?:\.[0-9]+)?",
}

# ---- patterns (Snakemake output patterns; fill them with the functions below) ----
DEMO_SOURCE = f"{RESULTS}/demo/source"
DEMO_MODEL_PATTERN = f"{DEMO_SOURCE}/model"
DEMO_DATASET_DIR = f"{DEMO_SOURCE}/dataset"

SNAPSHOT_PATTERN = f"{RESULTS}/models/{{model}}/{{variant}}/snapshot"
DATASET_PATTERN = f"{RESULTS}/datasets/{{dataset}}/{{variant}}/{{part}}.parquet"
# download_dataset's folder (MLPerf's files; rackbench.dataset_download names those in it).
DATASET_DOWNLOAD_PATTERN = f"{RESULTS}/datasets/{{dataset}}/download"
CHECKPOINT_PATTERN = f"{RESULTS}/quantized/{{model}}/{{recipe}}/{{variant}}/checkpoint"
ENGINE_PATTERN = f"{RESULTS}/engines/{{model}}/{{recipe}}/{{backend}}/{{gpu_type}}/{{variant}}/engine"
CONFIG_KEY_PATTERN = "{model}/{recipe}/{backend}/{gpu_type}/bs{batch_size}/{layout}"
RUN_DIR_PATTERN = f"{RESULTS}/runs/{CONFIG_KEY_PATTERN}/{{variant}}"
SHARD_PATTERN = f"{RUN_DIR_PATTERN}/{{mode}}/shard{{shard}}"
ACCURACY_DIR_PATTERN = f"{RESULTS}/accuracy/{CONFIG_KEY_PATTERN}/{{variant}}"
ACCURACY_JSON_PATTERN = f"{ACCURACY_DIR_PATTERN}/accuracy.json"
ACCURACY_TXT_PATTERN = f"{ACCURACY_DIR_PATTERN}/accuracy.txt"
ACCURACY_SUBCATEGORY = f"{CONFIG_KEY_PATTERN}/{{variant}}"  # its group in Snakemake's HTML report
# The rack-wide runs (one LoadGen over every engine server; rackbench.rack). One rack_run job
# starts the servers once and runs every LoadGen run of the configuration against them, one
# after the other: RACK_SESSION_PATTERN holds one directory per run (``rack_run_name``), each
# with a ``performance/`` and, for the scenarios' own runs, an ``accuracy/`` and (where an
# MLCommons checkout is configured) a ``TEST06/`` directory (RACK_TEST06_MODE: a performance
# run under TEST06's audit.config), each holding LoadGen's logs, shard.json, samples.parquet
# and endpoints.json (RACK_MODE_FILES).
RACK_VARIANT_PATTERN = f"{RESULTS}/rack/{CONFIG_KEY_PATTERN}/{{variant}}"
RACK_SESSION_PATTERN = f"{RACK_VARIANT_PATTERN}/runs"
RACK_ACCURACY_JSON_PATTERN = f"{RACK_VARIANT_PATTERN}/{{rack_run}}.accuracy.json"
RACK_ACCURACY_TXT_PATTERN = f"{RACK_VARIANT_PATTERN}/{{rack_run}}.accuracy.txt"
RACK_TEST06_MODE = "TEST06"
RACK_MODE_FILES = (
    "mlperf_log_summary.txt",
    "mlperf_log_detail.txt",
    "mlperf_log_accuracy.json",
    "shard.json",
    "samples.parquet",
    "endpoints.json",
)
ENDPOINTS_FILE = "endpoints.json"
REPORT_DIR = f"{RESULTS}/report"
LOGS = f"{RESULTS}/logs"

# The report's files, by kind (figures come as PDF, SVG and PNG).
REPORT_TABLES = {
    "throughput": "throughput.csv",
    "shards": "shards.csv",
    "provenance": "provenance.csv",
    "variants": "variants.csv",
    "rack": "rack.csv",
    "markdown": "report.md",
}
REPORT_FIGURES = ("shard_throughput", "shard_timeline", "records", "efficiency", "server_sweep")
FIGURE_FORMATS = (".pdf", ".svg", ".png")

# Logs: one per job, named by the job's wildcards (key and variant), under results/logs/<rule>/.
LOG_PATTERNS = {
    "demo_model": f"{LOGS}/demo_model.log",
    "demo_dataset": f"{LOGS}/demo_dataset.log",
    "download_model": f"{LOGS}/download_model/{{model}}-{{variant}}.log",
    "download_dataset": f"{LOGS}/download_dataset/{{dataset}}.log",
    "prepare_dataset": f"{LOGS}/prepare_dataset/{{dataset}}-{{variant}}.log",
    "quantize": f"{LOGS}/quantize/{{model}}-{{recipe}}-{{variant}}.log",
    "build_engine": f"{LOGS}/build_engine/{{model}}-{{recipe}}-{{backend}}-{{gpu_type}}-{{variant}}.log",
    "run_shard": f"{LOGS}/run_shard/{{model}}-{{recipe}}-{{backend}}-{{gpu_type}}-bs{{batch_size}}-{{layout}}"
    f"-{{variant}}-{{mode}}-shard{{shard}}.log",
    "accuracy": f"{LOGS}/accuracy/{{model}}-{{recipe}}-{{backend}}-{{gpu_type}}-bs{{batch_size}}-{{layout}}"
    f"-{{variant}}.log",
    "rack_run": f"{LOGS}/rack_run/{{model}}-{{recipe}}-{{backend}}-{{gpu_type}}-bs{{batch_size}}-{{layout}}"
    f"-{{variant}}.log",
    "rack_accuracy": f"{LOGS}/rack_accuracy/{{model}}-{{recipe}}-{{backend}}-{{gpu_type}}-bs{{batch_size}}-{{layout}}"
    f"-{{variant}}-{{rack_run}}.log",
    "report": f"{LOGS}/report.log",
}


# ---- variants ---------------------------------------------------------------------
def canonical_json(settings) -> str:
    """The one serialisation that is hashed: sorted keys, no spaces, UTF-8."""
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def variant_id(settings) -> str:
    """8 hex of sha256(canonical JSON): the ``{variant}`` of the result these settings make."""
    return hashlib.sha256(canonical_json(settings).encode()).hexdigest()[:VARIANT_LENGTH]


def settings_file(output_path: str | os.PathLike) -> Path:
    """Where the full settings of a result are written: its variant directory.

    ``output_path`` is a step's output or its variant directory itself."""
    path = Path(output_path)
    for candidate in (path, *path.parents):
        if re.fullmatch(VARIANT_REGEX, candidate.name):
            return candidate / SETTINGS_FILE
    raise ValueError(f"{output_path} has no variant directory ({VARIANT_LENGTH} hex digits) in it")


def write_settings(output_path: str | os.PathLike, settings: dict) -> Path:
    """Write ``settings`` beside the output, refusing ones whose hash is not the path's variant."""
    target = settings_file(output_path)
    if variant_id(settings) != target.parent.name:
        raise ValueError(f"settings hash to variant {variant_id(settings)}, but the path says {target.parent.name}")
    text = json.dumps(settings, indent=2, sort_keys=True) + "\n"
    if target.is_file() and target.read_text() == text:
        return target
    # Every shard job of a run variant writes the same file, maybe at once: each writes
    # its own temporary (no clean-up of others' temporaries) and renames it over.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)
    return target


# ---- paths ------------------------------------------------------------------------
class _KeepMissing(dict):
    def __missing__(self, key):
        return "{" + key + "}"


def pattern(template: str, **fixed) -> str:
    """``template`` with some wildcards filled and the others left as ``{wildcards}``."""
    return template.format_map(_KeepMissing(fixed))


def snapshot_dir(model: str, variant: str) -> str:
    return SNAPSHOT_PATTERN.format(model=model, variant=variant)


def dataset_file(dataset: str, variant: str, part: str) -> str:
    """``part``: samples or calibration."""
    if part not in ("samples", "calibration"):
        raise ValueError(f"dataset part must be samples or calibration, got {part!r}")
    return DATASET_PATTERN.format(dataset=dataset, variant=variant, part=part)


def checkpoint_dir(model: str, recipe: str, variant: str) -> str:
    return CHECKPOINT_PATTERN.format(model=model, recipe=recipe, variant=variant)


def engine_dir(model: str, recipe: str, backend: str, gpu_type: str, variant: str) -> str:
    return ENGINE_PATTERN.format(model=model, recipe=recipe, backend=backend, gpu_type=gpu_type, variant=variant)


def config_key(fields: dict) -> str:
    """The readable key of a configuration: model/recipe/backend/gpu_type/bs<batch_size>/layout."""
    return CONFIG_KEY_PATTERN.format(**fields)


def run_dir(fields: dict, variant: str) -> str:
    """A configuration's run variant: its performance/ and accuracy/ shard dirs and settings.json."""
    return RUN_DIR_PATTERN.format(**fields, variant=variant)


def shard_dir(fields: dict, variant: str, mode: str, shard: int) -> str:
    return SHARD_PATTERN.format(**fields, variant=variant, mode=mode, shard=shard)


def accuracy_json(fields: dict, variant: str) -> str:
    return ACCURACY_JSON_PATTERN.format(**fields, variant=variant)


def accuracy_txt(fields: dict, variant: str) -> str:
    return ACCURACY_TXT_PATTERN.format(**fields, variant=variant)


def rack_run_name(scenario: str, target_qps: float | None = None) -> str:
    """A rack run's directory name: ``Offline``, ``Server-qps<X>``, ``Interactive-qps<X>``."""
    if scenario == "Offline":
        return "Offline"
    if scenario not in ("Server", "Interactive") or target_qps is None:
        raise ValueError(f"a {scenario!r} rack run needs scenario Server or Interactive and a target QPS")
    return f"{scenario}-qps{float(target_qps):g}"


def parse_rack_run_name(name: str) -> tuple[str, float | None]:
    """(scenario, target QPS or None) of a ``rack_run_name``."""
    if not re.fullmatch(WILDCARD_CONSTRAINTS["rack_run"], name):
        raise ValueError(f"{name!r} is not a rack run name (Offline, Server-qps<X>, Interactive-qps<X>)")
    if name == "Offline":
        return "Offline", None
    scenario, qps = name.split("-qps")
    return scenario, float(qps)


def start_barrier_dir(fields: dict, variant: str) -> str:
    """Where a configuration's performance shards meet before LoadGen starts (rackbench.barrier);
    beside their outputs, not in them (a shard's output appears only when it is done)."""
    return f"{run_dir(fields, variant)}/performance/.start-barrier"


def rack_session_dir(fields: dict, variant: str) -> str:
    """The rack_run job's output: every LoadGen run of one configuration's rack session."""
    return RACK_SESSION_PATTERN.format(**fields, variant=variant)


def rack_run_dir(fields: dict, variant: str, run: str) -> str:
    return f"{rack_session_dir(fields, variant)}/{run}"


def rack_mode_dir(fields: dict, variant: str, run: str, mode: str) -> str:
    """One LoadGen test of a rack run: LoadGen's logs, shard.json, samples.parquet, endpoints.json."""
    return f"{rack_run_dir(fields, variant, run)}/{mode}"


def rack_accuracy_json(fields: dict, variant: str, run: str) -> str:
    return RACK_ACCURACY_JSON_PATTERN.format(**fields, variant=variant, rack_run=run)


def rack_accuracy_txt(fields: dict, variant: str, run: str) -> str:
    return RACK_ACCURACY_TXT_PATTERN.format(**fields, variant=variant, rack_run=run)


def one_loadgen_runs(fields: dict, variant: str, runs, *, test06: bool = False) -> list[dict]:
    """Every one-LoadGen (MLPerf's method) run of one configuration's rack session: what the
    report, TEST06, the submission tree and the checker consume.

    ``runs``: (scenario, target QPS or None, with_accuracy) triples, as
    ``rackbench.config.Configuration.rack_runs`` holds them; ``test06``: whether the session
    also makes each accuracy-checked run's TEST06 run. Returns one dict per run::

        {"scenario": "Server", "target_qps": 3200.0, "name": "Server-qps3200",
         "session_dir": ".../runs", "run_dir": ".../runs/Server-qps3200",
         "modes": ["performance", "accuracy", "TEST06"],
         "performance": ".../runs/Server-qps3200/performance",
         "accuracy": ".../runs/Server-qps3200/accuracy" or None (sweep points have none),
         "test06": ".../runs/Server-qps3200/TEST06" or None,
         "accuracy_json": ".../Server-qps3200.accuracy.json" or None, "accuracy_txt": ...}

    The scenarios' own runs (``rack_run.scenarios`` at ``run.rack_target_qps``) come first,
    in config order, then the sweep's extra Server points (performance only).
    """
    out = []
    for scenario, qps, with_accuracy in runs:
        name = rack_run_name(scenario, qps)
        modes = ["performance"] + (["accuracy"] + ([RACK_TEST06_MODE] if test06 else []) if with_accuracy else [])
        out.append(
            {
                "scenario": scenario,
                "target_qps": None if qps is None else float(qps),
                "name": name,
                "session_dir": rack_session_dir(fields, variant),
                "run_dir": rack_run_dir(fields, variant, name),
                "modes": modes,
                **{
                    key: rack_mode_dir(fields, variant, name, mode) if mode in modes else None
                    for key, mode in (
                        ("performance", "performance"),
                        ("accuracy", "accuracy"),
                        ("test06", RACK_TEST06_MODE),
                    )
                },
                "accuracy_json": rack_accuracy_json(fields, variant, name) if with_accuracy else None,
                "accuracy_txt": rack_accuracy_txt(fields, variant, name) if with_accuracy else None,
            }
        )
    return out


def report_file(kind: str) -> str:
    return f"{REPORT_DIR}/{REPORT_TABLES[kind]}"


def report_figure(name: str) -> str:
    """A figure's path without its extension (Snakemake's multiext adds them)."""
    if name not in REPORT_FIGURES:
        raise ValueError(f"unknown figure {name!r}; known: {REPORT_FIGURES}")
    return f"{REPORT_DIR}/{name}"


def log_file(rule: str) -> str:
    return LOG_PATTERNS[rule]


def run_variants_on_disk(results_root: str | os.PathLike = RESULTS) -> list[Path]:
    """Every run variant's settings.json under ``results_root`` (old and current), sorted."""
    levels = CONFIG_KEY_PATTERN.count("/") + 2  # the key's directories and the variant
    return sorted(
        p for p in (Path(results_root) / "runs").glob("/".join(["*"] * levels) + "/" + SETTINGS_FILE) if p.is_file()
    )


def main(argv=None) -> int:
    """``python -m rackbench.paths write-settings --out OUTPUT --settings-json JSON``; ``show``."""
    import argparse

    from rackbench.args import json_arg

    parser = argparse.ArgumentParser(prog="python -m rackbench.paths", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write-settings", help="write a step's settings.json into its variant directory")
    w.add_argument("--out", required=True, help="the step's output (or its variant directory)")
    w.add_argument("--settings-json", required=True, help="the settings, as JSON or a JSON file")
    v = sub.add_parser("variants", help="list the run variants under a results directory")
    v.add_argument("--results", default=RESULTS, help=f"results directory (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.command == "write-settings":
        print(write_settings(args.out, json_arg(args.settings_json)))
    else:
        for path in run_variants_on_disk(args.results):
            print(path.parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ---- MLCommons' checks: TEST06, the submission tree, the checker's verdict (rules/mlcommons.smk) ----
# One variant per configuration (rackbench.config.mlcommons_settings): the run and accuracy
# variants it is made from, plus the mlcommons settings (checkout, submitter, system name).
WILDCARD_CONSTRAINTS["scenario"] = r"Offline|Server|Interactive"
MLCOMMONS_DIR_PATTERN = f"{RESULTS}/mlcommons/{CONFIG_KEY_PATTERN}/{{variant}}"
TEST06_PATTERN = f"{MLCOMMONS_DIR_PATTERN}/test06/{{scenario}}"  # holds TEST06/ as a submission tree does
SUBMISSION_TREE_PATTERN = f"{MLCOMMONS_DIR_PATTERN}/submission"
CHECKER_VERDICT_PATTERN = f"{MLCOMMONS_DIR_PATTERN}/checker_verdict.json"
LOG_PATTERNS.update(
    {
        rule: f"{LOGS}/{rule}/{{model}}-{{recipe}}-{{backend}}-{{gpu_type}}-bs{{batch_size}}-{{layout}}"
        f"-{{variant}}{suffix}.log"
        for rule, suffix in (("test06", "-{scenario}"), ("submission_tree", ""), ("submission_check", ""))
    }
)


def test06_dir(fields: dict, variant: str, scenario: str) -> str:
    """The folder that holds a configuration's ``TEST06/`` for one scenario."""
    return TEST06_PATTERN.format(**fields, variant=variant, scenario=scenario)


def submission_tree(fields: dict, variant: str) -> str:
    return SUBMISSION_TREE_PATTERN.format(**fields, variant=variant)


def checker_verdict(fields: dict, variant: str) -> str:
    return CHECKER_VERDICT_PATTERN.format(**fields, variant=variant)
