"""An MLPerf submission tree for one configuration, and MLCommons' submission checker's verdict on it.

The tree follows ``tools/submission/submission_structure.md`` of mlcommons/inference::

    closed/<submitter>/systems/<system>.json
    closed/<submitter>/results/<system>/<benchmark>/<scenario>/
        performance/run_1/{mlperf_log_summary.txt, mlperf_log_detail.txt, mlperf_log_accuracy.json}
        accuracy/{accuracy.txt, mlperf_log_summary.txt, mlperf_log_detail.txt, mlperf_log_accuracy.json}
        TEST06/{verify_accuracy.txt, accuracy/mlperf_log_accuracy.json}
        measurements.json, user.conf, mlperf.conf, README.md
    closed/<submitter>/src/

The system description has every field the checker requires
(``SYSTEM_DESC_REQUIRED_FIELDS`` in its constants.py). Fields rackbench knows come from
the GPU-type table, the rack section and provenance.json; every other field says
``UNKNOWN`` visibly, never an invented value. The accuracy logs are truncated with
MLCommons' own ``tools/submission/truncate_accuracy_log.py`` (which also appends the
log's hash to accuracy.txt), as a submitter must.

Only one LoadGen run can make a tree: MLPerf's rules accept one LoadGen instance per
system result. A sum of several LoadGen runs (rackbench's per-shard method) gets no
tree; ``no_tree_reason`` says why, for the report.

The checker runs with its own command line, from the checkout::

    python3 -m tools.submission.submission_checker.main --input TREE --version v6.1 \\
        --submitter ORG --csv OUT.csv

and ``parse_checker_log`` reads its verdict (``SUMMARY: submission looks OK`` / ``has
errors``) and every message it logged.

``python -m rackbench.submission build ...`` and ``python -m rackbench.submission check ...``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from rackbench import benchmarks
from rackbench.args import json_arg
from rackbench.atomic import atomic_path, write_json_atomic, write_text_atomic
from rackbench.compliance import TEST06, VERIFY_OUTPUT, checkout, checkout_revision

UNKNOWN = "UNKNOWN (not recorded by rackbench; fill in before submitting)"
DEFAULT_STATUS = "rdi"  # research, development or internal: rackbench runs are not products
DIVISION = "closed"
LOADGEN_FILES = ("mlperf_log_summary.txt", "mlperf_log_detail.txt", "mlperf_log_accuracy.json")
CHECKER_MODULE = "tools.submission.submission_checker.main"
TRUNCATE_SCRIPT = Path("tools/submission/truncate_accuracy_log.py")
MLPERF_CONF = Path("loadgen/mlperf.conf")
VERDICT_OK = "SUMMARY: submission looks OK"
VERDICT_ERRORS = "SUMMARY: submission has errors"
PRECISION = {"nvfp4": "fp4", "fp8": "fp8", "none": "bf16"}
WEIGHT_TRANSFORMATIONS = {
    "nvfp4": "quantization (NVIDIA ModelOpt post-training quantization, NVFP4 weights, FP8 KV cache)",
    "fp8": "quantization (NVIDIA ModelOpt post-training quantization, FP8)",
    "none": "none",
}

# checker constants.py SYSTEM_DESC_REQUIRED_FIELDS (b66003e); tests/test_submission.py compares with the checkout
SYSTEM_FIELDS = (
    "division",
    "submitter",
    "status",
    "system_name",
    "number_of_nodes",
    "host_processor_model_name",
    "host_processors_per_node",
    "host_processor_core_count",
    "host_memory_capacity",
    "host_storage_capacity",
    "host_storage_type",
    "accelerators_per_node",
    "accelerator_model_name",
    "accelerator_memory_capacity",
    "framework",
    "operating_system",
    "system_type",
    "other_software_stack",
    "host_processor_frequency",
    "host_processor_caches",
    "host_memory_configuration",
    "host_processor_interconnect",
    "host_networking",
    "host_networking_topology",
    "accelerator_frequency",
    "accelerator_host_interconnect",
    "accelerator_interconnect",
    "accelerator_interconnect_topology",
    "accelerator_memory_configuration",
    "accelerator_on-chip_memories",
    "cooling",
    "hw_notes",
    "sw_notes",
    "host_network_card_count",
    "system_type_detail",
)
# user.conf keys (LoadGen's config-file names) for the settings rackbench.harness records
USER_CONF_KEYS = {
    "min_duration_ms": "min_duration",
    "min_query_count": "min_query_count",
    "offline_expected_qps": "target_qps",
    "performance_sample_count": "performance_sample_count_override",
}

# The demo departs from MLPerf's rules on purpose (a tiny model and dataset on CPU, no
# 10-minute run). Each departure and the checker messages that report it (checker log
# text at b66003e: checks/performance_check.py, checks/accuracy_check.py).
_TPS = benchmarks.LLAMA2_REFERENCE["tokens_per_sample"]
DEMO_DEPARTURES = {
    "sample count": (
        r"performance_sample_count, found \d+, needs to be >= \d+",
        r"Required minimum samples per query not met",
        r"accura?cy run does not cover all dataset",
        # Server/Interactive: LoadGen's early stopping needs hundreds of queries more than the
        # demo's few ("Would need to run at least N more queries" in the summary)
        r"Early stopping condition was not met",
    ),
    "minimum duration": (r"Test duration less than \d+s",),
    # the checker's tokens/sample bounds: 294.45 x 0.9 (lower) and x 1.1 (upper)
    "tokens per sample": (
        rf"accuracy not met: expected={_TPS * 0.9:.6f}, found=",
        rf"accuracy not met: upper limit={_TPS * 1.1:.6f}, found=",
    ),
}
# what the checker logs as a consequence of earlier messages, not as a finding of its own
_CONSEQUENCE = re.compile(r"^Some .+ [Cc]hecks failed for: ")
# warnings that fail a check (accuracy_check.py logs unmet targets as warnings and returns False)
_FAILING_WARNING = re.compile(r"accuracy not met: ")


class SubmissionError(RuntimeError):
    pass


# --------------------------------------------------------------------------- why no tree


def no_tree_reason(method: str, num_loadgens: int) -> str | None:
    """None where a tree can be made; otherwise the reason, for the report."""
    if num_loadgens == 1:
        return None
    return (
        f"no submission tree: this figure is {method}, the sum of {num_loadgens} separate LoadGen runs. "
        "MLPerf accepts one LoadGen instance per system result (inference_rules.adoc: LoadGen operates "
        "with a single SUT); summed runs may not be represented as an MLPerf result."
    )


# --------------------------------------------------------------------------- system description


def _gb(value) -> str:
    return UNKNOWN if value in (None, "") else f"{value:g} GB"


def system_description(
    *,
    submitter: str,
    system_name: str,
    gpu_type_name: str,
    gpu_type: dict,
    nodes: int,
    gpus_per_node: int,
    provenance: dict | None = None,
    status: str = DEFAULT_STATUS,
    backend: str | None = None,
) -> dict:
    """``<system>.json``: every required field; what rackbench does not know is UNKNOWN."""
    prov = provenance or {}
    packages = prov.get("packages") or {}
    gpus = prov.get("gpus") or []
    is_cpu = gpu_type.get("kind") == "cpu"
    if is_cpu:
        accelerator = f"none: {gpus_per_node} CPU workers per node (rackbench demo, no accelerator)"
    elif gpus:
        names = sorted({g.get("name") for g in gpus if isinstance(g, dict) and g.get("name")})
        accelerator = ", ".join(names) or gpu_type_name
    else:
        accelerator = f"{gpu_type_name} (rackbench GPU type; device name not recorded)"
    if backend == "tensorrt-llm":
        framework = f"TensorRT-LLM {packages.get('tensorrt-llm') or UNKNOWN}"
    else:
        framework = f"rackbench reference engine on PyTorch {packages.get('torch') or UNKNOWN}"
    software = ", ".join(f"{k} {v}" for k, v in sorted(packages.items()) if v) or UNKNOWN
    if prov.get("driver"):
        software += f", driver {prov['driver']}"
    if prov.get("cuda"):
        software += f", CUDA {prov['cuda']}"
    git = prov.get("git") or {}
    desc = {k: UNKNOWN for k in SYSTEM_FIELDS}
    desc.update(
        {
            "division": DIVISION,
            "submitter": submitter,
            "status": status,
            "system_name": system_name,
            "system_type": "datacenter",
            "number_of_nodes": nodes,
            "accelerators_per_node": gpus_per_node,
            "accelerator_model_name": accelerator,
            "accelerator_memory_capacity": "none" if is_cpu else _gb(gpu_type.get("memory_gb")),
            "framework": framework,
            "operating_system": prov.get("platform") or UNKNOWN,
            "other_software_stack": software,
            "sw_notes": (
                f"rackbench commit {git.get('commit')}{' (dirty)' if git.get('dirty') else ''}"
                if git.get("commit")
                else UNKNOWN
            ),
            "hw_notes": f"rackbench GPU type {gpu_type_name!r}; compute capability "
            f"{gpu_type.get('compute_capability') or UNKNOWN}",
        }
    )
    return desc


def unknown_fields(desc: dict) -> list[str]:
    return sorted(k for k, v in desc.items() if v == UNKNOWN)


def measurements(*, model_source: dict, recipe: str) -> dict:
    """``measurements.json`` (checker SYSTEM_IMP_REQUIRED_FILES): how the weights were made."""
    if model_source.get("repo_id"):
        weights = f"{model_source['repo_id']} at revision {model_source.get('revision')}"
    else:
        weights = model_source.get("local") or UNKNOWN
    return {
        "input_data_types": "int32",
        "retraining": "No",
        "starting_weights_filename": weights,
        "weight_data_types": PRECISION.get(recipe, recipe),
        "weight_transformations": WEIGHT_TRANSFORMATIONS.get(recipe, UNKNOWN),
    }


def user_conf(settings: dict, loadgen_scenario: str) -> str:
    """``user.conf`` for the LoadGen settings a run used beyond mlperf.conf (shard.json loadgen.settings)."""
    lines = ["# LoadGen settings rackbench.harness set on top of LoadGen's built-in mlperf.conf"]
    for key, conf_key in USER_CONF_KEYS.items():
        if settings.get(key) is not None:
            value = settings[key]
            value = f"{value:g}" if isinstance(value, float) else value
            lines.append(f"*.{loadgen_scenario}.{conf_key} = {value}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the tree


def _copy_loadgen(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in LOADGEN_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    missing = [n for n in LOADGEN_FILES[:2] if not (dst / n).is_file()]
    if missing:
        raise SubmissionError(f"{src}: missing {', '.join(missing)}")


def build_tree(
    out,
    *,
    inference_dir,
    submitter: str,
    system_name: str,
    benchmark: str,
    system: dict,
    measurements_json: dict,
    runs: dict,
) -> Path:
    """Write the tree at ``out`` (atomically); ``runs``: scenario -> {performance, accuracy,
    accuracy_txt, test06, settings (LoadGen settings of the performance run), readme}."""
    root = checkout(inference_dir)
    benchmarks.get(benchmark)
    bad = sorted(set(runs) - set(benchmarks.SCENARIOS))
    if bad:
        raise SubmissionError(f"unknown scenario(s) {bad}; known: {benchmarks.SCENARIOS}")
    out = Path(out).absolute()  # MLCommons' truncation runs in the checkout
    with atomic_path(out, directory=True) as final:
        staging = final.parent / (final.name + ".untruncated")
        try:
            _write_untruncated(
                staging,
                root=root,
                submitter=submitter,
                system_name=system_name,
                benchmark=benchmark,
                system=system,
                measurements_json=measurements_json,
                runs=runs,
            )
            # MLCommons' truncation, with its own command line: a new tree at `final`
            final.rmdir()
            proc = subprocess.run(
                [
                    sys.executable,
                    str(root / TRUNCATE_SCRIPT),
                    "--input",
                    str(staging),
                    "--submitter",
                    submitter,
                    "--output",
                    str(final),
                ],
                capture_output=True,
                text=True,
                timeout=600,
                cwd=root,
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if proc.returncode != 0 or not (final / DIVISION / submitter).is_dir():
            raise SubmissionError(f"truncate_accuracy_log.py failed ({proc.returncode}): {proc.stderr[-2000:]}")
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
        if errors:
            raise SubmissionError("truncate_accuracy_log.py: " + "; ".join(errors))
    return out


def _write_untruncated(
    staging: Path, *, root: Path, submitter, system_name, benchmark, system, measurements_json, runs
) -> None:
    if staging.exists():
        shutil.rmtree(staging)
    sub = staging / DIVISION / submitter
    write_json_atomic(sub / "systems" / f"{system_name}.json", system)
    (sub / "src").mkdir(parents=True)
    write_text_atomic(
        sub / "src" / "README.md", "Source: rackbench (see sw_notes in the system description for the commit).\n"
    )
    for scenario, run in runs.items():
        sdir = sub / "results" / system_name / benchmark / scenario
        _copy_loadgen(Path(run["performance"]), sdir / "performance" / "run_1")
        _copy_loadgen(Path(run["accuracy"]), sdir / "accuracy")
        shutil.copy2(run["accuracy_txt"], sdir / "accuracy" / "accuracy.txt")
        test06 = Path(run["test06"])
        if not (test06 / VERIFY_OUTPUT).is_file():
            raise SubmissionError(f"{test06}: no {VERIFY_OUTPUT} (run rackbench.compliance test06 first)")
        shutil.copytree(test06, sdir / TEST06, ignore=shutil.ignore_patterns("rackbench_*"))
        write_json_atomic(sdir / "measurements.json", measurements_json)
        write_text_atomic(
            sdir / "user.conf", user_conf(run.get("settings") or {}, benchmarks.LOADGEN_SCENARIO[scenario])
        )
        shutil.copy2(root / MLPERF_CONF, sdir / "mlperf.conf")
        write_text_atomic(
            sdir / "README.md",
            run.get("readme") or f"# {benchmark} {scenario}\n\nMade by rackbench; see ../../../../src/README.md.\n",
        )


# --------------------------------------------------------------------------- the checker

_LOG_LINE = re.compile(r"^\[(?P<time>[^\]]*?) (?P<file>[\w./-]+):(?P<line>\d+) (?P<level>[A-Z]+)\] (?P<text>.*)$")


def parse_checker_log(text: str) -> dict:
    """The checker's log (stderr) -> verdict, every message, errors, warnings, results."""
    messages = []
    for raw in text.splitlines():
        match = _LOG_LINE.match(raw)
        if match:
            messages.append({k: match.group(k) for k in ("file", "line", "level", "text")})
        elif messages and raw.strip():
            messages[-1]["text"] += "\n" + raw  # a message that spans lines
    summary = [m["text"] for m in messages if m["text"].startswith("SUMMARY:")]
    verdict = "pass" if VERDICT_OK in summary else "fail" if VERDICT_ERRORS in summary else "unknown"
    results = {}
    for m in messages:
        got = re.match(r"Results (\S+) (\S+)$", m["text"])
        if got:
            results[got.group(1)] = got.group(2)
    no_results = [m["text"].split(" ", 1)[1] for m in messages if m["text"].startswith("NoResults ")]
    errors = [m for m in messages if m["level"] == "ERROR" and not m["text"].startswith(("NoResults ", "SUMMARY:"))]
    # refusals: the findings that made a check fail (errors that are not mere consequences,
    # and the warnings with which the accuracy check fails)
    refusals = [
        m
        for m in messages
        if (m in errors and not _CONSEQUENCE.match(m["text"]))
        or (m["level"] == "WARNING" and _FAILING_WARNING.search(m["text"]))
    ]
    return {
        "verdict": verdict,
        "summary": summary[-1] if summary else None,
        "messages": messages,
        "errors": errors,
        "warnings": [m for m in messages if m["level"] == "WARNING"],
        "refusals": refusals,
        "results": results,
        "no_results": no_results,
    }


def classify(refusals: list[dict], departures: dict = DEMO_DEPARTURES) -> dict:
    """{departure name: [messages]} plus "other" for refusals that match no departure."""
    out = {name: [] for name in departures}
    out["other"] = []
    for m in refusals:
        for name, patterns in departures.items():
            if any(re.search(p, m["text"]) for p in patterns):
                out[name].append(m["text"])
                break
        else:
            out["other"].append(m["text"])
    return out


def run_checker(inference_dir, tree, *, version: str, submitter: str, csv_out=None, extra_args=()) -> dict:
    """MLCommons' checker on ``tree`` with its own command line, from the checkout; the parsed verdict."""
    root = checkout(inference_dir)
    tree = Path(tree).resolve()
    csv_path = Path(csv_out).resolve() if csv_out else tree.parent / f"{tree.name}.checker.csv"
    command = [
        sys.executable,
        "-m",
        CHECKER_MODULE,
        "--input",
        str(tree),
        "--version",
        version,
        "--submitter",
        submitter,
        "--csv",
        str(csv_path),
        *extra_args,
    ]
    proc = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=1800)
    parsed = parse_checker_log(proc.stderr)
    if parsed["verdict"] == "unknown":
        raise SubmissionError(f"the checker printed no SUMMARY line (exit {proc.returncode}): {proc.stderr[-3000:]}")
    if (parsed["verdict"] == "pass") != (proc.returncode == 0):
        raise SubmissionError(f"checker exit status {proc.returncode} disagrees with its summary {parsed['summary']!r}")
    rows = []
    if csv_path.is_file():
        with open(csv_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    parsed.update(
        {
            "command": command,
            "cwd": str(root),
            "returncode": proc.returncode,
            "csv": str(csv_path),
            "csv_rows": rows,
            "inference_revision": checkout_revision(root),
            "version": version,
            "submitter": submitter,
            "tree": str(tree),
        }
    )
    return parsed


# --------------------------------------------------------------------------- report


def markdown_section(
    verdicts: dict[str, dict], no_tree: dict[str, str] | None = None, departures: dict | None = None
) -> str:
    """``{configuration: run_checker result}`` (+ ``{configuration: no_tree_reason}``) -> report section.

    ``departures`` (e.g. DEMO_DEPARTURES for the demo) names the rule each refusal reports."""
    lines = [
        "## MLPerf submission checker",
        "",
        "MLCommons' `tools/submission/submission_checker`, run with its own command line on the "
        "configuration's submission tree. Its verdict and every error it logged:",
        "",
    ]
    for name, v in sorted(verdicts.items()):
        lines += [
            f"### `{name}`: **{'PASS' if v['verdict'] == 'pass' else 'REFUSED'}**",
            "",
            f"- command: `{' '.join(v['command'])}` (in `{v['cwd']}`)",
            f"- summary: `{v['summary']}`",
        ]
        for path, value in sorted(v["results"].items()):
            lines.append(f"- accepted result: {value} ({path})")
        for path in v["no_results"]:
            lines.append(f"- no result: {path}")
        shown = [m for m in v["messages"] if m in v["refusals"] or m in v["errors"]]
        if shown:
            groups = classify(v["refusals"], departures or {})
            kind = {text: name for name, texts in groups.items() for text in texts}
            lines += ["", "| # | level | checker file:line | message | departure |", "|---|---|---|---|---|"]
            for i, m in enumerate(shown, 1):
                text = m["text"].replace("|", "\\|").replace("\n", " ")
                lines.append(
                    f"| {i} | {m['level']} | {m['file']}:{m['line']} | {text} | "
                    f"{kind.get(m['text'], '-') if m in v['refusals'] else 'consequence'} |"
                )
        lines.append("")
    for name, reason in sorted((no_tree or {}).items()):
        lines += [f"### `{name}`: no tree", "", reason, ""]
    if not verdicts and not no_tree:
        lines.append("No submission tree was made.")
    return "\n".join(lines) + "\n"


MLCOMMONS_SECTION_TITLE = "## MLPerf compliance (TEST06) and submission checker"


def report_sections(
    test06_dirs=(),
    verdict_files=(),
    departures: dict | None = DEMO_DEPARTURES,
    *,
    no_tree: dict[str, str] | None = None,
    skipped: str | None = None,
) -> list[str]:
    """Markdown for the report: TEST06 results (``TEST06/`` folders, labelled by their parent path)
    and the checker's verdicts (``check --out-json`` files, labelled by their parent folder).
    ``no_tree``: {configuration: no_tree_reason} for those with no one-LoadGen run;
    ``skipped``: why none of this ran (no mlcommons/inference checkout)."""
    from rackbench import compliance

    if skipped:
        return [f"{MLCOMMONS_SECTION_TITLE}\n\nNot run: {skipped}.\n"]
    no_tree = dict(no_tree or {})
    sections = []
    if test06_dirs or no_tree:
        section = compliance.markdown_section(
            {str(Path(d).parent): compliance.read_result(d) for d in test06_dirs}
        ).rstrip("\n")
        if no_tree:
            section += "\n\n" + "\n".join(
                f"- `{name}`: not run (no one-LoadGen run; see the submission checker)" for name in sorted(no_tree)
            )
        sections.append(section + "\n")
    if verdict_files or no_tree:
        verdicts = {str(Path(f).parent): json.loads(Path(f).read_text()) for f in verdict_files}
        no_tree.update({name: v["no_tree_reason"] for name, v in verdicts.items() if v.get("no_tree_reason")})
        sections.append(markdown_section({k: v for k, v in verdicts.items() if k not in no_tree}, no_tree, departures))
    return sections


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rackbench.submission", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write a submission tree for one configuration")
    b.add_argument("--out", required=True)
    b.add_argument("--inference-dir", required=True, help="mlcommons/inference checkout (mlcommons.inference_dir)")
    b.add_argument("--submitter", required=True)
    b.add_argument("--system-name", required=True, help="system_desc_id: the tree's folder and JSON name")
    b.add_argument("--benchmark", default=benchmarks.DEFAULT_BENCHMARK, choices=sorted(benchmarks.BENCHMARKS))
    b.add_argument(
        "--runs-json",
        required=True,
        help='JSON (or file): {"Offline": {"performance": DIR, "accuracy": DIR, "accuracy_txt": FILE, '
        '"test06": DIR}} (one LoadGen run per mode)',
    )
    b.add_argument("--gpu-type", required=True)
    b.add_argument("--gpu-type-json", required=True, help="JSON (or file): config['gpu_types'][GPU_TYPE]")
    b.add_argument("--nodes", type=int, required=True)
    b.add_argument("--gpus-per-node", type=int, required=True)
    b.add_argument("--backend", default=None)
    b.add_argument("--recipe", required=True)
    b.add_argument("--model-source-json", required=True, help="JSON (or file): config['models'][MODEL]['source']")
    b.add_argument("--status", default=DEFAULT_STATUS, choices=["available", "preview", "rdi"])
    c = sub.add_parser("check", help="run MLCommons' submission checker on a tree")
    c.add_argument("--tree", required=True)
    c.add_argument("--inference-dir", required=True)
    c.add_argument("--version", default=benchmarks.CURRENT_ROUND)
    c.add_argument("--submitter", required=True)
    c.add_argument("--csv", default=None)
    c.add_argument("--out-json", required=True, help="the parsed verdict")
    return p


def _settings_of(performance_dir: Path) -> dict:
    shard = performance_dir / "shard.json"
    if shard.is_file():
        return (json.loads(shard.read_text()).get("loadgen") or {}).get("settings") or {}
    return {}


def _provenance_of(performance_dir: Path) -> dict:
    prov = performance_dir / "provenance.json"
    return json.loads(prov.read_text()) if prov.is_file() else {}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "build":
            runs = json_arg(args.runs_json)
            first = Path(next(iter(runs.values()))["performance"])
            for run in runs.values():
                run.setdefault("settings", _settings_of(Path(run["performance"])))
            system = system_description(
                submitter=args.submitter,
                system_name=args.system_name,
                gpu_type_name=args.gpu_type,
                gpu_type=json_arg(args.gpu_type_json),
                nodes=args.nodes,
                gpus_per_node=args.gpus_per_node,
                provenance=_provenance_of(first),
                status=args.status,
                backend=args.backend,
            )
            build_tree(
                args.out,
                inference_dir=args.inference_dir,
                submitter=args.submitter,
                system_name=args.system_name,
                benchmark=args.benchmark,
                system=system,
                measurements_json=measurements(model_source=json_arg(args.model_source_json), recipe=args.recipe),
                runs=runs,
            )
            print(f"submission tree: {args.out}; unknown system fields: {', '.join(unknown_fields(system))}")
            return 0
        result = run_checker(
            args.inference_dir, args.tree, version=args.version, submitter=args.submitter, csv_out=args.csv
        )
    except SubmissionError as err:
        print(f"submission: {err}", file=sys.stderr)
        return 2
    write_json_atomic(args.out_json, result)
    print(result["summary"])
    for m in result["refusals"]:
        print(f"  {m['level']} {m['text']}")
    # the verdict is data, not a failure of this step: the report shows it either way
    return 0


if __name__ == "__main__":
    sys.exit(main())
