"""The NVFP4 / FP8 dequantizer against ModelOpt's own quantizer and exported checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from rackbench.engines import nvfp4

NVFP4QTensor = pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor").NVFP4QTensor


def modelopt_roundtrip(x: torch.Tensor, global_scale=None):
    qt, scale, scale_2 = NVFP4QTensor.quantize(x.clone(), 16, weights_scaling_factor_2=global_scale)
    deq = qt.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: 16})
    return qt._quantized_data, scale, scale_2, deq


@pytest.mark.parametrize("shape,seed", [((48, 96), 0), ((7, 3, 32), 1), ((256, 688), 2)])
def test_dequantize_equals_modelopt(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.logspace(-3, 1, shape[-1])  # wide dynamic range
    x[..., :16].view(-1, 16)[0] = 0  # an all-zero block (ModelOpt's scale 1.0 path)
    packed, scale, scale_2, want = modelopt_roundtrip(x)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == shape[-1] // 2
    assert scale.dtype == torch.float8_e4m3fn and scale.shape[-1] == shape[-1] // 16
    got = nvfp4.dequantize_nvfp4(packed, scale, scale_2)
    assert torch.equal(got, want)
    assert torch.equal(nvfp4.dequantize_nvfp4(packed, scale, scale_2, torch.bfloat16), want.to(torch.bfloat16))
    # and it is a quantization of x: within half a step of the largest E2M1 gap per block
    step = (scale.float() * scale_2).repeat_interleave(16, dim=-1) * 2.0
    assert bool(((got - x).abs() <= step / 2 + 1e-12).all())


def test_nibble_order_and_code_table():
    # byte 0x2A: low nibble 0xA = -1.0 (element 2j), high nibble 0x2 = +1.0 (element 2j + 1)
    packed = torch.tensor([[0x2A, 0xF7]], dtype=torch.uint8)
    assert nvfp4.unpack_e2m1(packed).tolist() == [[-1.0, 1.0, 6.0, -6.0]]
    codes = torch.arange(16, dtype=torch.uint8)
    assert nvfp4.unpack_e2m1(nvfp4.pack_e2m1_codes(codes)).tolist() == list(nvfp4.E2M1_VALUES)
    assert list(nvfp4.E2M1_VALUES) == NVFP4QTensor.get_e2m1_values("cpu").tolist()


def test_round_to_e2m1_equals_modelopt_cast():
    x = torch.tensor([0.0, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, -0.25, -0.74, -2.6, -9.0])
    assert torch.equal(nvfp4.round_to_e2m1(x), NVFP4QTensor._cast_fp4(x.clone()))


@pytest.mark.parametrize("global_scale", [None, 0.5, 1e-4])
def test_fake_quantize_nvfp4_equals_modelopt(global_scale):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 64, generator=gen) * 3
    gs = NVFP4QTensor.get_weights_scaling_factor_2(x) if global_scale is None else torch.tensor(global_scale)
    *_, want = modelopt_roundtrip(x, gs)  # tiny global scales clamp block scales at 448
    assert torch.equal(nvfp4.fake_quantize_nvfp4(x, gs), want)


def test_shape_errors():
    with pytest.raises(TypeError):
        nvfp4.dequantize_nvfp4(torch.zeros(2, 8), torch.ones(2, 1), torch.tensor(1.0))
    with pytest.raises(ValueError, match="shapes"):
        nvfp4.dequantize_nvfp4(torch.zeros(2, 8, dtype=torch.uint8), torch.ones(3, 1), torch.tensor(1.0))
    with pytest.raises(ValueError, match="multiple"):
        nvfp4.fake_quantize_nvfp4(torch.zeros(2, 20), 1.0)


def _exported(tmp_path, recipe):
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=128,
            architectures=["LlamaForCausalLM"],
        )
    ).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = copy.deepcopy({"nvfp4": mtq.NVFP4_DEFAULT_CFG, "fp8": mtq.FP8_DEFAULT_CFG}[recipe])
    calib = torch.randint(0, 128, (2, 16))
    model = mtq.quantize(model, cfg, lambda m: m(calib))
    export_hf_checkpoint(model, export_dir=str(tmp_path))
    return original, load_file(tmp_path / "model.safetensors"), model


def test_exported_nvfp4_checkpoint(tmp_path):
    """Each packed weight of a real export decodes to ModelOpt's quantization of the
    original weight under the exported global scale (and repacks to the same bytes)."""
    original, tensors, _ = _exported(tmp_path, "nvfp4")
    packed_names = [k for k, v in tensors.items() if k.endswith(".weight") and v.dtype == torch.uint8]
    assert len(packed_names) == 7
    for name in packed_names:
        packed, scale, scale_2 = tensors[name], tensors[name + "_scale"], tensors[name + "_scale_2"]
        assert scale.dtype == torch.float8_e4m3fn and scale.shape == (packed.shape[0], packed.shape[1] * 2 // 16)
        want_packed, want_scale, _, want = modelopt_roundtrip(original[name].float(), scale_2)
        assert torch.equal(packed, want_packed) and torch.equal(scale.float(), want_scale.float())
        got = nvfp4.dequantize_nvfp4(packed, scale, scale_2)
        assert got.shape == original[name].shape
        assert torch.equal(got, want)
        assert (got - original[name]).abs().max() < original[name].abs().max() / 4


def test_exported_fp8_checkpoint(tmp_path):
    """FP8 weights decode to what the ModelOpt fake-quant weight quantizer produces."""
    original, tensors, model = _exported(tmp_path, "fp8")
    fp8_names = [k for k, v in tensors.items() if k.endswith(".weight") and v.dtype == torch.float8_e4m3fn]
    assert len(fp8_names) == 7
    modules = dict(model.named_modules())
    for name in fp8_names:
        got = nvfp4.dequantize_fp8(tensors[name], tensors[name + "_scale"])
        scale = tensors[name + "_scale"]
        want = nvfp4.fake_quantize_fp8(original[name].float(), scale)
        assert torch.equal(got, want)
        quantizer = modules[name.rsplit(".", 1)[0]].weight_quantizer
        with torch.no_grad():
            modelopt_fq = quantizer(original[name].float())
        assert torch.allclose(got, modelopt_fq, rtol=1e-6, atol=0)  # ModelOpt scales by 448/amax


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_fp8_equals_pytorchs_own_cast(dtype):
    """The table-based FP8 -> float32 step gives PyTorch's own conversion, bit for bit:
    every E4M3 code (as x = code * scale), values between codes, both zeros, infinities,
    NaN and subnormals."""
    scale = torch.tensor(0.37)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    noise = torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 200
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3e-3, 448.0, 1e6])
    x = torch.cat([codes * scale, noise, special]).to(dtype)
    want = ((x.float() / scale).clamp(-nvfp4.E4M3_MAX, nvfp4.E4M3_MAX).to(torch.float8_e4m3fn).float() * scale).to(
        dtype
    )
    got = nvfp4.fake_quantize_fp8(x, scale)
    assert got.dtype == dtype
    assert torch.equal(
        got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
    )
