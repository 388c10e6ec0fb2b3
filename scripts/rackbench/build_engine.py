"""Build an engine directory for one (model, recipe, backend, gpu type) and open it safely later.

CLI (rule ``build_engine``)::

    python -m rackbench.build_engine --checkpoint DIR --out DIR --backend reference \\
        --model NAME --recipe nvfp4 --gpu-type cpu --gpu-spec-json JSON --settings-json JSON

writes ``--out`` atomically with the backend's files plus ``engine.json`` (the engine
record, docs/ARCHITECTURE.md) and ``provenance.json``.

At run time ``open_engine`` reads ``engine.json``, finds out what this process runs on
(``detect_runtime``) and refuses (``EngineMismatch``) an engine built for another GPU
type, compute capability or software stack before handing it to the backend's ``load``.

``RACKBENCH_FAKE_GPU_TYPE=<gpu type>`` makes ``detect_runtime`` report that GPU type
(with ``fake_gpu: true``) whatever the hardware: for CI clusters whose "GPUs" are
fake and whose engines run on CPU. Never set it on a real rack.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

from rackbench.args import json_arg
from rackbench.atomic import atomic_path, write_json_atomic
from rackbench.engines import backend_module
from rackbench.provenance import write_provenance

FAKE_GPU_ENV = "RACKBENCH_FAKE_GPU_TYPE"
SOFTWARE = ("torch", "transformers", "tensorrt_llm", "cuda")


class EngineMismatch(RuntimeError):
    """The engine was built for another GPU type / compute capability / software stack."""


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def software_versions() -> dict:
    """Versions that an engine depends on; tensorrt_llm is looked up, never imported here."""
    import torch
    import transformers

    trtllm = None
    if importlib.util.find_spec("tensorrt_llm") is not None:
        trtllm = _dist_version("tensorrt-llm") or _dist_version("tensorrt_llm")
        if trtllm is None:  # importable but not installed as a distribution: ask the module
            try:
                import tensorrt_llm  # noqa: PLC0415 (only here, never at module import)

                trtllm = getattr(tensorrt_llm, "__version__", "unknown")
            except Exception:  # noqa: BLE001 - a broken install is "not available"
                trtllm = None
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tensorrt_llm": trtllm,
        "cuda": torch.version.cuda,
    }


def format_cc(cc) -> str | None:
    """Compute capability as "major.minor" (accepts (9, 0), 9.0, "9.0", "10.3", "sm_100"...)."""
    if cc is None:
        return None
    if isinstance(cc, (tuple, list)):
        return f"{int(cc[0])}.{int(cc[1])}"
    if isinstance(cc, (int, float)):
        return f"{float(cc):.1f}"
    text = str(cc).strip()
    m = re.fullmatch(r"(?:sm_?)?(\d+)(\d)", text)
    if m and "." not in text:
        return f"{int(m.group(1))}.{m.group(2)}"
    return f"{float(text):.1f}"


def match_gpu_type(device_name: str, capability, gpu_types: dict) -> str | None:
    """The key of ``gpu_types`` naming this CUDA device, or None.

    An entry may list ``match`` (regexes tried against the device name); otherwise the key
    itself must appear as a word of the name ("NVIDIA H100 80GB HBM3" -> H100,
    "NVIDIA GB200" -> GB200, not B200). Among several hits the longest key wins, and an
    entry whose compute_capability contradicts the device's is skipped.
    """
    cc = format_cc(capability)
    hits = []
    for key, spec in (gpu_types or {}).items():
        spec = spec or {}
        if spec.get("kind") == "cpu" or key == "cpu":
            continue
        patterns = spec.get("match")
        if patterns:
            patterns = [patterns] if isinstance(patterns, str) else patterns
            ok = any(re.search(p, device_name, re.IGNORECASE) for p in patterns)
        else:
            ok = re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name, re.IGNORECASE) is not None
        if (
            ok
            and spec.get("compute_capability") is not None
            and cc is not None
            and format_cc(spec["compute_capability"]) != cc
        ):
            ok = False
        if ok:
            hits.append(key)
    return max(hits, key=len) if hits else None


def detect_runtime(gpu_types: dict | None = None) -> dict:
    """What this process runs on: ``{"gpu_type", "compute_capability", "device_name", "fake_gpu", "software"}``.

    ``gpu_type`` is a key of ``gpu_types`` ("cpu" without CUDA; None for a CUDA device no
    entry matches). ``RACKBENCH_FAKE_GPU_TYPE`` overrides the hardware (``fake_gpu: true``).
    """
    gpu_types = gpu_types or {}
    software = software_versions()
    fake = os.environ.get(FAKE_GPU_ENV)
    if fake:
        spec = gpu_types.get(fake) or {}
        return {
            "gpu_type": fake,
            "compute_capability": format_cc(spec.get("compute_capability")),
            "device_name": f"fake {fake} ({FAKE_GPU_ENV})",
            "fake_gpu": True,
            "software": software,
        }
    import torch

    if not torch.cuda.is_available():
        return {
            "gpu_type": "cpu",
            "compute_capability": None,
            "device_name": "cpu",
            "fake_gpu": False,
            "software": software,
        }
    name = torch.cuda.get_device_name()
    cc = format_cc(torch.cuda.get_device_capability())
    return {
        "gpu_type": match_gpu_type(name, cc, gpu_types),
        "compute_capability": cc,
        "device_name": name,
        "fake_gpu": False,
        "software": software,
    }


def _describe(gpu_type, cc, device_name=None) -> str:
    text = str(gpu_type) if gpu_type is not None else f"an unknown GPU ({device_name!r} matches no gpu_types entry)"
    if device_name and device_name.startswith("fake "):
        text += f" [{device_name}]"
    return f"{text} ({cc if cc is not None else 'no compute capability'})"


def mismatches(record: dict, runtime: dict) -> list[str]:
    """Every difference between an engine record and a runtime, as phrases."""
    problems = []
    if record.get("gpu_type") != runtime.get("gpu_type") or format_cc(record.get("compute_capability")) != format_cc(
        runtime.get("compute_capability")
    ):
        built_cc = "compute capability " + str(format_cc(record.get("compute_capability")))
        built_for = _describe(record.get("gpu_type"), built_cc)
        this_node = _describe(
            runtime.get("gpu_type"), format_cc(runtime.get("compute_capability")), runtime.get("device_name")
        )
        problems.append(f"built for GPU type {built_for} but this node is {this_node}")
    built, running = record.get("software") or {}, runtime.get("software") or {}
    for name in SOFTWARE:
        if name in built and built.get(name) != running.get(name):
            problems.append(f"built with {name} {built.get(name)}, running {running.get(name)}")
    return problems


def check_compatible(record: dict, runtime: dict, *, engine_dir=None) -> None:
    """Raise ``EngineMismatch`` naming every field in which ``runtime`` differs from the engine ``record``.

    Compared: GPU type, compute capability, and each software version the record lists
    (torch, transformers, tensorrt_llm, cuda).
    """
    problems = mismatches(record, runtime)
    if problems:
        where = (
            f"engine {engine_dir}"
            if engine_dir is not None
            else f"engine {record.get('model')}/{record.get('recipe')}/{record.get('backend')}/{record.get('gpu_type')}"
        )
        gpu_problem = problems[0].startswith("built for GPU type")
        advice = (
            f"run it on a {record.get('gpu_type')} node, or use an engine built for "
            f"{runtime.get('gpu_type') or runtime.get('device_name')}; "
            if gpu_problem
            else ""
        )
        raise EngineMismatch(
            f"{where} was "
            + "; ".join(problems)
            + ": "
            + advice
            + "rebuild it with `snakemake -R build_engine ...`"
            + (" on such a node" if gpu_problem else " in this software environment")
            + (f" (or delete {engine_dir})" if engine_dir is not None else "")
        )


def read_record(engine_dir) -> dict:
    path = Path(engine_dir) / "engine.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: {engine_dir} is not a built engine")
    return json.loads(path.read_text())


def open_engine(engine_dir, *, gpu_ids, settings, gpu_types):
    """Check ``engine_dir`` against this process's hardware and software, then load it."""
    record = read_record(engine_dir)
    runtime = detect_runtime(gpu_types)
    check_compatible(record, runtime, engine_dir=engine_dir)
    module = backend_module(record["backend"])
    return module.load(Path(engine_dir), record=record, gpu_ids=list(gpu_ids or []), settings=settings or {})


def build_engine(*, checkpoint, out, backend, model, recipe, gpu_type, gpu_spec, settings, gpu_types=None) -> dict:
    """Build the engine into ``out`` atomically; returns the engine record."""
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    gpu_spec, settings = gpu_spec or {}, settings or {}
    runtime = detect_runtime(gpu_types or {gpu_type: gpu_spec})
    # Backends that compile for the build device check it themselves (tensorrt_llm.build).
    if recipe == "nvfp4" and gpu_spec.get("runs_nvfp4") is False and backend != "reference":
        raise ValueError(f"GPU type {gpu_type} cannot run NVFP4 (gpu_types.{gpu_type}.runs_nvfp4: false)")
    module = backend_module(backend)
    started = time.time()
    with atomic_path(out, directory=True) as tmp:
        facts = module.build(checkpoint, tmp, gpu_type=gpu_type, gpu_spec=gpu_spec, settings=settings)
        detected = facts.get("recipe_detected")
        if detected is not None and detected != recipe:  # e.g. an fp8 checkpoint under .../nvfp4/
            raise ValueError(f"{checkpoint} holds a {detected!r} checkpoint but the engine is for recipe {recipe!r}")
        record = {
            "backend": backend,
            "gpu_type": gpu_type,
            "compute_capability": format_cc(gpu_spec.get("compute_capability")),
            "recipe": recipe,
            "model": model,
            "software": runtime["software"],
            "build_settings": settings,
            "backend_facts": facts,
            "built_at_host": socket.gethostname(),
            "built_on": {
                "gpu_type": runtime["gpu_type"],
                "device_name": runtime["device_name"],
                "compute_capability": runtime["compute_capability"],
            },
            "fake_gpu": runtime["fake_gpu"],
            "checkpoint": str(checkpoint),
            "build_seconds": None,
            "built_at": started,
        }
        record["build_seconds"] = round(time.time() - started, 3)
        write_json_atomic(tmp / "engine.json", record)
        write_provenance(
            tmp / "provenance.json",
            step="build_engine",
            config_fragment={
                "model": model,
                "recipe": recipe,
                "backend": backend,
                "gpu_type": gpu_type,
                "gpu_spec": gpu_spec,
                "settings": settings,
            },
        )
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rackbench.build_engine", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="quantized (or unquantized) HF checkpoint dir")
    parser.add_argument("--out", required=True, help="engine dir to write (atomically)")
    parser.add_argument("--backend", required=True, help="reference | tensorrt-llm")
    parser.add_argument("--model", required=True)
    parser.add_argument("--recipe", required=True, help="nvfp4 | fp8 | none")
    parser.add_argument("--gpu-type", required=True, help="key of the config's gpu_types")
    parser.add_argument("--gpu-spec-json", required=True, help="that gpu_types entry, as JSON or a JSON file")
    parser.add_argument("--settings-json", required=True, help="engines.<backend> settings, as JSON or a JSON file")
    args = parser.parse_args(argv)
    gpu_spec = json_arg(args.gpu_spec_json)
    record = build_engine(
        checkpoint=args.checkpoint,
        out=args.out,
        backend=args.backend,
        model=args.model,
        recipe=args.recipe,
        gpu_type=args.gpu_type,
        gpu_spec=gpu_spec,
        settings=json_arg(args.settings_json),
        gpu_types={args.gpu_type: gpu_spec},
    )
    facts = record["backend_facts"]
    print(
        f"built {args.backend} engine {args.out} for {args.gpu_type}: recipe {args.recipe}, "
        f"{facts.get('quantized_layers', '?')} quantized layers, software {record['software']}"
        + (" [fake GPU]" if record["fake_gpu"] else ""),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
