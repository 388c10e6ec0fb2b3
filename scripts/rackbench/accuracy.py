"""The accuracy gate: ROUGE and tokens/sample over the accuracy-mode shards.

Computed as MLPerf's ``language/llama2-70b/evaluate-accuracy.py`` does:

* read each shard's ``mlperf_log_accuracy.json``; keep the first entry per
  ``qsl_idx`` (the reference's dedup), decode ``data`` as int32 token ids (the
  harness writes int32, ``run_accuracy.sh`` passes ``--dtype int32``);
* ``gen_tok_len`` = total token ids, ``tokens_per_sample = round(gen_tok_len / gen_num, 1)``;
* decode with the model's tokenizer (``AutoTokenizer(..., model_max_length=2048,
  padding_side="left", use_fast=False)``, ``batch_decode(skip_special_tokens=True)``);
* postprocess: strip, then one sentence per line (``nltk.sent_tokenize``);
* ROUGE = HF ``evaluate``'s ``rouge`` with ``use_stemmer=True, use_aggregator=False``,
  i.e. ``rouge_score.RougeScorer([rouge1, rouge2, rougeL, rougeLsum], use_stemmer=True)
  .score(target, pred).fmeasure`` per sample; mean x 100 rounded to 4 decimals;
* ``gen_len`` = total characters of the postprocessed predictions.

Sentence splitting only changes ``rougeLsum`` (and ``gen_len`` by one character
per sentence boundary): rouge1/2/L tokenize on non-alphanumerics, so the
newlines do not matter to them. ``nltk.sent_tokenize`` needs the ``punkt_tab``
data; where it is not installed (no network here) the fallback is nltk's own
Punkt algorithm with untrained default parameters (``PunktSentenceTokenizer()``:
splits after ``.?!`` but knows no abbreviations), and ``accuracy.json`` says so
in ``sentence_splitter``.

Targets (``--accuracy-json``: a benchmark name of rackbench.benchmarks, e.g.
``llama2-70b-99.9``, or a custom reference; accuracy.json names the one applied in
``target_name``), as MLPerf's submission checker applies them to the printed (rounded)
values: each ROUGE >= reference x target_fraction; tokens/sample within
[ref x (1 - tol), ref x (1 + tol)]. Every dataset sample must be scored exactly
once across the shards.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from rackbench.args import json_arg
from rackbench.atomic import sha256_file, write_json_atomic, write_text_atomic
from rackbench.provenance import write_provenance

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
GATED_ROUGE = ("rouge1", "rouge2", "rougeL")
DTYPE = np.int32  # what rackbench.harness writes (RESPONSE_DTYPE)
MAX_LISTED = 10


class AccuracyError(RuntimeError):
    pass


# --------------------------------------------------------------------------- text


def sentence_splitter():
    """(split function, description): nltk punkt if its data are installed, else the untrained fallback."""
    import nltk

    for resource in ("tokenizers/punkt_tab/english/", "tokenizers/punkt/english.pickle"):
        try:
            nltk.data.find(resource)
        except LookupError:
            continue
        try:
            nltk.sent_tokenize("Probe. Sentence.")
            return nltk.sent_tokenize, f"nltk.sent_tokenize ({resource.split('/')[1]} data)"
        except LookupError:
            continue
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return (
        PunktSentenceTokenizer().tokenize,
        "fallback: nltk PunktSentenceTokenizer() with untrained default parameters "
        "(punkt/punkt_tab data not installed); affects rougeLsum and gen_len only",
    )


def postprocess_text(preds, targets, split):
    preds = ["\n".join(split(p.strip())) for p in preds]
    targets = ["\n".join(split(t.strip())) for t in targets]
    return preds, targets


def rouge_per_sample(preds, targets) -> dict[str, list[float]]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out = {k: [] for k in ROUGE_TYPES}
    for pred, target in zip(preds, targets):
        score = scorer.score(target, pred)
        for k in ROUGE_TYPES:
            out[k].append(score[k].fmeasure)
    return out


def load_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    kwargs = dict(model_max_length=2048, padding_side="left")
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir), use_fast=False, **kwargs), "use_fast=False"
    except Exception as exc:  # no slow (sentencepiece) tokenizer for this model
        return (
            AutoTokenizer.from_pretrained(str(tokenizer_dir), **kwargs),
            f"default class; use_fast=False failed: {type(exc).__name__}",
        )


# --------------------------------------------------------------------------- shards


def read_shard(shard_dir) -> tuple[dict, list[tuple[int, np.ndarray]], list[str]]:
    """(shard.json, [(global sample index, token ids)], problems) for one accuracy shard."""
    shard_dir = Path(shard_dir)
    problems = []
    shard = json.loads((shard_dir / "shard.json").read_text())
    if shard.get("mode") != "accuracy":
        problems.append(f"{shard_dir}: shard.json mode is {shard.get('mode')!r}, not 'accuracy'")
    n = int(shard["num_samples"])
    if shard.get("sample_indices") is not None:
        first, stop = shard["sample_indices"]
        to_global = np.arange(first, stop, dtype=np.int64)
    else:
        table = pq.read_table(shard_dir / "samples.parquet", columns=["qsl_index", "sample_index"])
        to_global = np.full(n, -1, dtype=np.int64)
        to_global[table.column("qsl_index").to_numpy()] = table.column("sample_index").to_numpy()
    if len(to_global) != n:
        problems.append(f"{shard_dir}: sample_indices cover {len(to_global)} samples, num_samples is {n}")
    with open(shard_dir / "mlperf_log_accuracy.json") as handle:
        entries = json.load(handle)
    seen = set()
    preds = []
    for entry in entries:
        qsl_idx = int(entry["qsl_idx"])
        if qsl_idx in seen:
            continue
        seen.add(qsl_idx)
        if not 0 <= qsl_idx < len(to_global) or to_global[qsl_idx] < 0:
            problems.append(f"{shard_dir}: qsl_idx {qsl_idx} is outside the shard's {n} samples")
            continue
        preds.append((int(to_global[qsl_idx]), np.frombuffer(bytes.fromhex(entry["data"]), DTYPE)))
    return shard, preds, problems


def _listed(values) -> str:
    values = sorted(values)
    head = ", ".join(str(v) for v in values[:MAX_LISTED])
    return head + (f", ... ({len(values)} in all)" if len(values) > MAX_LISTED else "")


# --------------------------------------------------------------------------- evaluation


def reference_tokens_per_sample(dataset, tokenizer) -> tuple[float, str]:
    if "tok_output" in dataset.columns:
        return float(np.mean([len(t) for t in dataset["tok_output"]])), "mean length of the dataset's tok_output"
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in dataset["output"]]
    return float(np.mean(lengths)), "mean token count of the dataset's output, tokenized"


def evaluate(
    *,
    dataset,
    tokenizer,
    shard_dirs,
    reference: dict,
    target_fraction: float,
    tokens_tolerance: float,
    target_name: str | None = None,
) -> dict:
    import pandas as pd

    frame = pd.read_parquet(dataset, columns=None)
    if "output" not in frame.columns:
        raise AccuracyError(f"{dataset}: no 'output' column (the reference answers)")
    n_dataset = len(frame)
    tok, tokenizer_kind = load_tokenizer(tokenizer)
    split, splitter = sentence_splitter()

    failures: list[str] = []
    by_sample: dict[int, np.ndarray] = {}
    duplicates: set[int] = set()
    shards = []
    for shard_dir in shard_dirs:
        shard, preds, problems = read_shard(shard_dir)
        failures.extend(problems)
        shards.append(
            {
                "dir": str(shard_dir),
                "shard_index": shard.get("shard_index"),
                "num_samples": shard.get("num_samples"),
                "scored": len(preds),
                "accuracy_log_sha256": sha256_file(Path(shard_dir) / "mlperf_log_accuracy.json"),
            }
        )
        for index, ids in preds:
            if index in by_sample:
                duplicates.add(index)
                continue
            by_sample[index] = ids

    outside = {i for i in by_sample if not 0 <= i < n_dataset}
    missing = set(range(n_dataset)) - set(by_sample)
    if duplicates:
        failures.append(f"{len(duplicates)} sample(s) scored by more than one shard: {_listed(duplicates)}")
    if outside:
        failures.append(f"{len(outside)} sample index(es) outside the dataset of {n_dataset}: {_listed(outside)}")
    if missing:
        failures.append(f"{len(missing)} of {n_dataset} dataset sample(s) not scored: {_listed(missing)}")

    order = sorted(i for i in by_sample if i not in outside)
    pred_ids = [by_sample[i] for i in order]
    gen_tok_len = int(sum(len(p) for p in pred_ids))
    gen_num = len(order)

    result: dict = {}
    if gen_num:
        decoded = tok.batch_decode([p.tolist() for p in pred_ids], skip_special_tokens=True)
        targets = [frame["output"].iloc[i] for i in order]
        preds, targets = postprocess_text(decoded, targets, split)
        scores = rouge_per_sample(preds, targets)
        for k in ROUGE_TYPES:
            result[k] = round(float(np.mean(scores[k])) * 100, 4)
        result["gen_len"] = int(sum(len(p) for p in preds))
    else:
        for k in ROUGE_TYPES:
            result[k] = None
        result["gen_len"] = 0
        failures.append("no samples scored")
    result["gen_num"] = gen_num
    result["gen_tok_len"] = gen_tok_len
    result["tokens_per_sample"] = round(gen_tok_len / gen_num, 1) if gen_num else None

    # targets
    ref_tps = reference.get("tokens_per_sample")
    ref_tps_source = "config"
    if ref_tps is None:
        ref_tps, ref_tps_source = reference_tokens_per_sample(frame, tok)
    targets_out = {}
    for k in GATED_ROUGE:
        if reference.get(k) is None:
            continue
        target = float(reference[k]) * target_fraction
        targets_out[k] = target
        value = result[k]
        if value is not None and value < target:
            failures.append(f"{k} {value} < {target:.4f}")
    lo, hi = ref_tps * (1 - tokens_tolerance), ref_tps * (1 + tokens_tolerance)
    targets_out["tokens_per_sample"] = [lo, hi]
    tps = result["tokens_per_sample"]
    if tps is not None and not lo <= tps <= hi:
        failures.append(f"tokens_per_sample {tps} outside [{lo:.2f}, {hi:.2f}]")

    return {
        **result,
        # which target was applied: an MLPerf benchmark name (rackbench.benchmarks) or a custom one
        "target_name": target_name or f"custom (x{target_fraction} of the given reference)",
        "targets": targets_out,
        "valid": not failures,
        "failures": failures,
        "reference": {
            **{k: reference.get(k) for k in GATED_ROUGE},
            "tokens_per_sample": ref_tps,
            "tokens_per_sample_source": ref_tps_source,
        },
        "target_fraction": target_fraction,
        "tokens_tolerance": tokens_tolerance,
        "dataset_samples": n_dataset,
        "sentence_splitter": splitter,
        "tokenizer": f"{type(tok).__name__} ({tokenizer_kind})",
        "dtype": np.dtype(DTYPE).name,
        "shards": shards,
    }


def accuracy_txt(result: dict) -> str:
    """The text evaluate-accuracy.py prints (``print("\\nResults\\n"); print(dict)``)."""
    printed = {k: result[k] for k in (*ROUGE_TYPES, "gen_len", "gen_num", "gen_tok_len", "tokens_per_sample")}
    return f"\nResults\n\n{printed}\n"


def write_outputs(result: dict, out_json, out_txt) -> None:
    write_json_atomic(out_json, result)
    write_text_atomic(out_txt, accuracy_txt(result))


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rackbench.accuracy", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="dataset parquet (output, optional tok_output)")
    p.add_argument("--tokenizer", required=True, help="directory with the model's tokenizer")
    p.add_argument("--shard-dirs", nargs="+", required=True, help="accuracy-mode shard output dirs")
    p.add_argument(
        "--accuracy-json",
        default=None,
        help="JSON (or file): the model's config accuracy block, {benchmark: llama2-70b-99.9} or "
        "{reference, target_fraction, tokens_per_sample_tolerance} (instead of the three below)",
    )
    p.add_argument(
        "--reference-json",
        default=None,
        help='JSON (or file): {"rouge1":..,"rouge2":..,"rougeL":..,"tokens_per_sample":.. or null}',
    )
    p.add_argument("--target-fraction", type=float, default=None, help="0.99 for -99, 0.999 for -99.9")
    p.add_argument(
        "--tokens-tolerance",
        type=float,
        default=None,
        help="tokens/sample tolerance around the reference (config models.<m>.accuracy)",
    )
    p.add_argument("--out-json", required=True)
    p.add_argument("--out-txt", required=True)
    p.add_argument("--fail-on-invalid", action="store_true", help="exit 1 when the gate fails")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from rackbench import benchmarks

    if args.accuracy_json is not None:
        if args.reference_json is not None or args.target_fraction is not None:
            parser.error("give --accuracy-json or --reference-json/--target-fraction, not both")
        try:
            gate = benchmarks.gate(json_arg(args.accuracy_json))
        except benchmarks.BenchmarkError as err:
            parser.error(str(err))
    elif args.reference_json is None or args.target_fraction is None or args.tokens_tolerance is None:
        parser.error("give --accuracy-json, or all of --reference-json, --target-fraction and --tokens-tolerance")
    else:
        gate = benchmarks.gate(
            {
                "reference": json_arg(args.reference_json),
                "target_fraction": args.target_fraction,
                "tokens_per_sample_tolerance": args.tokens_tolerance,
            }
        )
    reference = gate["reference"]
    args.target_fraction, args.tokens_tolerance = gate["target_fraction"], gate["tokens_per_sample_tolerance"]
    result = evaluate(
        dataset=args.dataset,
        tokenizer=args.tokenizer,
        shard_dirs=args.shard_dirs,
        reference=reference,
        target_fraction=args.target_fraction,
        tokens_tolerance=args.tokens_tolerance,
        target_name=gate["target_name"],
    )
    write_outputs(result, args.out_json, args.out_txt)
    write_provenance(
        Path(args.out_json).parent / "provenance.json",
        step="accuracy",
        config_fragment={
            "target_name": gate["target_name"],
            "reference": reference,
            "target_fraction": args.target_fraction,
            "tokens_tolerance": args.tokens_tolerance,
        },
    )
    print(accuracy_txt(result), end="")
    status = "VALID" if result["valid"] else "INVALID: " + "; ".join(result["failures"])
    print(f"accuracy gate ({gate['description']}): {status}", file=sys.stderr)
    print(f"sentence splitter: {result['sentence_splitter']}", file=sys.stderr)
    return 1 if (args.fail_on_invalid and not result["valid"]) else 0


if __name__ == "__main__":
    sys.exit(main())
