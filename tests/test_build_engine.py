"""build_engine: the engine record, GPU-type detection, and refusing a mismatched engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from rackbench import build_engine as be

ROOT = Path(__file__).resolve().parents[1]

GPU_TYPES = {  # shaped like config/llama2-70b-gb300.yaml's table
    "cpu": {"kind": "cpu", "compute_capability": None, "runs_nvfp4": True},
    "H100": {"kind": "gpu", "compute_capability": "9.0", "runs_nvfp4": False},
    "H200": {"kind": "gpu", "compute_capability": "9.0", "runs_nvfp4": False},
    "B200": {"kind": "gpu", "compute_capability": "10.0", "runs_nvfp4": True},
    "GB200": {"kind": "gpu", "compute_capability": "10.0", "runs_nvfp4": True},
    "GB300": {"kind": "gpu", "compute_capability": "10.3", "runs_nvfp4": True},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny NVFP4 + FP8-KV ModelOpt export."""
    from test_reference_engine import quantize_and_export, tiny_model

    path = tmp_path_factory.mktemp("bq") / "checkpoint"
    quantize_and_export(tiny_model(layers=1), "nvfp4", path)
    (path / "provenance.json").write_text('{"step": "quantize"}')
    return path


@pytest.fixture(autouse=True)
def no_fake_gpu(monkeypatch):
    monkeypatch.delenv(be.FAKE_GPU_ENV, raising=False)


def build(checkpoint, out, **kw):
    args = dict(
        checkpoint=checkpoint,
        out=out,
        backend="reference",
        model="tiny-llama",
        recipe="nvfp4",
        gpu_type="cpu",
        gpu_spec=GPU_TYPES["cpu"],
        settings={"dtype": "float32", "max_batch_size": 8},
    )
    args.update(kw)
    return be.build_engine(**args)


def test_cli_writes_engine_record_and_provenance(checkpoint, tmp_path):
    out = tmp_path / "engines" / "engine"
    settings = {"dtype": "float32", "max_batch_size": 8, "torch_threads": 1}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rackbench.build_engine",
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(out),
            "--backend",
            "reference",
            "--model",
            "tiny-llama",
            "--recipe",
            "nvfp4",
            "--gpu-type",
            "cpu",
            "--gpu-spec-json",
            json.dumps(GPU_TYPES["cpu"]),
            "--settings-json",
            json.dumps(settings),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT / "scripts")},
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "engine.json").read_text())
    assert record["backend"] == "reference" and record["gpu_type"] == "cpu"
    assert record["compute_capability"] is None and record["recipe"] == "nvfp4" and record["model"] == "tiny-llama"
    assert record["software"] == {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tensorrt_llm": None,
        "cuda": torch.version.cuda,
    }
    assert record["build_settings"] == settings and record["fake_gpu"] is False
    facts = record["backend_facts"]
    assert facts["recipe_detected"] == "nvfp4" and facts["quantized_layers"] == 7 and facts["kv_cache_scales"] == 2
    assert record["built_at_host"]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["step"] == "build_engine" and prov["packages"]["torch"] == torch.__version__
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert [p.name for p in out.parent.iterdir()] == ["engine"]  # no temporary siblings left
    assert "built reference engine" in proc.stderr


def test_build_refuses_wrong_recipe_and_leaves_nothing(checkpoint, tmp_path):
    out = tmp_path / "engine"
    with pytest.raises(ValueError, match="'nvfp4' checkpoint but the engine is for recipe 'fp8'"):
        build(checkpoint, out, recipe="fp8")
    assert list(tmp_path.iterdir()) == []


def test_build_replaces_an_old_engine(checkpoint, tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "stale").write_text("x")
    record = build(checkpoint, out)
    assert not (out / "stale").exists() and json.loads((out / "engine.json").read_text()) == record


@pytest.mark.parametrize(
    "name,cc,want",
    [
        ("NVIDIA H100 80GB HBM3", (9, 0), "H100"),
        ("NVIDIA H100 PCIe", (9, 0), "H100"),
        ("NVIDIA H200", (9, 0), "H200"),
        ("NVIDIA B200", (10, 0), "B200"),
        ("NVIDIA GB200", (10, 0), "GB200"),
        ("NVIDIA GB300", (10, 3), "GB300"),
        ("NVIDIA A100-SXM4-80GB", (8, 0), None),
        ("NVIDIA H100 80GB HBM3", (8, 0), None),  # the name says H100 but the capability does not
    ],
)
def test_match_gpu_type(name, cc, want):
    assert be.match_gpu_type(name, cc, GPU_TYPES) == want


def test_match_gpu_type_explicit_patterns_and_lowercase_keys():
    table = {"gb300": {"compute_capability": "10.3"}, "rtx": {"match": [r"RTX PRO 6000"]}}
    assert be.match_gpu_type("NVIDIA GB300", (10, 3), table) == "gb300"
    assert be.match_gpu_type("NVIDIA RTX PRO 6000 Blackwell", (12, 0), table) == "rtx"


def test_format_cc():
    assert [be.format_cc(x) for x in ((9, 0), 9.0, "9.0", "10.3", "100", "sm_103", None)] == [
        "9.0",
        "9.0",
        "9.0",
        "10.3",
        "10.0",
        "10.3",
        None,
    ]


def test_detect_runtime_cpu_and_fake(monkeypatch):
    runtime = be.detect_runtime(GPU_TYPES)
    assert runtime["software"]["torch"] == torch.__version__
    if not torch.cuda.is_available():
        assert runtime["gpu_type"] == "cpu" and runtime["compute_capability"] is None and not runtime["fake_gpu"]
    monkeypatch.setenv(be.FAKE_GPU_ENV, "GB300")
    fake = be.detect_runtime(GPU_TYPES)
    assert fake["gpu_type"] == "GB300" and fake["compute_capability"] == "10.3" and fake["fake_gpu"] is True


def _record(**over):
    record = {
        "backend": "reference",
        "gpu_type": "GB300",
        "compute_capability": "10.3",
        "recipe": "nvfp4",
        "model": "llama2-70b",
        "software": {"torch": "2.13.0", "transformers": "5.14.1", "tensorrt_llm": "1.2.0", "cuda": "13.0"},
    }
    record.update(over)
    return record


def _runtime(**over):
    runtime = {
        "gpu_type": "GB300",
        "compute_capability": "10.3",
        "device_name": "NVIDIA GB300",
        "fake_gpu": False,
        "software": {"torch": "2.13.0", "transformers": "5.14.1", "tensorrt_llm": "1.2.0", "cuda": "13.0"},
    }
    runtime.update(over)
    return runtime


def test_check_compatible_accepts_identical():
    be.check_compatible(_record(), _runtime())
    assert issubclass(be.EngineMismatch, RuntimeError)


def test_check_compatible_names_gpu_type_and_capability():
    with pytest.raises(be.EngineMismatch) as err:
        be.check_compatible(
            _record(),
            _runtime(gpu_type="H100", compute_capability="9.0", device_name="NVIDIA H100"),
            engine_dir="results/engines/x/nvfp4/reference/GB300/engine",
        )
    msg = str(err.value)
    assert (
        "engine results/engines/x/nvfp4/reference/GB300/engine was built for GPU type GB300 "
        "(compute capability 10.3) but this node is H100 (9.0)"
    ) in msg
    assert "snakemake -R build_engine" in msg and "transformers" not in msg


def test_check_compatible_lists_every_difference():
    software = {"torch": "2.12.0", "transformers": "5.13.0", "tensorrt_llm": None, "cuda": "12.8"}
    with pytest.raises(be.EngineMismatch) as err:
        be.check_compatible(_record(), _runtime(gpu_type="GB200", compute_capability="10.0", software=software))
    msg = str(err.value)
    for phrase in (
        "GB300",
        "GB200",
        "10.3",
        "10.0",
        "built with torch 2.13.0, running 2.12.0",
        "built with transformers 5.14.1, running 5.13.0",
        "built with tensorrt_llm 1.2.0, running None",
        "built with cuda 13.0, running 12.8",
    ):
        assert phrase in msg, (phrase, msg)


def test_check_compatible_software_only_and_unknown_gpu():
    with pytest.raises(be.EngineMismatch, match=r"built with transformers 5.14.1, running 5.13.0") as err:
        be.check_compatible(_record(), _runtime(software={**_runtime()["software"], "transformers": "5.13.0"}))
    assert "built for" not in str(err.value) and "in this software environment" in str(err.value)
    with pytest.raises(be.EngineMismatch, match="NVIDIA A100.*matches no gpu_types entry"):
        be.check_compatible(
            _record(), _runtime(gpu_type=None, compute_capability="8.0", device_name="NVIDIA A100-SXM4-80GB")
        )


def test_open_engine_checks_then_loads(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "engine"
    build(checkpoint, out)
    engine = be.open_engine(out, gpu_ids=[], settings={"max_batch_size": 4, "torch_threads": 1}, gpu_types=GPU_TYPES)
    assert engine.max_batch_size == 4
    assert [len(g) <= 3 for g in engine.generate([[1, 9, 8], [1, 4]], 3)] == [True, True]
    engine.close()

    monkeypatch.setenv(be.FAKE_GPU_ENV, "GB300")  # a (fake) GB300 node must refuse a cpu engine
    with pytest.raises(be.EngineMismatch, match=r"built for GPU type cpu .* but this node is GB300"):
        be.open_engine(out, gpu_ids=[0], settings={}, gpu_types=GPU_TYPES)

    record = json.loads((out / "engine.json").read_text())  # a newer transformers is refused too
    monkeypatch.delenv(be.FAKE_GPU_ENV)
    (out / "engine.json").write_text(
        json.dumps({**record, "software": {**record["software"], "transformers": "4.0.0"}})
    )
    with pytest.raises(be.EngineMismatch, match=f"built with transformers 4.0.0, running {transformers.__version__}"):
        be.open_engine(out, gpu_ids=[], settings={}, gpu_types=GPU_TYPES)


def test_fake_gpu_build_and_open(checkpoint, tmp_path, monkeypatch):
    """The CI cluster: fake GB300s, engine built and run on CPU under RACKBENCH_FAKE_GPU_TYPE."""
    monkeypatch.setenv(be.FAKE_GPU_ENV, "GB300")
    out = tmp_path / "engine"
    record = build(checkpoint, out, gpu_type="GB300", gpu_spec=GPU_TYPES["GB300"])
    assert record["gpu_type"] == "GB300" and record["compute_capability"] == "10.3" and record["fake_gpu"] is True
    assert record["built_on"]["gpu_type"] == "GB300"
    engine = be.open_engine(out, gpu_ids=[0], settings={"torch_threads": 1}, gpu_types=GPU_TYPES)
    assert engine.facts["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert len(engine.generate([[1, 2, 3]], 2)) == 1
    monkeypatch.delenv(be.FAKE_GPU_ENV)
    if not torch.cuda.is_available():
        with pytest.raises(be.EngineMismatch, match="built for GPU type GB300 .* but this node is cpu"):
            be.open_engine(out, gpu_ids=[], settings={}, gpu_types=GPU_TYPES)


def test_tensorrt_llm_is_not_imported():
    code = (
        "import sys, rackbench.build_engine as b; b.software_versions(); "
        "b.detect_runtime({}); print('tensorrt_llm' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT / "scripts")},
    )
    assert proc.stdout.strip() == "False", proc.stderr
