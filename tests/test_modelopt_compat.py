"""ModelOpt compatibility: rackbench's container-side code uses only what the container's ModelOpt has.

The TensorRT-LLM 1.2.x container ships nvidia-modelopt ~=0.37.0; tests and the CPU demo run
0.47.0. ``rackbench/contracts/modelopt.yaml`` lists every ModelOpt name rackbench uses with the
file that defines it in each version. Here:

* an AST scan of quantize.py, build_engine.py and engines/tensorrt_llm.py finds every ``modelopt``
  name they import or reach through an alias (``mtq.X``) and fails on one the facts do not list for
  0.37.0;
* the 0.47.0 column is checked against the installed package;
* (slow) the 0.37.0 column against the real 0.37.0 wheel from PyPI, and quantize's calibration and
  the state save/restore (build_engine's tensorrt-mode restore) are run under 0.37.0 on CPU.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FACTS_PATH = ROOT / "scripts" / "rackbench" / "contracts" / "modelopt.yaml"
FACTS = yaml.safe_load(FACTS_PATH.read_text())
CONTAINER = FACTS["container_version"]
SCANNED = [
    "scripts/rackbench/quantize.py",
    "scripts/rackbench/build_engine.py",
    "scripts/rackbench/engines/tensorrt_llm.py",
]


def modelopt_names(source: str) -> set[str]:
    """Dotted ``modelopt...`` names a module imports or reaches through an import alias."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "modelopt":
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "modelopt"
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "modelopt":
            for a in node.names:
                names.add(f"{node.module}.{a.name}")
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, base = [], node
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in aliases:
                dotted = aliases[base.id] + "." + ".".join(reversed(chain))
                names.add(dotted)
    # Keep only leaf uses: a name that is the prefix of another used name is a module on the way.
    return {n for n in names if not any(o.startswith(n + ".") for o in names)}


def _problems(names: set[str], version: str) -> list[str]:
    known = {**FACTS["apis"], **FACTS["not_in_container"]}
    out = []
    for name in sorted(names):
        fact = known.get(name)
        if fact is None:
            out.append(f"{name}: not recorded in {FACTS_PATH.name}")
        elif fact.get(version) is None:
            out.append(f"{name}: ModelOpt {version} lacks it")
    return out


def test_rackbench_uses_only_modelopt_api_the_container_has():
    used = set()
    for rel in SCANNED:
        used |= modelopt_names((ROOT / rel).read_text())
    assert "modelopt.torch.quantization.quantize" in used  # the scan sees the real calls
    assert not _problems(used, CONTAINER)
    assert used <= set(FACTS["apis"]), "every used name belongs in apis, with a file per version"


def test_scan_catches_the_calls_that_crashed_the_container():
    old = (
        "import modelopt.torch.quantization as mtq\n"
        "from modelopt.torch.quantization.utils.core_utils import get_quantizer_state_dict\n"
        "cfg = mtq.update_quant_cfg_with_kv_cache_quant(mtq.NVFP4_DEFAULT_CFG, mtq.FP8_KV_CFG['quant_cfg'])\n"
    )
    problems = _problems(modelopt_names(old), CONTAINER)
    assert problems == [
        "modelopt.torch.quantization.update_quant_cfg_with_kv_cache_quant: ModelOpt 0.37.0 lacks it",
        "modelopt.torch.quantization.utils.core_utils.get_quantizer_state_dict: ModelOpt 0.37.0 lacks it",
    ]
    assert _problems({"modelopt.torch.quantization.no_such_thing"}, CONTAINER) == [
        "modelopt.torch.quantization.no_such_thing: not recorded in modelopt.yaml"
    ]


def check_version(version: str) -> list[str]:
    """Differences between the facts' ``version`` column and the ModelOpt importable here."""
    import modelopt

    root = Path(modelopt.__file__).parent.parent
    problems = []
    if modelopt.__version__ != version:
        return [f"importable ModelOpt is {modelopt.__version__}, not {version}"]
    for name, fact in {**FACTS["apis"], **FACTS["not_in_container"]}.items():
        module_name, attr = name.rsplit(".", 1)
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            obj = None
        want = fact.get(version)
        if want is None:
            if obj is not None:
                problems.append(f"{name}: recorded as absent from {version} but present")
            continue
        if obj is None:
            problems.append(f"{name}: recorded in {want} but {version} lacks it")
            continue
        if inspect.isfunction(obj) or inspect.isclass(obj):
            got = Path(inspect.getsourcefile(obj)).relative_to(root).as_posix()
            if got != want:
                problems.append(f"{name}: defined in {got}, recorded {want}")
        elif attr not in (root / want).read_text():
            problems.append(f"{name}: {want} does not define it")
    layout = FACTS["config_layout"][version]["quant_cfg"]
    got_layout = type(modelopt.torch.quantization.FP8_KV_CFG["quant_cfg"]).__name__
    if got_layout != layout:
        problems.append(f"quant_cfg layout is {got_layout}, recorded {layout}")
    for table in (
        FACTS["export_fields"]["config.json"],
        FACTS["export_fields"]["hf_quant_config.json"],
        FACTS["export_fields"]["tensors"],
    ):
        for field, fact in table.items():
            leaf = field.rsplit(".", 1)[-1]
            if fact.get(version) and leaf not in (root / fact[version]).read_text():
                problems.append(f"export field {field}: not in {fact[version]}")
    return problems


def test_facts_match_the_installed_modelopt():
    assert check_version(FACTS["environment_version"]) == []


# ---------------------------------------------------------------- the container's 0.37.0, for real


@pytest.fixture(scope="module")
def modelopt_037(tmp_path_factory):
    """nvidia-modelopt 0.37.0 (and torchprofile, which it imports) in a --target dir, no other deps."""
    target = tmp_path_factory.mktemp("modelopt037")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--disable-pip-version-check",
        "--target",
        str(target),
        f"nvidia-modelopt=={CONTAINER}",
        "torchprofile",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode:
        pytest.skip(f"cannot fetch nvidia-modelopt {CONTAINER} from PyPI: {proc.stderr.strip()[-300:]}")
    return target


def _run_037(modelopt_037, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(modelopt_037), str(ROOT / "scripts"), str(ROOT / "tests")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_facts_match_modelopt_037(modelopt_037):
    proc = _run_037(
        modelopt_037, f"import json, test_modelopt_compat as t; print(json.dumps(t.check_version({CONTAINER!r})))"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


@pytest.mark.slow
def test_quantize_and_restore_run_under_modelopt_037(modelopt_037, tmp_path):
    """quant_config, mtq.quantize calibration, the quantizer-state save and the restore that
    build_engine's tensorrt mode does, all with the container's ModelOpt (on CPU: 0.37's
    export_hf_checkpoint needs CUDA, see the facts' cpu_limits)."""
    code = f"""
import json, torch, modelopt
from transformers import LlamaConfig, LlamaForCausalLM
from modelopt.torch.quantization.nn import TensorQuantizer
from rackbench import quantize
assert modelopt.__version__ == {CONTAINER!r}, modelopt.__version__
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
base = LlamaForCausalLM(cfg).eval()
base.save_pretrained({str(tmp_path / "base")!r})
samples = [[(i * 7 + j) % 64 for j in range(12)] for i in range(6)]
result = {{}}
for recipe in ("nvfp4", "fp8"):
    qc = quantize.quant_config(recipe)
    assert isinstance(qc["quant_cfg"], dict) and "*[kv]_bmm_quantizer" in qc["quant_cfg"]
    model = LlamaForCausalLM.from_pretrained({str(tmp_path / "base")!r}).eval()
    quantize.quantize_model(model, recipe, samples, 3, "cpu")
    quantize.save_modelopt_state(model, {str(tmp_path)!r} + f"/{{recipe}}.pth")
    restored = quantize.restore_modelopt_state(LlamaForCausalLM.from_pretrained({str(tmp_path / "base")!r}),
                                               {str(tmp_path)!r} + f"/{{recipe}}.pth")
    amax = lambda m: {{n: q.amax.clone() for n, q in m.named_modules()
                      if isinstance(q, TensorQuantizer) and getattr(q, "amax", None) is not None}}
    want, got = amax(model), amax(restored)
    assert want and sorted(want) == sorted(got), (len(want), len(got))
    assert all(torch.equal(want[n], got[n]) for n in want)
    assert any("k_bmm_quantizer" in n for n in want)   # the FP8 KV cache quantizers are calibrated
    result[recipe] = len(want)
print(json.dumps(result))
"""
    proc = _run_037(modelopt_037, code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["nvfp4"] > 0 and counts["fp8"] > 0


if __name__ == "__main__":  # python tests/test_modelopt_compat.py VERSION: check the importable ModelOpt
    print(json.dumps(check_version(sys.argv[1]), indent=1))
