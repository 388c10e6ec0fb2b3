"""The ``rackbench`` command: one subcommand per step a user runs by hand.

    rackbench --help
    rackbench check-config config/llama2-70b-gb300.yaml
    rackbench ingest ../shared/mlperf-logs/
    rackbench report --help

Each subcommand hands the rest of the command line to that step's module, exactly as
``python -m rackbench.<module>`` would (the rules call the modules the same way). The
table below is the only list; a module that is not part of this installation gives a
one-line error instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, what it does)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "check-config": ("rackbench.config", "validate a config (defaults filled) and list what it benchmarks"),
    "variants": ("rackbench.paths", "list the run variants (their settings.json) under a results directory"),
    "download": ("rackbench.download", "download a pinned model snapshot (or copy a local one) with a manifest"),
    "prepare-dataset": ("rackbench.dataset", "verify the MLPerf OpenOrca pickles and convert them to parquet"),
    "demo": ("rackbench.demo", "make the demo's tiny model and dataset"),
    "quantize": ("rackbench.quantize", "ModelOpt post-training quantization of a snapshot"),
    "build-engine": ("rackbench.build_engine", "build an engine for one backend and GPU type"),
    "download-dataset": ("rackbench.dataset_download", "fetch the MLPerf OpenOrca files with checksums"),
    "check-trtllm-options": ("rackbench.trtllm_options", "check a config's TensorRT-LLM options against 1.2.1"),
    "run-shard": ("rackbench.harness", "run one shard through MLPerf LoadGen (Offline, Server, Interactive)"),
    "accuracy": ("rackbench.accuracy", "ROUGE accuracy gate over accuracy-mode shards"),
    "ingest": ("rackbench.ingest", "read any folder of LoadGen results (ours or published)"),
    "report": ("rackbench.report", "aggregate shard runs into tables, figures and report.md"),
    "serve": ("rackbench.serve", "serve an engine as an OpenAI-compatible completions endpoint"),
    "launch": ("rackbench.launch", "start engine servers (local or srun steps), run a command, tear them down"),
    "compliance": ("rackbench.compliance", "MLPerf TEST06 with MLCommons' audit.config and run_verification.py"),
    "submission": ("rackbench.submission", "build a submission tree and run MLCommons' submission checker"),
    "slurm-jobs": ("rackbench.slurm_jobs", "list this workflow's Slurm jobs an earlier run left running"),
}
# Arguments put before the user's, where a module serves several commands.
FIXED_ARGS: dict[str, list[str]] = {"variants": ["variants"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rackbench",
        description="Reproducible rack-scale LLM inference benchmarks. The whole chain runs as a Snakemake "
        "workflow (`snakemake --cores 2` for the demo); these subcommands run one step by hand.",
        epilog="`rackbench SUBCOMMAND --help` shows a subcommand's options.",
    )
    sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    for name, (module, summary) in SUBCOMMANDS.items():
        sub.add_parser(name, help=f"{summary} ({module})", add_help=False)
    return parser


def load_main(name: str):
    """The ``main`` of a subcommand's module; SystemExit with one line where it is missing."""
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            raise SystemExit(
                f"rackbench {name}: not available in this installation ({module_name} is missing)"
            ) from None
        raise
    entry = getattr(module, "main", None)
    if entry is None:
        raise SystemExit(f"rackbench {name}: {module_name} has no main()")
    return entry


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        parser.error(f"unknown subcommand {name!r}; choose from {', '.join(SUBCOMMANDS)}")
    result = load_main(name)(FIXED_ARGS.get(name, []) + rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
