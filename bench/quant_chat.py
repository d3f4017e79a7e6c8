"""Chat held-out reply loss on a quantized SmolLM2-135M base: does the NF4 gap close with training?

    python -m bench.quant_chat --train              # fp32 / NF4 / int8 LoRA, 96 steps, validation every 24
    python -m bench.quant_chat --untrained          # no training: the bases alone, and LoftQ at several ranks
    python -m bench.quant_chat --untrained --loftq '' --variants nf4,nf4-bs32,nf4-skip-v,nf4-bs32-skip-v \
        --out bench/results/quant-chat-untrained-levers.json   # NF4 levers at 4 bits: block 32, v_proj kept
    python -m bench.quant_chat --layer-errors --variants nf4,nf4-bs32,int8   # which layers' rounding costs most
    python -m bench.quant_chat --loftq-errors --loftq 8:1,8:5,16:1,16:5   # LoftQ's weight error only
    python -m bench.quant_chat --train --formats nf4 --set loftq_iterations=1 --tag -loftq1 \
        --out bench/results/quant-chat-levers.json     # one lever; rows add up in that file

``--train`` runs ``deltatune train``'s code (run_training) once per base with the same settings and
seed: LoRA r 8 on every linear layer (the chat task's defaults: alpha 16, dropout 0.05, lr 5e-4,
linear schedule), batch 4, max length 128, ``--examples`` training pairs (one epoch), validation
loss every ``--every`` steps on 96 held-out pairs, test loss at the end on 96 other pairs. Only the
base's storage differs (``quantize=none|nf4|int8``). ``bench.quant --quality-only smollm2`` is the
shorter 24-step run of the same kind.

``--untrained`` scores the bases with no adapter trained, on the validation and test pairs: fp32,
NF4, int8, and NF4 with LoftQ's initialisation (``dt.loftq``) at the ranks and iterations given —
LoftQ's adapter carries part of the quantization error, so the untrained loss says how much of the
gap it can remove before any training.

Writes bench/results/quant-chat-train.json / quant-chat-untrained.json (one row at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
SETS = ["model=smollm2-135m", "task=chat", "data.max_eval_examples=96", "epochs=1", "batch_size=4",
        "max_length=128", "loss_chunk=256", "tensorboard=false", "precision=fp32"]


def _write(path: Path, payload: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def train(formats: list[str], examples: int, every: int, seeds: list[int], extra: list[str],
          path: Path = RESULTS / "quant-chat-train.json", tag: str = "") -> None:
    from deltatune.train import load_config, run_training
    from deltatune.train.chat import ChatTask

    ChatTask.samples = 0  # no generations: loss only
    from deltatune.train import runner as runner_module

    reports: list[Any] = []
    real_apply = runner_module.apply_loftq
    runner_module.apply_loftq = lambda model: reports.append(real_apply(model))  # keep LoftQ's weight errors
    command = "python -m bench.quant_chat " + " ".join(sys.argv[1:])
    settings = SETS + [f"data.max_train_examples={examples}", f"eval_every={every}", *extra]
    out: dict[str, Any] = {"command": command, "settings": settings, "load_before": list(os.getloadavg()), "runs": {}}
    if path.name != "quant-chat-train.json" and path.exists():  # a file of several commands: rows add up
        out = {"runs": json.loads(path.read_text())["runs"]}
    for seed in seeds:
        for fmt in formats:
            with tempfile.TemporaryDirectory() as tmp:
                config = load_config(None, [*SETS, f"data.max_train_examples={examples}", f"eval_every={every}",
                                            f"seed={seed}", f"quantize={fmt}", f"output={tmp}/run", *extra])
                t0, load_before = time.perf_counter(), list(os.getloadavg())
                reports.clear()
                m = run_training(config, progress=False)
            row = {"command": command, "settings": settings, "seed": seed, "quantize": fmt,
                   "load_before": load_before, "test_loss": m["test_loss"], "base_test_loss": m.get("base_test_loss"), "steps": m["steps"],
                   "validation": [{k: v for k, v in r.items() if k in ("step", "loss", "epoch")}
                                  for r in m.get("validation", [])],
                   "train_cpu_seconds": m.get("train_cpu_seconds"), "wall_s": round(time.perf_counter() - t0, 1),
                   "load_after": list(os.getloadavg())}
            if reports and reports[0] is not None:
                row["loftq_weight_error"] = {"layers": reports[0].layers, "before": reports[0].before,
                                             "after": reports[0].after}
            out["runs"][f"{fmt}{tag}-seed{seed}"] = row
            _write(path, out)
            print(fmt, seed, {k: row[k] for k in ("test_loss", "base_test_loss", "validation")}, flush=True)
    print(f"wrote {path}")


def loftq_errors(loftq: list[tuple[int, int]]) -> None:
    """LoftQ's relative weight approximation error before (plain NF4) and after, no scoring."""
    import copy

    import deltatune as dt
    from deltatune.integrations.loftq import loftq_quantize
    from deltatune.train import load_config
    from deltatune.train.chat import ChatTask
    from deltatune.train.models import load_model

    config = load_config(None, [*SETS, "output=/tmp/unused"])
    model = load_model(config.model, ChatTask(), None, config).model
    path = RESULTS / "quant-chat-loftq-errors.json"
    out: dict[str, Any] = {"command": "python -m bench.quant_chat " + " ".join(sys.argv[1:]),
                           "load_before": list(os.getloadavg()), "rows": {}}
    for rank, iterations in loftq:
        lora = dt.LoraConfig(target="all-linear", rank=rank, alpha=2 * rank, dropout=0.05)
        t0 = time.perf_counter()
        report, _ = loftq_quantize(copy.deepcopy(model), lora, "nf4", iterations=iterations)
        out["rows"][f"nf4-loftq-r{rank}-it{iterations}"] = {
            "layers": report.layers, "weight_error_before": report.before, "weight_error_after": report.after,
            "seconds": round(time.perf_counter() - t0, 1)}
        _write(path, out)
        print(rank, iterations, out["rows"][f"nf4-loftq-r{rank}-it{iterations}"], flush=True)
    out["load_after"] = list(os.getloadavg())
    _write(path, out)
    print(f"wrote {path}")


#: ``--variants`` for ``--untrained``: NF4 levers at the same 4 bits, as deltatune.quantize keywords
#: (the training options quantize_blocksize / quantize_skip). "skip" adds to the head.
VARIANTS: dict[str, dict[str, Any]] = {
    "nf4": {}, "int8": {"fmt": "int8"}, "nf4-bs32": {"blocksize": 32},
    "nf4-skip-v": {"skip": ("v_proj",)}, "nf4-bs32-skip-v": {"blocksize": 32, "skip": ("v_proj",)},
    "nf4-skip-vk": {"skip": ("v_proj", "k_proj")}, "nf4-skip-o": {"skip": ("o_proj",)},
    "nf4-bs32-skip-vk": {"blocksize": 32, "skip": ("v_proj", "k_proj")},
}


def untrained(loftq: list[tuple[int, int]], variants: tuple[str, ...] | list[str] = ("nf4", "int8"),
              path: Path = RESULTS / "quant-chat-untrained.json") -> None:
    """Held-out reply loss of each base with no trained adapter (LoftQ's initial adapter included)."""
    from deltatune.integrations.quantize import DEFAULT_SKIP, resident_bytes

    import deltatune as dt
    from deltatune.train import load_config
    from deltatune.train.chat import ChatTask
    from deltatune.train.models import load_model

    config = load_config(None, [*SETS, "output=/tmp/unused"])
    task = ChatTask()
    splits = task.load_splits(config)
    loaded = load_model(config.model, task, None, config)
    model, tokenizer = loaded.model, loaded.tokenizer
    encoded = {k: task.encode(tokenizer, getattr(splits, k), config.max_length) for k in ("validation", "test")}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    run = lambda m, b: m(**b)  # noqa: E731

    def score(m: torch.nn.Module) -> dict[str, float]:
        m.eval()
        return {k: task.evaluate(m, items, tokenizer, 16, run)["loss"] for k, items in encoded.items()}

    def fresh() -> torch.nn.Module:
        model.load_state_dict(state)
        import copy
        return copy.deepcopy(model)

    out: dict[str, Any] = {"command": "python -m bench.quant_chat " + " ".join(sys.argv[1:]),
                           "load_before": list(os.getloadavg()), "rows": {}}
    rows = out["rows"]
    rows["fp32"] = {**score(model), "resident_bytes": resident_bytes(model)}
    for name in variants:
        kw = dict(VARIANTS[name])
        fmt = kw.pop("fmt", "nf4")
        kw["skip"] = DEFAULT_SKIP + tuple(kw.get("skip", ()))
        quantized = dt.quantize(fresh(), fmt, **kw)
        rows[name] = {**score(quantized), "resident_bytes": resident_bytes(quantized),
                      "load": list(os.getloadavg())}
        _write(path, out)
        print(name, rows[name], flush=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for rank, iterations in loftq:
        m = fresh()
        report = dt.loftq(m, dt.LoraConfig(target=targets, rank=rank, alpha=2 * rank), "nf4", iterations=iterations)
        rows[f"nf4-loftq-r{rank}-it{iterations}"] = {**score(m), "weight_error_before": report.before,
                                                      "weight_error_after": report.after}
        _write(path, out)
        print(rank, iterations, rows[f"nf4-loftq-r{rank}-it{iterations}"], flush=True)
    out["load_after"] = list(os.getloadavg())
    _write(path, out)
    print(f"wrote {path}")


def layer_errors(variants: list[str], pairs: int, path: Path) -> None:
    """Each variant's rounding: relative weight error ‖W − deq(Q)‖ / ‖W‖ (all quantized layers, and the
    worst layer), and the relative output error ‖X (W − deq(Q))ᵀ‖ / ‖X Wᵀ‖ of each kind of layer
    (q_proj ... down_proj, mean over the 30 blocks) on the inputs X it sees from ``pairs`` training
    pairs through the fp32 model: which layers' rounding the model feels most."""
    from torch import nn

    from deltatune.integrations.quantize import base_weight_of, quantized_linear
    from deltatune.train import load_config
    from deltatune.train.chat import ChatTask
    from deltatune.train.models import load_model

    config = load_config(None, [*SETS, "output=/tmp/unused", "data.max_train_examples=384"])
    task = ChatTask()
    loaded = load_model(config.model, task, None, config)
    model, tokenizer = loaded.model, loaded.tokenizer
    items = task.encode(tokenizer, task.load_splits(config).train, config.max_length)[:pairs]
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"}
    grams: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (tokens, d_in)
            grams[name] = grams.get(name, 0) + x.T @ x                  # (d_in, d_in)
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in linears.items()]
    model.eval()
    task.evaluate(model, items, tokenizer, 16, lambda m, b: m(**b))
    for h in hooks:
        h.remove()
    out: dict[str, Any] = {"command": "python -m bench.quant_chat " + " ".join(sys.argv[1:]),
                           "load_before": list(os.getloadavg()), "pairs": pairs, "rows": {}}
    for name in variants:
        kw = dict(VARIANTS[name])
        fmt, skip = kw.pop("fmt", "nf4"), kw.pop("skip", ())
        err = norm = worst = 0.0
        by_kind: dict[str, list[float]] = {}
        for n, m in linears.items():
            if any(n == s or n.endswith("." + s) for s in skip):
                continue
            W = m.weight.detach().double()
            E = base_weight_of(quantized_linear(m, fmt, **kw)).double() - W  # (d_out, d_in)
            e, w = E.pow(2).sum().item(), W.pow(2).sum().item()
            err, norm, worst = err + e, norm + w, max(worst, (e / w) ** 0.5)
            G = grams[n]
            ratio = (torch.einsum("oi,ij,oj->", E, G, E) / torch.einsum("oi,ij,oj->", W, G, W)).item() ** 0.5
            by_kind.setdefault(n.rsplit(".", 1)[-1], []).append(ratio)
        out["rows"][name] = {"weight_error": (err / norm) ** 0.5, "worst_layer_weight_error": worst,
                             "output_error_by_kind": {k: sum(v) / len(v) for k, v in by_kind.items()}}
        _write(path, out)
        print(name, out["rows"][name], flush=True)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", action="store_true")
    p.add_argument("--untrained", action="store_true")
    p.add_argument("--loftq-errors", action="store_true", help="LoftQ's weight error before/after only")
    p.add_argument("--formats", default="none,nf4,int8")
    p.add_argument("--examples", type=int, default=384, help="training pairs (steps = examples / 4)")
    p.add_argument("--every", type=int, default=24, help="validate every N steps")
    p.add_argument("--seeds", default="0")
    p.add_argument("--set", action="append", default=[], help="extra training config key=value")
    p.add_argument("--loftq", default="8:1,8:5,32:1,64:1,64:5", help="rank:iterations pairs for --untrained ('' for none)")
    p.add_argument("--variants", default="nf4,int8", help=f"--untrained bases besides fp32: {', '.join(VARIANTS)}")
    p.add_argument("--layer-errors", action="store_true", help="each --variants' weight and per-layer output error")
    p.add_argument("--pairs", type=int, default=32, help="--layer-errors: training pairs whose inputs X weigh it")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="results file (default bench/results/quant-chat-train.json)")
    p.add_argument("--tag", default="", help="suffix of each run's name, e.g. -r16")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.train:
        train(args.formats.split(","), args.examples, args.every, [int(s) for s in args.seeds.split(",")], args.set,
              Path(args.out) if args.out else RESULTS / "quant-chat-train.json", args.tag)
    if args.loftq_errors:
        loftq_errors([tuple(int(v) for v in pair.split(":")) for pair in args.loftq.split(",")])  # type: ignore[misc]
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if args.layer_errors:
        if unknown:
            p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
        layer_errors(args.variants.split(","), args.pairs,
                     Path(args.out) if args.out else RESULTS / "quant-chat-layer-errors.json")
    if args.untrained:
        unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
        if unknown:
            p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
        untrained([tuple(int(v) for v in pair.split(":")) for pair in args.loftq.split(",") if pair],  # type: ignore[misc]
                  args.variants.split(","), Path(args.out) if args.out else RESULTS / "quant-chat-untrained.json")


if __name__ == "__main__":
    main()
