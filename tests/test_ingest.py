"""Ingest every published system in ../shared/mlperf-logs and reproduce its published figures.

The expected tokens/s and samples/s are read from the table in ../shared/README.md
(the published figures); the accuracy values are read from each accuracy.txt's text
independently of rackbench's parser.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rackbench import ingest

SHARED = Path(__file__).resolve().parents[2] / "shared"
LOGS = SHARED / "mlperf-logs"
pytestmark = pytest.mark.skipif(not LOGS.is_dir(), reason=f"{LOGS} is absent")


def published_table():
    """folder -> (tokens/s, samples/s) as printed in shared/README.md."""
    rows = {}
    for line in (SHARED / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and (LOGS / cells[0]).is_dir():
            rows[cells[0]] = (cells[3], cells[4])
    return rows


SYSTEMS = sorted(p.name for p in LOGS.iterdir() if p.is_dir()) if LOGS.is_dir() else []


@pytest.fixture(scope="module")
def rows():
    return ingest.ingest(LOGS)


def test_readme_lists_every_system():
    assert sorted(published_table()) == SYSTEMS


@pytest.mark.parametrize("system", SYSTEMS)
def test_performance_run_reproduces_published_figures(rows, system):
    tokens, samples = published_table()[system]
    perf = [r for r in rows if r["path"].startswith(system + "/") and r["test_mode"] == "PerformanceOnly"]
    assert len(perf) == 1
    r = perf[0]
    assert r["tokens_per_second"] == tokens          # to the digit, as printed
    assert r["samples_per_second"] == samples
    assert r["result"] == "VALID"
    assert r["min_duration_satisfied"] == "Yes" and r["min_queries_satisfied"] == "Yes"
    assert r["scenario"] == "Offline"
    assert re.match(r"\d+(\.\d+)* @ [0-9a-f]+$", r["loadgen_version"])
    assert int(r["samples_per_query"]) > 0
    assert r["summary_detail_mismatch"] is None      # summary and detail agree
    # the run lasted at least the minimum duration it claims to satisfy
    assert float(r["duration_s"]) >= int(r["min_duration_ms"]) / 1000
    assert int(r["generated_samples_per_query"]) >= int(r["samples_per_query"])
    assert r["accuracy_evidence"] == ingest.EVIDENCE_SCORED


def test_specific_published_figures(rows):
    by = {r["path"].split("/")[0]: r for r in rows if r["test_mode"] == "PerformanceOnly"}
    assert by["v5.1_NVIDIA_B200-SXM-180GBx8_TRT"]["tokens_per_second"] == "101527"
    assert by["v4.1_NVIDIA_DGX-H100_H100-SXM-80GBx8_TRT"]["tokens_per_second"] == "24524.9"


@pytest.mark.parametrize("system", SYSTEMS)
def test_accuracy_values_match_accuracy_txt(rows, system):
    acc_dir = next(p for p in (LOGS / system).rglob("accuracy.txt")).parent
    text = (acc_dir / "accuracy.txt").read_text()
    expected = dict(re.findall(r"'(\w+)': ([0-9.]+)", text))
    r = next(r for r in rows if (LOGS / r["path"]) == acc_dir)
    assert r["test_mode"] == "AccuracyOnly"
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len", "gen_num", "tokens_per_sample"):
        assert r[key] == expected[key], key
    assert r["accuracy_hash"] == re.search(r"hash=(\w+)", text).group(1)
    assert r["accuracy_log"] == "nonempty"


def test_cli_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "rackbench.ingest", str(LOGS), "--out", str(out)],
                          capture_output=True, text=True, check=True)
    for tokens, samples in published_table().values():
        assert f" {tokens} " in proc.stdout and f" {samples} " in proc.stdout
    data = json.loads(out.read_text())
    assert len(data) == 2 * len(SYSTEMS)
    csv = tmp_path / "rows.csv"
    subprocess.run([sys.executable, "-m", "rackbench.ingest", str(LOGS), "--out", str(csv)], check=True,
                   capture_output=True)
    import pandas as pd
    frame = pd.read_csv(csv, dtype=str)
    assert set(frame["tokens_per_second"].dropna()) == {t for t, _ in published_table().values()}


def test_no_accuracy_evidence_is_flagged(tmp_path):
    run = tmp_path / "mysystem" / "performance" / "run_1"
    run.mkdir(parents=True)
    src = LOGS / SYSTEMS[0]
    perf = next(src.rglob("performance/run_1"))
    for name in ("mlperf_log_summary.txt", "mlperf_log_detail.txt"):
        (run / name).write_bytes((perf / name).read_bytes())
    (run / "mlperf_log_accuracy.json").write_text("[\n]\n")   # what LoadGen writes in performance mode
    rows = ingest.ingest(tmp_path)
    assert len(rows) == 1
    assert rows[0]["accuracy_log"] == "empty"
    assert rows[0]["accuracy_evidence"] == ingest.EVIDENCE_NONE


def test_invalid_summary(tmp_path):
    (tmp_path / "mlperf_log_summary.txt").write_text(
        "Scenario : Offline\nMode     : PerformanceOnly\nSamples per second: 1.5\nTokens per second: 12.25\n"
        "Result is : INVALID\n  Min duration satisfied : NO\n  Min queries satisfied : Yes\n")
    (r,) = ingest.ingest(tmp_path)
    assert (r["result"], r["tokens_per_second"], r["min_duration_satisfied"]) == ("INVALID", "12.25", "NO")
