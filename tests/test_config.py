"""Config validation: every bad config of the corpus is rejected with a one-line
message naming the key, before any job is planned."""

import copy
from pathlib import Path

import pytest
import yaml

from conftest import snakemake
from rackbench.config import ConfigError, check_config, configurations

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "config.yaml").read_text())
REAL = yaml.safe_load((ROOT / "config" / "llama2-70b-gb300.yaml").read_text())
for _dataset in REAL["datasets"].values():  # stand-ins: the MLPerf data is not on build machines
    for _part in ("samples", "calibration"):
        _dataset[_part].update({k: str(ROOT / "README.md") for k in ("path", "sha256_file") if k in _dataset[_part]})
CORPUS = yaml.safe_load((ROOT / "tests" / "configs" / "bad_configs.yaml").read_text())


def _walk(config, dotted):
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    return node, last


def apply_patch(config, case):
    config = copy.deepcopy(REAL if case.get("base") == "real" else config)
    for dotted, value in (case.get("set") or {}).items():
        node, key = _walk(config, dotted)
        node[key] = value
    for dotted in case.get("delete") or []:
        node, key = _walk(config, dotted)
        del node[key]
    return config


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 30
    assert len({case["name"] for case in CORPUS}) == len(CORPUS)


def test_real_config_is_valid():
    check_config(copy.deepcopy(REAL))
    assert [c.key for c in configurations(REAL)] == ["llama2-70b/nvfp4/tensorrt-llm/GB300/bs3072/72x1"]


def test_demo_config_is_valid():
    check_config(copy.deepcopy(DEMO))
    assert [c.key for c in configurations(DEMO)] == ["tiny-llama/nvfp4/reference/cpu/bs16/2x1"]


@pytest.mark.parametrize("case", CORPUS, ids=[c["name"] for c in CORPUS])
def test_bad_config_is_rejected(case):
    with pytest.raises(ConfigError) as err:
        check_config(apply_patch(DEMO, case))
    message = str(err.value)
    assert case["expect"] in message
    assert "\n" not in message


@pytest.mark.parametrize("case", CORPUS, ids=[c["name"] for c in CORPUS])
def test_snakemake_rejects_bad_config_before_planning(case, tmp_path):
    """Through Snakemake itself: one line, no traceback, nothing planned or written."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(apply_patch(DEMO, case)))
    proc = snakemake(ROOT, "-n", "--configfile", str(bad), "--directory", str(ROOT), timeout=120, check=False)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("invalid config: "), lines
    assert case["expect"] in lines[0]
    assert "Traceback" not in proc.stderr and "Job stats" not in proc.stdout
