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
    # the rack-wide session: one allocation of the 18 nodes, 72 trtllm-serve endpoints started
    # once, one LoadGen per run: Offline, Server at 3200, Interactive at 3000, and the sweep's
    # 2400, 2800, 3600
    assert counts["rack_run"] == 1
    assert counts["rack_accuracy"] == 3
    (line,) = [line for line in proc.stdout.splitlines() if ": one LoadGen at a time over" in line]
    assert "rack_run of llama2-70b/nvfp4 on tensorrt-llm/GB300: one LoadGen at a time over 72 engine server(s)" in line
    assert "(--server-kind trtllm-serve" in line, line
    assert "--extra-llm-api-options results/engines/llama2-70b/nvfp4/tensorrt-llm/GB300/" in line, line
    assert "one Slurm allocation of 18 node(s) x 4 gb300 GPU(s), one srun --exact step per server" in line, line
    assert line.endswith(
        "runs Offline, Server-qps3200, Interactive-qps3000, Server-qps2400, Server-qps2800, Server-qps3600"
    ), line
    assert re.search(
        r"results/rack/llama2-70b/nvfp4/tensorrt-llm/GB300/bs3072/72x1/[0-9a-f]{8}/Server-qps3200.accuracy.json",
        proc.stdout,
    )


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
    # the performance shards each run the 48 demo samples (replicate), as N per-node runs do
    assert sorted(s["num_samples"] for s in shards) == [48, 48]

    accuracy = json.loads((workdir / DEMO_CONFIGURATION.accuracy_json).read_text())
    assert accuracy["gen_num"] == 48
    assert accuracy["valid"] is True, accuracy

    throughput = pd.read_csv(report / "throughput.csv")
    assert len(throughput) == 1
    markdown = (report / "report.md").read_text()
    assert "VALID" in markdown

    # the shards ran at the same time: the start barrier starts both at one moment, and they
    # run the same samples. How long each then takes depends on the CPU it gets (on a loaded CI
    # machine one shard was seen at 0.89 of the other), so the report's verdict is checked
    # against its own overlap test rather than assumed.
    starts = sorted(s["started_at"] for s in shards)
    assert starts[1] - starts[0] < 0.1, starts
    overlap = pd.read_csv(report / "shards.csv")["overlap_fraction"]
    assert len(overlap) == 2 and (overlap >= 0.8).all(), list(overlap)
    assert ("(a) is not a rack throughput" in markdown) == bool((overlap < 0.9).any()), list(overlap)

    # the rack-wide runs: two engine servers on localhost, one LoadGen
    # (one session: the servers started once for every run)
    runs_by_name = {r["name"]: r for r in DEMO_CONFIGURATION.one_loadgen_runs()}
    assert set(runs_by_name) == {"Offline", "Server-qps10", "Server-qps20"}
    (rack_log,) = (workdir / "results" / "logs" / "rack_run").glob("*.log")
    assert rack_log.read_text().count("endpoint(s) ready in") == 1
    for name, run in runs_by_name.items():
        assert run["modes"] == (["performance"] if name == "Server-qps20" else ["performance", "accuracy", "TEST06"])
        for mode in run["modes"]:
            mode_dir = workdir / run["run_dir"] / mode
            for file in paths.RACK_MODE_FILES:
                assert (mode_dir / file).is_file(), (name, mode, file)
            record = json.loads((mode_dir / "shard.json").read_text())
            samples = 100 if mode == "TEST06" else 48  # TEST06's audit.config: min_query_count 100
            assert record["num_shards"] == 1 and record["servers"] == 2 and record["completed_samples"] == samples
            assert record["scenario"] == run["scenario"]
            endpoints = json.loads((mode_dir / paths.ENDPOINTS_FILE).read_text())["endpoints"]
            assert len(endpoints) == 2 and all(ep["samples"] > 0 and ep["busy_s"] > 0 for ep in endpoints), endpoints
            assert sum(ep["samples"] for ep in endpoints) == samples
        if run["accuracy_json"]:
            assert json.loads((workdir / run["accuracy_json"]).read_text())["valid"] is True, name
    offline = json.loads((workdir / runs_by_name["Offline"]["performance"] / "shard.json").read_text())
    assert offline["loadgen"]["result"] == "VALID"
    server = json.loads((workdir / runs_by_name["Server-qps10"]["performance"] / "shard.json").read_text())
    assert server["loadgen"]["ttft_p99_ns"] > 0 and server["loadgen"]["tpot_p99_ns"] > 0
    rack = pd.read_csv(report / "rack.csv")
    assert sorted(rack["scenario"]) == ["Offline", "Server", "Server"]
    assert set(rack["method"]) == {"one LoadGen (MLPerf's method)"}
    assert "sum of 2 LoadGens (not an MLPerf result)" in markdown
    assert "one LoadGen (MLPerf's method)" in markdown
    for ext in ("pdf", "svg", "png"):
        assert (report / f"server_sweep.{ext}").stat().st_size > 0
    # no engine server outlived the run
    import psutil

    leftovers = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "rackbench.serve" in (proc.info["cmdline"] or []) and proc.cwd() == str(workdir):
                leftovers.append(proc.info["cmdline"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    assert not leftovers, leftovers

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
        "rack_run",
        "rack_accuracy",
        "test06",
        "submission_tree",
        "submission_check",
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
