"""The quantized linear layers deltatune knows, and how the core recognises them without importing
their library: bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` (also as transformers loads them) and
:class:`TorchaoNF4Linear` (torchao's ``NF4Tensor`` in an ``nn.Linear``). Each library is one entry of
:data:`FORMATS` (``core/layers.py``: ``QuantizedFormat``): which format a module holds, its weight
dequantized, and the dtype its forward computes in. Making such layers is ``quantize.py``'s.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.core.layers import QuantizedFormat, quantized_format

__all__ = ["FORMATS", "TorchaoNF4Linear", "base_weight_of"]


# --- torchao's NF4 tensor in a linear layer --------------------------------------------------------

class TorchaoNF4Linear(nn.Linear):
    """``nn.Linear`` whose frozen weight is a torchao ``NF4Tensor``: ``y = x Wᵀ + b``, W dequantized
    blockwise inside torchao's ``linear_nf4`` (forward and backward to x)."""

    def forward(self, x: Tensor) -> Tensor:
        # torchao is installed whenever this layer exists (quantize() built it)
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4 as _linear

        y = _linear(x.to(self.weight.dtype), self.weight)  # (..., d_in) -> (..., d_out)
        return (y if self.bias is None else y + self.bias.to(y.dtype)).to(x.dtype)

    def __deepcopy__(self, memo: dict[int, Any]) -> TorchaoNF4Linear:
        """An exact copy. torchao's ``NF4Tensor.clone`` (what ``copy.deepcopy`` of its parameter calls)
        re-quantizes the dequantized weight with the default scaler block of 256, which fails for a
        weight whose number of blocks it does not divide (SmolLM2's 576 x 576: 5,184 blocks) and is not
        bit-exact where it runs. Here the packed codes and scales themselves are cloned."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_parameters":
                value = {name: _copy_nf4_parameter(p, memo) if name == "weight" and p is not None
                         else copy.deepcopy(p, memo) for name, p in value.items()}
            else:
                value = copy.deepcopy(value, memo)
            new.__dict__[key] = value
        return new


def _copy_nf4_parameter(p: Tensor, memo: dict[int, Any]) -> Tensor:
    if id(p) not in memo:
        names, ctx = p.__tensor_flatten__()  # the codes, the (double-quantized) scales, the NF4 table
        inner = {name: getattr(p, name).clone() for name in names}
        memo[id(p)] = nn.Parameter(type(p).__tensor_unflatten__(inner, ctx, p.size(), p.stride()),
                                   requires_grad=p.requires_grad)
    return memo[id(p)]


# --- how the core recognises each library's layers (no import of the library) ----------------------

def _is(module: nn.Module, class_name: str) -> bool:
    return any(c.__name__ == class_name and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def _bnb_format(module: nn.Module) -> str | None:
    weight = module._parameters.get("weight")
    if weight is None:
        return None
    if _is(module, "Linear4bit"):
        # Before quantization (meta device, not yet moved) the weight is still floating point.
        return None if weight.is_floating_point() else str(getattr(weight, "quant_type", "nf4"))
    if _is(module, "Linear8bitLt"):
        return "int8" if weight.dtype == torch.int8 else None
    return None


def _bnb_dequantize(module: nn.Module) -> Tensor:
    import bitsandbytes.functional as F

    weight = module.weight
    if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
        # bitsandbytes repacked it for its CPU inference kernel; undo that as its own state_dict() does
        weight.data, weight.quant_state = F._convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    if weight.dtype == torch.int8:  # row-wise absmax: W = CB · SCB / 127
        # the scales move from the weight to module.state on the layer's first forward
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return F.int8_vectorwise_dequant(weight.data, scales).to(torch.float32)
    return F.dequantize_4bit(weight.data, weight.quant_state)  # (d_out, d_in), the original dtype


def _bnb_computes_as(module: nn.Module, x: Tensor) -> torch.dtype | None:
    """The dtype ``Linear4bit.forward`` computes ``F.linear(x, deq(W), b)`` in (bitsandbytes 0.47-0.50:
    ``matmul_4bit`` -> ``gemm_4bit``, dequantize then ``F.linear``; its backward dequantizes again), or
    ``None`` where it does something else: int8 (its own state machine), a weight repacked (or about to
    be, on a no-grad eval call) for the bf16 CPU inference kernel, a weight quantized input-first.
    ``Linear8bitLt`` training on CPU runs ``MatMul8bitFp``: ``F.linear(x, CB · SCB / 127, b)`` in x's
    dtype; in eval (fp16 products) and on CUDA (int8 products) it is called."""
    if torch.is_autocast_enabled(x.device.type):
        return None
    if _is(module, "Linear8bitLt"):
        fp_state = getattr(getattr(module, "state", None), "has_fp16_weights", True)
        ok = x.device.type == "cpu" and module.training and not fp_state and module.weight.dtype == torch.int8
        return x.dtype if ok else None
    if not _is(module, "Linear4bit"):
        return None
    state = getattr(module.weight, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False) or x.shape[-1] != state.shape[1] \
            or getattr(state, "quant_type", None) not in ("nf4", "fp4"):
        return None
    if x.device.type == "cpu" and getattr(module, "support_avx512bf16_for_cpu", False) and not module.training \
            and not x.requires_grad:
        return None  # forward would repack the weight and run the bf16 inference kernel
    if not getattr(module, "compute_type_is_set", True):
        module.set_compute_type(x)  # what forward does on its first call (float32 / bf16 inputs win)
        module.compute_type_is_set = True
    return module.compute_dtype if module.compute_dtype is not None else x.dtype


def _torchao_format(module: nn.Module) -> str | None:
    return "nf4" if isinstance(module, TorchaoNF4Linear) else None


def _torchao_dequantize(module: nn.Module) -> Tensor:
    return module.weight.get_original_weight()


def _torchao_computes_as(module: nn.Module, x: Tensor) -> torch.dtype | None:
    """:class:`TorchaoNF4Linear` computes ``F.linear(x, deq(W)) + b`` in its weight's dtype."""
    if not isinstance(module, TorchaoNF4Linear) or torch.is_autocast_enabled(x.device.type):
        return None
    return module.weight.dtype


FORMATS: list[QuantizedFormat] = [
    QuantizedFormat("bitsandbytes", _bnb_format, _bnb_dequantize, _bnb_computes_as),
    QuantizedFormat("torchao", _torchao_format, _torchao_dequantize, _torchao_computes_as),
]


def base_weight_of(module: nn.Module) -> Tensor:
    found = quantized_format(module)
    return module.weight if found is None else found[0].dequantize(module)
