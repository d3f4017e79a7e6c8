"""One setup's RSS growth over two training steps, in a fresh process (see ``bench.measure``).

``python -m bench.worker WORKLOAD SETUP`` prints one JSON object. ``bench.run`` starts one such
process per setup, so no setup inherits another's heap.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workload")
    parser.add_argument("setup")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from bench import measure, setups
    from bench.workloads import WORKLOADS

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bf16:
        measure.AUTOCAST = torch.bfloat16
    workload = WORKLOADS[args.workload]
    try:
        setup = setups.build(args.setup, workload, workload.build(), copy_base=False)
    except setups.Unavailable as e:
        print(json.dumps({"unavailable": str(e)}))
        return
    if args.checkpointing:
        setups.enable_checkpointing(setup.model)
    batch = workload.make_batch()
    opt = setup.optimizer()
    def step() -> None:
        with setup.engine():
            measure.train_step(setup.model, batch, opt)

    result = measure.rss_growth(step, args.steps)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
