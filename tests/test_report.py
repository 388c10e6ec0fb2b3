"""Aggregation math on synthetic shard dirs, validity/evidence flags, byte-identical rebuilds."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from rackbench import report

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("aggregate_rack", REPO / "bench" / "aggregate_rack.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def make_rack(
    root,
    *,
    durations=(100.0, 200.0, 50.0),
    starts=(0.0, 0.0, 0.0),
    rows=(40, 60, 10),
    out_tok=(10, 20, 5),
    results=None,
    accuracy="pass",
    layout_gpus=2,
    gpu_type="GB300",
):
    n = len(durations)
    dirs = []
    for i in range(n):
        dirs.append(
            bench.write_shard(
                root,
                shard=i,
                num_shards=n,
                gpus_per_shard=layout_gpus,
                rows=rows[i],
                started_at=1.7e9 + starts[i],
                duration=durations[i],
                out_tokens_per_sample=out_tok[i],
                in_tokens_per_sample=100,
                result=(results or ["VALID"] * n)[i],
                gpu_type=gpu_type,
            )
        )
    acc = []
    if accuracy:
        acc.append(
            bench.write_accuracy(
                root,
                layout=f"{n}x{layout_gpus}",
                gpu_type=gpu_type,
                valid=accuracy == "pass",
                rouge1=44.4 if accuracy == "pass" else 40.1,
            )
        )
    return dirs, acc


def run(dirs, acc, out, gpu_types=None, models=None):
    """The report on one configuration, told its shard dirs and accuracy.json as the workflow tells it."""
    entry = bench.configuration_entry(dirs, acc[0] if acc else None)
    return report.build_report(
        [entry],
        gpu_types if gpu_types is not None else bench.GPU_TYPES,
        models if models is not None else bench.MODELS,
        out,
    )


def test_sum_concurrent_spread(tmp_path):
    dirs, acc = make_rack(tmp_path / "results")
    res = run(dirs, acc, tmp_path / "out")
    (cfg,) = res["configs"]
    # per shard output tokens/s: 40*10/100 = 4, 60*20/200 = 6, 10*5/50 = 1
    assert cfg["a_sum_tokens_per_s"] == pytest.approx(11.0)
    # (b): (400 + 1200 + 50) tokens / (200 - 0) s
    assert cfg["b_concurrent_tokens_per_s"] == pytest.approx(1650 / 200)
    # (c): per GPU (2 GPUs per shard): 2, 3, 0.5
    assert cfg["c_per_gpu_mean"] == pytest.approx(5.5 / 3)
    assert (cfg["c_per_gpu_min"], cfg["c_per_gpu_max"]) == (pytest.approx(0.5), pytest.approx(3.0))
    sd = pd.Series([2.0, 3.0, 0.5]).std()
    assert cfg["c_cv"] == pytest.approx(sd / (5.5 / 3))
    assert cfg["slowest_shard"] == 2
    assert cfg["total_gpus"] == 6
    assert cfg["status"] == report.STATUS_VALID
    # shards 0 and 1 lie largely outside the window all three share (0..50 s)
    assert cfg["non_overlapping_shards"] == [0, 1]
    assert not cfg["concurrent"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "(a) sum" in md and "(b) concurrent" in md and "(c)" in md
    assert "(a) is not a rack throughput" in md
    csv = pd.read_csv(tmp_path / "out" / "throughput.csv")
    assert csv.loc[0, "a_sum_tokens_per_s"] == pytest.approx(11.0)
    assert csv.loc[0, "slowest_shard"] == 2
    assert "slowest" in md
    shards = pd.read_csv(tmp_path / "out" / "shards.csv")
    assert list(shards["shard_index"]) == [0, 1, 2]
    # efficiency: (in+out) tokens / window / GPUs x 2 x 7e10 / 1.5e16 (nvfp4 -> fp4)
    tokens = 1650 + 100 * (40 + 60 + 10)
    assert cfg["efficiency_b"] == pytest.approx(tokens / 200 / 6 * 2 * 7e10 / 1.5e16)


def test_overlapping_shards_are_concurrent(tmp_path):
    dirs, acc = make_rack(tmp_path / "results", durations=(100.0, 101.0, 100.0), starts=(0.0, 0.5, 1.0))
    (cfg,) = run(dirs, acc, tmp_path / "out")["configs"]
    assert cfg["concurrent"] and cfg["non_overlapping_shards"] == []
    assert "(a) is not a rack throughput" not in (tmp_path / "out" / "report.md").read_text()


def test_sequential_shards_flagged(tmp_path):
    dirs, acc = make_rack(
        tmp_path / "results",
        durations=(100.0, 100.0, 100.0),
        starts=(0.0, 100.0, 200.0),
        rows=(10, 10, 10),
        out_tok=(10, 10, 10),
    )
    (cfg,) = run(dirs, acc, tmp_path / "out")["configs"]
    assert cfg["non_overlapping_shards"] == [0, 1, 2]
    # sum of separate runs triples the figure; the concurrent figure does not
    assert cfg["a_sum_tokens_per_s"] == pytest.approx(3.0)
    assert cfg["b_concurrent_tokens_per_s"] == pytest.approx(300 / 300)


def test_loadgen_invalid_shown_as_invalid(tmp_path):
    dirs, acc = make_rack(tmp_path / "results", results=["VALID", "INVALID", "VALID"])
    (cfg,) = run(dirs, acc, tmp_path / "out")["configs"]
    assert cfg["status"] == report.STATUS_INVALID
    assert "shard 1: LoadGen result INVALID" in cfg["status_reasons"]
    csv = pd.read_csv(tmp_path / "out" / "throughput.csv")
    assert csv.loc[0, "status"] == "INVALID"
    for col in report.RESULT_COLUMNS:
        assert math.isnan(csv.loc[0, col]), col  # never shown as a result
    md = (tmp_path / "out" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| llama2-70b/"))
    assert "**INVALID**" in row and "11.0" not in row


def test_accuracy_gate_failure_is_invalid(tmp_path):
    dirs, acc = make_rack(tmp_path / "results", accuracy="fail")
    (cfg,) = run(dirs, acc, tmp_path / "out")["configs"]
    assert cfg["status"] == report.STATUS_INVALID and "accuracy gate failed" in cfg["status_reasons"]
    assert "**FAIL**" in (tmp_path / "out" / "report.md").read_text()


def test_no_accuracy_evidence_flagged(tmp_path):
    dirs, acc = make_rack(tmp_path / "results", accuracy=None)
    (cfg,) = run(dirs, acc, tmp_path / "out")["configs"]
    assert cfg["status"] == report.STATUS_NO_EVIDENCE and cfg["accuracy_evidence"] == "none"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "NO ACCURACY EVIDENCE" in md
    shards = pd.read_csv(tmp_path / "out" / "shards.csv")
    assert set(shards["accuracy_log"]) == {"empty"}


def test_missing_shard_is_invalid(tmp_path):
    dirs, acc = make_rack(tmp_path / "results")
    (cfg,) = run(dirs[:2], acc, tmp_path / "out")["configs"]
    assert cfg["status"] == report.STATUS_INVALID and "missing [2]" in cfg["status_reasons"]


def test_accuracy_file_is_the_one_the_workflow_names(tmp_path):
    """The configuration's accuracy.json is wherever its entry says; the report parses no path."""
    dirs, _ = make_rack(tmp_path / "results", accuracy=None)
    elsewhere = tmp_path / "acc.json"
    elsewhere.write_text(json.dumps({"valid": True, "failures": [], "rouge1": 44.5}))
    (cfg,) = run(dirs, [elsewhere], tmp_path / "out")["configs"]
    assert cfg["status"] == report.STATUS_VALID and cfg["accuracy_evidence"] == "accuracy.json"
    assert cfg["accuracy_file"] == elsewhere.as_posix()


def test_configuration_fields_come_from_the_entry_not_the_path(tmp_path):
    dirs, acc = make_rack(tmp_path / "results")
    moved = tmp_path / "anywhere"
    moved.mkdir()
    for d in dirs:
        d.rename(moved / d.name)
    entry = bench.configuration_entry([moved / d.name for d in dirs], acc[0])
    (cfg,) = report.build_report([entry], bench.GPU_TYPES, bench.MODELS, tmp_path / "out")["configs"]
    assert (cfg["gpu_type"], cfg["batch_size"], cfg["layout"]) == ("GB300", 16, "3x2")
    assert cfg["variant"] == bench.SYNTHETIC_VARIANT and cfg["status"] == report.STATUS_VALID
    with pytest.raises(report.ReportInputError, match="lacks"):
        report.build_report(
            [{k: v for k, v in entry.items() if k != "gpu_type"}], bench.GPU_TYPES, bench.MODELS, tmp_path / "out2"
        )


def test_cpu_gpu_type_skips_efficiency(tmp_path):
    dirs, acc = make_rack(tmp_path / "results", gpu_type="cpu")
    (cfg,) = run(dirs, acc, tmp_path / "out")["configs"]
    assert math.isnan(cfg["efficiency_b"]) and "no peak dense FLOP/s" in cfg["efficiency_skip"]
    assert "skipped" in (tmp_path / "out" / "report.md").read_text()
    for name in ("efficiency", "records"):
        assert (tmp_path / "out" / f"{name}.png").stat().st_size > 0


def test_parameters_counted_from_checkpoint(tmp_path):
    cfg = {
        "hidden_size": 8192,
        "num_hidden_layers": 80,
        "intermediate_size": 28672,
        "vocab_size": 32000,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
    }
    assert report.count_parameters(cfg) == pytest.approx(6.9e10, rel=0.01)  # Llama-2-70B
    snap = tmp_path / "results" / "models" / "m" / "0123abcd" / "snapshot"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(cfg))
    n, source = report.model_parameters("m", {}, snap)
    assert n == report.count_parameters(cfg) and "config.json" in source


def test_provenance_table(tmp_path):
    from rackbench import provenance

    dirs, acc = make_rack(tmp_path / "results")
    for d in dirs:
        provenance.write_provenance(d / "provenance.json", step="run_shard", config_fragment={"d": str(d.name)})
    engine = tmp_path / "results/engines/llama2-70b/nvfp4/tensorrt-llm/GB300/0123abcd/engine"
    engine.mkdir(parents=True)
    provenance.write_provenance(engine / "provenance.json", step="build_engine", config_fragment={})
    entry = {**bench.configuration_entry(dirs, acc[0]), "engine_dir": str(engine)}
    res = report.build_report([entry], bench.GPU_TYPES, bench.MODELS, tmp_path / "out")
    assert sorted(r["step"] for r in res["provenance"]) == ["build_engine"] + ["run_shard"] * 3
    prov = pd.read_csv(tmp_path / "out" / "provenance.csv")
    assert len(prov) == 4 and prov["config_sha256"].nunique() == 4
    assert "## Provenance" in (tmp_path / "out" / "report.md").read_text()


def test_rebuild_is_byte_identical_and_figures_name_inputs(tmp_path):
    dirs, acc = make_rack(tmp_path / "results", results=["VALID", "VALID", "INVALID"])
    gpu_json = tmp_path / "gpu.json"
    gpu_json.write_text(json.dumps(bench.GPU_TYPES))
    models_json = tmp_path / "models.json"
    models_json.write_text(json.dumps(bench.MODELS))
    configurations = tmp_path / "configurations.json"
    configurations.write_text(json.dumps([bench.configuration_entry(dirs, acc[0])]))
    outs = []
    for name in ("one", "two"):
        out = tmp_path / name
        subprocess.run(
            [
                sys.executable,
                "-m",
                "rackbench.report",
                "--configurations-json",
                str(configurations),
                "--results",
                str(tmp_path / "results"),
                "--gpu-types-json",
                str(gpu_json),
                "--models-json",
                str(models_json),
                "--out",
                str(out),
            ],
            check=True,
            capture_output=True,
        )
        outs.append(out)
    names = sorted(p.name for p in outs[0].iterdir())
    for fig in ("shard_throughput", "shard_timeline", "records", "efficiency"):
        for ext in ("pdf", "svg", "png"):
            assert f"{fig}.{ext}" in names
    for name in ("throughput.csv", "shards.csv", "report.md", "provenance.csv"):
        assert name in names
    assert names == sorted(p.name for p in outs[1].iterdir())
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    summary = f"{dirs[0]}/mlperf_log_summary.txt"
    assert summary.encode() in (outs[0] / "shard_throughput.svg").read_bytes()
    assert summary.encode() in (outs[0] / "shard_throughput.pdf").read_bytes()
    from PIL import Image

    assert summary in Image.open(outs[0] / "shard_throughput.png").text["Source"]
    assert str(gpu_json) in Image.open(outs[0] / "records.png").text["Source"]
    svg = (outs[0] / "records.svg").read_text()
    assert "<dc:date>" not in svg
    assert b"CreationDate" not in (outs[0] / "records.pdf").read_bytes()
