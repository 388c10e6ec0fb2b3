"""A CPU implementation of ModelOpt's NVFP4 fake quantization.

ModelOpt 0.47 fake-quantizes NVFP4 (``num_bits=(2, 1)``, dynamic 16-blocks with
FP8 E4M3 scales) only with CUDA/Triton kernels (``tensor_quant._dynamic_block_quantize_impl``
asserts ``amax.is_cuda``). FP8 per-tensor fake quant already has an eager CPU path.
ModelOpt's hook for other implementations is
``modelopt.torch.quantization.nn.modules.tensor_quantizer.register_quant_backend(name, fn)``:
a quantizer whose ``backend`` attribute names a registered backend calls
``fn(inputs, quantizer)`` from ``TensorQuantizer._fake_quantize`` instead of its
kernels. The backend here quantizes and dequantizes with ``NVFP4QTensor``, the
same pure-torch code ``export_hf_checkpoint`` uses to pack the weights, so the
CPU fake-quant model computes exactly what the exported checkpoint stores.
"""

from __future__ import annotations

import torch

BACKEND_NAME = "rackbench_nvfp4_cpu"


def _is_nvfp4(quantizer) -> bool:
    bs = quantizer.block_sizes or {}
    return (
        (tuple(quantizer.num_bits) == (2, 1) if isinstance(quantizer.num_bits, (tuple, list)) else False)
        and bs.get("type") == "dynamic"
        and tuple(bs.get("scale_bits") or ()) == (4, 3)
    )


def nvfp4_fake_quant(inputs: torch.Tensor, quantizer) -> torch.Tensor:
    """Quantize ``inputs`` to NVFP4 along the last dim and back (what the kernels compute)."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    block = (quantizer.block_sizes or {}).get(-1) or 16
    # Per-tensor second-level scale from the calibrated amax (weights and
    # calibrated activations); computed from the tensor when there is none.
    scale_2 = (
        NVFP4QTensor.get_weights_scaling_factor_2_from_quantizer(quantizer)
        if getattr(quantizer, "_amax", None) is not None
        else None
    )
    x = inputs.float()
    qtensor, scale, scale_2 = NVFP4QTensor.quantize(x, block, weights_scaling_factor_2=scale_2)
    out = qtensor.dequantize(dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: block})
    return out.reshape(inputs.shape).to(inputs.dtype)


def register() -> None:
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import (
        is_registered_quant_backend,
        register_quant_backend,
    )

    if not is_registered_quant_backend(BACKEND_NAME):
        register_quant_backend(BACKEND_NAME, nvfp4_fake_quant)


def use_on(model: torch.nn.Module) -> int:
    """Point every enabled NVFP4 quantizer of ``model`` at the CPU backend; returns how many.

    Only the compute implementation changes: amax, block sizes and everything the
    export reads stay as calibrated.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    register()
    n = 0
    for module in model.modules():
        if isinstance(module, TensorQuantizer) and module.is_enabled and _is_nvfp4(module):
            module.backend = BACKEND_NAME
            n += 1
    return n


def clear_from(model: torch.nn.Module) -> None:
    """Undo ``use_on`` (back to ModelOpt's own kernels, e.g. before a CUDA run)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    for module in model.modules():
        if isinstance(module, TensorQuantizer) and getattr(module, "backend", None) == BACKEND_NAME:
            module.backend = None
