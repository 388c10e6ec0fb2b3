"""Aggregate shard runs into the report: tables, figures, provenance.

``python -m rackbench.report --configurations-json JSON --gpu-types-json JSON
--models-json JSON --out DIR [--results results]``

The workflow passes each configuration's fields and input paths
(``rackbench.config.Configuration.report_entry``); the report parses no path back.
Reads only results/ (shard dirs, accuracy.json files, provenance.json files
near them, the settings.json of every run variant); never reruns anything.
Writes to DIR: ``throughput.csv`` (one row per configuration, accuracy
included), ``shards.csv``, ``provenance.csv``, ``variants.csv`` (every run
variant on disk, current or not), ``report.md`` and the figures ``shard_throughput``, ``shard_timeline``,
``records`` and ``efficiency`` as PDF, SVG and PNG. The same inputs give
byte-identical outputs.

Throughput counts output tokens, as MLPerf does. Three figures, always named:

(a) *sum*: the sum of the shards' own LoadGen tokens/s. This is how a rack
    figure made of separate runs (18 LoadGen runs added up) is computed; it is a
    rack throughput only if the shards ran at the same time.
(b) *concurrent*: all shards' output tokens / (last shard end - first shard
    start), from shard.json ``started_at``/``finished_at`` and samples.parquet.
(c) *spread*: per-GPU tokens/s of each shard ((a)'s shard figure / GPUs per
    shard); mean, min, max and coefficient of variation (sample s.d. / mean)
    across shards, and the slowest shard.

A shard *overlaps* when all other shards of its configuration were running for
at least ``--min-overlap`` (default 0.9) of its own run time; otherwise (a) is
flagged as not a rack throughput.

Status of a configuration: ``INVALID`` when any shard's LoadGen result is not
VALID, a shard is missing, or the accuracy gate failed (its throughput is then
never reported as a result); ``NO ACCURACY EVIDENCE`` when there is no
accuracy.json/accuracy.txt for it; otherwise ``VALID``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from rackbench import figures, ingest, paths, provenance, records
from rackbench.args import is_json_file, json_arg
from rackbench.atomic import atomic_path, write_text_atomic
from rackbench.config import CONFIG_FIELDS
from rackbench.shards import parse_layout

STATUS_VALID = "VALID"
STATUS_INVALID = "INVALID"
STATUS_NO_EVIDENCE = "NO ACCURACY EVIDENCE"
PRECISION = {"nvfp4": "fp4", "fp8": "fp8", "none": "bf16"}
NAN = float("nan")


# --- reading ------------------------------------------------------------------


def config_name(fields: dict) -> str:
    """A configuration's readable key (rackbench.paths.config_key)."""
    return paths.config_key(fields)


def configuration_fields(entry: dict) -> dict:
    """The configuration fields of one entry the workflow passed (Configuration.report_entry)."""
    missing = [k for k in CONFIG_FIELDS if k not in entry]
    if missing:
        raise ReportInputError(f"configuration entry {entry.get('key', entry)!r} lacks {missing}")
    return {k: (int(entry[k]) if k == "batch_size" else entry[k]) for k in CONFIG_FIELDS}


class ReportInputError(ValueError):
    """The configurations given to the report are incomplete or inconsistent."""


def read_shard(shard_dir: str | os.PathLike, entry: dict) -> dict:
    """One shard dir of the configuration ``entry`` -> a flat record
    (configuration fields + shard.json + LoadGen logs + samples.parquet sums)."""
    shard_dir = Path(shard_dir)
    meta = json.loads((shard_dir / "shard.json").read_text())
    rec = configuration_fields(entry)
    rec["config"] = config_name(rec)
    rec["variant"] = entry.get("variant")
    rec["shard_dir"] = shard_dir.as_posix()
    for k in (
        "shard_index",
        "num_shards",
        "gpus_per_shard",
        "shard_mode",
        "mode",
        "hostname",
        "slurm_job_id",
        "cuda_visible_devices",
    ):
        rec[k] = meta.get(k)
    num_shards, gpus_per_shard = parse_layout(rec["layout"])
    rec["num_shards"] = rec["num_shards"] or num_shards
    rec["gpus_per_shard"] = rec["gpus_per_shard"] or gpus_per_shard
    rec["started_at"] = _float(meta.get("started_at"))
    rec["finished_at"] = _float(meta.get("finished_at"))
    inputs = [shard_dir / "shard.json"]
    inputs += _read_samples(rec, shard_dir, meta)
    inputs += _read_loadgen(rec, shard_dir, meta)
    _shard_throughput(rec)
    rec["inline_provenance"] = meta.get("provenance")
    rec["inputs"] = [p.as_posix() for p in inputs]
    return rec


def _read_samples(rec: dict, shard_dir: Path, meta: dict) -> list[Path]:
    samples = shard_dir / "samples.parquet"
    if not samples.exists():
        rec["completed_samples"] = meta.get("completed_samples")
        rec["output_tokens"] = meta.get("output_tokens")
        rec["input_tokens"] = meta.get("input_tokens")
        rec["last_completion"] = None
        rec["tokens_source"] = "shard.json"
        return []
    table = pq.read_table(samples, columns=["input_tokens", "output_tokens", "completed_at"])
    rec["completed_samples"] = table.num_rows
    rec["output_tokens"] = int(pc.sum(table["output_tokens"]).as_py() or 0)
    rec["input_tokens"] = int(pc.sum(table["input_tokens"]).as_py() or 0)
    rec["last_completion"] = _float(pc.max(table["completed_at"]).as_py())
    rec["tokens_source"] = "samples.parquet"
    return [samples]


def _read_loadgen(rec: dict, shard_dir: Path, meta: dict) -> list[Path]:
    logs = [shard_dir / name for name in (ingest.SUMMARY, ingest.DETAIL) if (shard_dir / name).exists()]
    loadgen = ingest.ingest_dir(shard_dir) if logs else {}
    lg_json = meta.get("loadgen") or {}
    rec["loadgen_result"] = loadgen.get("result") or lg_json.get("result")
    rec["loadgen_tokens_per_second"] = loadgen.get("tokens_per_second") or _str(lg_json.get("tokens_per_second"))
    rec["loadgen_samples_per_second"] = loadgen.get("samples_per_second") or _str(lg_json.get("samples_per_second"))
    rec["min_duration_satisfied"] = loadgen.get("min_duration_satisfied")
    rec["min_queries_satisfied"] = loadgen.get("min_queries_satisfied")
    rec["loadgen_version"] = loadgen.get("loadgen_version")
    rec["loadgen_duration_s"] = loadgen.get("duration_s")
    rec["accuracy_log"] = ingest.accuracy_log_state(shard_dir / ingest.ACC_LOG)
    return logs


def _shard_throughput(rec: dict) -> None:
    duration = _sub(rec["finished_at"], rec["started_at"])
    rec["wall_s"] = duration
    rec["measured_tokens_per_s"] = (
        rec["output_tokens"] / duration if duration and rec["output_tokens"] is not None else NAN
    )
    if rec["loadgen_tokens_per_second"] not in (None, ""):
        rec["tokens_per_s"] = float(rec["loadgen_tokens_per_second"])
        rec["tokens_per_s_source"] = "LoadGen"
    else:
        rec["tokens_per_s"] = rec["measured_tokens_per_s"]
        rec["tokens_per_s_source"] = "measured (shard.json window)"
    rec["tokens_per_s_per_gpu"] = rec["tokens_per_s"] / (rec["gpus_per_shard"] or 1)


def _float(v):
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _str(v):
    return None if v is None else str(v)


def _sub(a, b):
    return a - b if a is not None and b is not None else None


def read_accuracy(path: str | os.PathLike) -> dict | None:
    """accuracy.json (and accuracy.txt beside it) of one configuration; None when absent."""
    path = Path(path)
    if not path.is_file():
        return None
    txt = path.parent / "accuracy.txt"
    return {
        "file": path.as_posix(),
        "data": json.loads(path.read_text()),
        "accuracy_txt": ingest.parse_accuracy_txt(txt) if txt.exists() else None,
        "accuracy_txt_file": txt.as_posix() if txt.exists() else None,
    }


def count_parameters(hf_config: dict) -> int:
    """Parameters of a Llama-style decoder from its HF config.json (embeddings and lm_head included)."""
    c = hf_config.get("text_config", hf_config)
    h, L, inter, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    nh = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or nh
    hd = c.get("head_dim") or h // nh
    attn = h * nh * hd + 2 * h * kv * hd + nh * hd * h
    mlp = 3 * h * inter
    per_layer = attn + mlp + 2 * h
    embed = vocab * h
    head = 0 if c.get("tie_word_embeddings") else vocab * h
    return L * per_layer + embed + head + h


def model_parameters(model: str, spec: dict, snapshot_dir: str | os.PathLike | None) -> tuple[float | None, str]:
    """(parameter count, where it came from)."""
    if spec.get("parameters"):
        return float(spec["parameters"]), "models table"
    candidates = []
    if spec.get("checkpoint_config"):
        candidates.append(Path(spec["checkpoint_config"]))
    if snapshot_dir is not None:
        candidates.append(Path(snapshot_dir) / "config.json")
    local = (spec.get("source") or {}).get("local")
    if local:
        candidates.append(Path(local) / "config.json")
    for cand in candidates:
        if cand.is_file():
            try:
                return float(count_parameters(json.loads(cand.read_text()))), f"counted from {cand.as_posix()}"
            except (KeyError, TypeError, ValueError):
                continue
    return None, "unknown (no `parameters` in models table, no checkpoint config.json found)"


# --- aggregation ----------------------------------------------------------------


def aggregate(
    entries: list[dict],
    shards: list[dict],
    accuracy: dict,
    gpu_types: dict,
    models: dict,
    *,
    min_overlap: float = 0.9,
    published: dict | None = None,
) -> list[dict]:
    """Per-configuration figures (a), (b), (c), overlap, status, accuracy, records, efficiency.

    ``entries``: the configurations the workflow passed; ``shards``: read_shard records;
    ``accuracy``: configuration key -> read_accuracy result (or None).
    Also annotates each shard record in place (``overlap_fraction``, ``overlaps_all``, ``status``).
    """
    published = published if published is not None else published_records(gpu_types)
    by_cfg: dict[str, list[dict]] = {}
    for s in shards:
        by_cfg.setdefault(s["config"], []).append(s)
    configs = []
    for entry in sorted(entries, key=lambda e: config_name(configuration_fields(e))):
        fields = configuration_fields(entry)
        name = config_name(fields)
        rows = sorted(by_cfg.get(name, []), key=lambda s: (s["shard_index"] is None, s["shard_index"]))
        if not rows:
            raise ReportInputError(f"configuration {name}: no shard dirs given")
        cfg = {
            **fields,
            "config": name,
            "variant": entry.get("variant"),
            "label": name,
            "short": f"{fields['gpu_type']} {fields['recipe']} bs{fields['batch_size']} {fields['layout']}",
        }
        reasons = _completeness(cfg, rows) + _loadgen_validity(rows)
        _sum_figure(cfg, rows)
        _concurrent_figure(cfg, rows)
        _overlap(cfg, rows, min_overlap)
        _spread(cfg, rows)
        reasons += _accuracy(cfg, accuracy.get(name))
        _status(cfg, rows, reasons)
        _record(cfg, published)
        _efficiency(cfg, rows, gpu_types.get(fields["gpu_type"]) or {}, models, entry.get("snapshot_dir"))
        configs.append(cfg)
    return configs


def _completeness(cfg: dict, rows: list[dict]) -> list[str]:
    """Shard counts against the layout; the reasons a configuration is incomplete."""
    expected, gps = parse_layout(cfg["layout"])
    indices = [s["shard_index"] for s in rows]
    cfg["shards_found"], cfg["shards_expected"] = len(rows), expected
    cfg["gpus_per_shard"] = gps
    cfg["total_gpus"] = gps * len(rows)
    reasons = []
    if len(set(indices)) != len(indices):
        reasons.append(f"duplicate shard indices {sorted(indices)}")
    if len(set(indices)) < expected:
        missing = sorted(set(range(expected)) - set(indices))
        reasons.append(f"only {len(set(indices))} of {expected} shards (missing {missing})")
    return reasons


def _loadgen_validity(rows: list[dict]) -> list[str]:
    return [
        f"shard {s['shard_index']}: LoadGen result {s['loadgen_result'] or 'missing'}"
        for s in rows
        if s["loadgen_result"] != "VALID"
    ]


def _sum_figure(cfg: dict, rows: list[dict]) -> None:
    """(a): the sum of the shards' own throughputs."""
    per_shard = [s["tokens_per_s"] for s in rows]
    cfg["a_sum_tokens_per_s"] = sum(per_shard)
    cfg["a_source"] = ", ".join(sorted({s["tokens_per_s_source"] for s in rows}))
    cfg["a_per_gpu"] = cfg["a_sum_tokens_per_s"] / cfg["total_gpus"]
    cfg["shard_mean_tokens_per_s"] = statistics.fmean(per_shard)
    cfg["shard_sd_tokens_per_s"] = statistics.stdev(per_shard) if len(per_shard) > 1 else 0.0


def _concurrent_figure(cfg: dict, rows: list[dict]) -> None:
    """(b): all output tokens over the window from the first start to the last end."""
    starts = [s["started_at"] for s in rows if s["started_at"] is not None]
    ends = [s["finished_at"] for s in rows if s["finished_at"] is not None]
    cfg["output_tokens"] = sum(s["output_tokens"] or 0 for s in rows)
    cfg["input_tokens"] = sum(s["input_tokens"] or 0 for s in rows)
    if len(starts) == len(rows) and len(ends) == len(rows):
        window = max(ends) - min(starts)
        cfg["window_s"] = window
        cfg["b_concurrent_tokens_per_s"] = cfg["output_tokens"] / window if window > 0 else NAN
        cfg["common_start"], cfg["common_end"] = max(starts), min(ends)
    else:
        cfg["window_s"] = NAN
        cfg["b_concurrent_tokens_per_s"] = NAN
        cfg["common_start"] = cfg["common_end"] = None
    cfg["b_per_gpu"] = cfg["b_concurrent_tokens_per_s"] / cfg["total_gpus"]


def _overlap(cfg: dict, rows: list[dict], min_overlap: float) -> None:
    """Each shard's share of its run time that all other shards were running too."""
    non_overlap = []
    for s in rows:
        dur = _sub(s["finished_at"], s["started_at"])
        if cfg["common_start"] is None or not dur or dur <= 0:
            frac = NAN
        else:
            lo = max(s["started_at"], cfg["common_start"])
            hi = min(s["finished_at"], cfg["common_end"])
            frac = max(0.0, hi - lo) / dur
        s["overlap_fraction"] = frac
        s["overlaps_all"] = bool(len(rows) == 1 or (not math.isnan(frac) and frac >= min_overlap))
        if not s["overlaps_all"]:
            non_overlap.append(s["shard_index"])
    cfg["non_overlapping_shards"] = non_overlap
    cfg["concurrent"] = not non_overlap


def _spread(cfg: dict, rows: list[dict]) -> None:
    """(c): per-GPU throughput of each shard: mean, min, max, CV, the slowest shard."""
    per_gpu = [s["tokens_per_s_per_gpu"] for s in rows]
    mean = statistics.fmean(per_gpu)
    sd = statistics.stdev(per_gpu) if len(per_gpu) > 1 else 0.0
    cfg["c_per_gpu_mean"] = mean
    cfg["c_per_gpu_min"] = min(per_gpu)
    cfg["c_per_gpu_max"] = max(per_gpu)
    cfg["c_cv"] = sd / mean if mean else NAN
    slowest = min(rows, key=lambda s: (s["tokens_per_s_per_gpu"], s["shard_index"]))
    cfg["slowest_shard"] = slowest["shard_index"]
    cfg["slowest_shard_dir"] = slowest["shard_dir"]


def _accuracy(cfg: dict, acc: dict | None) -> list[str]:
    """The accuracy columns; the reason the configuration is invalid, if the gate failed."""
    if acc is None:
        cfg.update(accuracy_evidence="none", accuracy_valid=None, accuracy_file=None, accuracy_failures="")
        return []
    data = acc["data"]
    cfg["accuracy_file"] = acc["file"]
    cfg["accuracy_evidence"] = "accuracy.txt" if acc["accuracy_txt"] else "accuracy.json"
    cfg["accuracy_valid"] = bool(data.get("valid"))
    cfg["accuracy_failures"] = "; ".join(data.get("failures") or [])
    for k in ("rouge1", "rouge2", "rougeL", "rougeLsum", "tokens_per_sample", "gen_num"):
        cfg[f"acc_{k}"] = data.get(k)
    if cfg["accuracy_valid"]:
        return []
    return ["accuracy gate failed" + (f": {cfg['accuracy_failures']}" if cfg["accuracy_failures"] else "")]


def _status(cfg: dict, rows: list[dict], reasons: list[str]) -> None:
    if reasons:
        cfg["status"] = STATUS_INVALID
    elif cfg["accuracy_evidence"] == "none":
        cfg["status"] = STATUS_NO_EVIDENCE
        reasons.append(
            "no accuracy evidence (no accuracy.json/accuracy.txt; performance-mode mlperf_log_accuracy.json is empty)"
        )
    else:
        cfg["status"] = STATUS_VALID
    cfg["status_reasons"] = "; ".join(reasons)
    for s in rows:
        s["status"] = cfg["status"]


def _record(cfg: dict, published: dict) -> None:
    rec = published.get(cfg["gpu_type"])
    cfg["published_per_gpu"] = float(rec["tokens_per_s_per_gpu"]) if rec else NAN
    cfg["published_source"] = rec["source"] if rec else None


def _efficiency(cfg: dict, rows: list[dict], gpu: dict, models: dict, snapshot_dir: str | None) -> None:
    cfg["efficiency_a"] = cfg["efficiency_b"] = NAN
    precision = PRECISION.get(cfg["recipe"], cfg["recipe"])
    cfg["precision"] = precision
    params, params_source = model_parameters(cfg["model"], models.get(cfg["model"]) or {}, snapshot_dir)
    cfg["parameters"], cfg["parameters_source"] = params, params_source
    peaks = gpu.get("peak_dense_flops") or {}
    peak = peaks.get(precision)
    cfg["peak_dense_flops"] = float(peak) if peak else None
    cfg["peak_source"] = peaks.get("source")
    if not peak:
        cfg["efficiency_skip"] = (
            f"GPU type {cfg['gpu_type']!r} has no peak dense FLOP/s for {precision} in the GPU-type table"
        )
        return
    if not params:
        cfg["efficiency_skip"] = f"parameter count of {cfg['model']} {params_source}"
        return
    cfg["efficiency_skip"] = None
    flop_per_token = 2.0 * params
    # (b): all tokens over the common window, per GPU
    if cfg["window_s"] and not math.isnan(cfg["window_s"]) and cfg["window_s"] > 0:
        rate = (cfg["input_tokens"] + cfg["output_tokens"]) / cfg["window_s"] / cfg["total_gpus"]
        cfg["efficiency_b"] = rate * flop_per_token / float(peak)
    # (a): each shard's own window, mean over shards
    effs = []
    for s in rows:
        if s["wall_s"] and s["wall_s"] > 0:
            rate = ((s["input_tokens"] or 0) + (s["output_tokens"] or 0)) / s["wall_s"] / (s["gpus_per_shard"] or 1)
            effs.append(rate * flop_per_token / float(peak))
    if effs:
        cfg["efficiency_a"] = statistics.fmean(effs)


def published_records(gpu_types: dict) -> dict:
    recs = records.by_gpu_type()  # rackbench.records: sources and verification status
    for name, spec in sorted((gpu_types or {}).items()):
        pub = (spec or {}).get("published")
        if pub and pub.get("tokens_per_s_per_gpu"):
            recs[name] = {
                "tokens_per_s_per_gpu": pub["tokens_per_s_per_gpu"],
                "source": pub.get("source", "GPU-type table"),
            }
    return recs


# --- provenance -----------------------------------------------------------------


def provenance_rows(entries: list[dict], shards: list[dict], accuracy: dict) -> list[dict]:
    """provenance.json found in or near every input: shard dirs, and the engine, quantized
    checkpoint and snapshot each configuration was made from (paths given by the workflow)."""
    places: list[Path] = [Path(s["shard_dir"]) for s in shards]
    for entry in entries:
        places += [Path(entry[k]) for k in ("engine_dir", "checkpoint_dir", "snapshot_dir") if entry.get(k)]
    places += [Path(a["file"]) for a in accuracy.values() if a]
    rows = []
    for f in provenance.find_provenance(sorted({p for p in places if p.exists()})):
        try:
            record = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        rows.append(provenance.summarize(record, f.as_posix()))
    seen = {r["file"] for r in rows}
    for s in shards:
        if s.get("inline_provenance"):
            name = f"{s['shard_dir']}/shard.json#provenance"
            if name not in seen:
                rows.append(provenance.summarize(s["inline_provenance"], name))
    rows.sort(key=lambda r: r["file"])
    return rows


# --- variants ---------------------------------------------------------------------


def variant_rows(entries: list[dict], results_root: str | os.PathLike | None) -> list[dict]:
    """Every run variant under ``results_root`` (from each variant's settings.json), the
    configured ones marked current: old results stay listed after a knob changes."""
    current = {(config_name(configuration_fields(e)), e.get("variant")) for e in entries}
    rows = []
    for settings_path in paths.run_variants_on_disk(results_root) if results_root is not None else []:
        try:
            settings = json.loads(settings_path.read_text())
            fields = configuration_fields(settings)
        except (OSError, json.JSONDecodeError, ReportInputError):
            continue
        variant = settings_path.parent.name
        name = config_name(fields)
        perf = sorted(settings_path.parent.glob("performance/shard*/shard.json"))
        acc = sorted(settings_path.parent.glob("accuracy/shard*/shard.json"))
        rows.append(
            {
                "config": name,
                "variant": variant,
                "current": (name, variant) in current,
                "performance_shards": len(perf),
                "accuracy_shards": len(acc),
                "shards_expected": parse_layout(fields["layout"])[0],
                "settings": settings_path.as_posix(),
                "run": json.dumps(settings.get("run"), sort_keys=True),
            }
        )
    return rows


# --- writing --------------------------------------------------------------------


def _fmt(v, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _sci(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def _md_table(header: list[str], rows: list[list]) -> str:
    def esc(x):
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    import pandas as pd

    frame = pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=columns)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")


THROUGHPUT_COLUMNS = [
    "config",
    "variant",
    "model",
    "recipe",
    "backend",
    "gpu_type",
    "batch_size",
    "layout",
    "status",
    "status_reasons",
    "shards_found",
    "shards_expected",
    "total_gpus",
    "concurrent",
    "non_overlapping_shards",
    "a_sum_tokens_per_s",
    "a_source",
    "b_concurrent_tokens_per_s",
    "window_s",
    "output_tokens",
    "input_tokens",
    "c_per_gpu_mean",
    "c_per_gpu_min",
    "c_per_gpu_max",
    "c_cv",
    "slowest_shard",
    "slowest_shard_dir",
    "a_per_gpu",
    "b_per_gpu",
    "published_per_gpu",
    "published_source",
    "accuracy_evidence",
    "accuracy_valid",
    "accuracy_file",
    "accuracy_failures",
    "acc_rouge1",
    "acc_rouge2",
    "acc_rougeL",
    "acc_tokens_per_sample",
    "precision",
    "parameters",
    "parameters_source",
    "peak_dense_flops",
    "peak_source",
    "efficiency_a",
    "efficiency_b",
    "efficiency_skip",
]
RESULT_COLUMNS = [
    "a_sum_tokens_per_s",
    "b_concurrent_tokens_per_s",
    "c_per_gpu_mean",
    "c_per_gpu_min",
    "c_per_gpu_max",
    "a_per_gpu",
    "b_per_gpu",
    "efficiency_a",
    "efficiency_b",
]
VARIANT_COLUMNS = [
    "config",
    "variant",
    "current",
    "performance_shards",
    "accuracy_shards",
    "shards_expected",
    "settings",
    "run",
]
SHARD_COLUMNS = [
    "config",
    "variant",
    "shard_index",
    "status",
    "shard_dir",
    "hostname",
    "slurm_job_id",
    "gpus_per_shard",
    "shard_mode",
    "loadgen_result",
    "loadgen_tokens_per_second",
    "loadgen_samples_per_second",
    "min_duration_satisfied",
    "min_queries_satisfied",
    "loadgen_version",
    "loadgen_duration_s",
    "tokens_per_s",
    "tokens_per_s_source",
    "tokens_per_s_per_gpu",
    "measured_tokens_per_s",
    "output_tokens",
    "input_tokens",
    "completed_samples",
    "tokens_source",
    "started_at",
    "finished_at",
    "last_completion",
    "wall_s",
    "overlap_fraction",
    "overlaps_all",
    "accuracy_log",
]


def _public(cfg: dict) -> dict:
    """An INVALID configuration's throughput is not a result: blank it."""
    out = dict(cfg)
    out["non_overlapping_shards"] = " ".join(str(i) for i in cfg["non_overlapping_shards"])
    if cfg["status"] == STATUS_INVALID:
        for c in RESULT_COLUMNS:
            out[c] = None
    return out


def render_markdown(configs, shards, prov, figure_inputs, min_overlap, variants=(), extra_sections=()) -> str:
    md = [
        "# rackbench report",
        "",
        "Throughput counts **output tokens**, as MLPerf does. Each throughput figure names its method:",
        "",
        "- **(a) sum**: the sum of the shards' own LoadGen tokens/s (how a rack figure made of separate "
        "LoadGen runs is computed, e.g. 18 runs added up). It is a rack throughput **only if the shards ran "
        "at the same time**.",
        "- **(b) concurrent**: total output tokens of all shards / (last shard end - first shard start), "
        "from shard.json `started_at`/`finished_at` and samples.parquet.",
        "- **(c) spread**: per-GPU tokens/s of each shard ((a)'s shard figure / GPUs per shard): mean, min, "
        "max and coefficient of variation (sample s.d. / mean) across shards; the slowest shard is named.",
        "",
        f"A shard *overlaps* when all other shards of its configuration were running for at least "
        f"{min_overlap:.0%} of its run time. An INVALID configuration (LoadGen INVALID, missing shard, or "
        "accuracy gate failed) is shown as INVALID, never as a result.",
        "",
        "## Throughput per configuration",
        "",
    ]
    rows = []
    for c in configs:
        inv = c["status"] == STATUS_INVALID
        val = lambda v, d=1, inv=inv: "INVALID" if inv else _fmt(v, d)
        overlap = (
            "yes"
            if c["concurrent"]
            else f"**NO** (shards {', '.join(map(str, c['non_overlapping_shards']))}): (a) is not a rack throughput"
        )
        rows.append(
            [
                c["config"],
                f"**{c['status']}**",
                f"{c['shards_found']}/{c['shards_expected']}",
                c["total_gpus"],
                val(c["a_sum_tokens_per_s"]),
                val(c["b_concurrent_tokens_per_s"]),
                _fmt(c["window_s"], 1),
                val(c["c_per_gpu_mean"]),
                val(c["c_per_gpu_min"]),
                val(c["c_per_gpu_max"]),
                val(c["c_cv"], 3),
                c["slowest_shard"],
                overlap,
                c["accuracy_evidence"] if c["accuracy_evidence"] != "none" else "**NONE**",
            ]
        )
    md.append(
        _md_table(
            [
                "configuration",
                "status",
                "shards",
                "GPUs",
                "(a) sum tok/s",
                "(b) concurrent tok/s",
                "(b) window s",
                "(c) mean tok/s/GPU",
                "(c) min",
                "(c) max",
                "(c) CV",
                "(c) slowest shard",
                "shards overlapped",
                "accuracy evidence",
            ],
            rows,
        )
    )
    reasons = [c for c in configs if c["status_reasons"]]
    if reasons:
        md += ["", "Status reasons:", ""] + [
            f"- `{c['config']}`: {c['status']}: {c['status_reasons']}" for c in reasons
        ]
    md += ["", "## Shards", ""]
    srows = []
    for s in shards:
        srows.append(
            [
                s["config"],
                s["shard_index"],
                s["loadgen_result"] or "-",
                s["loadgen_tokens_per_second"] or "-",
                s["tokens_per_s_source"],
                "INVALID" if s["status"] == STATUS_INVALID else _fmt(s["tokens_per_s_per_gpu"]),
                _fmt(s["output_tokens"]),
                _fmt(s["wall_s"], 2),
                _fmt(s["overlap_fraction"], 3),
                s["hostname"] or "-",
            ]
        )
    md.append(
        _md_table(
            [
                "configuration",
                "shard",
                "LoadGen result",
                "LoadGen tokens/s (as printed)",
                "source",
                "tok/s/GPU",
                "output tokens",
                "wall s",
                "overlap fraction",
                "host",
            ],
            srows,
        )
    )
    md += ["", "## Accuracy", ""]
    arows = []
    for c in configs:
        if c["accuracy_evidence"] == "none":
            arows.append([c["config"], "**NO ACCURACY EVIDENCE**", "-", "-", "-", "-", "-"])
        else:
            arows.append(
                [
                    c["config"],
                    "PASS" if c["accuracy_valid"] else "**FAIL**",
                    _fmt(c.get("acc_rouge1"), 4),
                    _fmt(c.get("acc_rouge2"), 4),
                    _fmt(c.get("acc_rougeL"), 4),
                    _fmt(c.get("acc_tokens_per_sample"), 1),
                    c["accuracy_file"],
                ]
            )
    md.append(_md_table(["configuration", "gate", "rouge1", "rouge2", "rougeL", "tokens/sample", "file"], arows))
    md += ["", "## Per GPU against published Llama-2-70B Offline records", ""]
    rrows = []
    for c in configs:
        inv = c["status"] == STATUS_INVALID
        rrows.append(
            [
                c["config"],
                "INVALID" if inv else _fmt(c["a_per_gpu"]),
                "INVALID" if inv else _fmt(c["b_per_gpu"]),
                _fmt(c["published_per_gpu"], 0),
                c["published_source"] or "no record for this GPU type",
                "INVALID"
                if inv
                else (
                    _fmt(100 * c["efficiency_b"], 3) + " %"
                    if not math.isnan(c["efficiency_b"])
                    else f"skipped: {c['efficiency_skip'] or 'no window'}"
                ),
                _sci(c["parameters"]),
                c["parameters_source"],
                _sci(c["peak_dense_flops"]),
                c["precision"],
            ]
        )
    md.append(
        _md_table(
            [
                "configuration",
                "(a)/GPU tok/s",
                "(b)/GPU tok/s",
                "published tok/s/GPU",
                "source",
                "efficiency (b)",
                "parameters",
                "parameters from",
                "peak dense FLOP/s",
                "precision",
            ],
            rrows,
        )
    )
    md += [
        "",
        "Efficiency = (input + output tokens)/s per GPU x 2 x parameters / peak dense FLOP/s for the "
        "recipe's precision (GPU-type table). Published records are Llama-2-70B; compare only like models.",
        "",
        records.markdown_section(),
        *extra_sections,
        "## Provenance",
        "",
    ]
    md.append(
        _md_table(
            list(provenance.SUMMARY_COLUMNS),
            [[_fmt(r[c]) if r[c] is not None else "-" for c in provenance.SUMMARY_COLUMNS] for r in prov],
        )
        if prov
        else "No provenance.json found near the inputs."
    )
    md += [
        "",
        "## Variants on disk",
        "",
        "Each result's path carries the hash of the settings that made it (its variant; the full settings "
        "are in its settings.json), so results of earlier settings stay beside the current ones.",
        "",
    ]
    md.append(
        _md_table(
            ["configuration", "variant", "current", "performance shards", "accuracy shards", "settings"],
            [
                [
                    v["config"],
                    v["variant"],
                    "yes" if v["current"] else "no",
                    f"{v['performance_shards']}/{v['shards_expected']}",
                    f"{v['accuracy_shards']}/{v['shards_expected']}",
                    v["settings"],
                ]
                for v in variants
            ],
        )
        if variants
        else "No run variants listed."
    )
    md += ["", "## Figures", ""]
    for name, inputs in figure_inputs.items():
        md.append(f"- `{name}.{{pdf,svg,png}}`, drawn from {len(inputs)} input files (listed in each file's metadata)")
    return "\n".join(md) + "\n"


# ---- the rack-wide runs: one LoadGen over every engine server (rackbench.rack) ----
METHOD_ONE_LOADGEN = "one LoadGen (MLPerf's method)"
METHOD_SUM = "sum of {n} LoadGens (not an MLPerf result)"
RACK_COLUMNS = [
    "config",
    "variant",
    "method",
    "scenario",
    "target_qps",
    "result",
    "tokens_per_s",
    "samples_per_s",
    "tokens_per_s_per_gpu",
    "ttft_p99_ms",
    "ttft_limit_ms",
    "tpot_p99_ms",
    "tpot_limit_ms",
    "tokens_per_s_per_user",
    "servers",
    "endpoints_with_samples",
    "accuracy_passed",
    "run_dir",
]


def _ms(ns):
    return None if ns is None else ns / 1e6


def read_rack_runs(entries: list[dict]) -> list[dict]:
    """One row per one-LoadGen performance run (Configuration.one_loadgen_runs), read from its
    shard.json (LoadGen's summary, parsed by harness.parse_summary) and endpoints.json."""
    rows = []
    for e in entries:
        fields = configuration_fields(e)
        shards, gps = parse_layout(fields["layout"])
        for run in e.get("one_loadgen_runs") or ():
            perf = Path(run["performance"])
            if not (perf / "shard.json").is_file():
                raise ReportInputError(f"{perf}: no shard.json (the rack run has not been made)")
            rec = json.loads((perf / "shard.json").read_text())
            lg = rec["loadgen"]
            endpoints = json.loads((perf / paths.ENDPOINTS_FILE).read_text())["endpoints"]
            acc_path = Path(run["accuracy_json"]) if run.get("accuracy_json") else None
            acc = json.loads(acc_path.read_text()) if acc_path and acc_path.is_file() else None
            tpot = lg.get("tpot_p99_ns")
            tokens = lg.get("tokens_per_second")
            rows.append(
                {
                    "config": config_name(fields),
                    "variant": e["rack_variant"],
                    "method": METHOD_ONE_LOADGEN,
                    "scenario": run["scenario"],
                    "target_qps": run["target_qps"],
                    "result": lg.get("result"),
                    "tokens_per_s": tokens,
                    "samples_per_s": lg.get("samples_per_second"),
                    "tokens_per_s_per_gpu": None if tokens is None else tokens / (shards * gps),
                    "ttft_p99_ms": _ms(lg.get("ttft_p99_ns")),
                    "ttft_limit_ms": _ms(lg.get("ttft_latency_ns")),
                    "tpot_p99_ms": _ms(tpot),
                    "tpot_limit_ms": _ms(lg.get("tpot_latency_ns")),
                    "tokens_per_s_per_user": None if not tpot else 1e9 / tpot,
                    "servers": len(endpoints),
                    "endpoints_with_samples": sum(1 for ep in endpoints if ep["samples"] > 0),
                    "accuracy_passed": None if acc is None else bool(acc.get("valid")),
                    "run_dir": run["run_dir"],
                    "short": f"{fields['gpu_type']} {fields['recipe']} bs{fields['batch_size']} {fields['layout']}",
                    "inputs": [str(perf / "shard.json"), str(perf / paths.ENDPOINTS_FILE)],
                }
            )
    return rows


def render_rack_section(configs: list[dict], rack: list[dict]) -> list[str]:
    """The two methods side by side per configuration, then every one-LoadGen run."""
    if not rack:
        return []
    md = [
        "## One LoadGen for the whole rack vs the per-shard sum",
        "",
        f"- **{METHOD_ONE_LOADGEN}**: one LoadGen instance drives every engine server of the rack "
        "through one SUT (rackbench.rack). MLPerf's rules accept only this for a system result; a VALID "
        "run with a passing accuracy gate (and the compliance tests) is what may be submitted as one.",
        f"- **{METHOD_SUM.format(n='N')}**: the per-shard method's (a) sum. Even when the shards overlap "
        "in time it may not be represented as an MLPerf result (MLPerf results messaging guidelines).",
        "",
    ]
    rows = []
    for c in configs:
        for r in (r for r in rack if r["config"] == c["config"] and r["scenario"] == "Offline"):
            rows.append([c["config"], METHOD_ONE_LOADGEN, r["scenario"], f"**{r['result']}**", _fmt(r["tokens_per_s"])])
        inv = c["status"] == STATUS_INVALID
        rows.append(
            [
                c["config"],
                METHOD_SUM.format(n=c["shards_expected"]),
                "Offline",
                f"**{c['status']}**",
                "INVALID" if inv else _fmt(c["a_sum_tokens_per_s"]),
            ]
        )
    md += [_md_table(["configuration", "method", "scenario", "result", "output tokens/s"], rows), ""]
    md += ["### Every one-LoadGen run", ""]
    table = []
    for r in rack:
        lat = lambda v, lim: "-" if v is None else f"{_fmt(v, 1)} / {_fmt(lim, 0)}"  # noqa: E731
        table.append(
            [
                r["config"],
                r["scenario"],
                _fmt(r["target_qps"], 1) if r["target_qps"] is not None else "-",
                f"**{r['result']}**",
                _fmt(r["tokens_per_s"]),
                _fmt(r["samples_per_s"], 2),
                lat(r["ttft_p99_ms"], r["ttft_limit_ms"]),
                lat(r["tpot_p99_ms"], r["tpot_limit_ms"]),
                f"{r['endpoints_with_samples']}/{r['servers']}",
                {None: "-", True: "passed", False: "FAILED"}[r["accuracy_passed"]],
            ]
        )
    md += [
        _md_table(
            [
                "configuration",
                "scenario",
                "target QPS",
                "LoadGen result",
                "output tokens/s",
                "samples/s",
                "p99 TTFT / limit (ms)",
                "p99 TPOT / limit (ms)",
                "endpoints used",
                "accuracy gate",
            ],
            table,
        ),
        "",
        "The Server sweep figure (server_sweep.*) plots output tokens/s per GPU against tokens/s per "
        "user (1 / p99 TPOT), one curve per configuration.",
        "",
    ]
    return md


def build_report(
    entries: list[dict],
    gpu_types: dict,
    models: dict,
    out_dir,
    *,
    results_root=None,
    min_overlap: float = 0.9,
    table_sources=("gpu-types table", "models table"),
    test06_dirs=(),
    checker_verdicts=(),
    no_tree=None,
    mlcommons_skipped=None,
) -> dict:
    """The whole report for the configurations ``entries`` (Configuration.report_entry:
    fields, variant, shard_dirs, accuracy_json, and the engine/checkpoint/snapshot dirs).
    ``results_root``: where to list every run variant on disk (None: only the given ones).
    ``test06_dirs`` / ``checker_verdicts``: TEST06 folders and submission-checker verdicts to report;
    ``no_tree``: {configuration: why it has no submission tree}; ``mlcommons_skipped``: why none ran."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not entries:
        raise SystemExit("no configurations given")
    shards = [read_shard(d, e) for e in entries for d in sorted(set(map(str, e["shard_dirs"])))]
    if not shards:
        raise SystemExit("no shard dirs given")
    accuracy = {
        config_name(configuration_fields(e)): read_accuracy(e["accuracy_json"]) if e.get("accuracy_json") else None
        for e in entries
    }
    configs = aggregate(entries, shards, accuracy, gpu_types, models, min_overlap=min_overlap)
    shards.sort(key=lambda s: (s["config"], s["shard_index"]))
    prov = provenance_rows(entries, shards, accuracy)
    variants = variant_rows(entries, results_root)
    fig_inputs = _figure_inputs(shards, [a for a in accuracy.values() if a], table_sources)
    rack = read_rack_runs(entries)
    fig_inputs["server_sweep"] = sorted({p for r in rack for p in r["inputs"]})
    _draw_figures(configs, shards, published_records(gpu_types), out_dir, fig_inputs)
    figures.server_sweep(rack, out_dir, fig_inputs["server_sweep"])
    _write_csv(out_dir / paths.REPORT_TABLES["rack"], rack, RACK_COLUMNS)
    _write_csv(out_dir / paths.REPORT_TABLES["throughput"], [_public(c) for c in configs], THROUGHPUT_COLUMNS)
    _write_csv(out_dir / paths.REPORT_TABLES["shards"], shards, SHARD_COLUMNS)
    _write_csv(out_dir / paths.REPORT_TABLES["provenance"], prov, list(provenance.SUMMARY_COLUMNS))
    _write_csv(out_dir / paths.REPORT_TABLES["variants"], variants, VARIANT_COLUMNS)
    from rackbench.submission import report_sections  # TEST06 and the checker's verdicts, rendered there

    extra = (
        report_sections(test06_dirs, checker_verdicts, no_tree=no_tree, skipped=mlcommons_skipped)
        if test06_dirs or checker_verdicts or no_tree or mlcommons_skipped
        else ()
    )
    write_text_atomic(
        out_dir / paths.REPORT_TABLES["markdown"],
        render_markdown(
            configs, shards, prov, fig_inputs, min_overlap, variants, [*render_rack_section(configs, rack), *extra]
        ),
    )
    return {"configs": configs, "shards": shards, "provenance": prov, "variants": variants, "rack": rack}


def _figure_inputs(shards: list[dict], accuracy: list[dict], table_sources) -> dict[str, list[str]]:
    """The files each figure is drawn from (written into its metadata)."""
    shard_inputs = sorted({p for s in shards for p in s["inputs"]})
    acc_inputs = sorted(
        {a["file"] for a in accuracy} | {a["accuracy_txt_file"] for a in accuracy if a["accuracy_txt_file"]}
    )
    return {
        "shard_throughput": shard_inputs + acc_inputs,
        "shard_timeline": sorted({s["shard_dir"] + "/shard.json" for s in shards}),
        "records": shard_inputs + acc_inputs + [table_sources[0]],
        "efficiency": shard_inputs + acc_inputs + list(table_sources),
    }


def _draw_figures(configs, shards, published, out_dir: Path, fig_inputs: dict) -> None:
    figures.shard_throughput(configs, shards, out_dir, fig_inputs["shard_throughput"])
    figures.shard_timeline(configs, shards, out_dir, fig_inputs["shard_timeline"])
    figures.records(configs, published, out_dir, fig_inputs["records"])
    figures.efficiency(configs, out_dir, fig_inputs["efficiency"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rackbench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configurations-json",
        required=True,
        help="JSON list (inline or a file) of configurations: their fields, variant, "
        "shard_dirs, accuracy_json, engine_dir, checkpoint_dir, snapshot_dir "
        "(what rackbench.config.Configuration.report_entry gives)",
    )
    parser.add_argument("--gpu-types-json", required=True, help="config['gpu_types'] as a JSON file or string")
    parser.add_argument("--models-json", required=True, help="config['models'] as a JSON file or string")
    parser.add_argument("--out", required=True, help=f"output dir ({paths.REPORT_DIR})")
    parser.add_argument(
        "--results", default=None, help=f"results dir whose run variants to list (the workflow passes {paths.RESULTS})"
    )
    parser.add_argument(
        "--min-overlap",
        type=float,
        default=0.9,
        help="fraction of a shard's run time all others must share (default 0.9)",
    )
    parser.add_argument("--test06", nargs="*", default=[], help="TEST06/ folders (python -m rackbench.compliance)")
    parser.add_argument(
        "--checker-verdicts", nargs="*", default=[], help="verdict JSON files (python -m rackbench.submission check)"
    )
    parser.add_argument(
        "--no-tree-json", default=None, help="JSON (inline or a file): {configuration: why it has no submission tree}"
    )
    parser.add_argument("--mlcommons-skipped", default=None, help="why TEST06 and the checker did not run")
    args = parser.parse_args(argv)
    sources = tuple(
        v if is_json_file(v) else f"{flag} (inline)"
        for v, flag in ((args.gpu_types_json, "--gpu-types-json"), (args.models_json, "--models-json"))
    )
    try:
        result = build_report(
            json_arg(args.configurations_json),
            json_arg(args.gpu_types_json),
            json_arg(args.models_json),
            args.out,
            results_root=args.results,
            min_overlap=args.min_overlap,
            table_sources=sources,
            test06_dirs=args.test06,
            checker_verdicts=args.checker_verdicts,
            no_tree=json_arg(args.no_tree_json) if args.no_tree_json else None,
            mlcommons_skipped=args.mlcommons_skipped,
        )
    except ReportInputError as err:
        raise SystemExit(f"report: {err}") from None
    for c in result["configs"]:
        print(
            f"{c['config']} ({c['variant']}): {c['status']}  (a) {_fmt(c['a_sum_tokens_per_s'])}  "
            f"(b) {_fmt(c['b_concurrent_tokens_per_s'])} tokens/s  concurrent={c['concurrent']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
