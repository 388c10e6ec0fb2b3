import json
import subprocess
from pathlib import Path

from rackbench import provenance

SMI = """
==============NVSMI LOG==============

Timestamp                                 : Mon Jan  1 00:00:00 2026
Driver Version                            : 580.82.07
CUDA Version                              : 13.0

Attached GPUs                             : 2
GPU 00000000:18:00.0
    Product Name                          : NVIDIA GB300
    Product Architecture                  : Blackwell
    MIG Mode
        Current                           : Disabled
        Pending                           : Disabled
    Serial Number                         : 1650124000001
    GPU UUID                              : GPU-aaaa
    VBIOS Version                         : 97.00.0B.00.01
    PCI
        Bus                               : 0x18
        Bus Id                            : 00000000:18:00.0
    FB Memory Usage
        Total                             : 284208 MiB
        Reserved                          : 1000 MiB
    BAR1 Memory Usage
        Total                             : 262144 MiB

GPU 00000000:19:00.0
    Product Name                          : NVIDIA GB300
    Serial Number                         : 1650124000002
    GPU UUID                              : GPU-bbbb
"""


def test_parse_nvidia_smi_q():
    inv = provenance.parse_nvidia_smi_q(SMI)
    assert inv["driver"] == "580.82.07" and inv["cuda"] == "13.0"
    assert [g["uuid"] for g in inv["gpus"]] == ["GPU-aaaa", "GPU-bbbb"]
    g = inv["gpus"][0]
    assert g["name"] == "NVIDIA GB300" and g["serial"] == "1650124000001"
    assert g["memory_total"] == "284208 MiB"  # FB memory, not BAR1
    assert g["mig_mode"] == "Disabled" and g["bus_id"] == "00000000:18:00.0"


def test_write_provenance_fields(tmp_path):
    fragment = {"b": 2, "a": [1, 2]}
    path = tmp_path / "provenance.json"
    record = provenance.write_provenance(path, step="report", config_fragment=fragment)
    on_disk = json.loads(path.read_text())
    assert on_disk == record
    assert record["step"] == "report"
    for name in ("torch", "transformers", "nvidia-modelopt", "mlcommons-loadgen", "tensorrt-llm"):
        assert name in record["packages"]
    import importlib.metadata

    assert record["packages"]["nvidia-modelopt"] == importlib.metadata.version("nvidia-modelopt")
    assert record["packages"]["mlcommons-loadgen"] == importlib.metadata.version("mlcommons-loadgen")
    for key in ("cuda", "driver", "gpus", "gpu_inventory", "host", "python"):
        assert key in record
    repo = Path(provenance.__file__).resolve().parents[2]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert record["git"]["commit"] == head
    assert isinstance(record["git"]["dirty"], bool)
    assert record["config_sha256"] == provenance.config_hash({"a": [1, 2], "b": 2})  # key order irrelevant
    assert record["config_sha256"] != provenance.config_hash({"a": [1, 2], "b": 3})
    has_smi = subprocess.run(["sh", "-c", "command -v nvidia-smi"], capture_output=True).returncode == 0
    assert (record["gpu_inventory"] is None) == (not has_smi)


def test_collect_keeps_signature():
    assert provenance.collect("x")["step"] == "x"


def test_find_and_summarize(tmp_path):
    step = tmp_path / "engines" / "m" / "engine"
    step.mkdir(parents=True)
    provenance.write_provenance(step.parent / "provenance.json", step="build_engine", config_fragment={})
    found = provenance.find_provenance([step])
    assert found == [step.parent / "provenance.json"]
    row = provenance.summarize(json.loads(found[0].read_text()), "f")
    assert row["step"] == "build_engine" and row["gpus"] == "none" and len(row["git_commit"]) == 12
    assert set(row) == set(provenance.SUMMARY_COLUMNS)
