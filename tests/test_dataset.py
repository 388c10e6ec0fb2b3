"""prepare_dataset: checksum verification and pickle -> parquet conversion."""

import hashlib

import pandas as pd
import pyarrow.parquet as pq
import pytest

from rackbench import dataset
from rackbench.dataset import DatasetError, prepare


def _openorca_like(n=5):
    return pd.DataFrame(
        {
            "id": [f"cot.{i}" for i in range(n)],
            "system_prompt": ["You are a helpful assistant."] * n,
            "question": [f"question {i}" for i in range(n)],
            "input": [f"<s>[INST] question {i} [/INST]" for i in range(n)],
            "output": [f"answer number {i}" for i in range(n)],
            "tok_input": [[1] + list(range(10, 10 + i + 3)) for i in range(n)],
            "tok_output": [list(range(20, 22 + i)) for i in range(n)],
        }
    )


@pytest.fixture
def pickle_file(tmp_path):
    path = tmp_path / "open_orca_gpt4_tokenized_llama.sampled_24576.pkl"
    _openorca_like().to_pickle(path)
    return path


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_conversion_keeps_rows_columns_and_tokens(pickle_file, tmp_path):
    out = tmp_path / "samples.parquet"
    rows = prepare(pickle_file, out, sha256=_sha(pickle_file))
    assert rows == 5
    table = pq.read_table(out)
    assert {"input", "tok_input", "output", "tok_output", "id"} <= set(table.column_names)
    frame = table.to_pandas()
    source = pd.read_pickle(pickle_file)
    assert frame["output"].tolist() == source["output"].tolist()
    assert [list(t) for t in frame["tok_input"]] == source["tok_input"].tolist()
    assert table.schema.field("tok_input").type.value_type == "int32"


def test_checksum_mismatch_is_refused(pickle_file, tmp_path):
    out = tmp_path / "samples.parquet"
    with pytest.raises(DatasetError, match="does not match the pinned"):
        prepare(pickle_file, out, sha256="0" * 64)
    assert not out.exists()


def test_sha256sums_file(pickle_file, tmp_path):
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{'1' * 64}  other.pkl\n{_sha(pickle_file)}  {pickle_file.name}\n")
    assert prepare(pickle_file, tmp_path / "s.parquet", sha256_file_path=str(sums)) == 5
    sums.write_text(f"{'1' * 64}  other.pkl\n")
    with pytest.raises(DatasetError, match=f"has no entry for {pickle_file.name}"):
        prepare(pickle_file, tmp_path / "s.parquet", sha256_file_path=str(sums))


def test_missing_column_is_named(tmp_path):
    path = tmp_path / "bad.pkl"
    _openorca_like().drop(columns=["tok_input"]).to_pickle(path)
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['tok_input'\]"):
        prepare(path, tmp_path / "out.parquet", sha256=_sha(path))


def test_cli_checks_declared_row_count(pickle_file, tmp_path):
    out = tmp_path / "s.parquet"
    args = ["--pickle", str(pickle_file), "--out", str(out), "--checksum", f"sha256:{_sha(pickle_file)}"]
    assert dataset.main(args + ["--expect-rows", "5"]) == 0
    assert dataset.main(args + ["--expect-rows", "24576"]) == 1
    assert not out.exists()
    assert dataset.main(["--pickle", str(pickle_file), "--out", str(out), "--checksum", "md5:abc"]) == 1
