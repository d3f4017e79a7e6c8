"""``python -m bench.multi_adapter``: many LoRA adapters on one base, mixed batches, side by side.

For all-MiniLM-L6-v2 (a forward pass over a batch of 32 examples of 64 tokens) and SmolLM2-135M
(``generate`` for a batch of 32 prompts), with LoRA r=8 on every linear layer of the encoder /
decoder blocks (MiniLM: query, key, value, dense), it times in one process, setups taking turns
(order reversed every other round; medians):

- the bare base model;
- one unmerged adapter active, in deltatune and in Hugging Face PEFT;
- a mixed batch whose rows use 1, 8 or 32 distinct adapters: deltatune's ``routing`` (a batched
  gather + ``bmm`` path), running each group separately (one forward per adapter, deltatune),
  and PEFT's ``adapter_names``.

The adapters hold identical random weights in both libraries, and the run checks that the mixed
batches agree (largest output difference, identical generated tokens). Prints a table and writes
JSON (default ``bench/results/multi_adapter.json``). ``--quick`` uses tiny random models: a smoke
test whose figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.core.routing import routing  # noqa: E402

BERT_TARGET = ["query", "key", "value", "dense"]
LLAMA_TARGET = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GOALS = {"one adapter / base": 1.10, "32 distinct adapters / base": 1.30}


# --- models and adapters -----------------------------------------------------------------------


def _quiet() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_base(kind: str, quick: bool) -> nn.Module:
    _quiet()
    torch.manual_seed(0)  # the tiny --quick models are random: the same weights on every call
    if kind == "minilm":
        from transformers import AutoModel, BertConfig, BertModel

        if quick:
            return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=37, max_position_embeddings=128)).eval()
        from deltatune.train.models import minilm_dir

        return AutoModel.from_pretrained(minilm_dir()).eval()
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if quick:
        return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)).eval()
    from deltatune.train.models import smollm2_dir

    return AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()


def adapter_weights(model: nn.Module, target: list[str], names: list[str], rank: int) -> dict[str, dict]:
    """Attach ``names`` as LoRA adapters with random (non-zero) A and B; return the weights by
    adapter, module and factor, to give PEFT the very same adapters."""
    g = torch.Generator().manual_seed(0)
    weights: dict[str, dict] = {}
    for name in names:
        dt.attach(model, dt.LoraConfig(rank=rank, alpha=2.0 * rank, target=target), name, activate=False)
        weights[name] = {}
        for module_name, layer in model.named_modules():
            if isinstance(layer, dt.AdaptedLayer) and name in layer.adapters:
                lora = layer.adapters[name]
                with torch.no_grad():
                    lora.A.copy_(torch.randn(lora.A.shape, generator=g) / lora.A.shape[1] ** 0.5)
                    lora.B.copy_(torch.randn(lora.B.shape, generator=g) * 0.02)
                weights[name][module_name] = (lora.A.detach(), lora.B.detach())
    return weights


def peft_model(base: nn.Module, target: list[str], weights: dict[str, dict], rank: int) -> nn.Module:
    import peft

    names = list(weights)
    config = lambda: peft.LoraConfig(r=rank, lora_alpha=2.0 * rank, target_modules=target)  # noqa: E731
    model = peft.get_peft_model(base, config(), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config())
    inner = model.base_model.model
    with torch.no_grad():
        for name, modules in weights.items():
            for module_name, (A, B) in modules.items():
                layer = inner.get_submodule(module_name)
                layer.lora_A[name].weight.copy_(A)
                layer.lora_B[name].weight.copy_(B)
    model.set_adapter(names[0])
    return model.eval()


# --- setups ----------------------------------------------------------------------------------------


def _grouped(model: nn.Module, names: list[str], run: Callable[[nn.Module, torch.Tensor], Any],
             rows: torch.Tensor) -> Callable[[], None]:
    """One forward per adapter on its rows: the loop the batched path replaces."""
    groups = {n: torch.tensor([i for i, m in enumerate(names) if m == n]) for n in dict.fromkeys(names)}

    def call() -> None:
        for name, idx in groups.items():
            with routing(model, [name] * len(idx)):  # one adapter for all rows: the plain forward
                run(model, rows[idx])
    return call


def setups(kind: str, args: argparse.Namespace) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """The timed callables of one workload, and a correctness check of the mixed batches."""
    causal = kind == "smollm2"
    target, counts = (LLAMA_TARGET if causal else BERT_TARGET), args.adapters
    names_all = [f"t{i}" for i in range(max(counts))]
    base = load_base(kind, args.quick)
    ours = load_base(kind, args.quick)
    weights = adapter_weights(ours, target, names_all, args.rank)
    theirs = peft_model(load_base(kind, args.quick), target, weights, args.rank)
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (args.batch, args.prompt if causal else args.length), generator=g)

    def run(m: nn.Module, x: torch.Tensor, **extra: Any) -> torch.Tensor:
        if causal:  # a fixed number of new tokens, so that every setup does the same work
            n = args.new_tokens
            return m.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, **extra)
        return m(input_ids=x, attention_mask=torch.ones_like(x), **extra).last_hidden_state

    mix = {n: [names_all[i % n] for i in range(args.batch)] for n in counts}
    fns: dict[str, Callable[[], Any]] = {"base": lambda: run(base, ids)}

    def routed(names: list[str]) -> Callable[[], Any]:
        def call() -> Any:
            with routing(ours, names):
                return run(ours, ids)
        return call

    dt.set_active(ours, names_all[0], trainable=False)  # routing ignores the active adapter
    fns["deltatune: 1 adapter active"] = lambda: run(ours, ids)
    fns["peft: 1 adapter active"] = lambda: run(theirs, ids)
    for n in counts:
        fns[f"deltatune: mixed batch, {n} adapters"] = routed(mix[n])
        fns[f"peft: adapter_names, {n} adapters"] = lambda n=n: run(theirs, ids, adapter_names=mix[n])
        if n > 1:
            fns[f"deltatune: each group separately, {n} adapters"] = _grouped(ours, mix[n], run, ids)

    with torch.inference_mode():
        n = max(counts)
        a, b = fns[f"deltatune: mixed batch, {n} adapters"](), fns[f"peft: adapter_names, {n} adapters"]()
        check = ({"identical_tokens": bool(torch.equal(a, b))} if causal
                 else {"max_abs_diff_vs_peft": float((a - b).abs().max())})
    return fns, check


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each setup; setups take turns, reversed every other round."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                fns[n]()
        for r in range(rounds):
            print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)
            for n in names if r % 2 == 0 else names[::-1]:
                start = clock()
                fns[n]()
                times[n].append(clock() - start)
    return times


# --- report --------------------------------------------------------------------------------------


def summarise(times: dict[str, list[float]], counts: list[int]) -> dict[str, Any]:
    med = {n: statistics.median(t) for n, t in times.items()}
    base, n = med["base"], max(counts)
    ratios = {
        "deltatune: one adapter / base": med["deltatune: 1 adapter active"] / base,
        "peft: one adapter / base": med["peft: 1 adapter active"] / base,
        f"deltatune: {n} distinct adapters / base": med[f"deltatune: mixed batch, {n} adapters"] / base,
        f"peft: {n} distinct adapters / base": med[f"peft: adapter_names, {n} adapters"] / base,
        f"deltatune: {n} distinct / its 1-adapter batch":
            med[f"deltatune: mixed batch, {n} adapters"] / med["deltatune: 1 adapter active"],
        f"peft: {n} distinct / its 1-adapter batch":
            med[f"peft: adapter_names, {n} adapters"] / med["peft: 1 adapter active"],
    }
    return {"median_s": med, "times_s": times, "ratios": ratios}


def table(title: str, summary: dict[str, Any]) -> str:
    med, base = summary["median_s"], summary["median_s"]["base"]
    width = max(len(n) for n in med) + 2
    lines = [title, f"{'setup':<{width}}{'median ms':>11}{'x base':>9}", "-" * (width + 20)]
    lines += [f"{n:<{width}}{1e3 * t:>11.1f}{t / base:>9.2f}" for n, t in med.items()]
    lines.append("")
    lines += [f"  {k}: {v:.2f}" for k, v in summary["ratios"].items()]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.multi_adapter", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=["minilm", "smollm2"], default=["minilm", "smollm2"])
    p.add_argument("--adapters", nargs="+", type=int, default=[1, 8, 32], help="distinct adapters per batch")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=64, help="MiniLM sequence length")
    p.add_argument("--prompt", type=int, default=32, help="SmolLM2 prompt length")
    p.add_argument("--new-tokens", type=int, default=16, help="SmolLM2 tokens generated per prompt")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this thread's CPU time, robust to other processes on a busy machine (needs --threads 1)")
    p.add_argument("--quick", action="store_true", help="tiny random models, 2 rounds: a smoke test")
    p.add_argument("--output", type=Path, default=Path("bench/results/multi_adapter.json"))
    args = p.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu measures one thread: add --threads 1")
    if args.quick:
        args.rounds, args.warmup, args.length, args.prompt, args.new_tokens = 2, 1, 16, 8, 4
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine(), "load_before": os.getloadavg()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "goals": GOALS,
    }
    for kind in args.models:
        fns, check = setups(kind, args)
        clock = time.thread_time if args.clock == "cpu" else time.perf_counter
        summary = summarise(interleaved(fns, args.rounds, args.warmup, clock), args.adapters)
        summary["check"] = check
        result[kind] = summary
        what = (f"generate, {args.batch} prompts x {args.prompt} tokens, {args.new_tokens} new" if kind == "smollm2"
                else f"forward, batch {args.batch} x {args.length} tokens")
        print(table(f"\n{kind}: {what}, LoRA r={args.rank}", summary))
        print(f"  check: {check}")
    result["machine"]["load_after"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}  (load average before {result['machine']['load_before']}, "
          f"after {result['machine']['load_after']})")
    return result


if __name__ == "__main__":
    main()
