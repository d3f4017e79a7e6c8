"""A quantized frozen base (QLoRA-style): the base's linear layers stored in 4 or 8 bits, the adapter
trained in full precision on top.

    model = deltatune.quantize(model, "nf4")             # before attaching adapters
    deltatune.attach(model, deltatune.LoraConfig(...))  # LoRA, DoRA, (IA)³, LoHa, LoKr, VeRA, OFT, ...

QLoRA (Dettmers et al., 2023, arXiv:2305.14314): W is stored as 4-bit NormalFloat (NF4) codes in
blocks of 64 with one absmax scale per block; with double quantization those scales are themselves
quantized to 8 bits in blocks of 256. The forward dequantizes ``W ≈ absmax · q`` to the compute dtype
and runs the usual product; only the adapter (and its gradients and optimizer state) is full
precision. ``int8`` is LLM.int8()'s row-wise absmax int8 weight (Dettmers et al., 2022).

Backends (kernels come from a maintained library; deltatune writes none):

- ``bitsandbytes`` (default): ``bnb.nn.Linear4bit`` / ``Linear8bitLt``, the same layers transformers
  loads with ``BitsAndBytesConfig`` and that PEFT QLoRA checkpoints are trained on; x86 CPU kernels
  since 0.47, CUDA. Measured here (bench/quant.py): its NF4 forward+backward is ~1.2x an fp32 Linear's
  on this CPU, torchao's NF4 tensor ~3.3x, so bitsandbytes is the default.
- ``torchao``: torchao's ``NF4Tensor`` (pure torch: the same code on CPU and CUDA, FSDP2-aware) in
  :class:`TorchaoNF4Linear`; NF4 only (its scales are always double-quantized).

A model transformers loaded with ``BitsAndBytesConfig(load_in_4bit=True)`` (or 8-bit) holds the same
bitsandbytes layers, so it takes adapters as is. The core recognises quantized layers through the
:data:`FORMATS` table (``quantized_layers.py``; ``core/layers.py``), wired in ``deltatune/__init__.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.core.layer import AdaptedLayer
from deltatune.core.layers import quantized_format
from deltatune.integrations.quantized_layers import FORMATS, TorchaoNF4Linear, base_weight_of

__all__ = ["FORMATS", "QUANT_FORMATS", "BACKENDS", "TorchaoNF4Linear", "dequantize", "quantize", "quantized_linear",
           "requantize", "mark_for_transformers", "resident_bytes", "parse_dtype", "base_weight_of"]

QUANT_FORMATS = ("nf4", "int8", "none")
BACKENDS = ("bitsandbytes", "torchao")
#: Output heads stay in full precision by default: they are small next to the body, often tied to
#: the input embedding, and a classifier head usually trains in full.
DEFAULT_SKIP = ("lm_head", "classifier", "score")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"compute dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _import(backend: str) -> Any:
    try:
        if backend == "bitsandbytes":
            import bitsandbytes
            return bitsandbytes
        import torchao.quantization
        return torchao.quantization
    except ImportError as e:  # the one-line error naming what to install
        package = "bitsandbytes>=0.47" if backend == "bitsandbytes" else "torchao>=0.10"
        raise ImportError(f"quantizing with {backend} needs {package}: pip install 'deltatune[quant]' "
                          f"(or pip install '{package}'); import failed: {e}") from None


# --- quantize / dequantize -------------------------------------------------------------------------

def quantize(model: nn.Module, fmt: str = "nf4", *, double_quant: bool = True,
             compute_dtype: torch.dtype | str = torch.float32, backend: str = "bitsandbytes",
             skip: Iterable[str] = DEFAULT_SKIP, blocksize: int = 64,
             rest_dtype: torch.dtype | str | None = None, device: torch.device | str | None = None) -> nn.Module:
    """Replace ``model``'s ``nn.Linear`` layers by frozen ``fmt`` ones, in place; returns ``model``.

    Quantize on the device the model will train on: pass ``device`` (each linear layer moves there
    just before it is quantized, so at most one of them is there in full precision at a time; the
    rest of the model follows at the end), or move the model first. bitsandbytes' int8 layer keeps
    its scales outside the parameter, where ``model.to(...)`` does not move them.

    Args:
        fmt: ``"nf4"`` (4-bit NormalFloat), ``"int8"`` (row-wise absmax) or ``"none"`` (no change).
        double_quant: NF4 only: also quantize the per-block scales (QLoRA's double quantization,
            ~0.37 bits/parameter saved).
        compute_dtype: the dtype the forward dequantizes to (float32, bfloat16, float16).
        backend: ``"bitsandbytes"`` (default) or ``"torchao"`` (NF4 only).
        skip: leave these modules (a name, or the last part(s) of one) in full precision.
        blocksize: NF4 block size (64 as in QLoRA).
        rest_dtype: also store the parameters that stay unquantized (embeddings, norms, the head,
            biases) in this dtype, as transformers does with ``load_in_4bit`` and
            ``torch_dtype=torch.bfloat16`` (QLoRA practice). ``None`` (default): left as they are.
            Buffers (e.g. rotary frequencies) are not touched. Pair bfloat16 with
            ``compute_dtype=torch.bfloat16`` so the activations stay in one dtype.
        device: where to quantize and leave the model (default: where each weight is).
    """
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"quantize must be one of {', '.join(QUANT_FORMATS)}; got {fmt!r}")
    if backend not in BACKENDS:
        raise ValueError(f"quantization backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if fmt == "none":
        return model
    if backend == "torchao" and fmt != "nf4":
        raise ValueError("the torchao backend quantizes to nf4 only; use backend='bitsandbytes' for int8")
    if backend == "torchao" and not double_quant:
        raise ValueError("torchao's NF4 tensor always quantizes its scales; set double_quant=True or use "
                         "backend='bitsandbytes'")
    if any(isinstance(m, AdaptedLayer) for m in model.modules()):
        raise ValueError("quantize the base model before attaching adapters: deltatune.quantize(model, ...) "
                         "then deltatune.attach(model, config)")
    dtype = parse_dtype(compute_dtype)
    rest = None if rest_dtype is None else parse_dtype(rest_dtype)
    target = None if device is None else check_device(device)
    _import(backend)  # the one-line error naming what to install, before any layer changes
    skip = tuple(skip)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear
             and not any(n == s or n.endswith("." + s) for s in skip)]
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        linear = owner.get_submodule(leaf)
        if target is not None:
            linear.to(target)  # only this layer in full precision on the device at a time
        setattr(owner, leaf, quantized_linear(linear, fmt, double_quant=double_quant,
                                              compute_dtype=dtype, backend=backend, blocksize=blocksize))
    if rest is not None:
        cast_rest(model, rest)
    if target is not None:
        model.to(target)  # the rest (embeddings, norms, head); quantized weights are there already
    return model


def check_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device``, or the one-line error when this machine has no such device."""
    where = torch.device(device)
    if where.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"quantize on {where}: torch sees no CUDA device here (torch {torch.__version__}); "
                           "install a CUDA build of torch or quantize on device='cpu'")
    return where


def cast_rest(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store every floating-point parameter outside the quantized layers' weights in ``dtype``, in
    place (tied parameters stay tied: each ``Parameter`` object is cast once, in place)."""
    seen: set[int] = set()
    for module in model.modules():
        quantized = quantized_format(module) is not None
        for name, p in module.named_parameters(recurse=False):
            if p is None or id(p) in seen or (quantized and name == "weight") or not p.is_floating_point():
                continue
            seen.add(id(p))
            p.data = p.data.to(dtype)
    return model


def quantized_linear(linear: nn.Linear, fmt: str, *, double_quant: bool = True,
                     compute_dtype: torch.dtype | str = torch.float32, backend: str = "bitsandbytes",
                     blocksize: int = 64) -> nn.Module:
    """A frozen ``fmt`` copy of one ``nn.Linear`` (what :func:`quantize` puts in its place)."""
    lib = _import(backend)
    try:
        return _quantized(lib, backend, linear, fmt, double_quant, parse_dtype(compute_dtype), blocksize)
    except (RuntimeError, NotImplementedError, AttributeError, AssertionError) as e:
        device = linear.weight.device
        raise RuntimeError(f"{backend} cannot quantize to {fmt} on {device.type} here ({type(e).__name__}: {e}); "
                           f"install a {backend} build for this device, or try the other backend / "
                           "quantize: none") from e


def _quantized(lib: Any, backend: str, linear: nn.Linear, fmt: str, double_quant: bool,
               dtype: torch.dtype, blocksize: int) -> nn.Module:
    weight, bias = linear.weight.detach(), linear.bias
    device = weight.device
    d_in, d_out = linear.in_features, linear.out_features
    if backend == "torchao":
        new = TorchaoNF4Linear(d_in, d_out, bias=bias is not None, device="meta")
        if weight.numel() % blocksize:
            raise ValueError(f"torchao's NF4 needs a weight size divisible by the block size {blocksize}; a "
                             f"{d_out}x{d_in} weight is not: use backend='bitsandbytes' or skip=[...] that layer")
        # scales are quantized in blocks of 256 (QLoRA), or of the largest divisor of their number
        scaler_block = math.gcd(weight.numel() // blocksize, 256)
        nf4 = lib.to_nf4(weight.to(dtype).contiguous(), block_size=blocksize, scaler_block_size=scaler_block)
        new.weight = nn.Parameter(nf4, requires_grad=False)
    elif fmt == "nf4":
        bnb = lib.nn
        new = bnb.Linear4bit(d_in, d_out, bias=bias is not None, compute_dtype=dtype, compress_statistics=double_quant,
                             quant_type="nf4", device="meta")
        new.weight = bnb.Params4bit(weight.to(dtype), requires_grad=False, blocksize=blocksize,
                                    compress_statistics=double_quant, quant_type="nf4", module=new).to(device)
        # Without this, bitsandbytes repacks the weight in place on the first no-grad eval forward on
        # an AVX512-BF16 CPU (absmax rounded to bf16): eval outputs would differ from training's, and it
        # fails for layers narrower than a block. Training never takes that path anyway.
        new.support_avx512bf16_for_cpu = False
    else:
        bnb = lib.nn
        new = bnb.Linear8bitLt(d_in, d_out, bias=bias is not None, has_fp16_weights=False, threshold=0.0, device="meta")
        # Quantized here, on the weight's device: ``Int8Params.to(device)`` quantizes only a weight
        # moving off the CPU, so a CUDA weight would stay floating point. The same row-wise absmax
        # as its own quantization (fp16 first).
        import bitsandbytes.functional as F

        CB, SCB, _ = F.int8_vectorwise_quant(weight.to(torch.float16).contiguous())  # (d_out, d_in), (d_out,)
        new.weight = bnb.Int8Params(CB, requires_grad=False, has_fp16_weights=False, CB=CB, SCB=SCB)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    new.train(linear.training)
    return new


def dequantize(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Replace every quantized linear layer (bases of adapted layers included) by an ``nn.Linear`` with
    the dequantized weight, in place; returns ``model``. ``dtype``: the new weights' dtype (default:
    the dequantized one). Merging needs a floating-point base (``core/merge.py``)."""
    target = None if dtype is None else parse_dtype(dtype)
    names = [n for n, m in model.named_modules() if n and quantized_format(m) is not None]
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        module = owner.get_submodule(leaf)
        entry, _ = quantized_format(module)  # type: ignore[misc]
        weight = entry.dequantize(module).detach()
        if target is not None:
            weight = weight.to(target)
        new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        new.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.detach().to(weight.dtype), requires_grad=False)
        new.train(module.training)
        setattr(owner, leaf, new)
    return model


def resident_bytes(model: nn.Module) -> int:
    """Bytes the model's tensors occupy (parameters, buffers and quantization state such as NF4
    scales; a tensor shared by several modules counted once)."""
    seen: set[int] = set()
    total = 0
    for t in model.state_dict(keep_vars=True).values():
        for inner in _storage_tensors(t):
            ptr = inner.untyped_storage().data_ptr()
            if ptr in seen:
                continue
            seen.add(ptr)
            total += inner.untyped_storage().nbytes()
    return total


def _storage_tensors(t: Any) -> list[Tensor]:
    """The plain tensors behind ``t`` (a tensor subclass such as torchao's NF4Tensor holds several)."""
    if not isinstance(t, Tensor):
        return []
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return [x for n in names for x in _storage_tensors(getattr(t, n))]
    if isinstance(t, nn.Parameter) and type(t.data) is not torch.Tensor:
        return _storage_tensors(t.data)
    return [t.detach()]


def requantize(model: nn.Module, fmt: str, **kwargs: Any) -> dict[str, float]:
    """:func:`quantize` a full-precision (e.g. merged) model and report the rounding error of its
    quantized weights against the full-precision ones: ``max_abs_error``, ``mean_abs_error`` (over
    every weight value of the quantized layers) and ``layers``. ``kwargs`` go to :func:`quantize`."""
    skip = tuple(kwargs.get("skip", DEFAULT_SKIP))
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear
              and not any(n == s or n.endswith("." + s) for s in skip)}
    quantize(model, fmt, **kwargs)
    worst, total, count = 0.0, 0.0, 0
    for name, weight in before.items():
        diff = (base_weight_of(model.get_submodule(name)).float() - weight.float()).abs()  # (d_out, d_in)
        worst, total, count = max(worst, diff.max().item()), total + diff.sum().item(), count + diff.numel()
    return {"max_abs_error": worst, "mean_abs_error": total / max(count, 1), "layers": len(before)}


def mark_for_transformers(model: nn.Module, fmt: str, double_quant: bool = True,
                          compute_dtype: torch.dtype | str = torch.float32, skip: Iterable[str] = DEFAULT_SKIP) -> None:
    """Record in ``model.config`` how :func:`quantize` stored it (bitsandbytes), so transformers'
    ``save_pretrained`` writes a checkpoint that ``from_pretrained`` reloads quantized, as it would a
    model it quantized itself."""
    from transformers import BitsAndBytesConfig

    dtype = parse_dtype(compute_dtype)
    if fmt == "nf4":
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=list(skip))
    else:
        qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip))
    model.config.quantization_config = qc
