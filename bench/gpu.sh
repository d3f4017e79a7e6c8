#!/usr/bin/env bash
# The CUDA run, as one prepared script for a borrowed GPU machine (no network, its own torch).
#
#   bash bench/gpu.sh [SECTION ...]     sections: env tests bf16 quant serve_step serve (default: all)
#
# Before: `bash bench/gpu_carry.sh` here fills .gpu/ (ignored by git) with the locked wheels the
# GPU machine lacks and the built-in models' config and tokenizer files; the call carries `.gpu`.
# On the machine the wheels install into /tmp/site, bench/twins.py builds random-weight twins of
# the built-in models (their weights cannot travel: time and memory figures only, never task
# quality), and each section runs under its own time limit, writing into /tmp/gpuout. After every
# section everything is packed into $OUT/gpu.tgz, so a run cut short still returns what finished.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
RES=/tmp/gpuout
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
sections=("$@")
((${#sections[@]})) || sections=(env tests bf16 quant serve_step serve)

pack() { tar -czf "$OUT/gpu.tgz.tmp" -C "$RES" . && mv "$OUT/gpu.tgz.tmp" "$OUT/gpu.tgz"; }

# run NAME LIMIT CMD...: one section, its log in $RES/NAME.log, a one-line result on stdout
run() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=5 "$limit" "$@" >"$RES/$name.log" 2>&1
    rc=$?
    echo "== $name rc=$rc in $((SECONDS - start)) s"
    tail -n 30 "$RES/$name.log"
    pack
}

if [[ -d .gpu/whl && -z ${NO_WHEELS:-} ]]; then  # NO_WHEELS=1: use this Python's packages (a dry run here)
    start=$SECONDS
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
        >"$RES/install.log" 2>&1 || { echo "wheel install failed"; tail -20 "$RES/install.log"; pack; exit 1; }
    echo "== wheels installed in $((SECONDS - start)) s"
fi
export PYTHONPATH=/tmp/twins/pkgs:/tmp/site:$PWD/src:$PWD
export DELTATUNE_CACHE=/tmp/twins/cache
# The twins build (about 25 s) while the first section that needs none (env, tests) runs.
$PY -m bench.twins --models .gpu/models --into /tmp/twins >"$RES/twins.log" 2>&1 &
twins=$!
twins_ready() {
    [[ -z $twins ]] && return
    wait "$twins" || { echo "== twins failed"; tail -20 "$RES/twins.log"; }
    twins=
}

for s in "${sections[@]}"; do
    [[ $s == env || $s == tests ]] || twins_ready
    case $s in
    env)
        twins_ready
        run env 60 bash -c "nvidia-smi; $PY - <<'EOF'
import importlib, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))
for m in ['transformers', 'peft', 'torchao', 'bitsandbytes', 'fastapi', 'uvicorn', 'openai', 'pydantic', 'huggingface_hub', 'deltatune']:
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, '__version__', '?'), mod.__file__)
    except Exception as e:
        print(m, 'FAILED', type(e).__name__, e)
a = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(10): a @ b
e.record(); torch.cuda.synchronize()
print('bf16 8192^3 matmul TFLOP/s', round(10 * 2 * 8192**3 / (s.elapsed_time(e) / 1e3) / 1e12, 1))
from importlib.metadata import version
print({p: version(p) for p in ['accelerate', 'hf-xet', 'regex', 'tqdm', 'click', 'typer', 'rich', 'safetensors', 'tokenizers', 'numpy', 'pyyaml', 'httpx', 'anyio']})
def smoke(name, fn):
    try:
        print(name, 'ok', fn())
    except Exception as e:
        print(name, 'FAILED', type(e).__name__, e)
def nf4():
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    w = torch.randn(256, 256, device='cuda', dtype=torch.bfloat16)
    return (to_nf4(w).get_original_weight() - w).abs().max().item()
def bnb4():
    import bitsandbytes as bnb
    lin = bnb.nn.Linear4bit(256, 256, compute_dtype=torch.bfloat16, quant_type='nf4').cuda()
    return tuple(lin(torch.randn(4, 256, device='cuda', dtype=torch.bfloat16)).shape)
def llama():
    from transformers import AutoModelForCausalLM
    from deltatune.train.models import smollm2_dir
    m = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.bfloat16).cuda()
    return m(torch.randint(0, 1000, (2, 16), device='cuda')).logits.shape
def cli():
    import subprocess, sys
    return subprocess.run([sys.executable, '-m', 'deltatune', '--help'], capture_output=True, text=True).returncode
for n, f in [('torchao-nf4', nf4), ('bnb-nf4', bnb4), ('smollm2-twin', llama), ('cli', cli)]:
    smoke(n, f)
EOF"
        ;;
    tests)
        run tests "${T_TESTS:-75}" $PY -m pytest -q -p no:cacheprovider -n 6 -k "not cpu" tests/gpu  # the CPU half runs in CI
        ;;
    bf16)  # issue 20: the training step best against best on CUDA, both batch sizes, roofline
        run bf16 "${T_BF16:-95}" $PY -m bench.bf16 --device cuda --workloads minilm smollm2 --sizes default gpu \
            --rounds 5 --steps-per-round 3 --budget-s "$(( ${T_BF16:-95} - 25 ))" --out "$RES/bf16-cuda.json"
        ;;
    quant)  # issue 13: fp32 / bf16 / int8 / NF4 (bitsandbytes, torchao) / PEFT + bitsandbytes on CUDA
        run quant "${T_QUANT:-100}" $PY -m bench.quant_device --device cuda --budget-s "$(( ${T_QUANT:-100} - 20 ))" \
            --out "$RES/quant-cuda.json"
        ;;
    serve_step)  # issue 18: the engine's decode step and prefill, base / 1 / 32 / 256 adapters
        run serve_step "${T_STEP:-45}" $PY -m bench.serve_step --device cuda --rows 64 --adapters 32,256 --rounds 6 \
            --steps 5 --phases decode,layer,prefill,prefill-padded --adapter-cache /tmp/adapters \
            --out "$RES/serve_step-cuda.json"
        ;;
    serve)  # issue 18: HTTP load generator against deltatune serve on CUDA, and PEFT's baseline
        run serve "${T_SERVE:-110}" $PY -m bench.serve_http --device cuda --clients 64 --max-tokens 32 --warmup 1 \
            --seconds 2.5 --pairs 2 --adapters 1,32,256 --adapter-cache /tmp/adapters --out "$RES/serve-http-cuda.json"
        ;;
    *)
        echo "== $s: no such section (env tests bf16 quant serve_step serve)"
        ;;
    esac
done
pack
echo "== done; results in $OUT/gpu.tgz"
