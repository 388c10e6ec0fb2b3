"""Ingest every published system in ../shared/mlperf-logs and reproduce its published figures.

The expected tokens/s and samples/s are read from the table in ../shared/README.md
(the published figures); the accuracy values are read from each accuracy.txt's text
independently of rackbench's parser.
"""

import json
import re
import shutil
import subprocess
import sys

import pytest

from helpers import MLPERF_LOGS as LOGS
from helpers import SHARED
from rackbench import ingest

pytestmark = pytest.mark.skipif(not LOGS.is_dir(), reason=f"{LOGS} is absent")


def published_table():
    """folder -> (tokens/s, samples/s) of its Offline run as printed in shared/README.md
    (a cell may name the scenario: "Offline 1.12685e+06")."""
    rows = {}
    for line in (SHARED / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and (LOGS / cells[0]).is_dir():
            rows[cells[0]] = tuple(c.removeprefix("Offline ").strip() for c in cells[3:5])
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
    perf = [
        r
        for r in rows
        if r["path"].startswith(system + "/")
        and r["test_mode"] == "PerformanceOnly"
        and r["mlperf_scenario"] == "Offline"
    ]
    assert len(perf) == 1
    r = perf[0]
    assert r["tokens_per_second"] == tokens  # to the digit, as printed
    assert r["samples_per_second"] == samples
    assert r["result"] == "VALID"
    assert r["min_duration_satisfied"] == "Yes" and r["min_queries_satisfied"] == "Yes"
    assert r["scenario"] == "Offline"
    assert re.match(r"\d+(\.\d+)* @ ([0-9a-f]+|NA)$", r["loadgen_version"])  # NVIDIA v6.0 printed "@ NA"
    assert int(r["samples_per_query"]) > 0
    assert r["summary_detail_mismatch"] is None  # summary and detail agree
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
    acc_dir = sorted(p for p in (LOGS / system).rglob("accuracy.txt"))[0].parent
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
    proc = subprocess.run(
        [sys.executable, "-m", "rackbench.ingest", str(LOGS), "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    for tokens, samples in published_table().values():
        assert f" {tokens} " in proc.stdout and f" {samples} " in proc.stdout
    data = json.loads(out.read_text())
    # one performance and one accuracy dir per folder; the x72 tree: 3 scenarios x (both + TEST06/accuracy)
    assert len(data) == 2 * (len(SYSTEMS) - 1) + 9
    csv = tmp_path / "rows.csv"
    subprocess.run(
        [sys.executable, "-m", "rackbench.ingest", str(LOGS), "--out", str(csv)], check=True, capture_output=True
    )
    import pandas as pd

    frame = pd.read_csv(csv, dtype=str)
    assert set(frame["tokens_per_second"].dropna()) == {t for t, _ in published_table().values()}
    assert set(frame["completed_tokens_per_second"].dropna()) == {"868277.92", "814127.85"}


def test_no_accuracy_evidence_is_flagged(tmp_path):
    run = tmp_path / "mysystem" / "performance" / "run_1"
    run.mkdir(parents=True)
    src = LOGS / SYSTEMS[0]
    perf = next(src.rglob("performance/run_1"))
    for name in ("mlperf_log_summary.txt", "mlperf_log_detail.txt"):
        (run / name).write_bytes((perf / name).read_bytes())
    (run / "mlperf_log_accuracy.json").write_text("[\n]\n")  # what LoadGen writes in performance mode
    rows = ingest.ingest(tmp_path)
    assert len(rows) == 1
    assert rows[0]["accuracy_log"] == "empty"
    assert rows[0]["accuracy_evidence"] == ingest.EVIDENCE_NONE


def test_invalid_summary(tmp_path):
    (tmp_path / "mlperf_log_summary.txt").write_text(
        "Scenario : Offline\nMode     : PerformanceOnly\nSamples per second: 1.5\nTokens per second: 12.25\n"
        "Result is : INVALID\n  Min duration satisfied : NO\n  Min queries satisfied : Yes\n"
    )
    (r,) = ingest.ingest(tmp_path)
    assert (r["result"], r["tokens_per_second"], r["min_duration_satisfied"]) == ("INVALID", "12.25", "NO")


# --------------------------------------------------------------------------- Server/Interactive, racks

X72 = LOGS / "v6.0_NVIDIA_GB300-NVL72_x72_TRT_submission"


def test_server_and_interactive_fields(rows):
    x72 = {
        r["mlperf_scenario"]: r
        for r in rows
        if r["path"].startswith(X72.name + "/") and r["test_mode"] == "PerformanceOnly"
    }
    assert sorted(x72) == ["Interactive", "Offline", "Server"]
    server, interactive, offline = x72["Server"], x72["Interactive"], x72["Offline"]
    assert (server["scenario"], interactive["scenario"]) == ("Server", "Server")  # LoadGen has no Interactive
    assert server["completed_tokens_per_second"] == "868277.92"
    assert (server["ttft_p99_ns"], server["ttft_limit_ns"]) == ("276316453", "2000000000")
    assert (server["tpot_p99_ns"], server["tpot_limit_ns"]) == ("40548358", "200000000")
    assert interactive["ttft_limit_ns"] == "450000000" and interactive["tpot_limit_ns"] == "40000000"
    assert interactive["throughput_tokens_per_second"] == "814127.85"
    # LoadGen's exponent form kept as printed, and the number it is
    assert offline["tokens_per_second"] == "1.12685e+06"
    assert offline["throughput_tokens_per_second_value"] == 1126850.0
    assert ingest.mlperf_scenario("x/run_1", "Server", "450000000") == "Interactive"


def test_one_loadgen_rack_x72():
    rack = ingest.read_as_rack(X72, gpus_per_run=72)
    off = rack["scenarios"]["Offline"]
    assert off["num_loadgens"] == 1 and off["sum_tokens_per_second"] == 1126850.0
    assert round(off["sum_per_gpu"]) == 15651
    assert off["nodes"][0]["accuracy"]["meets_target"] and off["nodes"][0]["benchmark"] == "llama2-70b-99"
    assert off["claim"].startswith("one LoadGen (MLPerf's method): 1.12685e+06 (= 1,126,850)")
    assert "as one system result" in off["mlperf_accepts"]
    assert round(rack["scenarios"]["Server"]["sum_tokens_per_second"]) == 868278
    assert round(rack["scenarios"]["Interactive"]["sum_tokens_per_second"]) == 814128


def _rack_of(tmp_path, folders, strip_datetime=()):
    """Published per-node folders copied side by side as node0, node1, ... of one rack."""
    rack = tmp_path / "rack"
    for i, name in enumerate(folders):
        dest = rack / f"node{i}"
        shutil.copytree(LOGS / name, dest)
        if i in strip_datetime:
            for detail in dest.rglob("mlperf_log_detail.txt"):
                detail.chmod(0o644)
                detail.write_text(
                    "".join(
                        line
                        for line in detail.read_text().splitlines(keepends=True)
                        if '"key": "test_datetime"' not in line
                    )
                )
    return rack


AZURE = "v5.1_Azure_ND_GB200_v6"
NV_GB200 = "v5.1_NVIDIA_GB200-NVL72_GB200-186GB_aarch64x4_TRT"


def test_per_node_folders_read_as_rack(tmp_path):
    rack = _rack_of(tmp_path, [AZURE, NV_GB200])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rackbench.ingest",
            "--as-rack",
            str(rack),
            "--gpus-per-run",
            "4",
            "--out",
            str(tmp_path / "rack.json"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    fig = json.loads((tmp_path / "rack.json").read_text())["scenarios"]["Offline"]
    assert fig["num_loadgens"] == 2 and fig["gpus"] == 8
    assert fig["sum_tokens_per_second"] == pytest.approx(52061.6 + 51736.9)
    assert fig["sum_per_gpu"] == pytest.approx((52061.6 + 51736.9) / 8)
    assert fig["slowest_node"].startswith("node1")
    assert fig["spread"]["min"] == pytest.approx(51736.9 / 4) and fig["spread"]["max"] == pytest.approx(52061.6 / 4)
    # the two runs were a week apart: their test_datetime says so
    assert fig["concurrent"] is False and "NOT concurrent" in fig["overlap"]
    assert fig["claim"] == "sum of 2 LoadGens (not an MLPerf result): 103,798 tokens/s"
    assert "never their sum" in fig["mlperf_accepts"]
    assert all(n["accuracy"]["meets_target"] for n in fig["nodes"])  # each has a scored accuracy run
    assert "| what the runs claim | what MLPerf would accept |" in proc.stdout and "NOT concurrent" in proc.stdout


def test_stripped_start_times_cannot_be_verified(tmp_path):
    fig = ingest.read_as_rack(_rack_of(tmp_path, [AZURE, AZURE], strip_datetime={1}), gpus_per_run=4)
    fig = fig["scenarios"]["Offline"]
    assert fig["concurrent"] is None and fig["concurrent_tokens_per_second"] is None
    assert fig["overlap"].startswith("cannot be verified: no test_datetime") and "node1" in fig["overlap"]


def test_same_start_times_are_concurrent(tmp_path):
    fig = ingest.read_as_rack(_rack_of(tmp_path, [AZURE, AZURE]), gpus_per_run=4)["scenarios"]["Offline"]
    assert fig["concurrent"] is True
    # two identical runs side by side: concurrent throughput = the sum
    assert fig["concurrent_tokens_per_second"] == pytest.approx(2 * 52061.6)
