"""``deltatune export RUN --format gguf --output FILE``: a decoder's adapter as a llama.cpp LoRA adapter.

llama.cpp applies an adapter file to a base model it has loaded from GGUF: for a weight tensor
``blk.N.attn_q.weight`` it looks up ``blk.N.attn_q.weight.lora_a`` (r, d_in) and ``.lora_b``
(d_out, r) and computes ``W x + (α / r) · b (a x)``, with one ``adapter.lora.alpha`` for the
file and r read per tensor (``general.type = adapter``, ``adapter.type = lora``). Its own
converter (``convert_lora_to_gguf.py``) reads PEFT files only, exits on DoRA magnitudes and on
embedding or head weights trained in full, and ignores rsLoRA's ``α/√r``.

Here every adapted layer of the run becomes an exact ``(a, b)`` pair:

- a plain low-rank adapter (the :class:`~deltatune.core.contract.LowRank` capability) gives its
  factors ``(A, B, s)``; the scaling s (α/r, α/√r for rsLoRA, or any other) is folded into b;
- any other adapter that merges into the weight (LoHa, VeRA, AdaLoRA, LoRA on embeddings...)
  is merged into a copy of the layer and its update ``ΔW`` factored by SVD; when ``ΔW`` has
  low numerical rank k the rank-k factors reproduce it to float32 precision, and they are written.
  A full-rank update (DoRA's column re-normalisation, (IA)³'s scaling, OFT's rotation, BitFit's
  bias, a module trained in full) has no exact low-rank form: the export is refused, naming the
  layer and the reason, and pointing to the merged-model route;
- all pairs are zero-padded to one rank R and ``adapter.lora.alpha = R``, so llama.cpp's
  ``α / r`` is 1 for every tensor whatever its own rank;
- Llama-family q/k weights are stored by llama.cpp with rows permuted for its rotary layout, so
  their b factors are permuted the same way; ``token_embd`` pairs use llama.cpp's embedding
  layout (a: (vocab, r), b: (dim, r)); an adapter on tied embeddings or a tied head is refused
  (llama.cpp has one tensor for both, so the update could not apply to one of them only).

The file is then read back with gguf's reader and the merged weights rebuilt from it in PyTorch
must equal deltatune's own merge (largest difference reported); otherwise nothing is written.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: transformers ``model_type`` -> (gguf architecture, whether llama.cpp permutes q/k rows).
ARCHES: dict[str, tuple[str, bool]] = {
    "llama": ("LLAMA", True),
    "mistral": ("LLAMA", True),
    "qwen2": ("QWEN2", False),
}
RANK_TOLERANCE = 1e-5  # singular values below this fraction of the largest count as zero (float32 noise)


def need_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ValueError("GGUF export needs the gguf package: pip install 'deltatune[export]'") from None
    return gguf


@dataclass
class Pair:
    """One llama.cpp LoRA pair for the base tensor ``name``; ``delta = b @ a`` (linear) or ``a @ b.T`` (embedding)."""

    name: str
    module: str
    a: Tensor
    b: Tensor
    how: str
    embedding: bool = False
    permute_heads: int | None = None  # rows of b permuted like llama.cpp's q/k, with this many heads


def permute(w: Tensor, heads: int) -> Tensor:
    """llama.cpp's q/k row order (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``): per head, the
    two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: Tensor, heads: int) -> Tensor:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def plan(model: nn.Module, adapter: str) -> tuple[str, list[Pair]]:
    """(gguf architecture name, the pairs) for adapter ``adapter`` on ``model``; ``ValueError`` naming
    the first layer that llama.cpp cannot carry exactly, and why."""
    import deltatune as dt
    from deltatune.core.contract import is_low_rank
    from deltatune.core.records import adapted_layers
    from deltatune.core.layer import FullCopy

    gguf = need_gguf()
    cfg = model.config
    if cfg.model_type not in ARCHES:
        raise ValueError(f"GGUF export knows the {', '.join(ARCHES)} architectures; this model is a "
                         f"{cfg.model_type!r}: export it with --format onnx")
    arch_key, permutes = ARCHES[cfg.model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_key)
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    method = dt.configs(model)[adapter].method
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    pairs = []
    layers = [(name, layer) for name, layer in adapted_layers(model) if adapter in layer.adapters]
    if not layers:
        raise ValueError(f"the {method} adapter changes no weight (it adds virtual tokens or a key/value "
                         "prefix), which llama.cpp's LoRA adapters cannot carry; export with --format onnx")
    for name, layer in layers:
        part = layer.adapters[adapter]
        where = names.get_name(name)
        if isinstance(part, FullCopy):
            raise ValueError(f"{name} is trained in full, and llama.cpp adapters carry low-rank updates only; "
                             "export the merged model (deltatune merge, then llama.cpp's convert_hf_to_gguf.py)")
        if where is None:
            raise ValueError(f"{method} on {name}: llama.cpp has no tensor for this module; export with --format onnx")
        embedding = isinstance(layer.base, nn.Embedding)
        if tied and where in ("token_embd", "output"):
            raise ValueError(f"{method} on {name}: this model ties its input embeddings and output head, which "
                             "llama.cpp holds as one tensor, so an update to one of them cannot be carried; "
                             "train without adapting the embeddings or head, or export with --format onnx")
        if is_low_rank(part) and not embedding:
            A, B, s = part.low_rank_factors()                     # (k, d_in), (d_out, k)
            a, b, how = A.detach().float(), B.detach().float() * s, f"low-rank factors, scaling {s:g} folded into b"
        else:
            a, b, how = _factor(name, method, layer.base, part, embedding)
        heads = None
        role = where.rsplit(".", 1)[-1]
        if permutes and role in ("attn_q", "attn_k"):  # llama.cpp's rotary row order (see permute)
            heads = cfg.num_attention_heads if role == "attn_q" else (cfg.num_key_value_heads or cfg.num_attention_heads)
            b = permute(b, heads)
        pairs.append(Pair(f"{where}.weight", name, a.contiguous(), b.contiguous(), how, embedding, heads))
    return gguf.MODEL_ARCH_NAMES[arch], pairs


@torch.no_grad()
def _factor(name: str, method: str, base: nn.Module, part: nn.Module, embedding: bool) -> tuple[Tensor, Tensor, str]:
    """The update ``part`` makes to ``base.weight``, as exact low-rank factors (a, b); or ValueError."""
    if not getattr(part, "mergeable", False):
        raise ValueError(f"{method} on {name} adds computation that cannot be folded into the weight, and llama.cpp "
                         "adapters carry low-rank weight updates only; export with --format onnx")
    merged = copy.deepcopy(base)
    part.merge_into(merged)
    for pname, p in base.named_parameters():
        if pname != "weight" and not torch.equal(p, dict(merged.named_parameters())[pname]):
            raise ValueError(f"{method} on {name} changes its {pname}, and llama.cpp adapters carry weight "
                             "updates only; export with --format onnx")
    delta = (merged.weight.double() - base.weight.double())         # (d_out, d_in), or (V, d) for embeddings
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    top = float(S[0]) if S.numel() else 0.0
    k = int((S > top * RANK_TOLERANCE).sum()) if top > 0 else 0
    if k > min(delta.shape) // 2:
        raise ValueError(f"{method} on {name}: its weight update has rank {k} of {min(delta.shape)} (full rank: it "
                         "rescales or rotates the whole weight), so no llama.cpp LoRA pair holds it exactly; "
                         "export the merged model with --format onnx (or deltatune merge, then llama.cpp's "
                         "convert_hf_to_gguf.py)")
    k = max(k, 1)
    root = S[:k].sqrt()
    left, right = U[:, :k] * root, Vh[:k].T * root                   # delta = left @ right.T
    how = f"merged update factored exactly at rank {k} (SVD)"
    if embedding:  # llama.cpp: token_embd.lora_a (V, k), lora_b (d, k); delta_E = a @ b.T
        return left.float(), right.float(), how
    return right.T.float(), left.float(), how                          # a (k, d_in), b (d_out, k)


def pad(pairs: list[Pair]) -> int:
    """Zero-pad every pair to the largest rank (exact: the extra rows/columns add 0); return it."""
    rank = max(p.a.shape[1] if p.embedding else p.a.shape[0] for p in pairs)
    for p in pairs:
        k = p.a.shape[1] if p.embedding else p.a.shape[0]
        if k < rank:
            p.b = torch.cat([p.b, p.b.new_zeros(p.b.shape[0], rank - k)], dim=1)
            extra = (p.a.new_zeros(p.a.shape[0], rank - k), 1) if p.embedding else (p.a.new_zeros(rank - k, p.a.shape[1]), 0)
            p.a = torch.cat([p.a, extra[0]], dim=extra[1])
    return rank


def write(path: Path, arch: str, pairs: list[Pair], alpha: float, meta: dict[str, str]) -> None:
    """The adapter file, written beside ``path`` and renamed onto it."""
    gguf = need_gguf()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(str(tmp), arch=arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for key, value in meta.items():
            writer.add_string(key, value)
        for p in pairs:
            writer.add_tensor(f"{p.name}.lora_a", p.a.numpy().astype("float32"))
            writer.add_tensor(f"{p.name}.lora_b", p.b.numpy().astype("float32"))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


SOURCE_KEY = "adapter.deltatune.source"  # in every adapter this module writes


def written_here(path: Path) -> bool:
    """Whether ``path`` is a GGUF adapter that this exporter wrote (its metadata holds ``SOURCE_KEY``)."""
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            return False
    try:
        return SOURCE_KEY in need_gguf().GGUFReader(str(path)).fields
    except (ValueError, OSError, IndexError):  # a damaged file: not one of ours to replace
        return False


def read(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(metadata, tensors) of a GGUF file, through gguf's own reader."""
    gguf = need_gguf()
    reader = gguf.GGUFReader(str(path))
    meta = {}
    for field in reader.fields.values():
        if field.types and field.types[0] == gguf.GGUFValueType.STRING:
            meta[field.name] = bytes(field.parts[field.data[0]]).decode()
        elif field.types and len(field.data) == 1:
            meta[field.name] = field.parts[field.data[0]].tolist()[0]
    tensors = {t.name: torch.from_numpy(t.data.copy()).reshape([int(n) for n in reversed(t.shape.tolist())])
               for t in reader.tensors}
    return meta, tensors


def rebuilt_delta(tensors: dict[str, Tensor], alpha: float, pair: Pair) -> Tensor:
    """The weight update llama.cpp applies for ``pair.name``, from the file, in transformers' layout."""
    a, b = tensors[f"{pair.name}.lora_a"].double(), tensors[f"{pair.name}.lora_b"].double()
    scale = alpha / b.shape[1]                                     # llama.cpp: alpha / rank (rank = b's columns)
    if pair.embedding:
        return (a @ b.T) * scale                                   # (V, d)
    delta = (b @ a) * scale                                        # (d_out, d_in), llama.cpp's row order
    return unpermute(delta, pair.permute_heads) if pair.permute_heads else delta


def export_gguf(run: str | Path, output: Path, overrides: dict[str, Any] | None = None,
                say: Any = print) -> dict[str, Any]:
    """Write the run's adapter as a llama.cpp LoRA adapter at ``output``, check it, return the facts."""
    import deltatune as dt
    from deltatune.export.tasks import GGUF_KINDS
    from deltatune.train import load_trained
    from deltatune.train.models import read_trained

    need_gguf()
    output = Path(output)
    if output.suffix != ".gguf":
        raise ValueError(f"--output {output} should be a .gguf file")
    if output.is_dir():
        raise ValueError(f"--output {output} is a directory; give a .gguf file")
    if output.exists() and not written_here(output):  # e.g. the base model's own .gguf: never replaced
        raise ValueError(f"--output {output} exists and deltatune did not write it; choose another file name, "
                         "or move that file away first")
    recorded = read_trained(run, overrides)
    if recorded.kind != "adapter":
        raise ValueError(f"{run} holds a full model, not an adapter; export it with --format onnx")
    if recorded.task.kind not in GGUF_KINDS:
        raise ValueError(f"llama.cpp runs decoders; this run's task {recorded.config.task!r} is a "
                         f"{recorded.task.kind}: export it with --format onnx")
    if recorded.config.quantize != "none":  # the factors are exact; the base llama.cpp adds them to is the user's
        loftq = " and LoftQ's starting factors, which fit only that base's rounding" if getattr(
            recorded.config, "loftq_iterations", 0) else ""
        say(f"note: this adapter trained on an {recorded.config.quantize} base{loftq}; llama.cpp adds it to the "
            "base model you give it, so its answers match the trained model's only as far as that base matches")
    trained = load_trained(run, overrides)
    model = dt.dequantize(trained.model)  # the check merges: into the weights the adapter trained against
    method = dt.configs(model)[trained.adapter].method
    arch, pairs = plan(model, trained.adapter)
    rank = pad(pairs)
    meta = {"general.name": f"deltatune {trained.config.method} adapter ({trained.config.task})",
            SOURCE_KEY: str(trained.source)}
    output.parent.mkdir(parents=True, exist_ok=True)
    check_path = output.with_name(f".{output.name}.check-{os.getpid()}")
    try:
        write(check_path, arch, pairs, rank, meta)
        worst = check(check_path, model, pairs)
        os.replace(check_path, output)
    finally:
        check_path.unlink(missing_ok=True)
    say(f"read back {output.name}: weights rebuilt from it equal deltatune's merge within {worst:.2e}")
    hows = sorted({p.how.split(",")[0] for p in pairs})
    return {"format": "gguf", "architecture": arch, "tensors": 2 * len(pairs), "layers": len(pairs), "rank": rank,
            "alpha": float(rank), "bytes": output.stat().st_size, "max_abs_diff": worst, "conversion": hows,
            "method": method}


@torch.no_grad()
def check(path: Path, model: nn.Module, pairs: list[Pair]) -> float:
    """Read ``path`` back; base + its updates must equal deltatune's merge of ``model`` (which this merges)."""
    import deltatune as dt

    meta, tensors = read(path)
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise RuntimeError(f"{path} does not read back as a LoRA adapter ({meta.get('general.type')!r})")
    alpha = float(meta["adapter.lora.alpha"])
    modules = dict(model.named_modules())
    bases = {p.module: modules[p.module].base.weight.detach().double().clone() for p in pairs}
    dt.merge_and_unload(model)  # deltatune's own merge: the reference
    modules = dict(model.named_modules())
    worst = 0.0
    for p in pairs:
        merged = modules[p.module].weight.double()
        rebuilt = bases[p.module] + rebuilt_delta(tensors, alpha, p)
        diff = float((merged - rebuilt).abs().max())
        tolerance = 1e-5 * max(1.0, float(merged.abs().max()))
        if not diff <= tolerance:
            raise RuntimeError(f"{p.name}: weights rebuilt from the GGUF file differ from deltatune's merge by "
                               f"{diff:.3g} (tolerance {tolerance:.3g}); nothing written")
        worst = max(worst, diff)
    return worst
