"""Benchmark 5: output tokens/s of the reference engine vs a naive per-sample loop.

Uses exactly the demo's model and samples, made by the same commands as the workflow
(rules/demo.smk, rules/quantize.smk, rules/engine.smk) with config.yaml's settings:

    python -m rackbench.demo model    (config.yaml demo.model: 2 layers, hidden 256, vocab 1024)
    python -m rackbench.demo dataset  (demo.num_samples: 48 prompts of 20..200 tokens)
    python -m rackbench.quantize      (recipe nvfp4 = NVFP4 + FP8 KV; quantization.* settings)
    reference.build                   (engines.reference settings)

then decodes the 48 dataset prompts (``run.max_new_tokens``: 128 new tokens, EOS stops; the
demo's answers end by 114 tokens, 3,225 output tokens in all against 5,780 prompt tokens)

1. with ``Engine.generate`` (one call, ``engines.reference.max_batch_size``), for each
   emulation setting (the demo's own is FP8 KV on, activations off);
2. naively: transformers' ``model.generate`` once per prompt on the engine's own
   (dequantized) model.

It prints output tokens/s for each (fastest of ``--repeats`` runs: the machine may be
shared) and the ratio (target >= 5x), and checks that the engine's tokens equal the
naive loop's (no FP8-KV emulation in that comparison, as transformers' generate has none).

    python bench/reference_engine.py [--repeats 3] [--threads 1] [--assets DIR] [--profile]

``--assets DIR`` keeps (and reuses) the model, dataset, checkpoint and engine there.
``--profile`` prints a pyinstrument profile of one engine.generate call (demo settings).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TARGET = 5.0


def _sh(module: list[str], **options) -> None:
    """``python -m <module...>``, each keyword an option: ``num_samples=48`` -> ``--num-samples 48``."""
    args = [*module, *(x for name, value in options.items() for x in (f"--{name.replace('_', '-')}", str(value)))]
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(module)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def make_assets(root: Path, config: dict) -> tuple[Path, Path]:
    """The demo's model, dataset, NVFP4 checkpoint and reference engine, as the workflow makes
    them; returns (engine_dir, samples_pkl)."""
    from rackbench import demo
    from rackbench.engines import reference

    d, q = config["demo"], config["quantization"]
    model, data, ckpt, engine = root / "model", root / "dataset", root / "checkpoint", root / "engine"
    if not model.exists():
        flags = {option: d["model"][key] for option, key in demo.MODEL_OPTIONS.items() if key in d["model"]}
        _sh(["rackbench.demo", "model"], out=model, seed=d["seed"], **flags)
    if not data.exists():
        _sh(
            ["rackbench.demo", "dataset"],
            model=model,
            out=data,
            seed=d["seed"],
            num_samples=d["num_samples"],
            num_calibration=d["num_calibration"],
            max_new_tokens=d["reference_max_new_tokens"],
        )
    if not ckpt.exists():
        calib = root / "calibration.parquet"
        _pkl_to_parquet(data / demo.CALIBRATION_PKL, calib)  # what prepare_dataset does, minus the checksum
        _sh(
            ["rackbench.quantize"],
            model_dir=model,
            calibration=calib,
            recipe="nvfp4",
            out=ckpt,
            calib_samples=q["calibration_samples"],
            calib_batch_size=q["calibration_batch_size"],
            calib_max_seq_len=q["calibration_max_seq_len"],
            device="cpu",
        )
    if not engine.exists():
        reference.build(ckpt, engine, gpu_type="cpu", gpu_spec={}, settings=config["engines"]["reference"])
    return engine, data / demo.SAMPLES_PKL


def _pkl_to_parquet(pkl: Path, parquet: Path) -> None:
    from rackbench.dataset import convert

    convert(pkl, parquet)


def demo_engine_and_samples(root: Path, config: dict) -> tuple[Path, Path]:
    """``make_assets`` in ``root`` (made once, reused), plus the demo samples as the harness
    reads them: (engine_dir, samples.parquet)."""
    root.mkdir(parents=True, exist_ok=True)
    engine_dir, samples_pkl = make_assets(root, config)
    parquet = root / "samples.parquet"
    if not parquet.exists():
        _pkl_to_parquet(samples_pkl, parquet)
    return engine_dir, parquet


def naive(model, prompts, max_new_tokens, eos):
    """The baseline: transformers' ``model.generate`` once per prompt, the tests' reference too."""
    from rackbench import demo

    return demo.greedy(model, prompts, max_new_tokens, batch_size=1, eos=eos)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "config.yaml"))
    ap.add_argument("--threads", type=int, default=None, help="default: engines.reference.torch_threads")
    ap.add_argument("--batch-size", type=int, default=None, help="default: engines.reference.max_batch_size")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each; the fastest counts")
    ap.add_argument("--assets", help="keep/reuse the demo assets in this dir")
    ap.add_argument("--profile", action="store_true", help="pyinstrument profile of one engine.generate")
    ap.add_argument("--skip-naive", action="store_true", help="engine only (for profiling)")
    args = ap.parse_args()

    import pandas as pd

    from rackbench.engines import reference

    config = yaml.safe_load(Path(args.config).read_text())
    settings = dict(config["engines"]["reference"])
    threads = args.threads or settings.get("torch_threads") or 1
    batch = args.batch_size or settings.get("max_batch_size", 64)
    max_new = config["run"]["max_new_tokens"]
    torch.set_num_threads(threads)
    tmp = None if args.assets else tempfile.TemporaryDirectory(prefix="rb-bench-")
    root = Path(args.assets or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    engine_dir, samples = make_assets(root, config)
    frame = pd.read_pickle(samples)
    prompts = [list(map(int, p)) for p in frame["tok_input"]]
    m = config["demo"]["model"]
    lens, outs = sorted(map(len, prompts)), sorted(map(len, frame["tok_output"]))
    print(
        f"demo assets ready in {time.perf_counter() - t0:.0f} s: {m['num_hidden_layers']} layers, hidden "
        f"{m['hidden_size']}, vocab {m['vocab_size']}, NVFP4 + FP8 KV; {len(prompts)} prompts of "
        f"{lens[0]}..{lens[-1]} tokens, max_new_tokens {max_new}, batch {batch}, {threads} thread(s)"
    )
    print(
        f"workload: {sum(lens)} prompt tokens (mean {sum(lens) / len(lens):.1f}); reference outputs "
        f"{sum(outs)} tokens (mean {sum(outs) / len(outs):.1f}, {outs[0]}..{outs[-1]})"
    )

    def load(**extra):
        return reference.load(
            engine_dir,
            record={},
            gpu_ids=[],
            settings={**settings, "max_batch_size": batch, "torch_threads": threads, **extra},
        )

    if args.profile:
        from pyinstrument import Profiler

        engine = load()
        engine.generate(prompts[:2], 2)
        prof = Profiler(interval=0.0005)
        prof.start()
        engine.generate(prompts, max_new)
        prof.stop()
        print(prof.output_text(unicode=False, color=False, show_all=False))
        if args.skip_naive:
            return

    results = {}
    variants = {
        "engine (weights only)": {"emulate_fp8_kv_cache": False},
        "engine (+FP8 KV, demo setting)": {},
        "engine (+FP8 KV +activations)": {"emulate_activation_quant": True},
    }
    for label, extra in variants.items():
        engine = load(**extra)
        engine.generate(prompts[:2], 2)  # warm up
        dt = cpu = float("inf")
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            out = engine.generate(prompts, max_new)
            dt, cpu = min(dt, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
        results[label] = (out, sum(map(len, out)) / dt, dt, cpu)
        if label == "engine (weights only)":
            model, eos = engine.model, engine.eos_ids[0]
    if args.skip_naive:
        for label, (out, tps, secs, cpu) in results.items():
            print(f"{label:34s} {sum(map(len, out)):6d} tokens {secs:7.3f} s {tps:9.1f} tok/s (CPU {cpu:.3f} s)")
        return
    naive(model, prompts[:1], 2, eos)  # warm up
    dt = naive_cpu = float("inf")
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        ref_out = naive(model, prompts, max_new, eos)
        dt, naive_cpu = min(dt, time.perf_counter() - t0), min(naive_cpu, time.process_time() - c0)
    naive_tps = sum(map(len, ref_out)) / dt
    print(
        f"{'naive model.generate per sample':34s} {sum(map(len, ref_out)):6d} tokens {dt:7.3f} s "
        f"{naive_tps:9.1f} tok/s            (CPU time {naive_cpu:.3f} s)"
    )
    for label, (out, tps, secs, cpu) in results.items():
        print(
            f"{label:34s} {sum(map(len, out)):6d} tokens {secs:7.3f} s {tps:9.1f} tok/s  "
            f"x{tps / naive_tps:5.1f} vs naive (CPU time {cpu:.3f} s: x{naive_cpu / cpu:.1f})"
        )
    same = results["engine (weights only)"][0] == ref_out
    print(f"engine (weights only) tokens == naive loop tokens: {same}")
    demo_ratio = results["engine (+FP8 KV, demo setting)"][1] / naive_tps
    worst = min(r[1] for r in list(results.values())[:2]) / naive_tps
    print(
        f"target >= {TARGET:.0f}x (demo setting x{demo_ratio:.1f}, weights only "
        f"x{results['engine (weights only)'][1] / naive_tps:.1f}): {'MET' if worst >= TARGET else 'MISSED'}"
    )
    if tmp:
        tmp.cleanup()
    if not same:
        raise SystemExit("batched output differs from the per-sample loop")


if __name__ == "__main__":
    main()
