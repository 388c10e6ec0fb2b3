"""prepare_dataset: the MLPerf OpenOrca pickles -> checksum-verified parquet.

MLPerf ships ``open_orca_gpt4_tokenized_llama.sampled_24576.pkl`` (benchmark)
and ``open_orca_gpt4_tokenized_llama.calibration_1000.pkl`` (calibration),
pickled pandas DataFrames whose columns include ``input``, ``tok_input`` and
``output``. Later steps read the parquet written here, never the pickle.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rackbench.atomic import atomic_path, sha256_file
from rackbench.provenance import write_provenance

REQUIRED_COLUMNS = ("input", "tok_input", "output")
log = logging.getLogger("rackbench.dataset")


class DatasetError(RuntimeError):
    pass


def expected_sha256(path: Path, *, sha256: str | None = None, sha256_file_path: str | None = None) -> str:
    """The pinned checksum of ``path``: given directly, or looked up in a SHA256SUMS file."""
    if sha256:
        return sha256.lower()
    if not sha256_file_path:
        raise DatasetError(f"{path}: no sha256 pinned for it")
    sums = Path(sha256_file_path)
    if not sums.is_file():
        raise DatasetError(f"checksum file {sums} does not exist")
    for line in sums.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if name.lstrip("*") == path.name:
            return digest.lower()
    raise DatasetError(f"{sums} has no entry for {path.name}")


def verify_checksum(path: Path, expected: str) -> None:
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist")
    actual = sha256_file(path)
    if actual != expected:
        raise DatasetError(f"{path}: sha256 {actual} does not match the pinned {expected}")


def _to_token_list(value) -> list[int]:
    return [int(t) for t in value]


def convert(pickle_path: Path, parquet_path: Path) -> int:
    """Convert one pickle; returns the number of rows."""
    frame = pd.read_pickle(pickle_path)
    if not isinstance(frame, pd.DataFrame):
        raise DatasetError(f"{pickle_path}: expected a pickled pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DatasetError(f"{pickle_path}: missing column(s) {missing}; has {list(frame.columns)}")
    if len(frame) == 0:
        raise DatasetError(f"{pickle_path}: no samples")
    columns = {
        "input": pa.array(frame["input"].astype(str).tolist(), pa.string()),
        "tok_input": pa.array([_to_token_list(v) for v in frame["tok_input"]], pa.list_(pa.int32())),
        "output": pa.array(frame["output"].astype(str).tolist(), pa.string()),
    }
    if "tok_output" in frame.columns:
        columns["tok_output"] = pa.array([_to_token_list(v) for v in frame["tok_output"]], pa.list_(pa.int32()))
    for name in ("id", "system_prompt", "question"):
        if name in frame.columns:
            columns[name] = pa.array(frame[name].astype(str).tolist(), pa.string())
    table = pa.table(columns)
    with atomic_path(parquet_path) as tmp:
        pq.write_table(table, tmp)
    return table.num_rows


def prepare(pickle_path, parquet_path, *, sha256=None, sha256_file_path=None) -> int:
    pickle_path = Path(pickle_path)
    verify_checksum(pickle_path, expected_sha256(pickle_path, sha256=sha256, sha256_file_path=sha256_file_path))
    return convert(pickle_path, Path(parquet_path))


def parse_checksum(spec: str) -> dict:
    """``sha256:<hex>`` or ``file:<SHA256SUMS path>`` -> keyword arguments of ``prepare``."""
    kind, _, value = spec.partition(":")
    if kind == "sha256" and value:
        return {"sha256": value}
    if kind == "file" and value:
        return {"sha256_file_path": value}
    raise DatasetError(f"checksum {spec!r}: expected sha256:<hex> or file:<path>")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pickle", required=True, action="append", help="input pickle (repeatable)")
    parser.add_argument("--out", required=True, action="append", help="output parquet, one per --pickle")
    parser.add_argument(
        "--checksum", required=True, action="append", help="sha256:<hex> or file:<SHA256SUMS>, one per --pickle"
    )
    parser.add_argument(
        "--expect-rows", type=int, action="append", help="declared row count, one per --pickle (0 = not declared)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    expect = args.expect_rows or [0] * len(args.pickle)
    if not len(args.pickle) == len(args.out) == len(args.checksum) == len(expect):
        parser.error("give one --out, one --checksum (and --expect-rows, if any) per --pickle")
    try:
        for src, dst, spec, rows_expected in zip(args.pickle, args.out, args.checksum, expect):
            rows = prepare(src, dst, **parse_checksum(spec))
            if rows_expected and rows != rows_expected:
                Path(dst).unlink()
                raise DatasetError(f"{src}: {rows} samples, but the config declares num_samples {rows_expected}")
            log.info("%s -> %s: %d samples, checksum verified", src, dst, rows)
        write_provenance(
            Path(args.out[0]).parent / "provenance.json",
            step="prepare_dataset",
            config_fragment={"pickles": args.pickle, "checksums": args.checksum},
        )
    except DatasetError as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
