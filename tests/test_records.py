"""Records: every verified one is re-read from its published LoadGen log; unverified ones say so."""

from __future__ import annotations

from pathlib import Path

import pytest

from rackbench import ingest, records, report

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("rec", [r for r in records.RECORDS if r.status == records.VERIFIED], ids=lambda r: r.key)
def test_verified_records_match_their_logs(rec):
    summary = ROOT / rec.verified_from
    if not summary.is_file():
        pytest.skip(f"{summary} is absent")
    fields = ingest.parse_summary(summary)
    printed = fields.get("tokens_per_second") or fields.get("completed_tokens_per_second")
    assert printed == rec.printed  # as LoadGen printed it
    assert float(printed) == rec.tokens_per_s
    assert fields["result"] == "VALID"
    assert rec.benchmark in summary.parts or rec.benchmark in str(summary)


def test_cited_figures():
    by_key = {r.key: r for r in records.RECORDS}
    assert round(by_key["nvidia-gb300-x72-v6.0-offline"].tokens_per_s_per_gpu) == 15651
    assert round(by_key["coreweave-nvl72-v6.1-offline"].tokens_per_s_per_gpu) == 15779
    assert by_key["oracle-gb300-v6.1-best-per-gpu"].tokens_per_s_per_gpu == 16532
    assert by_key["amd-mi355x-x8-v6.1-offline"].tokens_per_s_per_gpu == 13315
    assert by_key["azure-gb300-nvl72-sum"].status == records.NOT_MLPERF
    for r in records.RECORDS:
        assert r.source
        assert (r.status == records.VERIFIED) == bool(r.verified_from)
        if r.status != records.VERIFIED:
            assert r.note and r.status in r.short_label()  # never shown without saying what it is


def test_report_compares_with_the_best_verified_record():
    published = report.published_records({})
    assert published["GB300"]["tokens_per_s_per_gpu"] == 15651 and published["GB300"]["source"] == "NVIDIA v6.0"
    assert published["MI355X"]["source"].endswith("unverified")
    # a GPU type's own `published` entry still overrides
    assert report.published_records({"GB300": {"published": {"tokens_per_s_per_gpu": 1, "source": "x"}}})["GB300"] == {
        "tokens_per_s_per_gpu": 1,
        "source": "x",
    }
    md = records.markdown_section()
    assert "1.12685e+06 (= 1,126,850)" in md and "not an MLPerf result" in md
