"""The accuracy gate: ROUGE math, tokens/sample, targets, sample coverage, and the harness round trip."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import QUICK_LOADGEN
from rackbench import accuracy
from rackbench.harness import RESPONSE_DTYPE, run_shard

WORDS = ["<unk>", "</s>", "the", "cat", "cats", "sat", "on", "mat", "dog", "ran", "running", "run", "a", "."]
EOS = 1
REF = {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "tokens_per_sample": None}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(path)
    return path


def ids(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.split()]


def write_dataset(path: Path, outputs: list[str], with_tok_output=True):
    columns = {
        "input": [f"question {i}" for i in range(len(outputs))],
        "tok_input": pa.array([[2, 3, i + 2] for i in range(len(outputs))], pa.list_(pa.int32())),
        "output": outputs,
    }
    if with_tok_output:
        columns["tok_output"] = pa.array([ids(o) for o in outputs], pa.list_(pa.int32()))
    pq.write_table(pa.table(columns), path)


def write_shard(shard_dir: Path, first: int, preds: list[list[int]], *, order=None, mode="accuracy", extra=()):
    """A shard dir as the harness writes it: shard.json + LoadGen's accuracy log."""
    shard_dir.mkdir(parents=True)
    order = order if order is not None else range(len(preds))
    entries = [
        {
            "seq_id": s,
            "qsl_idx": q,
            "data": np.asarray(preds[q], RESPONSE_DTYPE).tobytes().hex().upper(),
            "token_count": len(preds[q]),
        }
        for s, q in enumerate([*order, *extra])
    ]
    (shard_dir / "mlperf_log_accuracy.json").write_text(json.dumps(entries))
    (shard_dir / "shard.json").write_text(
        json.dumps(
            {"mode": mode, "shard_index": 0, "num_samples": len(preds), "sample_indices": [first, first + len(preds)]}
        )
    )


def evaluate(
    tmp_path, tokenizer_dir, outputs, shards, reference=REF, target_fraction=0.99, tol=0.1, with_tok_output=True
):
    tmp_path.mkdir(parents=True, exist_ok=True)
    ds = tmp_path / "ds.parquet"
    write_dataset(ds, outputs, with_tok_output)
    dirs = []
    for k, (first, preds, kw) in enumerate(shards):
        write_shard(tmp_path / f"shard{k}", first, preds, **kw)
        dirs.append(tmp_path / f"shard{k}")
    return accuracy.evaluate(
        dataset=ds,
        tokenizer=tokenizer_dir,
        shard_dirs=dirs,
        reference=reference,
        target_fraction=target_fraction,
        tokens_tolerance=tol,
    )


def test_rouge_by_hand():
    # ref: the cat sat on the mat (6 unigrams, 5 bigrams); pred: the cat sat
    got = accuracy.rouge_per_sample(["the cat sat"], ["the cat sat on the mat"])
    assert got["rouge1"][0] == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # P=3/3, R=3/6
    assert got["rouge2"][0] == pytest.approx(2 * 1.0 * 0.4 / 1.4)  # P=2/2, R=2/5
    assert got["rougeL"][0] == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # LCS 3
    # Porter stemming: cats/cat and running/run match
    stem = accuracy.rouge_per_sample(["cats running"], ["cat run"])
    assert stem["rouge1"][0] == pytest.approx(1.0) and stem["rouge2"][0] == pytest.approx(1.0)
    # rougeLsum works on newline-separated sentences: union LCS per reference sentence
    lsum = accuracy.rouge_per_sample(["a dog ran\nthe cat sat"], ["the cat sat\na dog ran"])
    assert lsum["rougeLsum"][0] == pytest.approx(1.0)
    assert lsum["rougeL"][0] == pytest.approx(0.5)  # LCS over the whole text is 3 of 6


def test_scores_averaged_per_sample(tmp_path, tokenizer_dir):
    outputs = ["the cat sat on the mat", "a dog ran"]
    preds = [ids("the cat sat"), ids("a dog ran") + [EOS]]  # EOS is a special token: skipped when decoding
    result = evaluate(tmp_path, tokenizer_dir, outputs, [(0, preds, {})])
    r1 = (2 * 0.5 / 1.5 + 1.0) / 2 * 100
    r2 = (2 * 0.4 / 1.4 + 1.0) / 2 * 100
    assert result["rouge1"] == round(r1, 4)
    assert result["rouge2"] == round(r2, 4)
    assert result["rougeL"] == round(r1, 4)
    assert result["gen_num"] == 2
    assert result["gen_tok_len"] == 3 + 4
    assert result["tokens_per_sample"] == 3.5
    assert result["gen_len"] == len("the cat sat") + len("a dog ran")
    # reference tokens/sample from tok_output: (6 + 3) / 2 = 4.5 -> [4.05, 4.95]; 3.5 is outside
    assert result["targets"]["tokens_per_sample"] == pytest.approx([4.05, 4.95])
    assert result["reference"]["tokens_per_sample_source"].startswith("mean length of the dataset's tok_output")
    assert result["valid"] is False
    assert any(f.startswith("rouge1 ") for f in result["failures"])
    assert any(f.startswith("tokens_per_sample 3.5 outside") for f in result["failures"])


def test_perfect_copy_passes_across_shards(tmp_path, tokenizer_dir):
    outputs = ["the cat sat on the mat .", "a dog ran", "the dog sat", "cats run on a mat"]
    shards = [
        (0, [ids(o) for o in outputs[:2]], {"order": [1, 0, 1]}),  # duplicate qsl_idx in one log: deduped
        (2, [ids(o) for o in outputs[2:]], {}),
    ]
    result = evaluate(tmp_path, tokenizer_dir, outputs, shards, target_fraction=0.99)
    assert result["valid"] is True, result["failures"]
    for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert result[k] == 100.0
    assert result["gen_num"] == 4
    assert result["tokens_per_sample"] == round(sum(len(o.split()) for o in outputs) / 4, 1)
    assert result["targets"]["rouge1"] == pytest.approx(99.0)
    assert "sentence_splitter" in result and result["dtype"] == "int32"


def test_reference_tokens_from_tokenized_output(tmp_path, tokenizer_dir):
    outputs = ["the cat sat", "a dog ran on the mat"]
    result = evaluate(tmp_path, tokenizer_dir, outputs, [(0, [ids(o) for o in outputs], {})], with_tok_output=False)
    assert result["reference"]["tokens_per_sample"] == pytest.approx(4.5)
    assert "tokenized" in result["reference"]["tokens_per_sample_source"]
    assert result["valid"] is True


def test_explicit_reference_and_fraction(tmp_path, tokenizer_dir):
    outputs = ["the cat sat on the mat"]
    preds = [ids("the cat sat on a mat")]  # rouge1 = 5/6
    ref = {"rouge1": 90.0, "rouge2": 10.0, "rougeL": 10.0, "tokens_per_sample": 6.0}
    passing = evaluate(
        tmp_path / "a", tokenizer_dir, outputs, [(0, preds, {})], reference=ref, target_fraction=0.9
    )  # 83.3333 >= 81
    assert passing["rouge1"] == round(100 * 5 / 6, 4) and passing["valid"] is True
    failing = evaluate(
        tmp_path / "b", tokenizer_dir, outputs, [(0, preds, {})], reference=ref, target_fraction=0.99
    )  # 83.3333 < 89.1
    assert failing["valid"] is False and failing["failures"] == ["rouge1 83.3333 < 89.1000"]


def test_missing_and_duplicate_samples_invalid(tmp_path, tokenizer_dir):
    outputs = ["the cat sat", "a dog ran", "the mat"]
    missing = evaluate(tmp_path / "m", tokenizer_dir, outputs, [(0, [ids(o) for o in outputs[:2]], {})])
    assert missing["valid"] is False
    assert "1 of 3 dataset sample(s) not scored: 2" in missing["failures"]
    assert missing["gen_num"] == 2 and missing["rouge1"] == 100.0

    dup = evaluate(
        tmp_path / "d",
        tokenizer_dir,
        outputs,
        [(0, [ids(o) for o in outputs[:2]], {}), (1, [ids(o) for o in outputs[1:]], {})],
    )
    assert dup["valid"] is False
    assert "1 sample(s) scored by more than one shard: 1" in dup["failures"]

    perf = evaluate(tmp_path / "p", tokenizer_dir, outputs, [(0, [ids(o) for o in outputs], {"mode": "performance"})])
    assert perf["valid"] is False and any("not 'accuracy'" in f for f in perf["failures"])


def _one_perfect_shard_args(tmp_path, tokenizer_dir) -> list[str]:
    """A 2-sample dataset and one shard that answers it exactly: accuracy.main's --dataset,
    --tokenizer and --shard-dirs for them."""
    outputs = ["the cat sat", "a dog ran"]
    ds = tmp_path / "ds.parquet"
    write_dataset(ds, outputs)
    write_shard(tmp_path / "s0", 0, [ids(o) for o in outputs])
    return ["--dataset", str(ds), "--tokenizer", str(tokenizer_dir), "--shard-dirs", str(tmp_path / "s0")]


def test_accuracy_txt_format_and_cli(tmp_path, tokenizer_dir):
    out_json, out_txt = tmp_path / "acc" / "accuracy.json", tmp_path / "acc" / "accuracy.txt"
    rc = accuracy.main(
        [
            *_one_perfect_shard_args(tmp_path, tokenizer_dir),
            "--reference-json",
            json.dumps(REF),
            "--target-fraction",
            "0.99",
            "--tokens-tolerance",
            "0.1",
            "--out-json",
            str(out_json),
            "--out-txt",
            str(out_txt),
        ]
    )
    assert rc == 0
    data = json.loads(out_json.read_text())
    assert data["valid"] is True and data["failures"] == []
    text = out_txt.read_text()
    assert text.startswith("\nResults\n\n{'rouge1': 100.0, 'rouge2': 100.0, 'rougeL': 100.0, 'rougeLsum': 100.0, ")
    printed = ast.literal_eval(text.strip().splitlines()[-1])
    assert list(printed) == [
        "rouge1",
        "rouge2",
        "rougeL",
        "rougeLsum",
        "gen_len",
        "gen_num",
        "gen_tok_len",
        "tokens_per_sample",
    ]
    assert printed["gen_num"] == 2 and printed["tokens_per_sample"] == 3.0
    assert sorted(p.name for p in out_json.parent.iterdir()) == ["accuracy.json", "accuracy.txt", "provenance.json"]


def test_cli_gate_names_the_benchmark_target(tmp_path, tokenizer_dir):
    """--accuracy-json {benchmark: ...} applies that MLPerf target (rackbench.benchmarks) and names it."""
    base = [*_one_perfect_shard_args(tmp_path, tokenizer_dir), "--out-txt", str(tmp_path / "a.txt")]
    for name, fraction in (("llama2-70b-99.9", 0.999), ("llama2-70b-99", 0.99)):
        out = tmp_path / f"{name}.json"
        assert accuracy.main([*base, "--accuracy-json", json.dumps({"benchmark": name}), "--out-json", str(out)]) == 0
        data = json.loads(out.read_text())
        assert data["target_name"] == name and data["target_fraction"] == fraction
        assert data["targets"]["rouge1"] == pytest.approx(44.4312 * fraction)
        assert data["valid"] is False  # 3 tokens/sample is far from 294.45
        assert any(f.startswith("tokens_per_sample 3.0 outside [265.00, 323.90]") for f in data["failures"])
    with pytest.raises(SystemExit):
        accuracy.main(
            [
                *base,
                "--accuracy-json",
                json.dumps({"benchmark": "llama2-70b-99"}),
                "--target-fraction",
                "0.9",
                "--out-json",
                str(tmp_path / "x.json"),
            ]
        )


class CopyEngine:
    """Answers each prompt with the dataset's reference output tokens (a perfect model)."""

    max_batch_size = 4

    def __init__(self, answers):
        self.answers = answers

    def generate(self, prompts, max_new_tokens):
        return [self.answers[tuple(p)][:max_new_tokens] for p in prompts]

    def close(self):
        pass


def test_harness_round_trip(tmp_path, tokenizer_dir):
    outputs = ["the cat sat on the mat", "a dog ran", "the dog sat on a mat", "cats run", "the cat ran"]
    ds = tmp_path / "ds.parquet"
    write_dataset(ds, outputs)
    table = pq.read_table(ds).to_pylist()
    engine = CopyEngine({tuple(r["tok_input"]): r["tok_output"] for r in table})
    dirs = []
    for shard in range(2):
        d = tmp_path / "runs" / f"shard{shard}"
        run_shard(
            engine,
            samples_parquet=ds,
            out_dir=d,
            mode="accuracy",
            shard_index=shard,
            num_shards=2,
            shard_mode="split",
            batch_size=2,
            max_new_tokens=16,
            **QUICK_LOADGEN,
            metadata={},
            log=lambda m: None,
        )
        dirs.append(d)
    result = accuracy.evaluate(
        dataset=ds, tokenizer=tokenizer_dir, shard_dirs=dirs, reference=REF, target_fraction=0.99, tokens_tolerance=0.1
    )
    assert result["valid"] is True, result["failures"]
    assert result["rouge1"] == 100.0 and result["gen_num"] == 5
    assert result["gen_tok_len"] == sum(len(o.split()) for o in outputs)
    # one shard only: the other's samples are missing
    partial = accuracy.evaluate(
        dataset=ds,
        tokenizer=tokenizer_dir,
        shard_dirs=dirs[:1],
        reference=REF,
        target_fraction=0.99,
        tokens_tolerance=0.1,
    )
    assert partial["valid"] is False and any("not scored" in f for f in partial["failures"])
