"""The workflow as users run it: lint, the real config's DAG, and the demo end to end."""

import json
import re

import pandas as pd
import pytest

from conftest import DEMO_CONFIGURATION, PLANTED_TOKEN, ROOT, real_config_with_local_data, snakemake
from rackbench import paths


def test_lint_reports_nothing():
    proc = snakemake(ROOT, "--lint", timeout=300)
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


def job_counts(dry_run_stdout):
    table = dry_run_stdout.split("Job stats:")[1].split("\n\n")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_real_config_plans_the_whole_rack(tmp_path):
    config = real_config_with_local_data(tmp_path)
    proc = snakemake(ROOT, "-n", "--configfile", str(config), timeout=300)
    counts = job_counts(proc.stdout)
    # 18 nodes x 4 GPUs, one engine (one shard) per GPU: 72 performance + 72 accuracy shards
    assert counts["run_shard"] == 144
    for rule in ("download_model", "prepare_dataset", "quantize", "build_engine", "accuracy", "report"):
        assert counts[rule] == 1, rule
    assert "demo_model" not in counts
    assert "download_dataset" not in counts  # the config names local copies: no download
    assert re.search(
        r"results/runs/llama2-70b/nvfp4/tensorrt-llm/GB300/bs3072/72x1/[0-9a-f]{8}/performance/shard71", proc.stdout
    )
    # the TensorRT-LLM jobs show their GPU request and container
    shard_jobs = [line for line in proc.stdout.splitlines() if ": run_shard " in line]
    assert len(shard_jobs) == 144
    assert all(
        line.endswith("on tensorrt-llm/GB300 (layout 72x1, batch 3072): 1 x gb300 GPU(s), container envs/trtllm.sif")
        for line in shard_jobs
    ), shard_jobs[:2]
    assert re.search(
        r"build_engine tensorrt-llm engine of llama2-70b/nvfp4 for GB300: 1 x gb300 GPU\(s\), "
        r"container envs/trtllm.sif",
        proc.stdout,
    )
    # quantize calibrates on one GB300 node
    assert re.search(r"rule quantize:(.|\n)*?resources: .*gpu=1, gpu_model=gb300, cpus_per_gpu=18", proc.stdout)


def test_real_config_four_gpu_shards(tmp_path):
    config = real_config_with_local_data(tmp_path, **{"benchmarks.gpus_per_shard": [4]})
    proc = snakemake(ROOT, "-n", "--configfile", str(config), timeout=300)
    assert job_counts(proc.stdout)["run_shard"] == 36  # 18 performance + 18 accuracy
    assert re.search(r"/18x4/[0-9a-f]{8}/performance/shard17", proc.stdout)


# ---- the demo, end to end --------------------------------------------------------
@pytest.mark.slow
def test_demo_end_to_end(demo_run):
    workdir, proc = demo_run
    report = workdir / "results" / "report"
    for name in ("report.md", "throughput.csv", "shards.csv", "provenance.csv"):
        assert (report / name).stat().st_size > 0, name
    for figure in ("shard_throughput", "shard_timeline", "records", "efficiency"):
        for ext in ("pdf", "svg", "png"):
            assert (report / f"{figure}.{ext}").stat().st_size > 0

    runs = workdir / DEMO_CONFIGURATION.run_dir
    shards = [json.loads((runs / "performance" / f"shard{i}" / "shard.json").read_text()) for i in range(2)]
    for i, shard in enumerate(shards):
        shard_dir = runs / "performance" / f"shard{i}"
        for log in ("mlperf_log_summary.txt", "mlperf_log_detail.txt", "mlperf_log_accuracy.json"):
            assert (shard_dir / log).is_file()
        assert shard["loadgen"]["result"] == "VALID"
        assert shard["finished_at"] > shard["started_at"]
        per_sample = pd.read_parquet(shard_dir / "samples.parquet")
        assert per_sample["output_tokens"].sum() == shard["output_tokens"]
    # the performance shards split the 48 demo samples between them
    assert sorted(s["num_samples"] for s in shards) == [24, 24]

    accuracy = json.loads((workdir / DEMO_CONFIGURATION.accuracy_json).read_text())
    assert accuracy["gen_num"] == 48
    assert accuracy["valid"] is True, accuracy

    throughput = pd.read_csv(report / "throughput.csv")
    assert len(throughput) == 1
    markdown = (report / "report.md").read_text()
    assert "VALID" in markdown

    # every step left a log and provenance
    logs = workdir / "results" / "logs"
    for rule in (
        "demo_model",
        "demo_dataset",
        "download_model",
        "prepare_dataset",
        "quantize",
        "build_engine",
        "run_shard",
        "accuracy",
        "report",
    ):
        assert list(logs.glob(f"{rule}*")), rule
    assert (workdir / DEMO_CONFIGURATION.checkpoint_dir / "provenance.json").is_file()
    assert (workdir / DEMO_CONFIGURATION.engine_dir / "engine.json").is_file()
    # and its full settings beside its output, under the variant they hash to
    for output in (
        DEMO_CONFIGURATION.snapshot_dir,
        DEMO_CONFIGURATION.dataset_file("samples"),
        DEMO_CONFIGURATION.checkpoint_dir,
        DEMO_CONFIGURATION.engine_dir,
        DEMO_CONFIGURATION.run_dir,
        DEMO_CONFIGURATION.accuracy_json,
    ):
        settings_json = paths.settings_file(workdir / output)
        assert paths.variant_id(json.loads(settings_json.read_text())) == settings_json.parent.name, output


@pytest.mark.slow
def test_demo_leaks_no_token(demo_run):
    """The demo ran with HF_TOKEN planted: no file under results/, the logs or .snakemake/ contains it."""
    workdir, proc = demo_run
    assert PLANTED_TOKEN not in proc.stdout + proc.stderr
    scanned = 0
    for top in ("results", ".snakemake"):
        for path in (workdir / top).rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert PLANTED_TOKEN.encode() not in path.read_bytes(), path
                scanned += 1
    assert scanned > 50


@pytest.mark.slow
def test_demo_html_report_renders_in_chromium(demo_copy, chromium):
    """`snakemake --report` on the real workflow's demo results; Chromium shows every figure."""
    from test_report_html import assert_figures_render

    snakemake(demo_copy, "--report", "results/report.html")
    html = (demo_copy / "results" / "report.html").read_text()
    for category in ("throughput", "accuracy", "provenance"):
        assert category in html
    targets = [
        f"results/report/{f}.{e}"
        for f in ("shard_throughput", "shard_timeline", "records", "efficiency")
        for e in ("png", "svg")
    ]
    assert_figures_render(chromium, demo_copy / "results" / "report.html", targets, demo_copy)
