"""Partial reruns as users do them, through Snakemake, on a private copy of one
finished demo run (conftest.demo_copy): change a setting, ask Snakemake what it
would redo (`snakemake -n`), and where it is cheap, redo it for real.

Config changes go in a small override YAML after config.yaml
(`--configfile config.yaml override.yaml`): Snakemake deep-merges config files
(lists are replaced). `--config` is no substitute for nested keys: it parses
nested values as strings (see test_nested_config_on_the_command_line_...).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import DEMO_CONFIG, DEMO_CONFIGURATION, DEMO_STEP_OUTPUTS, ROOT, snakemake
from rackbench import paths
from rackbench.config import configurations, merge_configs

KEY = DEMO_CONFIGURATION.key

pytestmark = pytest.mark.slow

# The demo's upstream outputs, by the rule that makes them.
UPSTREAM = {rule: path for rule, path in DEMO_STEP_OUTPUTS.items() if rule not in ("run_shard", "accuracy", "report")}
RUN_ONLY = {"run_shard": 4, "accuracy": 1, "report": 1, "all": 1}  # 2 performance + 2 accuracy shards
FIGURES = [
    f"{name}.{ext}"
    for name in ("shard_throughput", "shard_timeline", "records", "efficiency")
    for ext in ("pdf", "svg", "png")
]


def job_stats(output: str) -> dict[str, int]:
    """Snakemake's "Job stats" table (printed by a dry run and at the start of a real
    run) as {rule: count}, without the total; {} when there is nothing to do."""
    if "Nothing to be done" in output:
        return {}
    m = re.search(r"Job stats:\njob\s+count\n[-\s]+\n(.*?)\ntotal\s+\d+", output, re.S)
    assert m, f"no job stats in:\n{output[-3000:]}"
    return {rule: int(n) for rule, n in (line.split() for line in m.group(1).splitlines())}


def plan(workdir: Path, *args: str) -> dict[str, int]:
    p = snakemake(workdir, "-n", "--cores", "2", *args)
    return job_stats(p.stdout + p.stderr)


def run(workdir: Path, *args: str) -> dict[str, int]:
    """A real run; returns the jobs it ran."""
    p = snakemake(workdir, "--cores", "2", *args)
    return job_stats(p.stdout + p.stderr)


# The overrides leave the rack session out: these tests are about the per-shard steps' variants,
# and the session (and the MLCommons steps on it) would add minutes to every real run here.
NO_RACK = "rack_run:\n  enabled: false\n"


def override(workdir: Path, text: str) -> list[str]:
    path = workdir / "override.yaml"
    path.write_text(text + NO_RACK)
    return ["--configfile", "config.yaml", str(path)]


def configuration_with(text: str):
    """The demo's configuration under an override YAML, as Snakemake merges it."""
    config = yaml.safe_load(yaml.safe_dump(DEMO_CONFIG))
    merge_configs(config, yaml.safe_load(text + NO_RACK))
    (cfg,) = configurations(config)
    return cfg


def stamps(workdir: Path, paths) -> dict[str, int]:
    """mtime (ns) of each path and of every file under it: what a rerun would touch."""
    out = {}
    for rel in paths:
        root = workdir / rel
        for f in [root, *(root.rglob("*") if root.is_dir() else [])]:
            out[str(f.relative_to(workdir))] = f.stat().st_mtime_ns
    return out


def shard_records(workdir: Path, cfg=DEMO_CONFIGURATION, mode: str = "performance") -> dict[str, dict]:
    runs = workdir / cfg.run_dir / mode
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(runs.glob("shard*/shard.json"))}


def test_batch_size_change_reruns_only_the_shards_accuracy_and_report(demo_copy):
    """(a) The runtime batch size is a run-only parameter: the engine (built for up to
    engines.reference.max_batch_size) is reused; the bs16 results stay beside the new ones."""
    args = override(demo_copy, "benchmarks:\n  batch_sizes: [8]\n")
    assert plan(demo_copy, *args) == RUN_ONLY
    before = stamps(demo_copy, [*UPSTREAM.values(), f"results/runs/{KEY}", f"results/accuracy/{KEY}"])

    assert run(demo_copy, *args) == RUN_ONLY
    assert stamps(demo_copy, before) == before  # nothing upstream redone, bs16 results untouched
    new = configuration_with("benchmarks:\n  batch_sizes: [8]\n")
    new_key = new.key
    assert new_key == KEY.replace("bs16", "bs8")
    recs = {**shard_records(demo_copy, new), **shard_records(demo_copy, new, "accuracy")}
    assert len(recs) == 2 and {r["batch_size"] for r in recs.values()} == {8}
    throughput = pd.read_csv(demo_copy / "results" / "report" / "throughput.csv")
    assert throughput["config"].tolist() == [new_key] and throughput["status"].tolist() == ["VALID"]

    assert plan(demo_copy, *args) == {}
    # back to the default config: its results are all still there, only the report is redone
    assert plan(demo_copy) == {"report": 1, "all": 1}


def test_recipe_change_reruns_quantize_and_everything_after_it(demo_copy):
    """(b) A new recipe: quantize onwards, side by side with the nvfp4 results; never the
    download, the dataset conversion, or the demo's own model and dataset."""
    args = override(demo_copy, "benchmarks:\n  recipes: [fp8]\n")
    p = snakemake(demo_copy, "-n", "--cores", "2", *args)
    jobs = job_stats(p.stdout + p.stderr)
    assert jobs == {"quantize": 1, "build_engine": 1, **RUN_ONLY}
    assert not {"download_model", "prepare_dataset", "demo_model", "demo_dataset"} & set(jobs)
    out = p.stdout + p.stderr
    fp8 = configuration_with("benchmarks:\n  recipes: [fp8]\n")
    assert fp8.checkpoint_dir.startswith("results/quantized/tiny-llama/fp8/") and fp8.checkpoint_dir in out
    assert fp8.engine_dir.startswith("results/engines/tiny-llama/fp8/reference/cpu/") and fp8.engine_dir in out


def test_report_only_rebuild_gives_identical_figures(demo_copy):
    """(c) `-R report --until report` redoes the report alone, from results/ alone, and
    the figures (and tables) come out byte for byte the same."""
    assert plan(demo_copy, "-R", "report", "--until", "report") == {"report": 1}
    report = demo_copy / "results" / "report"
    before = {f.name: f.read_bytes() for f in report.iterdir()}
    assert set(FIGURES) <= set(before)
    upstream = stamps(demo_copy, [*UPSTREAM.values(), "results/runs", "results/accuracy"])
    old_mtime = (report / "report.md").stat().st_mtime_ns

    assert run(demo_copy, "-R", "report", "--until", "report") == {"report": 1}
    assert (report / "report.md").stat().st_mtime_ns != old_mtime  # really redone
    after = {f.name: f.read_bytes() for f in report.iterdir()}
    assert sorted(after) == sorted(before)
    changed = [name for name in before if after[name] != before[name]]
    assert changed == [], f"not byte-identical after a report-only rebuild: {changed}"
    assert stamps(demo_copy, upstream) == upstream
    assert plan(demo_copy) == {}


def test_max_new_tokens_change_makes_a_new_run_variant_beside_the_old(demo_copy):
    """(d) run.max_new_tokens shapes the shards' results: a change within the demo's reference
    length runs a new run variant (shards, accuracy, report) beside the old one, which stays
    untouched and listed; switching back costs only the report."""
    demo = yaml.safe_load((ROOT / "config.yaml").read_text())
    limit = demo["demo"]["reference_max_new_tokens"]
    shorter = demo["run"]["max_new_tokens"] // 2
    text = f"run:\n  max_new_tokens: {shorter}\n"
    new = configuration_with(text)
    assert new.key == KEY and new.run_variant != DEMO_CONFIGURATION.run_variant
    args = override(demo_copy, text)
    assert plan(demo_copy, *args) == RUN_ONLY
    before = stamps(demo_copy, [*UPSTREAM.values(), DEMO_CONFIGURATION.run_dir])

    assert run(demo_copy, *args) == RUN_ONLY
    assert stamps(demo_copy, before) == before  # the old variant is untouched
    new_records = shard_records(demo_copy, new)
    assert sorted(new_records) == ["shard0", "shard1"]
    assert {r["max_new_tokens"] for r in new_records.values()} == {shorter}
    settings = json.loads(paths.settings_file(demo_copy / new.run_dir).read_text())
    assert settings["run"]["max_new_tokens"] == shorter
    variants = pd.read_csv(demo_copy / paths.report_file("variants"))
    assert sorted(zip(variants["variant"], variants["current"])) == sorted(
        [(DEMO_CONFIGURATION.run_variant, False), (new.run_variant, True)]
    )
    assert plan(demo_copy, *args) == {}
    assert plan(demo_copy) == {"report": 1, "all": 1}  # back to the default: its results are all there
    # beyond the demo's reference length the config is refused before anything runs
    bad = snakemake(
        demo_copy, "-n", "--cores", "2", *override(demo_copy, f"run:\n  max_new_tokens: {limit + 1}\n"), check=False
    )
    assert bad.returncode != 0
    assert (
        f"invalid config: run.max_new_tokens: {limit + 1} exceeds demo.reference_max_new_tokens ({limit})"
        in bad.stdout + bad.stderr
    )


def test_changed_knob_whose_job_fails_keeps_the_previous_result(demo_copy):
    """Issue 11's new-user case: a dataset path that passes the config check but is not the
    dataset (here the checksum list itself; a directory is now refused before any job).
    Its conversion fails; the previous samples.parquet, every result made from it and the
    report that shows them are all still there, and switching back has nothing to redo."""
    previous = [
        str(Path(DEMO_CONFIGURATION.dataset_file("samples")).parent),
        DEMO_CONFIGURATION.run_dir,
        str(Path(DEMO_CONFIGURATION.accuracy_json).parent),
        paths.REPORT_DIR,
    ]
    keep = stamps(demo_copy, previous)
    report_before = (demo_copy / paths.report_file("markdown")).read_text()
    assert f"| {KEY} | **VALID** |" in report_before
    not_the_dataset = f"{paths.DEMO_DATASET_DIR}/SHA256SUMS"
    text = f"datasets:\n  {DEMO_CONFIGURATION.dataset}:\n    samples:\n      path: {not_the_dataset}\n"
    changed = configuration_with(text)
    assert changed.dataset_variant != DEMO_CONFIGURATION.dataset_variant

    failed = snakemake(demo_copy, "--cores", "2", *override(demo_copy, text), check=False)
    assert failed.returncode != 0
    assert "Error in rule prepare_dataset" in failed.stdout + failed.stderr
    assert not (demo_copy / changed.dataset_file("samples")).exists()
    assert stamps(demo_copy, keep) == keep  # nothing of the previous results was deleted or rewritten
    assert (demo_copy / paths.report_file("markdown")).read_text() == report_before
    throughput = pd.read_csv(demo_copy / paths.report_file("throughput"))
    assert throughput[["config", "variant", "status"]].values.tolist() == [
        [KEY, DEMO_CONFIGURATION.run_variant, "VALID"]
    ]
    assert plan(demo_copy) == {}


def test_nested_config_on_the_command_line_is_refused_not_misread(demo_copy):
    """`--config 'benchmarks={batch_sizes: [8]}'` deep-merges, but Snakemake parses nested
    values as strings: the config check refuses it in one line, before any job.
    (Hence the override YAML in the README.)"""
    before = stamps(demo_copy, ["results"])
    p = snakemake(demo_copy, "--cores", "2", "--config", "benchmarks={batch_sizes: [8]}", check=False)
    assert p.returncode != 0
    assert "invalid config: benchmarks.batch_sizes.0: '8' is not of type 'integer'" in p.stdout + p.stderr
    assert stamps(demo_copy, ["results"]) == before
