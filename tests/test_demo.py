"""The demo's tiny model, tokenizer and OpenOrca-shaped dataset."""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest

from helpers import make_demo_dataset, make_demo_model
from rackbench import demo

MODEL_ARGS = [
    "--hidden-size",
    "256",
    "--intermediate-size",
    "688",
    "--num-layers",
    "2",
    "--num-heads",
    "8",
    "--num-kv-heads",
    "1",
    "--vocab-size",
    "1024",
]
COLUMNS = ["id", "system_prompt", "question", "input", "output", "tok_input", "tok_output"]


def make_model(path, seed=0):
    return make_demo_model(path, *MODEL_ARGS, seed=seed)


def make_dataset(model, path):
    return make_demo_dataset(model, path, num_samples=10, num_calibration=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture(scope="module")
def dataset_dir(model_dir, tmp_path_factory):
    return make_dataset(model_dir, tmp_path_factory.mktemp("demo") / "dataset")


def test_model_is_deterministic_per_seed(model_dir, tmp_path):
    again = make_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name
    other = make_model(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (model_dir / "model.safetensors").read_bytes()
    assert not list(tmp_path.glob(".*tmp-*")), "atomic write left a temporary directory"


def test_model_loads_with_llama_layout(model_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    ids = tok("the quick fox sees a river.")["input_ids"]
    assert ids[0] == 1 and 0 not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "the quick fox sees a river."
    model = LlamaForCausalLM.from_pretrained(model_dir)
    cfg = model.config
    assert (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.vocab_size,
    ) == (256, 688, 2, 8, 1, 1024)
    assert len(tok) <= cfg.vocab_size


def test_model_logits_are_peaked(model_dir):
    """Greedy choices must have a wide margin, or quantization noise would flip them."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([tok("my cat hears that market carries again into the child. our bright")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0]
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 5.0


def test_dataset_layout_and_checksums(dataset_dir, model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    sums = (dataset_dir / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == 2
    for line in sums:
        digest, name = line.split("  ")
        assert hashlib.sha256((dataset_dir / name).read_bytes()).hexdigest() == digest
    samples = pd.read_pickle(dataset_dir / demo.SAMPLES_PKL)
    calib = pd.read_pickle(dataset_dir / demo.CALIBRATION_PKL)
    assert list(samples.columns) == COLUMNS and list(calib.columns) == COLUMNS
    assert (len(samples), len(calib)) == (10, 4)
    assert not set(samples["input"]) & set(calib["input"])
    for df in (samples, calib):
        for row in df.itertuples():
            assert row.tok_input == tok(row.input)["input_ids"] and row.tok_input[0] == 1
            assert 20 <= len(row.tok_input) <= 200
            assert all(isinstance(t, int) for t in row.tok_input + row.tok_output)
            assert 2 not in row.tok_output and len(row.tok_output) <= 64
            assert row.output == tok.decode(row.tok_output, skip_special_tokens=True)
            assert row.input == f"{row.system_prompt} {row.question}"


def test_dataset_output_is_unquantized_greedy(dataset_dir, model_dir):
    """`output` is what the model decodes greedily, one prompt at a time (no padding)."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    samples = pd.read_pickle(dataset_dir / demo.SAMPLES_PKL)
    lengths = set()
    for row in samples.head(4).itertuples():
        with torch.no_grad():
            out = model.generate(
                torch.tensor([row.tok_input]), do_sample=False, max_new_tokens=64, eos_token_id=2, pad_token_id=2
            )[0, len(row.tok_input) :].tolist()
        expected = out[: out.index(2)] if 2 in out else out
        assert row.tok_output == expected
    lengths = {len(t) for t in samples["tok_output"]}
    assert len(lengths) > 2, "answers should end (EOS) at varying lengths"


def test_dataset_is_deterministic(dataset_dir, model_dir, tmp_path):
    again = make_dataset(model_dir, tmp_path / "again")
    assert (again / "SHA256SUMS").read_text() == (dataset_dir / "SHA256SUMS").read_text()
    for name in (demo.SAMPLES_PKL, demo.CALIBRATION_PKL):
        pd.testing.assert_frame_equal(pd.read_pickle(again / name), pd.read_pickle(dataset_dir / name))


def test_dataset_needs_a_model(tmp_path):
    with pytest.raises(SystemExit):
        demo.main(["dataset", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "d")])
