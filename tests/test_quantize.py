"""ModelOpt quantization of the demo model: exported files, packed NVFP4, accuracy property."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import make_demo_dataset, make_demo_model
from rackbench import cpu_quant_backend, demo, quantize

E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6])
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    model = root / "model"
    make_demo_model(model)
    make_demo_dataset(model, root / "ds", num_samples=24, num_calibration=8)
    calib = pd.read_pickle(root / "ds" / demo.CALIBRATION_PKL)
    # The parquet prepare_dataset writes (ARCHITECTURE.md): input, tok_input list<int32>, output.
    pq.write_table(
        pa.table(
            {
                "input": calib["input"],
                "tok_input": pa.array(calib["tok_input"].tolist(), type=pa.list_(pa.int32())),
                "output": calib["output"],
            }
        ),
        root / "calibration.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "input": pa.array([], pa.string()),
                "tok_input": pa.array([], pa.list_(pa.int32())),
                "output": pa.array([], pa.string()),
            }
        ),
        root / "empty.parquet",
    )
    samples = pd.read_pickle(root / "ds" / demo.SAMPLES_PKL)
    return {"root": root, "model": model, "calibration": root / "calibration.parquet", "samples": samples}


def run_quantize(assets, recipe, out=None, **kw):
    out = out or assets["root"] / f"q_{recipe}"
    argv = [
        "--model-dir",
        str(kw.get("model", assets["model"])),
        "--calibration",
        str(kw.get("calibration", assets["calibration"])),
        "--recipe",
        recipe,
        "--out",
        str(out),
        "--calib-samples",
        "8",
        "--calib-batch-size",
        "4",
        "--calib-max-seq-len",
        "512",
        "--device",
        "cpu",
    ]
    return quantize.main(argv), out


@pytest.fixture(scope="module")
def checkpoints(assets):
    result = {}
    for recipe in quantize.RECIPES:
        rc, out = run_quantize(assets, recipe)
        assert rc == 0
        result[recipe] = out
    return result


def tensors(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("recipe,algo", [("nvfp4", "NVFP4"), ("fp8", "FP8")])
def test_quantized_checkpoint_files(checkpoints, recipe, algo):
    ckpt = checkpoints[recipe]
    config = json.loads((ckpt / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == algo
    assert qc["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    hf = json.loads((ckpt / "hf_quant_config.json").read_text())["quantization"]
    assert hf["quant_algo"] == algo and hf["kv_cache_quant_algo"] == "FP8"
    assert "lm_head" in hf["exclude_modules"]
    assert list(ckpt.glob("*.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (ckpt / name).is_file()
    prov = json.loads((ckpt / "provenance.json").read_text())
    assert prov["step"] == "quantize" and len(prov["config_sha256"]) == 64
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(ckpt).eos_token_id == 2
    sd = tensors(ckpt)
    for layer in range(2):
        for proj in ("k_proj", "v_proj"):
            assert sd[f"model.layers.{layer}.self_attn.{proj}.{proj[0]}_scale"].numel() == 1


def test_nvfp4_weights_are_packed(checkpoints):
    sd = tensors(checkpoints["nvfp4"])
    for layer in range(2):
        for name in LINEARS:
            part = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            p = f"model.layers.{layer}.{part}.{name}."
            w, s, s2 = sd[p + "weight"], sd[p + "weight_scale"], sd[p + "weight_scale_2"]
            assert w.dtype == torch.uint8 and s.dtype == torch.float8_e4m3fn and s2.dtype == torch.float32
            assert s.shape == (w.shape[0], w.shape[1] * 2 // 16) and s2.numel() == 1
            assert sd[p + "input_scale"].numel() == 1
    assert sd["lm_head.weight"].dtype == torch.float32  # excluded, as in hf_ptq


def test_fp8_weights(checkpoints):
    sd = tensors(checkpoints["fp8"])
    p = "model.layers.0.mlp.down_proj."
    assert sd[p + "weight"].dtype == torch.float8_e4m3fn and sd[p + "weight_scale"].numel() == 1


def test_none_recipe_is_plain(checkpoints, assets):
    ckpt = checkpoints["none"]
    assert "quantization_config" not in json.loads((ckpt / "config.json").read_text())
    assert not (ckpt / "hf_quant_config.json").exists()
    a, b = tensors(ckpt), tensors(assets["model"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((ckpt / "provenance.json").read_text())["step"] == "quantize"


def test_recipe_config_matches_hf_ptq():
    import modelopt.torch.quantization as mtq

    cfg = quantize.quant_config("nvfp4")
    assert cfg["algorithm"] == "max"
    assert cfg["quant_cfg"][: len(mtq.NVFP4_DEFAULT_CFG["quant_cfg"])] == mtq.NVFP4_DEFAULT_CFG["quant_cfg"]
    assert cfg["quant_cfg"][-1] == mtq.FP8_KV_CFG["quant_cfg"][-1]
    assert cfg["quant_cfg"][-1]["quantizer_name"] == "*[kv]_bmm_quantizer"
    assert "use_constant_amax" not in cfg["quant_cfg"][-1].get("cfg", {})  # fp8, not fp8_cast


@pytest.mark.parametrize(
    "case,message", [("model", "no config.json"), ("recipe", "unknown recipe"), ("empty", "no non-empty tok_input")]
)
def test_bad_input_is_one_line_error(assets, tmp_path, capsys, case, message):
    kw = (
        {"model": tmp_path / "missing"}
        if case == "model"
        else {"calibration": assets["root"] / "empty.parquet"}
        if case == "empty"
        else {}
    )
    rc, out = run_quantize(assets, "int3" if case == "recipe" else "nvfp4", out=tmp_path / "out", **kw)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


# ------------------------------------------------------------ the accuracy property


def rouge1(refs, preds):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    return 100 * sum(scorer.score(r, p)["rouge1"].fmeasure for r, p in zip(refs, preds)) / len(refs)


def dequantize(sd, corrupt=None):
    """NVFP4 export -> float weights (the checkpoint's own numbers), optionally with broken scales."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for key, value in sd.items():
        if key.endswith(("weight_scale", "weight_scale_2", "input_scale", "k_scale", "v_scale")):
            continue
        if key.endswith(".weight") and value.dtype == torch.uint8:
            p = key[: -len("weight")]
            scale = sd[p + "weight_scale"].float()
            if corrupt == "zero":
                scale = torch.zeros_like(scale)
            elif corrupt == "random":
                scale = scale * torch.randn(scale.shape, generator=gen)
            rows = value.shape[0]
            w = torch.stack([E2M1[(value & 0x0F).long()], E2M1[(value >> 4).long()]], -1).reshape(rows, -1)
            w = (w.view(rows, -1, 16) * scale.unsqueeze(-1)).reshape(rows, -1)
            out[key] = w * sd[p + "weight_scale_2"].float()
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def reference(assets):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(assets["model"]).eval()
    tok = AutoTokenizer.from_pretrained(assets["model"])
    samples = assets["samples"]

    def score(m):
        outs = demo.greedy(m, samples["tok_input"].tolist(), 64)
        return rouge1(samples["output"], [tok.decode(o, skip_special_tokens=True) for o in outs])

    return model, score


def test_nvfp4_export_keeps_accuracy_and_broken_scales_lose_it(checkpoints, reference):
    base, score = reference
    assert score(base) == pytest.approx(100.0)
    sd = tensors(checkpoints["nvfp4"])
    results = {}
    for corrupt in (None, "zero", "random"):
        model = copy.deepcopy(base)
        model.load_state_dict(dequantize(sd, corrupt), strict=True)
        results[corrupt] = score(model)
    assert results[None] >= 80, results
    assert results["zero"] < 30 and results["random"] < 30, results


def test_nvfp4_fake_quant_on_cpu_keeps_accuracy(assets, reference, checkpoints):
    """Weights + activations NVFP4 + FP8 KV through ModelOpt's fake quant (CPU backend)."""
    base, score = reference
    model = copy.deepcopy(base)
    calib = pq.read_table(assets["calibration"]).column("tok_input").to_pylist()
    quantize.quantize_model(model, "nvfp4", calib, 4, "cpu")
    assert cpu_quant_backend.use_on(model) == 2 * 7 * 2  # weight + input quantizer per linear
    assert score(model) >= 80
    # The backend computes what the export stores: fake-quant weight == dequantized packed weight.
    down = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        fq = down.weight_quantizer(down.weight)
    exported = dequantize(tensors(checkpoints["nvfp4"]))["model.layers.0.mlp.down_proj.weight"]
    # (equal up to float rounding: the product of the two scales is formed in another order)
    torch.testing.assert_close(fq, exported, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("recipe", ["nvfp4", "fp8"])
def test_modelopt_state_restores_the_calibrated_quantizers(assets, checkpoints, recipe):
    """The TensorRT-engine path rebuilds the quantized module from the base model and
    modelopt_state.pth (export_tensorrt_llm_checkpoint needs the module, not HF files)."""
    from modelopt.torch.quantization.nn import TensorQuantizer
    from transformers import LlamaForCausalLM

    state = checkpoints[recipe] / quantize.MODELOPT_STATE
    assert state.is_file()
    assert state.stat().st_size < 1_000_000  # quantizer state only, no weights
    restored = quantize.restore_modelopt_state(LlamaForCausalLM.from_pretrained(assets["model"]), state)
    calibrated = LlamaForCausalLM.from_pretrained(assets["model"])
    calib = pq.read_table(assets["calibration"]).column("tok_input").to_pylist()
    quantize.quantize_model(calibrated, recipe, calib, 4, "cpu")

    def amaxes(model):
        return {
            name: m.amax.clone()
            for name, m in model.named_modules()
            if isinstance(m, TensorQuantizer) and getattr(m, "amax", None) is not None
        }

    want, got = amaxes(calibrated), amaxes(restored)
    assert want and sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)
    assert quantize.MODELOPT_STATE not in [p.name for p in checkpoints["none"].iterdir()]


def test_modelopt_state_from_another_modelopt_is_refused(checkpoints, assets, tmp_path):
    import modelopt
    from transformers import LlamaForCausalLM

    saved = torch.load(checkpoints["fp8"] / quantize.MODELOPT_STATE, weights_only=False)
    assert saved["modelopt_version"] == modelopt.__version__
    saved["modelopt_version"] = "0.37.0" if not modelopt.__version__.startswith("0.37.") else "0.47.0"
    torch.save(saved, tmp_path / "other.pth")
    with pytest.raises(quantize.QuantizeError, match=r"saved by ModelOpt 0\.\d+\.0 but this environment has"):
        quantize.restore_modelopt_state(LlamaForCausalLM.from_pretrained(assets["model"]), tmp_path / "other.pth")
