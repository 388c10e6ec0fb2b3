"""Dequantize the packed weights that ModelOpt's ``export_hf_checkpoint`` writes.

Layouts (ModelOpt 0.47, ``modelopt/torch/quantization/qtensor/nvfp4_tensor.py`` and
``modelopt/torch/export/unified_export_hf.py``):

NVFP4 (``quant_algo: NVFP4``), for a Linear of shape ``[out, in]``:
    ``<name>.weight``          uint8 ``[out, in // 2]``: two E2M1 codes per byte; the
                               element at even input index ``2j`` is the LOW nibble, the
                               one at ``2j + 1`` the HIGH nibble
                               (``packed = (q[..., 1::2] << 4) | q[..., 0::2]``).
                               A code is ``sign << 3 | magnitude index`` into
                               ``0, 0.5, 1, 1.5, 2, 3, 4, 6``.
    ``<name>.weight_scale``    float8_e4m3fn ``[out, in // 16]``: one scale per block of 16
                               consecutive input elements.
    ``<name>.weight_scale_2``  float32 scalar: the global (per-tensor) scale.
    value = e2m1 * (float(weight_scale) * weight_scale_2)   (in this order, as ModelOpt does)
    ``<name>.input_scale``     float32 scalar: the activations' global scale
                               (amax / (6 * 448)); activations are quantized dynamically
                               per block of 16 at run time (see ``fake_quantize_nvfp4``).

FP8 (``quant_algo: FP8``): ``<name>.weight`` float8_e4m3fn, ``<name>.weight_scale`` float32
(per tensor, or per output channel); value = float(weight) * weight_scale.
``<name>.input_scale`` is the activations' per-tensor scale (amax / 448).

KV cache (``kv_cache_quant_algo: FP8``): ``...k_proj.k_scale`` / ``...v_proj.v_scale``
(float32 scalars): K and V are stored as FP8 E4M3 of ``x / scale``.
"""

from __future__ import annotations

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
# E2M1 code -> value; index = sign << 3 | magnitude code (same table as ModelOpt's).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # round-to-nearest boundaries
_E2M1_ODD_BOUNDS = (0.75, 1.75, 3.5)  # ties that round up (to the even code)

_TABLES: dict[tuple, torch.Tensor] = {}


def _table(values, device, dtype=torch.float32) -> torch.Tensor:
    key = (values, str(device), dtype)
    if key not in _TABLES:
        _TABLES[key] = torch.tensor(values, dtype=dtype, device=device)
    return _TABLES[key]


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., n]`` -> float32 ``[..., 2n]`` E2M1 values (low nibble first)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed NVFP4 data must be uint8, got {packed.dtype}")
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)
    return _table(E2M1_VALUES, packed.device)[codes.long()]


def pack_e2m1_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[..., 2n]`` (0..15) -> packed uint8 ``[..., n]``."""
    return (codes[..., 1::2] << 4) | codes[..., 0::2]


def dequantize_nvfp4(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    *,
    shape=None,
) -> torch.Tensor:
    """Dequantize an exported NVFP4 weight: ``e2m1 * (fp8 block scale * global scale)``.

    ``weight``: uint8 ``[..., in // 2]``; ``weight_scale``: float8_e4m3fn (or float)
    ``[..., in_padded // block]``; ``weight_scale_2``: scalar. The block size is inferred
    from the shapes. ``shape`` trims padding when the original input dim was not a
    multiple of the block size.
    """
    values = unpack_e2m1(weight)  # float32 [..., in]
    n_in = values.shape[-1]
    n_blocks = weight_scale.shape[-1]
    if weight_scale.shape[:-1] != values.shape[:-1] or n_in % n_blocks:
        raise ValueError(
            f"NVFP4 shapes do not fit: weight {tuple(weight.shape)} (unpacked "
            f"{tuple(values.shape)}), weight_scale {tuple(weight_scale.shape)}"
        )
    block = n_in // n_blocks
    block_scale = weight_scale.to(torch.float32) * weight_scale_2.to(torch.float32).to(values.device)
    out = (values.view(*values.shape[:-1], n_blocks, block) * block_scale.unsqueeze(-1)).reshape(values.shape)
    if shape is not None:
        out = out[tuple(slice(0, s) for s in shape)]
    return out.to(dtype)


def dequantize_fp8(
    weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dequantize an exported FP8 E4M3 weight: ``float(weight) * weight_scale``.

    ``weight_scale`` is a scalar (per tensor) or has one entry per output channel.
    """
    if weight.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"FP8 weight must be a float8 tensor, got {weight.dtype}")
    scale = weight_scale.to(torch.float32)
    if scale.numel() > 1 and scale.dim() == 1:
        scale = scale.unsqueeze(-1)
    return (weight.to(torch.float32) * scale).to(dtype)


def _e4m3_to_float32(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> float32 through a 256-entry table of PyTorch's own conversions of
    the codes: the same values, but PyTorch's cast is scalar code on CPU (~3 ns per
    element), which the reference engine's FP8 KV cache pays every decode step."""
    key = ("float8_e4m3fn", str(q.device), torch.float32)
    if key not in _TABLES:
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
        _TABLES[key] = codes.float().to(q.device)
    return torch.take(_TABLES[key], q.view(torch.uint8).long())


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Quantize-dequantize ``x`` to FP8 E4M3 with ``scale`` (x ~ fp8(x / scale) * scale)."""
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (_e4m3_to_float32(q) * scale).to(x.dtype)


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round float values (already scaled into [-6, 6]) to E2M1 codes as ModelOpt does.

    Round to nearest, ties to the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, ...); values beyond
    6 saturate.
    """
    bounds = _table(_E2M1_BOUNDS, x.device)
    mag = x.abs().float()
    code = torch.searchsorted(bounds, mag.contiguous(), out_int32=True)
    odd = _table(_E2M1_ODD_BOUNDS, x.device)
    code = code + (mag.unsqueeze(-1) == odd).any(-1).to(code.dtype)
    return (code + (x < 0).to(code.dtype) * 8).to(torch.uint8)


def fake_quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor | float, block: int = 16) -> torch.Tensor:
    """NVFP4 quantize-dequantize along the last dim with a given global scale.

    The per-block scale is ``fp8(block_amax / (6 * global_scale))`` (clamped to E4M3's
    range, 1.0 for all-zero blocks), as ModelOpt's ``NVFP4QTensor.quantize`` computes it and
    as an NVFP4 GEMM quantizes its activations with the exported ``input_scale``.
    """
    shape = x.shape
    n = shape[-1]
    if n % block:
        raise ValueError(f"last dim {n} is not a multiple of the NVFP4 block {block}")
    xf = x.float().reshape(*shape[:-1], n // block, block)
    gs = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
    scale = xf.abs().amax(-1) / (E2M1_MAX * gs)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scale = scale.clamp(2**-9, E4M3_MAX).to(torch.float8_e4m3fn).float() * gs
    codes = round_to_e2m1(xf / scale.unsqueeze(-1))
    values = _table(E2M1_VALUES, x.device)[codes.long()]
    return (values * scale.unsqueeze(-1)).reshape(shape).to(x.dtype)
