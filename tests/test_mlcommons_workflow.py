"""MLCommons' checks as workflow steps (issue 13), through real Snakemake: the demo itself.

The demo's rack session (two engine servers, one LoadGen per run) is the demo's one-LoadGen
result: with MLCommons' own tools from ../shared/mlcommons-inference (the demo config's
mlcommons.inference_dir; test copies get ../shared beside them), its session makes TEST06
runs, and test06, submission_tree and submission_check run; the report shows all three.
"""

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import DEMO_CONFIG, DEMO_CONFIGURATION, ROOT, snakemake
from rackbench import paths, submission
from rackbench.config import fill_defaults, mlcommons_settings

INFERENCE = (ROOT.parent / "shared" / "mlcommons-inference").resolve()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not INFERENCE.is_dir(), reason=f"{INFERENCE} (mlcommons/inference) is absent"),
]
SCENARIOS = ("Offline", "Server")


def test_the_demo_gets_test06_a_tree_and_the_checkers_verdict_in_the_report(demo_run):
    demo, proc = demo_run
    ran = proc.stdout + proc.stderr
    for rule in ("test06", "submission_tree", "submission_check", "report"):
        assert re.search(rf"^{rule}\s+{2 if rule == 'test06' else 1}$", ran, re.M), f"{rule} did not run"
    cfg, config = DEMO_CONFIGURATION, fill_defaults(yaml.safe_load(yaml.safe_dump(DEMO_CONFIG)))
    assert cfg.rack_test06
    variant = paths.variant_id(mlcommons_settings(config, cfg.fields))

    # TEST06: the session's TEST06 runs (LoadGen under audit.config), then the three checks
    for scenario in SCENARIOS:
        (run,) = [r for r in cfg.one_loadgen_runs() if r["scenario"] == scenario and r["test06"]]
        assert (demo / run["test06"] / "audit.config").is_file()
        text = (
            Path(demo, paths.test06_dir(cfg.fields, variant, scenario), "TEST06") / "verify_accuracy.txt"
        ).read_text()
        first = "Skipped" if scenario == "Offline" else "True"
        assert f"First token check pass: {first}" in text and "EOS check pass: True" in text, text
        assert "Sample length check pass: True" in text

    # the tree, as submission_structure.md lays it out
    tree = Path(demo, paths.submission_tree(cfg.fields, variant))
    org = tree / "closed" / config["mlcommons"]["submitter"]
    assert config["mlcommons"]["submitter"] == "rackbench-user"  # the schema's default
    system = json.loads((org / "systems" / "rackbench_cpu_x2.json").read_text())
    assert system["number_of_nodes"] == 1 and system["host_processor_model_name"] == submission.UNKNOWN
    for scenario in SCENARIOS:
        scen = org / "results" / "rackbench_cpu_x2" / "llama2-70b-99.9" / scenario
        for rel in ("performance/run_1/mlperf_log_detail.txt", "accuracy/accuracy.txt", "TEST06/verify_accuracy.txt"):
            assert (scen / rel).is_file(), (scenario, rel)
    assert (org / "src").is_dir()

    # the checker's verdict: refused for exactly the demo's departures, nothing structural
    verdict = json.loads(Path(demo, paths.checker_verdict(cfg.fields, variant)).read_text())
    assert verdict["verdict"] == "fail" and verdict["returncode"] != 0
    groups = submission.classify(verdict["refusals"])
    for departure in submission.DEMO_DEPARTURES:
        assert groups[departure], f"the checker did not report the demo's {departure}"
    assert groups["other"] == [], groups["other"]  # Offline and Server: every required scenario is there

    # all of it in the report: the TEST06 row, the verdict and every message
    report = (demo / paths.report_file("markdown")).read_text()
    assert "## MLPerf compliance: TEST06" in report
    assert re.search(r"\| \S+/test06/Offline \| skipped \| pass \| pass \| PASS \| 100 \|", report)
    assert re.search(r"\| \S+/test06/Server \| pass \| pass \| pass \| PASS \| 100 \|", report)
    assert "**REFUSED**" in report and verdict["summary"] in report
    for m in verdict["refusals"]:
        assert m["text"].replace("|", "\\|").replace("\n", " ") in report
    for departure in submission.DEMO_DEPARTURES:
        assert f"| {departure} |" in report


def test_without_a_checkout_no_test06_tree_or_checker_is_planned(demo_copy):
    """inference_dir null: no TEST06 run in the session (a new variant beside the old one), no
    test06, tree or checker; the report is planned again (it then says why, from
    compliance.configured_checkout)."""
    (demo_copy / "override.yaml").write_text(yaml.safe_dump({"mlcommons": {"inference_dir": None}}))
    proc = snakemake(demo_copy, "-n", "--configfile", "config.yaml", "override.yaml")
    for rule in ("test06", "submission_tree", "submission_check"):
        assert not re.search(rf"^{rule}\s+\d+$", proc.stdout, re.M), rule
    assert re.search(r"^rack_run\s+1$", proc.stdout, re.M)
    assert re.search(r"^report\s+1$", proc.stdout, re.M)
