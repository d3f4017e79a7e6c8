"""MobileNetV2 inference: the base vs LoRA unmerged vs LoRA merged, interleaved in one run.

    python -m bench.image_merge [--rounds 20] [--batch 32] [--size 64] [--out bench/results/image_merge.json]

The goal (issue 14): "LoRA's merged model exactly as fast as the base at inference". A merged LoRA
is the base architecture with other numbers in its weights (``merge_and_unload`` folds
``s·B A`` into each convolution and removes the wrappers), so the same kernels run; this measures
it. Each round times one forward of each model in turn (order rotated per round), so load on a
shared machine hits all three alike; we report the median seconds per batch and the ratios to the
base, plus the largest logit difference between merged and unmerged. Takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import deltatune as dt
from deltatune.train.image_models import MobileNetV2, pretrained_mobilenet_v2
from deltatune.train.image_task import MOBILENET_STEM_AND_DEPTHWISE


def build(random_weights: bool) -> MobileNetV2:
    if random_weights:
        torch.manual_seed(0)
        return MobileNetV2(10)
    return pretrained_mobilenet_v2(10)[0]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--random-weights", action="store_true", help="skip the packaged weights (tests)")
    parser.add_argument("--out", default="bench/results/image_merge.json")
    args = parser.parse_args(argv)

    base = build(args.random_weights).eval()
    unmerged = copy.deepcopy(base)
    dt.attach(unmerged, dt.LoraConfig(target="all-conv", exclude=(MOBILENET_STEM_AND_DEPTHWISE,), rank=4, alpha=8))
    with torch.no_grad():  # a trained-looking adapter: B away from zero
        for n, p in unmerged.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    unmerged.eval()
    merged = dt.merge_and_unload(copy.deepcopy(unmerged)).eval()
    models = {"base": base, "lora-unmerged": unmerged, "lora-merged": merged}
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {k: [] for k in models}
    load_start = os.getloadavg()
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model(x)
        names = list(models)
        for r in range(args.rounds):
            for name in names[r % 3:] + names[:r % 3]:
                t0 = time.perf_counter()
                models[name](x)
                times[name].append(time.perf_counter() - t0)
        gap = (merged(x).logits - unmerged(x).logits).abs().max().item()
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "batch": args.batch, "size": args.size, "rounds": args.rounds, "random_weights": args.random_weights,
        "median_s": median, "ratio_vs_base": {k: v / median["base"] for k, v in median.items()},
        # each round's time over the same round's base time, then the median: load that changes between
        # rounds cancels better than in the ratio of the medians
        "median_round_ratio_vs_base": {k: statistics.median(t / b for t, b in zip(v, times["base"]))
                                       for k, v in times.items()},
        "merged_vs_unmerged_max_abs_logit_diff": gap,
        "same_modules": [type(m).__name__ for m in merged.modules()] == [type(m).__name__ for m in base.modules()],
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                    "torch": torch.__version__, "python": platform.python_version()},
    }
    print(f"MobileNetV2, batch {args.batch} x {args.size}x{args.size}, median of {args.rounds} interleaved rounds")
    for k in models:
        print(f"  {k:14s} {median[k] * 1000:8.1f} ms  {result['ratio_vs_base'][k]:.3f}x base "
              f"(median per-round ratio {result['median_round_ratio_vs_base'][k]:.3f}x)")
    print(f"  merged vs unmerged logits: max |diff| {gap:.2e}; merged has the base's modules: {result['same_modules']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
