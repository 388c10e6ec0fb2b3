"""Ingest MLPerf LoadGen results from any folder: ours and published ones.

``python -m rackbench.ingest FOLDER [--out CSV|JSON]`` walks FOLDER, finds every
directory that holds LoadGen output (``mlperf_log_summary.txt``,
``mlperf_log_detail.txt``, ``mlperf_log_accuracy.json``) or an MLPerf
``accuracy.txt``, and prints one row per such directory.

Numbers that LoadGen printed (tokens/s, samples/s, ROUGE scores, ...) are kept
as the exact strings LoadGen or ``evaluate-accuracy.py`` wrote, so a published
figure is reproduced to the digit (``101527`` stays ``101527``, ``24524.9``
stays ``24524.9``); numeric columns for arithmetic are derived from them with
``float()`` and named ``*_value``.

Accuracy evidence. A performance run proves nothing about accuracy; each row is
given the best evidence found for its *group* (the directory with trailing
``run_N``/``shardN``/``performance``/``accuracy`` components removed, and a
``runs`` component identified with ``accuracy``, so rackbench's
``results/runs/...`` and ``results/accuracy/...`` meet):

* ``accuracy.txt``: a scored accuracy run (ROUGE values ingested);
* ``accuracy log only (unscored)``: a non-empty ``mlperf_log_accuracy.json`` but no score;
* ``none``: nothing (an empty ``mlperf_log_accuracy.json``, as LoadGen writes in
  performance mode, is not evidence).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
from pathlib import Path

SUMMARY = "mlperf_log_summary.txt"
DETAIL = "mlperf_log_detail.txt"
ACC_LOG = "mlperf_log_accuracy.json"
ACC_TXT = "accuracy.txt"
LOG_FILES = (SUMMARY, DETAIL, ACC_LOG, ACC_TXT)

# summary "Key : value" lines -> column names (values kept as printed)
_SUMMARY_KEYS = {
    "SUT name": "sut_name",
    "Scenario": "scenario",
    "Mode": "test_mode",
    "Samples per second": "samples_per_second",
    "Tokens per second": "tokens_per_second",
    "Result is": "result",
    "Min duration satisfied": "min_duration_satisfied",
    "Min queries satisfied": "min_queries_satisfied",
    "Early stopping satisfied": "early_stopping_satisfied",
    "Max latency (ns)": "max_latency_ns",
    # Server / Interactive (LoadGen runs Interactive as Server with the interactive latency limits)
    "Completed samples per second": "completed_samples_per_second",
    "Completed tokens per second": "completed_tokens_per_second",
    "Performance constraints satisfied": "performance_constraints_satisfied",
    "99.00 percentile first token latency (ns)": "ttft_p99_ns",
    "99.00 percentile time to output token (ns)": "tpot_p99_ns",
    "ttft_latency (ns)": "ttft_limit_ns",
    "tpot_latency (ns)": "tpot_limit_ns",
    "target_qps": "target_qps",
    "samples_per_query": "samples_per_query",
    "min_duration (ms)": "min_duration_ms",
    "min_query_count": "min_query_count",
}

# detail MLLOG keys -> column names (used when the summary lacks the field)
_DETAIL_KEYS = {
    "loadgen_version": "loadgen_version",
    "test_datetime": "test_datetime",
    "sut_name": "sut_name",
    "effective_scenario": "scenario",
    "effective_test_mode": "test_mode",
    "effective_samples_per_query": "samples_per_query",
    "generated_samples_per_query": "generated_samples_per_query",
    "effective_min_duration_ms": "min_duration_ms",
    "effective_min_query_count": "min_query_count",
    "result_validity": "result",
    "result_min_duration_met": "min_duration_satisfied",
    "result_min_queries_met": "min_queries_satisfied",
    "early_stopping_met": "early_stopping_satisfied",
    "result_samples_per_second": "samples_per_second",
    "result_tokens_per_second": "tokens_per_second",
    "result_max_latency_ns": "max_latency_ns",
    "result_completed_samples_per_sec": "completed_samples_per_second",
    "result_completed_tokens_per_second": "completed_tokens_per_second",
    "result_perf_constraints_met": "performance_constraints_satisfied",
    "result_first_token_99.00_percentile_latency_ns": "ttft_p99_ns",
    "result_time_per_output_token_99.00_percentile_ns": "tpot_p99_ns",
    "effective_server_ttft_latency": "ttft_limit_ns",
    "effective_server_tpot_latency": "tpot_limit_ns",
    "effective_server_target_qps": "target_qps",
    "power_begin": "power_begin",
    "power_end": "power_end",
    "num_errors": "num_errors",
}

COLUMNS = [
    "path",
    "group",
    "sut_name",
    "scenario",
    "mlperf_scenario",
    "test_mode",
    "result",
    "tokens_per_second",
    "samples_per_second",
    "completed_tokens_per_second",
    "completed_samples_per_second",
    "throughput_tokens_per_second",
    "throughput_tokens_per_second_value",
    "performance_constraints_satisfied",
    "ttft_p99_ns",
    "ttft_limit_ns",
    "tpot_p99_ns",
    "tpot_limit_ns",
    "target_qps",
    "min_duration_satisfied",
    "min_queries_satisfied",
    "early_stopping_satisfied",
    "samples_per_query",
    "generated_samples_per_query",
    "min_duration_ms",
    "min_query_count",
    "loadgen_version",
    "test_datetime",
    "power_begin",
    "power_end",
    "duration_s",
    "num_errors",
    "num_warnings",
    "rouge1",
    "rouge2",
    "rougeL",
    "rougeLsum",
    "gen_len",
    "gen_num",
    "gen_tok_len",
    "tokens_per_sample",
    "accuracy_hash",
    "accuracy_log",
    "accuracy_evidence",
    "summary_detail_mismatch",
]
EVIDENCE_SCORED = "accuracy.txt"
EVIDENCE_UNSCORED = "accuracy log only (unscored)"
EVIDENCE_NONE = "none"


MLPERF_SCENARIOS = ("Offline", "Server", "Interactive", "SingleStream", "MultiStream")
INTERACTIVE_TTFT_NS = 450e6  # LoadGen mlperf.conf: llama2-70b-interactive.Server.ttft_latency = 450 (ms)


class _Raw(str):
    """A number exactly as it was written in the log."""


def _yes_no(value) -> str:
    if isinstance(value, bool):
        return "Yes" if value else "No"
    return str(value)


def parse_summary(path: str | os.PathLike) -> dict:
    """Fields of ``mlperf_log_summary.txt``; every value is the printed string."""
    out: dict = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        name = _SUMMARY_KEYS.get(key.strip())
        if name and name not in out:
            out[name] = value.strip()
    return out


def parse_detail(path: str | os.PathLike) -> dict:
    """Fields of ``mlperf_log_detail.txt`` (``:::MLLOG {json}`` lines).

    Numbers keep their written form; ``num_warnings``/``num_errors`` count the
    entries LoadGen flagged (``num_errors`` prefers LoadGen's own count).
    """
    out: dict = {}
    errors = warnings = 0
    with open(path, errors="replace") as handle:
        for line in handle:
            if not line.startswith(":::MLLOG"):
                continue
            try:
                entry = json.loads(line[len(":::MLLOG") :], parse_float=_Raw, parse_int=_Raw)
            except json.JSONDecodeError:
                continue
            meta = entry.get("metadata") or {}
            errors += bool(meta.get("is_error"))
            warnings += bool(meta.get("is_warning"))
            name = _DETAIL_KEYS.get(entry.get("key"))
            if name and name not in out:
                value = entry.get("value")
                out[name] = _yes_no(value) if isinstance(value, bool) else str(value)
    out.setdefault("num_errors", str(errors))
    out["num_warnings"] = str(warnings)
    return out


def parse_accuracy_txt(path: str | os.PathLike) -> dict:
    """The dict that MLPerf's ``evaluate-accuracy.py`` prints, values as printed, plus ``hash``."""
    text = Path(path).read_text(errors="replace")
    out: dict = {}
    match = re.search(r"\{[^{}]*\}", text)
    if match:
        body = match.group(0)
        # keep each number's written form: pair keys with their literal text
        for key, literal in re.findall(r"'([^']+)'\s*:\s*([^,}]+)", body):
            literal = literal.strip()
            try:
                ast.literal_eval(literal)
            except (ValueError, SyntaxError):
                continue
            out[key] = literal.strip("'\"")
    hashed = re.search(r"^hash=(\S+)", text, re.M)
    if hashed:
        out["accuracy_hash"] = hashed.group(1)
    return out


def accuracy_log_state(path: str | os.PathLike) -> str:
    """``absent``, ``empty`` (``[]``, as LoadGen writes in performance mode) or ``nonempty``."""
    path = Path(path)
    if not path.exists():
        return "absent"
    with open(path, "rb") as handle:
        head = handle.read(4096).decode(errors="replace")
    stripped = head.strip()
    if not stripped or stripped.lstrip("[").strip() in ("", "]"):
        return "empty"
    return "nonempty"


def _duration_s(row: dict) -> str | None:
    # Offline: LoadGen issues everything at t=0, so the run lasts until the
    # last completion (max latency); samples/s = generated samples / this.
    # Otherwise (Server issues over time; accuracy runs print no latencies) LoadGen's power_begin/end
    # wall-clock marks, millisecond resolution.
    ns = row.get("max_latency_ns") if row.get("scenario") == "Offline" else None
    if ns:
        try:
            return f"{int(ns) / 1e9:.3f}"
        except ValueError:
            pass
    begin, end = row.get("power_begin"), row.get("power_end")
    if begin and end:
        from datetime import datetime

        fmt = "%m-%d-%Y %H:%M:%S.%f"
        try:
            return f"{(datetime.strptime(end, fmt) - datetime.strptime(begin, fmt)).total_seconds():.3f}"
        except ValueError:
            return None
    return None


_STRIP = re.compile(r"^(run_?\d+|shard\d+|performance|accuracy|Performance|Accuracy)$")


def group_key(rel: str) -> str:
    parts = [p for p in Path(rel).parts]
    while parts and _STRIP.match(parts[-1]):
        parts.pop()
    parts = ["@" if p in ("runs", "accuracy") else p for p in parts]
    return "/".join(parts) or "."


def ingest_dir(directory: str | os.PathLike) -> dict:
    """One LoadGen result directory -> a row (strings as written; None where absent)."""
    directory = Path(directory)
    row: dict = {}
    detail = directory / DETAIL
    summary = directory / SUMMARY
    detail_fields = parse_detail(detail) if detail.exists() else {}
    summary_fields = parse_summary(summary) if summary.exists() else {}
    row.update(detail_fields)
    row.update(summary_fields)  # the summary is what submitters publish: it wins
    mismatch = []
    for key in ("tokens_per_second", "samples_per_second", "completed_tokens_per_second", "result"):
        a, b = summary_fields.get(key), detail_fields.get(key)
        if a is not None and b is not None:
            try:
                same = float(a) == float(b)
            except ValueError:
                same = a == b
            if not same:
                mismatch.append(f"{key}: summary {a} != detail {b}")
    row["summary_detail_mismatch"] = "; ".join(mismatch) or None
    if (directory / ACC_TXT).exists():
        row.update(parse_accuracy_txt(directory / ACC_TXT))
    row["accuracy_log"] = accuracy_log_state(directory / ACC_LOG)
    row["duration_s"] = _duration_s(row)
    # the headline throughput as printed: Offline "Tokens per second", Server/Interactive
    # "Completed tokens per second"; *_value is the number (1.12685e+06 -> 1126850.0)
    printed = row.get("tokens_per_second") or row.get("completed_tokens_per_second")
    row["throughput_tokens_per_second"] = printed
    row["throughput_tokens_per_second_value"] = _number(printed)
    return row


def _number(printed):
    try:
        return None if printed in (None, "") else float(printed)
    except ValueError:
        return None


def mlperf_scenario(rel: str, loadgen_scenario: str | None, ttft_limit_ns=None) -> str | None:
    """The MLPerf scenario: a path component names it (results/<system>/<benchmark>/<scenario>/...);
    otherwise LoadGen's, where a Server run with Interactive's 450 ms TTFT limit is Interactive."""
    for part in reversed(Path(rel).parts):
        if part in MLPERF_SCENARIOS:
            return part
    if loadgen_scenario == "Server" and ttft_limit_ns and _number(ttft_limit_ns) == INTERACTIVE_TTFT_NS:
        return "Interactive"
    return loadgen_scenario


def find_run_dirs(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if any(name in filenames for name in LOG_FILES):
            found.add(Path(dirpath))
    return sorted(found, key=lambda p: p.as_posix())


def ingest(root: str | os.PathLike) -> list[dict]:
    """Every LoadGen result directory under ``root``, one dict per directory, sorted by path."""
    root = Path(root)
    rows = []
    for directory in find_run_dirs(root):
        row = ingest_dir(directory)
        rel = directory.relative_to(root).as_posix() if directory != root else "."
        row["path"] = rel
        row["group"] = group_key(rel)
        row["mlperf_scenario"] = mlperf_scenario(rel, row.get("scenario"), row.get("ttft_limit_ns"))
        rows.append(row)
    evidence: dict[str, str] = {}
    for row in rows:
        g = row["group"]
        if row.get("rouge1") is not None:
            evidence[g] = EVIDENCE_SCORED
        elif row["accuracy_log"] == "nonempty" and evidence.get(g) != EVIDENCE_SCORED:
            evidence[g] = EVIDENCE_UNSCORED
    for row in rows:
        row["accuracy_evidence"] = evidence.get(row["group"], EVIDENCE_NONE)
    return [{col: row.get(col) for col in COLUMNS} for row in rows]


# --------------------------------------------------------------------------- a folder as one rack

RACK_METHOD_ONE = "one LoadGen (MLPerf's method)"


def _utc(test_datetime: str | None) -> float | None:
    """LoadGen's ``test_datetime`` (UTC, e.g. 2026-02-04T15:31:29Z, 1 s resolution) -> epoch seconds."""
    if not test_datetime:
        return None
    from datetime import datetime, timezone

    try:
        return datetime.strptime(test_datetime, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def _fmt_printed(printed, value) -> str:
    """LoadGen's number as printed, and what it is (1.12685e+06 (= 1,126,850))."""
    if value is None:
        return "-"
    return printed if f"{value:,.0f}" == printed else f"{printed} (= {value:,.0f})"


def read_as_rack(
    root,
    *,
    gpus_per_run: int | None = None,
    min_overlap: float = 0.9,
    benchmark: str | None = None,
    rows: list[dict] | None = None,
) -> dict:
    """Every performance run under ``root`` as one node of a rack, per MLPerf scenario.

    Per scenario: (a) the sum of the nodes' own LoadGen tokens/s, per GPU (with
    ``gpus_per_run``), the spread of per-node figures and the slowest node; (b) the
    concurrent throughput, all nodes' output tokens / (last end - first start), where
    every node's detail log carries ``test_datetime``; otherwise the overlap cannot be
    verified and (b) is not given. Accuracy evidence per node (accuracy.txt against the
    benchmark's targets), and side by side what the runs claim and what MLPerf would accept.
    """
    from rackbench import benchmarks

    rows = ingest(root) if rows is None else rows
    perf = [r for r in rows if r["test_mode"] == "PerformanceOnly"]
    scored = {}
    for r in rows:
        if r.get("rouge1") is not None:
            scored.setdefault(r["group"], r)
    out = {"root": str(root), "gpus_per_run": gpus_per_run, "min_overlap": min_overlap, "scenarios": {}}
    for scenario in sorted({r["mlperf_scenario"] for r in perf}, key=str):
        nodes = []
        for r in sorted((r for r in perf if r["mlperf_scenario"] == scenario), key=lambda r: r["path"]):
            bench_name = benchmark or _benchmark_in(r["path"]) or benchmarks.DEFAULT_BENCHMARK
            acc = scored.get(r["group"])
            node = {
                "node": r["group"],
                "path": r["path"],
                "result": r["result"],
                "tokens_per_second": r["throughput_tokens_per_second"],
                "tokens_per_second_value": r["throughput_tokens_per_second_value"],
                "ttft_p99_ns": r.get("ttft_p99_ns"),
                "tpot_p99_ns": r.get("tpot_p99_ns"),
                "test_datetime": r.get("test_datetime"),
                "start": _utc(r.get("test_datetime")),
                "duration_s": _number(r.get("duration_s")),
                "benchmark": bench_name,
                "accuracy": _accuracy_evidence(acc, bench_name),
            }
            node["end"] = (
                node["start"] + node["duration_s"]
                if node["start"] is not None and node["duration_s"] is not None
                else None
            )
            if gpus_per_run:
                node["per_gpu"] = (node["tokens_per_second_value"] or 0.0) / gpus_per_run
            nodes.append(node)
        out["scenarios"][scenario] = _rack_figures(nodes, gpus_per_run, min_overlap)
    return out


def _benchmark_in(path: str) -> str | None:
    from rackbench import benchmarks

    for part in Path(path).parts:
        if part in benchmarks.BENCHMARKS:
            return part
    return None


def _accuracy_evidence(acc: dict | None, bench_name: str) -> dict:
    from rackbench import benchmarks

    if acc is None:
        return {"evidence": EVIDENCE_NONE, "meets_target": None, "failures": ["no scored accuracy run"]}
    targets = benchmarks.get(bench_name).targets()
    failures = []
    for key in ("rouge1", "rouge2", "rougeL"):
        if acc.get(key) is None or float(acc[key]) < targets[key]:
            failures.append(f"{key} {acc.get(key)} < {targets[key]:.4f}")
    lo, hi = targets["tokens_per_sample"]
    tps = _number(acc.get("tokens_per_sample"))
    if tps is None or not lo <= tps <= hi:
        failures.append(f"tokens_per_sample {acc.get('tokens_per_sample')} outside [{lo:.2f}, {hi:.2f}]")
    return {
        "evidence": EVIDENCE_SCORED,
        "path": acc["path"],
        "meets_target": not failures,
        "failures": failures,
        **{k: acc.get(k) for k in ("rouge1", "rouge2", "rougeL", "tokens_per_sample", "gen_num")},
    }


def _rack_figures(nodes: list[dict], gpus_per_run, min_overlap) -> dict:
    import statistics

    n = len(nodes)
    values = [x["tokens_per_second_value"] or 0.0 for x in nodes]
    total = sum(values)
    fig: dict = {
        "nodes": nodes,
        "num_loadgens": n,
        "sum_tokens_per_second": total,
        "gpus": n * gpus_per_run if gpus_per_run else None,
    }
    fig["sum_per_gpu"] = total / fig["gpus"] if fig["gpus"] else None
    per = [x.get("per_gpu", v) for x, v in zip(nodes, values)]
    mean = statistics.fmean(per) if per else float("nan")
    fig["spread"] = {
        "unit": "tokens/s per GPU" if gpus_per_run else "tokens/s per node",
        "mean": mean,
        "min": min(per),
        "max": max(per),
        "cv": (statistics.stdev(per) / mean) if n > 1 and mean else 0.0,
    }
    slowest = min(nodes, key=lambda x: (x["tokens_per_second_value"] or 0.0, x["node"]))
    fig["slowest_node"] = slowest["node"]
    # (b) concurrent throughput: only where every node says when it ran
    undated = [x["node"] for x in nodes if x["start"] is None or x["duration_s"] is None]
    if undated:
        fig["concurrent_tokens_per_second"] = None
        fig["overlap"] = "cannot be verified: no test_datetime (or no duration) in the detail log of " + ", ".join(
            undated
        )
        fig["concurrent"] = None
    else:
        first, last = min(x["start"] for x in nodes), max(x["end"] for x in nodes)
        common_start, common_end = max(x["start"] for x in nodes), min(x["end"] for x in nodes)
        tokens = sum((x["tokens_per_second_value"] or 0.0) * x["duration_s"] for x in nodes)
        fig["window_s"] = last - first
        fig["concurrent_tokens_per_second"] = tokens / fig["window_s"] if fig["window_s"] > 0 else None
        for x in nodes:
            x["overlap_fraction"] = (
                (max(0.0, common_end - common_start) / x["duration_s"] if x["duration_s"] else 0.0) if n > 1 else 1.0
            )
        late = [x["node"] for x in nodes if x["overlap_fraction"] < min_overlap]
        fig["concurrent"] = not late
        fig["overlap"] = (
            "one LoadGen run: nothing to overlap"
            if n == 1
            else "all nodes ran together (test_datetime, 1 s resolution)"
            if not late
            else f"NOT concurrent: {', '.join(late)} overlapped the others less than {min_overlap:.0%}"
        )
    # claims and what MLPerf would accept
    invalid = [x["node"] for x in nodes if x["result"] != "VALID"]
    inaccurate = [x["node"] for x in nodes if not x["accuracy"]["meets_target"]]
    if n == 1:
        claim = f"{RACK_METHOD_ONE}: {_fmt_printed(nodes[0]['tokens_per_second'], values[0])} tokens/s"
        accepted = (
            f"{_fmt_printed(nodes[0]['tokens_per_second'], values[0])} tokens/s as one system result"
            if not invalid and not inaccurate
            else "nothing: " + _why_not(invalid, inaccurate)
        )
    else:
        claim = f"sum of {n} LoadGens (not an MLPerf result): {total:,.0f} tokens/s"
        accepted = f"{n} separate per-node results (each node its own system), never their sum" + (
            f"; not even those of {_why_not(invalid, inaccurate)}" if invalid or inaccurate else ""
        )
    fig["claim"], fig["mlperf_accepts"] = claim, accepted
    return fig


def _why_not(invalid, inaccurate) -> str:
    parts = []
    if invalid:
        parts.append("LoadGen INVALID: " + ", ".join(invalid))
    if inaccurate:
        parts.append("accuracy evidence missing or below target: " + ", ".join(inaccurate))
    return "; ".join(parts)


def format_rack(rack: dict) -> str:
    """The rack reading as markdown (also what ``--as-rack`` prints)."""
    lines = [f"# {rack['root']} read as one rack", ""]
    for scenario, fig in rack["scenarios"].items():
        n = fig["num_loadgens"]
        lines += [
            f"## {scenario}: {n} LoadGen run{'s' if n != 1 else ''}",
            "",
            "| node | LoadGen result | tokens/s (as printed) | per GPU | TTFT p99 ns | TPOT p99 ns | "
            "start (test_datetime) | duration s | accuracy evidence |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for x in fig["nodes"]:
            acc = x["accuracy"]
            acc_cell = (
                "none"
                if acc["evidence"] == EVIDENCE_NONE
                else f"rouge1 {acc['rouge1']}, rouge2 {acc['rouge2']}, rougeL {acc['rougeL']}, tokens/sample "
                f"{acc['tokens_per_sample']}: {'meets' if acc['meets_target'] else 'BELOW'} {x['benchmark']}"
            )
            per_gpu = "-" if x.get("per_gpu") is None else f"{x['per_gpu']:,.0f}"
            duration = "-" if x["duration_s"] is None else f"{x['duration_s']:.1f}"
            printed = _fmt_printed(x["tokens_per_second"], x["tokens_per_second_value"])
            lines.append(
                f"| {x['node']} | {x['result']} | {printed} | {per_gpu} | {x['ttft_p99_ns'] or '-'} | "
                f"{x['tpot_p99_ns'] or '-'} | {x['test_datetime'] or 'absent'} | {duration} | {acc_cell} |"
            )
        sp = fig["spread"]
        conc = fig["concurrent_tokens_per_second"]
        lines += [
            "",
            f"- (a) sum: {fig['sum_tokens_per_second']:,.0f} tokens/s"
            + (
                f", {fig['sum_per_gpu']:,.0f} per GPU ({fig['gpus']} GPUs)"
                if fig["sum_per_gpu"]
                else " (per GPU: give --gpus-per-run)"
            ),
            f"- spread ({sp['unit']}): mean {sp['mean']:,.0f}, min {sp['min']:,.0f}, max {sp['max']:,.0f}, "
            f"CV {sp['cv']:.3f}; slowest node: {fig['slowest_node']}",
            "- (b) concurrent: "
            + (f"{conc:,.0f} tokens/s over {fig['window_s']:,.0f} s" if conc else "not given")
            + f"; overlap {fig['overlap']}",
            "",
            "| what the runs claim | what MLPerf would accept |",
            "|---|---|",
            f"| {fig['claim']} | {fig['mlperf_accepts']} |",
            "",
        ]
    return "\n".join(lines)


def to_frame(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows, columns=COLUMNS, dtype=object)


_PRINT = [
    ("path", "path"),
    ("mlperf_scenario", "scenario"),
    ("test_mode", "mode"),
    ("result", "result"),
    ("throughput_tokens_per_second", "tokens/s"),
    ("samples_per_second", "samples/s"),
    ("ttft_p99_ns", "TTFT p99 ns"),
    ("tpot_p99_ns", "TPOT p99 ns"),
    ("min_duration_satisfied", "min dur"),
    ("min_queries_satisfied", "min q"),
    ("samples_per_query", "samples/query"),
    ("loadgen_version", "loadgen"),
    ("duration_s", "duration s"),
    ("rouge1", "rouge1"),
    ("rouge2", "rouge2"),
    ("rougeL", "rougeL"),
    ("tokens_per_sample", "tok/sample"),
    ("accuracy_evidence", "accuracy evidence"),
]


def format_table(rows: list[dict]) -> str:
    header = [title for _, title in _PRINT]
    body = [["-" if row.get(key) is None else str(row[key]) for key, _ in _PRINT] for row in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rackbench.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="any folder of LoadGen results (searched recursively)")
    parser.add_argument("--out", help="also write the rows (with --as-rack: the rack reading) to this .csv or .json")
    parser.add_argument(
        "--as-rack", action="store_true", help="read every performance run under FOLDER as one node of one rack"
    )
    parser.add_argument(
        "--gpus-per-run",
        type=int,
        default=None,
        help="with --as-rack: GPUs each LoadGen run drove (a node's GPUs; 72 for one LoadGen over an NVL72), "
        "for the per-GPU figures",
    )
    parser.add_argument("--min-overlap", type=float, default=0.9, help="with --as-rack (default 0.9)")
    parser.add_argument("--benchmark", default=None, help="with --as-rack: accuracy targets (default: from the path)")
    args = parser.parse_args(argv)
    if not Path(args.folder).is_dir():
        parser.error(f"{args.folder} is not a directory")
    rows = ingest(args.folder)
    if not rows:
        print(f"no LoadGen results under {args.folder}", file=sys.stderr)
        return 1
    if args.as_rack:
        rack = read_as_rack(
            args.folder,
            gpus_per_run=args.gpus_per_run,
            min_overlap=args.min_overlap,
            benchmark=args.benchmark,
            rows=rows,
        )
        print(format_rack(rack))
        if args.out:
            from rackbench.atomic import write_json_atomic

            if not args.out.endswith(".json"):
                parser.error("with --as-rack, --out must end in .json")
            write_json_atomic(args.out, rack)
        return 0
    print(format_table(rows))
    if args.out:
        from rackbench.atomic import atomic_path, write_json_atomic

        if args.out.endswith(".json"):
            write_json_atomic(args.out, rows)
        elif args.out.endswith(".csv"):
            with atomic_path(args.out) as tmp:
                to_frame(rows).to_csv(tmp, index=False)
        else:
            parser.error("--out must end in .csv or .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
