"""``deltatune export --list [RUN ...]``: which export formats apply to which runs, and why not.

Without runs: the table of formats by task kind. With runs: for each, ``onnx`` and ``gguf`` with
yes / no and the reason; for ``gguf`` the adapter is loaded and planned layer by layer (no file is
written), so "yes" means the export would succeed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltatune.export.tasks import GGUF_KINDS, SPECS

TABLE = [
    ("onnx", "merged model as ONNX (+ --quantize int8), checked with ONNX Runtime",
     f"runs whose task kind is {', '.join(SPECS)}"),
    ("gguf", "llama.cpp LoRA adapter, read back and checked",
     f"adapter runs whose task kind is {', '.join(GGUF_KINDS)}, on a Llama/Mistral/Qwen2 decoder, whose every "
     "adapted layer has an exact low-rank update (LoRA, rsLoRA, LoHa, VeRA, AdaLoRA...; not DoRA, (IA)3, OFT, "
     "bottlenecks, prompts, tied embeddings)"),
]


def describe(runs: list[Path], overrides: dict[str, Any]) -> str:
    if not runs:
        lines = ["format  what it writes                                                 applies to"]
        lines += [f"{name:<7} {what:<62} {where}" for name, what, where in TABLE]
        lines.append("give runs (deltatune export --list runs/*) to check each one")
        return "\n".join(lines)
    out = []
    for run in runs:
        out.append(f"{run}:")
        for fmt, (ok, why) in applicable(run, overrides).items():
            out.append(f"  {fmt:<5} {'yes' if ok else 'no '}  {why}")
    return "\n".join(out)


def applicable(run: Path, overrides: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    """{format: (applies, why)} for one run."""
    from deltatune.train.models import read_trained

    try:
        recorded = read_trained(run, overrides)
    except ValueError as err:
        return {"onnx": (False, str(err)), "gguf": (False, str(err))}
    kind, task = recorded.task.kind, recorded.config.task
    result = {"onnx": (kind in SPECS, f"task {task!r} ({kind})" + ("" if kind in SPECS else
                                                                 f": ONNX export knows {', '.join(SPECS)}"))}
    if recorded.kind != "adapter":
        result["gguf"] = (False, "a full model, not an adapter (llama.cpp adapters are LoRA pairs)")
    elif kind not in GGUF_KINDS:
        result["gguf"] = (False, f"task {task!r} is a {kind}; llama.cpp runs decoders ({', '.join(GGUF_KINDS)})")
    else:
        result["gguf"] = _plan(run, overrides)
    return result


def _plan(run: Path, overrides: dict[str, Any]) -> tuple[bool, str]:
    from deltatune.export.gguf import pad, plan
    from deltatune.train import load_trained

    try:
        trained = load_trained(run, overrides)
        arch, pairs = plan(trained.model, trained.adapter)
    except ValueError as err:
        return False, str(err)
    return True, f"{len(pairs)} layers as {arch} LoRA pairs of rank {pad(pairs)}"
