"""Post-training quantization with NVIDIA ModelOpt -> unified HF checkpoint.

``python -m rackbench.quantize --model-dir DIR --calibration PARQUET --recipe {nvfp4,fp8,none}
--out DIR [--calib-samples N --calib-batch-size B --calib-max-seq-len L --device auto|cpu|cuda]``

Recipes (the configs ``examples/llm_ptq/hf_ptq.py`` builds in NVIDIA/Model-Optimizer:
the model preset plus ``FP8_KV_CFG["quant_cfg"]``, merged as its ``apply_kv_cache_quant``
(0.37) / ``mtq.update_quant_cfg_with_kv_cache_quant`` (0.40+) do; for a Llama
``example_utils.build_quant_cfg`` adds nothing, and ``--kv_cache_qformat fp8``
(not ``fp8_cast``) keeps the data-calibrated KV amax rather than a constant one):

ModelOpt versions: this module runs under the TensorRT-LLM container's ModelOpt
(``nvidia-modelopt[torch]~=0.37.0``, pinned by TensorRT-LLM 1.2.1's requirements.txt)
and under the rackbench environment's 0.47. It uses only the API both have; every
ModelOpt name it touches is listed in ``rackbench/contracts/modelopt.yaml`` and
tests/test_modelopt_compat.py fails on one that 0.37 lacks.

* ``nvfp4``: ``hf_ptq.py --qformat nvfp4 --kv_cache_qformat fp8``
  = ``NVFP4_DEFAULT_CFG`` + ``FP8_KV_CFG["quant_cfg"]``, algorithm ``max``.
* ``fp8``:   ``hf_ptq.py --qformat fp8 --kv_cache_qformat fp8``
  = ``FP8_DEFAULT_CFG`` + ``FP8_KV_CFG["quant_cfg"]``.
* ``none``:  the model saved as is (same layout, no ``quantization_config``).

The output directory (``export_hf_checkpoint``: ``config.json`` with
``quantization_config``, ``hf_quant_config.json``, safetensors; plus the tokenizer
files and ``provenance.json``) appears atomically.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from rackbench.atomic import atomic_path
from rackbench.config import schema_defaults
from rackbench.padding import pad_batch
from rackbench.provenance import write_provenance

RECIPES = ("nvfp4", "fp8", "none")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)


class QuantizeError(Exception):
    """Bad input: reported as one line, exit status 2."""


def quant_config(recipe: str) -> dict:
    """The ModelOpt config ``hf_ptq.py --qformat <recipe> --kv_cache_qformat fp8`` uses."""
    import modelopt.torch.quantization as mtq

    base = {"nvfp4": mtq.NVFP4_DEFAULT_CFG, "fp8": mtq.FP8_DEFAULT_CFG}[recipe]
    return with_kv_cache_quant(base, mtq.FP8_KV_CFG["quant_cfg"])


def with_kv_cache_quant(quant_cfg: dict, kv_cache_quant_cfg) -> dict:
    """A deep copy of ``quant_cfg`` with the KV-cache quantizer entries added (presets stay untouched).

    ModelOpt changed the shape of ``quant_cfg["quant_cfg"]``: up to 0.4x a dict
    pattern -> attributes (0.37 ``examples/llm_ptq/example_utils.py apply_kv_cache_quant``:
    ``dict.update``), later an ordered list of ``QuantizerCfgEntry`` dicts (0.47
    ``modelopt/torch/quantization/utils/core_utils.py update_quant_cfg_with_kv_cache_quant``:
    list concatenation, later entries win). Each version's presets come in its own
    shape, so the merge follows the shape it is given.
    """
    import copy

    merged = copy.deepcopy(quant_cfg)
    inner, kv = merged.get("quant_cfg"), copy.deepcopy(kv_cache_quant_cfg)
    if isinstance(inner, dict) and isinstance(kv, dict):
        inner.update(kv)
    elif isinstance(inner, (list, tuple)) and isinstance(kv, (list, tuple)):
        merged["quant_cfg"] = list(inner) + list(kv)
    else:
        raise TypeError(
            f"cannot merge a KV-cache quant_cfg of type {type(kv).__name__} into one of type "
            f"{type(inner).__name__}: this ModelOpt's config layout is not one rackbench knows"
        )
    if not merged.get("algorithm"):
        merged["algorithm"] = "max"
    return merged


def read_calibration(path: Path, num_samples: int, max_seq_len: int) -> list[list[int]]:
    import pandas as pd

    if not path.is_file():
        raise QuantizeError(f"calibration set {path} not found")
    df = pd.read_parquet(path, columns=["tok_input"])
    ids = [[int(t) for t in row][:max_seq_len] for row in df["tok_input"].head(num_samples)]
    ids = [row for row in ids if row]
    if not ids:
        raise QuantizeError(f"calibration set {path} has no non-empty tok_input rows")
    return ids


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise QuantizeError("--device cuda but no CUDA device is visible")
    return device


def batches(samples: list[list[int]], batch_size: int, pad_id: int):
    """Left-padded (input_ids, attention_mask) batches, as hf_ptq's calibration uses."""
    for i in range(0, len(samples), batch_size):
        yield pad_batch(samples[i : i + batch_size], pad_id, side="left")


def quantize_model(model, recipe: str, samples: list[list[int]], batch_size: int, device: str):
    """Calibrate ``model`` in place with the recipe's ModelOpt config; returns the config."""
    import modelopt.torch.quantization as mtq
    import torch

    cfg = quant_config(recipe)
    pad_id = model.config.pad_token_id
    pad_id = pad_id if pad_id is not None else (model.config.eos_token_id or 0)
    if isinstance(pad_id, list):
        pad_id = pad_id[0]

    def forward_loop(m):
        with torch.no_grad():
            for ids, mask in batches(samples, batch_size, pad_id):
                m(input_ids=ids.to(device), attention_mask=mask.to(device))

    mtq.quantize(model, cfg, forward_loop=forward_loop)
    return cfg


MODELOPT_STATE = "modelopt_state.pth"


def save_modelopt_state(model, path: Path) -> None:
    """The calibrated quantizers without the weights: ModelOpt's state plus the
    quantizers' own state dict (amax and friends). TensorRT-LLM's engine-build mode
    (``export_tensorrt_llm_checkpoint``) needs the quantized torch module; it is
    rebuilt from the base model with ``restore_modelopt_state``. Small even for 70B.
    """
    import modelopt
    import modelopt.torch.opt as mto
    import torch

    torch.save(
        {
            "modelopt_state": mto.modelopt_state(model),
            "quantizer_state_dict": quantizer_state_dict(model),
            "modelopt_version": modelopt.__version__,
        },
        path,
    )


def quantizer_state_dict(model) -> dict:
    """``{module name: TensorQuantizer.state_dict()}``, as ModelOpt's ``get_quantizer_state_dict``.

    ModelOpt's own helper moved (0.37 ``modelopt/torch/quantization/utils.py``, 0.43+
    ``.../utils/core_utils.py``); ``TensorQuantizer`` (``modelopt.torch.quantization.nn``)
    is where it is in both, so this walks the modules itself. Plain HF models only:
    no DDP/FSDP wrapper names to unwrap.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {name: module.state_dict() for name, module in model.named_modules() if isinstance(module, TensorQuantizer)}


def load_quantizer_state_dict(model, state: dict) -> None:
    """The inverse of ``quantizer_state_dict`` (ModelOpt's ``set_quantizer_state_dict``)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    quantizers = {name: m for name, m in model.named_modules() if isinstance(m, TensorQuantizer)}
    missing = sorted(set(state) - set(quantizers))
    if missing:
        raise ValueError(
            f"saved quantizer state names {len(missing)} quantizer(s) the restored model lacks, "
            f"e.g. {missing[0]}: the base model differs from the one quantized"
        )
    for name, values in state.items():
        quantizers[name].load_state_dict(values)


def check_same_modelopt(saved: str | None, running: str, path) -> None:
    """Refuse a state saved by another ModelOpt minor release: the config layout inside it
    changed between 0.37 and 0.47 (contracts/modelopt.yaml config_layout), so a cross-version
    restore fails deep inside ModelOpt or, worse, restores the wrong quantizers."""
    if saved is None:
        return  # saved before rackbench recorded the version
    if saved.split(".")[:2] != running.split(".")[:2]:
        raise QuantizeError(
            f"{path} was saved by ModelOpt {saved} but this environment has {running}: "
            "run quantize where build_engine runs (the TensorRT-LLM container), "
            "e.g. snakemake -R quantize ..."
        )


def restore_modelopt_state(model, path: Path):
    """Make ``model`` (the unquantized base) the calibrated quantized model again."""
    import modelopt
    import modelopt.torch.opt as mto
    import torch

    saved = torch.load(path, map_location="cpu", weights_only=False)
    check_same_modelopt(saved.get("modelopt_version"), modelopt.__version__, path)
    model = mto.restore_from_modelopt_state(model, saved["modelopt_state"])
    load_quantizer_state_dict(model, saved["quantizer_state_dict"])
    return model


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def run(args) -> dict:
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise QuantizeError(f"model dir {model_dir} has no config.json")
    if args.recipe not in RECIPES:
        raise QuantizeError(f"unknown recipe {args.recipe!r}; known: {', '.join(RECIPES)}")
    if args.calib_samples < 1 or args.calib_batch_size < 1 or args.calib_max_seq_len < 1:
        raise QuantizeError("--calib-samples, --calib-batch-size and --calib-max-seq-len must be >= 1")
    device = resolve_device(args.device)
    samples = (
        read_calibration(Path(args.calibration), args.calib_samples, args.calib_max_seq_len)
        if args.recipe != "none"
        else []
    )

    import torch
    from transformers import AutoModelForCausalLM

    started = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device).eval()
    fragment = {
        "recipe": args.recipe,
        "device": device,
        "model_dir": str(model_dir),
        "calibration": str(args.calibration),
        "calib_samples": len(samples),
        "calib_batch_size": args.calib_batch_size,
        "calib_max_seq_len": args.calib_max_seq_len,
        "kv_cache_qformat": "fp8" if args.recipe != "none" else None,
        "hf_ptq_equivalent": (
            f"hf_ptq.py --qformat {args.recipe} --kv_cache_qformat fp8" if args.recipe != "none" else None
        ),
    }
    with atomic_path(args.out, directory=True) as tmp:
        if args.recipe == "none":
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            from modelopt.torch.export import export_hf_checkpoint

            cfg = quantize_model(model, args.recipe, samples, args.calib_batch_size, device)
            fragment["quant_cfg"] = json.loads(json.dumps(cfg, default=str))
            save_modelopt_state(model, tmp / MODELOPT_STATE)  # before export, which may repack weights
            with torch.inference_mode():
                export_hf_checkpoint(model, export_dir=tmp)
        fragment["tokenizer_files"] = copy_tokenizer(model_dir, tmp)
        write_provenance(tmp / "provenance.json", step="quantize", config_fragment=fragment)
    summary = {
        "recipe": args.recipe,
        "device": device,
        "calib_samples": len(samples),
        "seconds": round(time.time() - started, 2),
        "out": str(args.out),
    }
    print("quantize: " + json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rackbench.quantize", description="ModelOpt PTQ (nvfp4 / fp8 + FP8 KV cache) -> HF checkpoint"
    )
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--calibration", required=True, help="calibration.parquet (tok_input column)")
    parser.add_argument("--recipe", required=True, help="nvfp4, fp8 or none")
    parser.add_argument("--out", required=True, type=Path)
    defaults = schema_defaults("quantization")  # the config schema's, the only defaults
    parser.add_argument("--calib-samples", type=int, default=defaults["calibration_samples"])
    parser.add_argument("--calib-batch-size", type=int, default=defaults["calibration_batch_size"])
    parser.add_argument("--calib-max-seq-len", type=int, default=defaults["calibration_max_seq_len"])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=defaults["device"])
    args = parser.parse_args(argv)
    try:
        run(args)
    except QuantizeError as exc:
        print(f"quantize: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
