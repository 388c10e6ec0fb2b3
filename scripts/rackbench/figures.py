"""The report's figures, drawn with matplotlib and saved byte-identically.

Every figure is written as PDF, SVG and PNG, sized for a single paper column
(3.4 in wide), with units on its axes. Rebuilding from the same inputs gives
the same bytes: ``svg.hashsalt`` is fixed, no creation dates or timestamps are
written, and the metadata (PNG text ``Source``, PDF ``Keywords``, SVG
``Source``) names the input files the figure was drawn from.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rackbench.atomic import atomic_path  # noqa: E402

FORMATS = ("pdf", "svg", "png")
WIDTH_IN = 3.4  # one column of a two-column paper

# Published records (tokens/s per GPU, sources, verification): rackbench.records.
RC = {
    "svg.hashsalt": "rackbench",
    "svg.fonttype": "path",
    "pdf.fonttype": 42,
    "font.size": 7,
    "axes.titlesize": 7,
    "axes.labelsize": 7,
    "xtick.labelsize": 6,
    "ytick.labelsize": 6,
    "legend.fontsize": 6,
    "figure.dpi": 100,
    "savefig.dpi": 300,
    "path.simplify": False,
}

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
INVALID_COLOR = "#999999"
WARN_COLOR = "#d62728"


def _metadata(fmt: str, title: str, description: str, inputs: list[str]) -> dict:
    sources = "; ".join(inputs)
    producer = f"rackbench (matplotlib {matplotlib.__version__})"
    if fmt == "png":
        return {"Title": title, "Description": description, "Source": sources, "Software": producer}
    if fmt == "pdf":
        return {
            "Title": title,
            "Subject": description,
            "Keywords": sources,
            "Creator": producer,
            "Producer": producer,
            "CreationDate": None,
            "ModDate": None,
        }
    return {"Title": title, "Description": description, "Source": sources, "Creator": producer, "Date": None}


def save(fig, out_dir: str | os.PathLike, name: str, *, title: str, description: str, inputs: list[str]) -> list[Path]:
    """Write ``name.{pdf,svg,png}`` atomically and deterministically; close ``fig``."""
    out_dir = Path(out_dir)
    written = []
    for fmt in FORMATS:
        final = out_dir / f"{name}.{fmt}"
        with plt.rc_context(RC), atomic_path(final) as tmp:
            fig.savefig(
                tmp,
                format=fmt,
                metadata=_metadata(fmt, title, description, inputs),
                bbox_inches="tight",
                pad_inches=0.02,
            )
        written.append(final)
    plt.close(fig)
    return written


def _figure(height: float):
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(WIDTH_IN, height), layout="constrained")
    return fig, ax


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def shard_throughput(configs: list[dict], shards: list[dict], out_dir, inputs: list[str]) -> list[Path]:
    """Per-shard output tokens/s bars, grouped by configuration, with mean and +-1 sd band."""
    with plt.rc_context(RC):
        fig, ax = _figure(2.4)
        x = 0
        ticks, labels = [], []
        for ci, cfg in enumerate(configs):
            rows = [s for s in shards if s["config"] == cfg["config"]]
            invalid = cfg["status"] == "INVALID"
            color = INVALID_COLOR if invalid else COLORS[ci % len(COLORS)]
            xs = list(range(x, x + len(rows)))
            values = [s["tokens_per_s"] for s in rows]
            ax.bar(
                xs,
                values,
                width=0.8,
                color=color,
                hatch="//" if invalid else None,
                edgecolor="black" if invalid else color,
                linewidth=0.4,
                label=f"{cfg['label']}" + (" (INVALID)" if invalid else ""),
            )
            mean, sd = cfg.get("shard_mean_tokens_per_s"), cfg.get("shard_sd_tokens_per_s")
            if mean is not None and not math.isnan(mean):
                lo, hi = xs[0] - 0.45, xs[-1] + 0.45
                ax.hlines(mean, lo, hi, colors="black", linewidth=0.8)
                if sd is not None and not math.isnan(sd):
                    ax.fill_between([lo, hi], mean - sd, mean + sd, color="black", alpha=0.12, linewidth=0)
                ax.text(hi, mean, f" mean {_fmt(mean)}", va="bottom", ha="right", fontsize=5.5)
            if invalid:
                ax.text(
                    (xs[0] + xs[-1]) / 2,
                    max(values or [0]) * 0.5,
                    "INVALID",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color=WARN_COLOR,
                    rotation=90 if len(xs) < 3 else 0,
                )
            for s, xi in zip(rows, xs):
                ticks.append(xi)
                labels.append(str(s["shard_index"]))
            x += len(rows) + 1
        ax.set_xticks(ticks, labels)
        ax.set_xlabel("shard index")
        ax.set_ylabel("output tokens/s per shard")
        ax.set_ylim(bottom=0)
        ax.legend(loc="lower right", frameon=True, framealpha=0.8)
        ax.set_title("Per-shard throughput, mean and ±1 s.d.")
    return save(
        fig,
        out_dir,
        "shard_throughput",
        title="Per-shard throughput",
        description="Per-shard output tokens/s with mean and +-1 sd across shards",
        inputs=inputs,
    )


def shard_timeline(configs: list[dict], shards: list[dict], out_dir, inputs: list[str]) -> list[Path]:
    """Gantt chart of shard run windows; the window all shards of a configuration shared is shaded."""
    n = len(shards)
    with plt.rc_context(RC):
        fig, ax = _figure(max(1.6, 0.9 + 0.12 * n + 0.1 * len(configs)))
        starts = [s["started_at"] for s in shards if s.get("started_at") is not None]
        t0 = min(starts) if starts else 0.0
        y = 0
        yticks, ylabels = [], []
        for ci, cfg in enumerate(configs):
            rows = [s for s in shards if s["config"] == cfg["config"]]
            color = INVALID_COLOR if cfg["status"] == "INVALID" else COLORS[ci % len(COLORS)]
            ys = list(range(y, y + len(rows)))
            for s, yi in zip(rows, ys):
                if s.get("started_at") is None or s.get("finished_at") is None:
                    continue
                overl = s.get("overlaps_all", True)
                ax.barh(
                    yi,
                    s["finished_at"] - s["started_at"],
                    left=s["started_at"] - t0,
                    height=0.7,
                    color=color if overl else WARN_COLOR,
                    edgecolor="black",
                    linewidth=0.3,
                )
                yticks.append(yi)
                ylabels.append(f"{cfg['short']} s{s['shard_index']}")
            ws, we = cfg.get("common_start"), cfg.get("common_end")
            if ws is not None and we is not None and we > ws:
                ax.axvspan(ws - t0, we - t0, ymin=0, ymax=1, color=color, alpha=0.10, linewidth=0)
            y += len(rows) + 1
        ax.set_yticks(yticks, ylabels)
        ax.invert_yaxis()
        ax.set_xlabel("wall-clock time since first shard start (s)")
        ax.set_title("Shard timeline (shaded: all running; red: no overlap)")
    return save(
        fig,
        out_dir,
        "shard_timeline",
        title="Shard timeline",
        description="Start and end of each shard (shard.json started_at/finished_at)",
        inputs=inputs,
    )


def _labelled_hbars(ax, rows: list[tuple], label) -> None:
    """Horizontal bars, top to bottom, from (name, value, colour) rows, each bar
    labelled with ``label(value)`` at its end."""
    ys = list(range(len(rows)))
    ax.barh(ys, [r[1] for r in rows], color=[r[2] for r in rows], height=0.7)
    for yi, r in zip(ys, rows):
        ax.text(r[1], yi, f" {label(r[1])}", va="center", fontsize=5.5)
    ax.set_yticks(ys, [r[0] for r in rows], fontsize=5)
    ax.invert_yaxis()


def _warning_notes(ax, notes: list[str], *, y: float, wrap: bool = False) -> None:
    """What a figure leaves out and why (e.g. "x: INVALID, not shown"), one per line, bottom right."""
    if notes:
        ax.text(
            0.99,
            y,
            "\n".join(notes),
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=5,
            color=WARN_COLOR,
            wrap=wrap,
        )


def records(configs: list[dict], published: dict, out_dir, inputs: list[str]) -> list[Path]:
    """Our per-GPU output tokens/s (methods a and b) beside published Llama-2-70B Offline records."""
    rows = []  # (label, value, color, note)
    for name in sorted(published, key=lambda k: published[k]["tokens_per_s_per_gpu"]):
        rec = published[name]
        rows.append((f"{name} ({rec['source']})", float(rec["tokens_per_s_per_gpu"]), "#7f7f7f"))
    notes = []
    for ci, cfg in enumerate(configs):
        if cfg["status"] == "INVALID":
            notes.append(f"{cfg['short']}: INVALID, not shown")
            continue
        color = COLORS[ci % len(COLORS)]
        for key, method in (("a_per_gpu", "(a) sum"), ("b_per_gpu", "(b) concurrent")):
            v = cfg.get(key)
            if v is not None and not math.isnan(v) and v > 0:
                rows.append((f"{cfg['short']} {method}", v, color))
    with plt.rc_context(RC):
        fig, ax = _figure(max(1.8, 0.8 + 0.17 * len(rows) + 0.1 * len(notes)))
        _labelled_hbars(ax, rows, _fmt)
        ax.set_xscale("log")
        values = [r[1] for r in rows]
        ax.set_xlim(min(values) / 2, max(values) * 8)
        ax.set_xlabel("output tokens/s per GPU (log scale)")
        ax.set_title("Per GPU vs published Llama-2-70B Offline (grey)")
        _warning_notes(ax, notes, y=0.01)
    return save(
        fig,
        out_dir,
        "records",
        title="Per-GPU throughput against published records",
        description="Ours: (a) sum of per-shard LoadGen tokens/s / GPUs, (b) concurrent / GPUs. "
        "Published records as labelled (model: Llama-2-70B; ours may be another model)",
        inputs=inputs,
    )


def efficiency(configs: list[dict], out_dir, inputs: list[str]) -> list[Path]:
    """(input + output tokens)/s x 2 x parameters / peak dense FLOP/s, per configuration."""
    rows, notes = [], []
    for ci, cfg in enumerate(configs):
        if cfg["status"] == "INVALID":
            notes.append(f"{cfg['short']}: INVALID, not shown")
            continue
        if cfg.get("efficiency_skip"):
            notes.append(f"{cfg['short']}: skipped ({cfg['efficiency_skip']})")
            continue
        for key, method in (("efficiency_b", "(b) concurrent"), ("efficiency_a", "(a) per-shard mean")):
            v = cfg.get(key)
            if v is not None and not math.isnan(v):
                rows.append((f"{cfg['short']} {method}", 100.0 * v, COLORS[ci % len(COLORS)]))
    with plt.rc_context(RC):
        fig, ax = _figure(max(1.6, 0.8 + 0.17 * len(rows) + 0.1 * len(notes)))
        if rows:
            _labelled_hbars(ax, rows, lambda v: f"{v:.3g}%")
        else:
            ax.set_yticks([])
        ax.set_xlim(0, max(r[1] for r in rows) * 1.35 if rows else 1.0)
        ax.set_xlabel("model FLOP/s / peak dense FLOP/s (%)")
        ax.set_title("(in+out tok/s) × 2 × params / peak FLOP/s")
        _warning_notes(ax, notes, y=0.02, wrap=True)
    return save(
        fig,
        out_dir,
        "efficiency",
        title="Efficiency against the GPU's peak dense FLOP/s",
        description="(input + output tokens)/s per GPU x 2 x parameters / peak dense FLOP/s "
        "for the recipe's precision, from the GPU-type table",
        inputs=inputs,
    )


def server_sweep(rack_rows: list[dict], out_dir, inputs: list[str]) -> list[Path]:
    """Output tokens/s per GPU against tokens/s per user (1 / p99 TPOT), one curve per
    configuration, from its one-LoadGen Server runs (the target-QPS sweep); INVALID points hollow."""
    by_config: dict[str, list[dict]] = {}
    for r in rack_rows:
        if r["scenario"] == "Server" and r.get("tokens_per_s_per_user") and r.get("tokens_per_s_per_gpu"):
            by_config.setdefault(r["config"], []).append(r)
    with plt.rc_context(RC):
        fig, ax = _figure(2.4)
        for ci, (_config, rows) in enumerate(sorted(by_config.items())):
            rows.sort(key=lambda r: r["tokens_per_s_per_user"])
            color = COLORS[ci % len(COLORS)]
            xs = [r["tokens_per_s_per_user"] for r in rows]
            ys = [r["tokens_per_s_per_gpu"] for r in rows]
            ax.plot(xs, ys, "-", color=color, linewidth=1, label=rows[0]["short"])
            for r, x, y in zip(rows, xs, ys):
                valid = r["result"] == "VALID"
                ax.plot(x, y, "o", color=color, markersize=3.5, markerfacecolor=color if valid else "white")
                ax.annotate(f"{r['target_qps']:g} QPS", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=5)
        if not by_config:
            ax.text(0.5, 0.5, "no Server runs", transform=ax.transAxes, ha="center", va="center")
        else:
            ax.legend(loc="best", frameon=False)
        ax.set_xlabel("tokens/s per user (1 / p99 TPOT)")
        ax.set_ylabel("output tokens/s per GPU")
        ax.set_title("Server target-QPS sweep, one LoadGen (hollow: LoadGen INVALID)")
    return save(
        fig,
        out_dir,
        "server_sweep",
        title="Latency-throughput sweep (Server scenario, one LoadGen over the rack)",
        description="output tokens/s per GPU vs tokens/s per user (1 / p99 TPOT) at each Server target QPS",
        inputs=inputs,
    )
