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
    "power_begin": "power_begin",
    "power_end": "power_end",
    "num_errors": "num_errors",
}

COLUMNS = [
    "path", "group", "sut_name", "scenario", "test_mode", "result",
    "tokens_per_second", "samples_per_second",
    "min_duration_satisfied", "min_queries_satisfied", "early_stopping_satisfied",
    "samples_per_query", "generated_samples_per_query", "min_duration_ms", "min_query_count",
    "loadgen_version", "test_datetime", "power_begin", "power_end", "duration_s",
    "num_errors", "num_warnings",
    "rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len", "gen_num", "gen_tok_len",
    "tokens_per_sample", "accuracy_hash", "accuracy_log", "accuracy_evidence",
    "summary_detail_mismatch",
]
ACCURACY_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len", "gen_num", "gen_tok_len",
                 "tokens_per_sample")
EVIDENCE_SCORED = "accuracy.txt"
EVIDENCE_UNSCORED = "accuracy log only (unscored)"
EVIDENCE_NONE = "none"


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
                entry = json.loads(line[len(":::MLLOG"):], parse_float=_Raw, parse_int=_Raw)
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
    # Otherwise (accuracy runs print no latencies) LoadGen's power_begin/end
    # wall-clock marks, millisecond resolution.
    ns = row.get("max_latency_ns")
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
    row.update(summary_fields)     # the summary is what submitters publish: it wins
    mismatch = []
    for key in ("tokens_per_second", "samples_per_second", "result"):
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
    return row


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


def to_frame(rows: list[dict]):
    import pandas as pd
    return pd.DataFrame(rows, columns=COLUMNS, dtype=object)


_PRINT = [("path", "path"), ("test_mode", "mode"), ("result", "result"),
          ("tokens_per_second", "tokens/s"), ("samples_per_second", "samples/s"),
          ("min_duration_satisfied", "min dur"), ("min_queries_satisfied", "min q"),
          ("samples_per_query", "samples/query"), ("loadgen_version", "loadgen"),
          ("duration_s", "duration s"), ("rouge1", "rouge1"), ("rouge2", "rouge2"),
          ("rougeL", "rougeL"), ("tokens_per_sample", "tok/sample"),
          ("accuracy_evidence", "accuracy evidence")]


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
    parser.add_argument("--out", help="also write the rows to this .csv or .json file")
    args = parser.parse_args(argv)
    if not Path(args.folder).is_dir():
        parser.error(f"{args.folder} is not a directory")
    rows = ingest(args.folder)
    if not rows:
        print(f"no LoadGen results under {args.folder}", file=sys.stderr)
        return 1
    print(format_table(rows))
    if args.out:
        from rackbench.atomic import write_json_atomic, atomic_path
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
