"""MLCommons' checks as workflow steps (issue 13), through real Snakemake on copies of the demo.

The demo's default layout is 2 shards (a per-shard sum: no submission tree). A small
override makes its rack one worker, so its one shard is one LoadGen for the whole system
(layout 1x1): then test06, submission_tree and submission_check run, with MLCommons' own
tools from ../shared/mlcommons-inference, and the report shows all three. The engine,
model and dataset of the finished demo are reused (their variants do not depend on the rack).
"""

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import DEMO_CONFIG, ROOT, snakemake
from rackbench import paths, submission
from rackbench.config import configurations, fill_defaults, merge_configs, mlcommons_settings

INFERENCE = (ROOT.parent / "shared" / "mlcommons-inference").resolve()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not INFERENCE.is_dir(), reason=f"{INFERENCE} (mlcommons/inference) is absent"),
]


def with_override(workdir: Path, override: dict):
    """Snakemake's arguments for config.yaml + ``override``, and the configuration it makes."""
    (workdir / "override.yaml").write_text(yaml.safe_dump(override))
    config = yaml.safe_load(yaml.safe_dump(DEMO_CONFIG))
    merge_configs(config, override)
    (cfg,) = configurations(config)
    return ["--configfile", "config.yaml", "override.yaml"], cfg, config


def mlcommons_variant(config, cfg):
    """The variant the workflow computes (on the config with the schema's defaults filled)."""
    return paths.variant_id(mlcommons_settings(fill_defaults(config), cfg.fields))


def test_one_loadgen_demo_gets_test06_a_tree_and_the_checkers_verdict_in_the_report(demo_copy):
    args, cfg, config = with_override(
        demo_copy, {"rack": {"gpus_per_node": 1}, "mlcommons": {"inference_dir": str(INFERENCE)}}
    )
    assert cfg.layout == "1x1"
    proc = snakemake(demo_copy, "--cores", "2", *args)
    ran = proc.stdout + proc.stderr
    for rule in ("test06", "submission_tree", "submission_check", "report"):
        assert re.search(rf"^{rule}\s+1$", ran, re.M), f"{rule} did not run"
    variant = mlcommons_variant(config, cfg)

    # TEST06: the three checks, from run_verification.py
    test06 = Path(demo_copy, paths.test06_dir(cfg.fields, variant, "Offline"), "TEST06")
    text = (test06 / "verify_accuracy.txt").read_text()
    assert "First token check pass: Skipped" in text and "EOS check pass: True" in text
    assert "Sample length check pass: True" in text

    # the tree, as submission_structure.md lays it out
    tree = Path(demo_copy, paths.submission_tree(cfg.fields, variant))
    org = tree / "closed" / config["mlcommons"]["submitter"]
    assert config["mlcommons"]["submitter"] == "rackbench-user"  # the schema's default
    system = json.loads((org / "systems" / "rackbench_cpu_x1.json").read_text())
    assert system["number_of_nodes"] == 1 and system["host_processor_model_name"] == submission.UNKNOWN
    scen = org / "results" / "rackbench_cpu_x1" / "llama2-70b-99.9" / "Offline"
    for rel in ("performance/run_1/mlperf_log_detail.txt", "accuracy/accuracy.txt", "TEST06/verify_accuracy.txt"):
        assert (scen / rel).is_file(), rel
    assert (org / "src").is_dir()

    # the checker's verdict: refused for exactly the demo's departures, nothing structural
    verdict = json.loads(Path(demo_copy, paths.checker_verdict(cfg.fields, variant)).read_text())
    assert verdict["verdict"] == "fail" and verdict["returncode"] != 0
    groups = submission.classify(verdict["refusals"])
    for departure in submission.DEMO_DEPARTURES:
        assert groups[departure], f"the checker did not report the demo's {departure}"
    has_server = any((scen.parent / s).is_dir() for s in ("Server", "Interactive"))
    expected_other = [] if has_server else ["missing ['(one of) Interactive or Server']"]
    assert [t.split("does not have all required scenarios, ")[-1] for t in groups["other"]] == expected_other

    # all of it in the report: the TEST06 row, the verdict and every message
    report = (demo_copy / paths.report_file("markdown")).read_text()
    assert "## MLPerf compliance: TEST06" in report
    assert re.search(r"\| \S+/test06/Offline \| skipped \| pass \| pass \| PASS \| 100 \|", report)
    assert "**REFUSED**" in report and verdict["summary"] in report
    for m in verdict["refusals"]:
        assert m["text"].replace("|", "\\|").replace("\n", " ") in report
    for departure in submission.DEMO_DEPARTURES:
        assert f"| {departure} |" in report
