"""The one results layout (rackbench.paths), the variants that keep every result of
every setting, defaults from the schema alone, and the `rackbench` command."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rackbench import cli, paths, report
from rackbench.config import (
    ConfigError,
    check_config,
    configurations,
    fill_defaults,
    schema_defaults,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "config.yaml").read_text())
VARIANT_FIELDS = (
    "snapshot_variant",
    "dataset_variant",
    "checkpoint_variant",
    "engine_variant",
    "run_variant",
    "accuracy_variant",
)


def variants_with(**changes):
    """Each step's variant of the demo's configuration after dotted-key changes."""
    config = copy.deepcopy(DEMO)
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    (cfg,) = configurations(config)
    return {f: getattr(cfg, f) for f in VARIANT_FIELDS}


BASE = variants_with()


@pytest.mark.parametrize(
    "change, first_changed",
    [
        ({"run.max_new_tokens": 64}, "run_variant"),
        ({"run.min_duration_ms": 1000}, "run_variant"),
        ({"quantization.calibration_samples": 8}, "checkpoint_variant"),
        ({"quantization.calibration_batch_size": 2}, "checkpoint_variant"),
        ({"engines.reference.dtype": "bfloat16"}, "engine_variant"),
        ({"datasets.demo-orca.samples.path": "elsewhere.pkl"}, "dataset_variant"),
        ({"demo.num_samples": 40}, "snapshot_variant"),
        ({"models.tiny-llama.accuracy.target_fraction": 0.6}, "accuracy_variant"),
    ],
)
def test_a_changed_knob_changes_its_step_and_everything_downstream_only(change, first_changed):
    changed = variants_with(**change)
    order = list(VARIANT_FIELDS)
    # the dataset is not downstream of the snapshot: the demo block shapes both
    for field in order:
        downstream = order.index(field) >= order.index(first_changed)
        if field == "snapshot_variant" and first_changed == "dataset_variant":
            downstream = False
        if first_changed == "snapshot_variant" and field == "dataset_variant":
            downstream = True
        assert (changed[field] != BASE[field]) == downstream, (change, field)


def test_settings_that_cannot_change_a_result_keep_its_variant():
    assert variants_with(**{"run.progress_interval_s": 1}) == BASE
    assert variants_with(**{"gpu_types.cpu.slurm.runtime_min": 99}) == BASE


def test_paths_carry_the_variant_and_settings_json_hashes_to_it(tmp_path):
    (cfg,) = configurations(DEMO)
    assert cfg.run_dir == f"results/runs/{cfg.key}/{cfg.run_variant}"
    assert cfg.shard_dirs("accuracy")[1] == f"{cfg.run_dir}/accuracy/shard1"
    assert cfg.key == "tiny-llama/nvfp4/reference/cpu/bs16/2x1"
    settings = {"step": "x", "value": 1}
    variant = paths.variant_id(settings)
    assert len(variant) == 8 and variant == paths.variant_id({"value": 1, "step": "x"})  # key order is not content
    out = tmp_path / "results" / "runs" / variant / "performance" / "shard0"
    written = paths.write_settings(out, settings)
    assert written == tmp_path / "results" / "runs" / variant / "settings.json"
    assert json.loads(written.read_text()) == settings
    paths.write_settings(out, settings)  # every shard job writes it; the same content is fine
    with pytest.raises(ValueError, match="hash to variant"):
        paths.write_settings(out, {"step": "x", "value": 2})
    with pytest.raises(ValueError, match="no variant directory"):
        paths.settings_file(tmp_path / "plain" / "dir")


def test_the_layout_documented_is_the_layout_used():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for pattern in (
        paths.SNAPSHOT_PATTERN,
        paths.CHECKPOINT_PATTERN,
        paths.ENGINE_PATTERN,
        paths.SHARD_PATTERN,
        paths.ACCURACY_JSON_PATTERN,
        paths.RACK_SESSION_PATTERN,
        paths.RACK_ACCURACY_JSON_PATTERN,
        paths.pattern(paths.DATASET_PATTERN, part="samples"),
    ):
        assert pattern in doc, pattern


def test_defaults_come_from_the_schema_and_are_filled_before_the_semantic_checks():
    config = copy.deepcopy(DEMO)
    config["run"] = {}  # all of run defaulted: max_new_tokens 1024 > the demo's reference length 128
    with pytest.raises(ConfigError, match="run.max_new_tokens: 1024 exceeds demo.reference_max_new_tokens"):
        check_config(config)
    assert config["run"]["min_duration_ms"] == 600000  # filled in place, before that check
    filled = fill_defaults({"engines": {"tensorrt-llm": {"kv_cache": {"dtype": "auto"}}}})
    trt = filled["engines"]["tensorrt-llm"]
    assert trt["kv_cache"] == {"dtype": "auto", "free_gpu_memory_fraction": 0.95, "enable_block_reuse": False}
    from rackbench.engines import tensorrt_llm

    assert tensorrt_llm.DEFAULTS == schema_defaults("engines", "tensorrt-llm")
    assert {k: trt[k] for k in tensorrt_llm.DEFAULTS if k != "kv_cache"} == {
        k: v for k, v in tensorrt_llm.DEFAULTS.items() if k != "kv_cache"
    }


def test_cli_defaults_are_the_schemas():
    from rackbench import quantize  # noqa: F401  (its parser reads the schema when built)

    quant = schema_defaults("quantization")
    demo = schema_defaults("demo")
    assert (quant["calibration_batch_size"], quant["calibration_max_seq_len"]) == (1, 1024)
    assert demo["reference_max_new_tokens"] == 128 and demo["model"]["num_key_value_heads"] == 1


def test_report_lists_old_and_current_variants(tmp_path):
    (cfg,) = configurations(DEMO)
    old = copy.deepcopy(DEMO)
    old["run"]["max_new_tokens"] = 64
    (old_cfg,) = configurations(old)
    from rackbench.config import run_settings

    for c, config in ((cfg, DEMO), (old_cfg, old)):
        paths.write_settings(tmp_path / c.run_dir, run_settings(fill_defaults(copy.deepcopy(config)), c.fields))
    (tmp_path / cfg.shard_dirs("performance")[0]).mkdir(parents=True)
    (tmp_path / cfg.shard_dirs("performance")[0] / "shard.json").write_text("{}")
    entry = {**cfg.report_entry()}
    rows = report.variant_rows([entry], tmp_path / "results")
    assert {(r["variant"], r["current"], r["performance_shards"]) for r in rows} == {
        (cfg.run_variant, True, 1),
        (old_cfg.run_variant, False, 0),
    }


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "rackbench.cli", *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_rackbench_help_lists_every_subcommand():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for name in cli.SUBCOMMANDS:
        assert name in proc.stdout


def test_subcommand_help_is_the_modules_own():
    proc = run_cli("report", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--configurations-json" in proc.stdout
    proc = run_cli("check-config", str(ROOT / "config.yaml"))
    assert proc.returncode == 0, proc.stderr
    (cfg,) = configurations(DEMO)
    assert cfg.run_dir in proc.stdout


@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_every_subcommand_has_help(name, capsys):
    """Nothing installed crashes on start: each subcommand's --help exits 0 with a usage line."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


def test_missing_module_and_unknown_subcommand_fail_in_one_line(monkeypatch):
    monkeypatch.setitem(cli.SUBCOMMANDS, "absent", ("rackbench.no_such_module", "a module not installed"))
    with pytest.raises(SystemExit, match=r"^rackbench absent: not available in this installation"):
        cli.main(["absent"])
    proc = run_cli("frobnicate")
    assert proc.returncode == 2 and "unknown subcommand 'frobnicate'" in proc.stderr
    assert "Traceback" not in proc.stderr
