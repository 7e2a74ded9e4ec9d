#!/usr/bin/env bash
# The GPU figures of docs/quality.md and docs/benchmarks.md, on one H100:
#
#   bash scripts/benchmarks/gpu_checks.sh OUTPUT_DIR [STAGE ...]
#   (stages: smoke benchmark compiled train quality quality-more, default all of them; options and upcycle
#   only when named)
#
# smoke:        the quality experiment and the benchmark at toy sizes on the GPU; stops here if either fails (1 min).
# benchmark:    scripts/benchmarks/benchmark.py --device cuda, float32 then bfloat16 (one JSON each), alone on the GPU (1 min).
# compiled:     its `generate` section with --compile (static caches, compiled decode steps) at 512 and 16k contexts,
#               float32 then bfloat16 (one JSON each; compilation takes most of the 2-4 min).
# train:        scripts/benchmarks/train_benchmark.py --device cuda: BST-SH/MH/MF and the residual-only BST
#               (docs/quality.md's best) against Llama and Mistral at the base presets' and the upcycled SmolLM2's
#               shapes, bf16 autocast, 32k tokens a step, 2k-64k, eager then compiled within TRAIN_SECONDS (points
#               that do not fit are skipped and recorded); then torch.profiler on one BST-SH/residual-only/MH/MF and
#               one Llama layer at d 1024, 4k and 16k, bf16 (kernels per layer, top operators by GPU time); then the
#               FFT convolution's error in fp32/fp16/bf16 against float64, and its time. Three JSONs, about 5 min.
# quality:      scripts/experiments/quality_experiment.py --device cuda at 3x the CPU budget (batch 16 x 600 steps of 512
#               tokens, 4.9M tokens per run), books and code, seeds 0-2 of the BST variants, Slide, Mistral and
#               Llama, one process per (corpus, seed), and three ablations on books, one process per seed: 15
#               processes sharing the GPU (CUDA MPS when it starts), 4 min.
# quality-more: RecurrentGemma (chunked scan) on both corpora, seeds 0-2; seeds 3-4 of the other models; two more
#               ablations on books: 17 processes, 3 min.
# Then one merged report of every run under OUTPUT_DIR/runs: quality_results_gpu.json, quality_gpu.md, figures.
# options:      (only when named) the from-scratch comparison of docs/quality.md on the scaled gated backbone
#               (--gated_mlp --scaled_backbone --initializer_range 0.05) at the same budget: the plain BST, the SSM
#               through the residual branch only with Mistral's window (the CPU budget's best), the residual branch
#               beside cross-attention with that window, Slide, Slide with that window, Mistral-SWA, Llama and
#               RecurrentGemma, books and code, seeds 0-4, one process per (corpus, seed): 10 processes, about 6 min;
#               its own report in OUTPUT_DIR/options (the backbone differs from the quality stages', so the two do
#               not merge).
# upcycle:      (only when named) scripts/benchmarks/upcycle_stage.sh: SmolLM2-135M upcycled into a BST, its control and
#               the evaluation by length, into OUTPUT_DIR/upcycle (needs SMOLLM2_GGUF and UPCYCLE_TOKENS; about 8 min).
#
# Needs data/books, data/code (scripts/prepare_data.py) and a CUDA build of torch. Each stage has a time limit
# (environment: BENCHMARK_SECONDS per dtype, QUALITY_SECONDS per quality stage); a stage that runs out keeps the
# runs it finished.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUTPUT_DIR=${1:?usage: bash scripts/benchmarks/gpu_checks.sh OUTPUT_DIR}
DEVICE=${DEVICE:-cuda}
BENCHMARK_SECONDS=${BENCHMARK_SECONDS:-150}
COMPILED_SECONDS=${COMPILED_SECONDS:-150}
TRAIN_SECONDS=${TRAIN_SECONDS:-180}
PROFILE_SECONDS=${PROFILE_SECONDS:-75}
# GPU calls take milliseconds: more repeats than the CPU default, and two warm-up calls (cuFFT plans, allocator).
BENCHMARK_TIMING=(--repeats 9 --warmup 2 --max-call-seconds 20 --seconds-per-point 3 --max-memory-gb 70)
QUALITY_SECONDS=${QUALITY_SECONDS:-300}
mkdir -p "$OUTPUT_DIR"/{logs,runs,figures}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
started=$(date +%s)
elapsed() { echo "[$(( $(date +%s) - started ))s] $*"; }
shift
STAGES=${*:-smoke benchmark compiled train quality quality-more}
wanted() { [[ " $STAGES " == *" $1 "* ]]; }

python - <<'EOF' 2>&1 | tee "$OUTPUT_DIR/logs/versions.log"
import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
EOF

# The experiment's settings: every process and the merge must agree on them (the merge checks).
QUALITY_SETTINGS=(--device "$DEVICE" --batch_size 16 --max_steps 600 --warmup_steps 30 --eval_every 50
                  --data_dir data --work_dir runs/quality --threads 1)

# 0. Smoke: every model, one ablation and every benchmark section at toy sizes.
smoke=$OUTPUT_DIR/smoke
wanted smoke && elapsed "smoke"
if wanted smoke && ! timeout 120 python scripts/experiments/quality_experiment.py --quick --device "$DEVICE" --corpora books \
        --eval_spans 1 --seeds 0 \
        --models bst-sh-s4,bst-mh-s4,bst-mf-s4,bst-sh-unstructured,slide,mistral-swa,recurrentgemma,llama \
        --ablations "bst-sh-s4 attend_previous_block" --work_dir "$smoke" \
        --output_json "$smoke/quality.json" --figure_dir "$smoke" --markdown "$smoke/quality.md" \
        > "$OUTPUT_DIR/logs/smoke_quality.log" 2>&1; then
    tail -30 "$OUTPUT_DIR/logs/smoke_quality.log"; echo "smoke: quality experiment failed"; exit 1
fi
if wanted smoke && ! timeout 120 python scripts/benchmarks/benchmark.py --quick --device "$DEVICE" \
        --output "$smoke/benchmark.json" --figures-dir "$smoke" > "$OUTPUT_DIR/logs/smoke_benchmark.log" 2>&1; then
    tail -30 "$OUTPUT_DIR/logs/smoke_benchmark.log"; echo "smoke: benchmark failed"; exit 1
fi

# 1. Speed, alone on the GPU.
wanted benchmark && for dtype in float32 bfloat16; do
    elapsed "benchmark $dtype"
    timeout "$BENCHMARK_SECONDS" python scripts/benchmarks/benchmark.py --device "$DEVICE" --dtypes "$dtype" \
        "${BENCHMARK_TIMING[@]}" --note "one GPU, alone; figures of scripts/benchmarks/gpu_checks.sh" \
        --output "$OUTPUT_DIR/benchmark_gpu_$dtype.json" --figures-dir "$OUTPUT_DIR/figures" \
        > "$OUTPUT_DIR/logs/benchmark_$dtype.log" 2>&1 || echo "benchmark $dtype: exit $?"
    grep -A40 "^Layer forward" "$OUTPUT_DIR/logs/benchmark_$dtype.log" | head -60
done

wanted compiled && for dtype in float32 bfloat16; do
    elapsed "compiled decoding $dtype"
    timeout "$COMPILED_SECONDS" python scripts/benchmarks/benchmark.py --device "$DEVICE" --dtypes "$dtype" --sections generate \
        --compile --decode-contexts 512 16k "${BENCHMARK_TIMING[@]}" --note "one GPU, alone; compiled decoding, scripts/benchmarks/gpu_checks.sh" \
        --output "$OUTPUT_DIR/benchmark_gpu_compiled_$dtype.json" --figures-dir "$OUTPUT_DIR/figures/compiled" \
        > "$OUTPUT_DIR/logs/compiled_$dtype.log" 2>&1 || echo "compiled $dtype: exit $?"
    grep -A30 "^Generation" "$OUTPUT_DIR/logs/compiled_$dtype.log" | head -40
done

# Upcycling SmolLM2 (docs/upcycling.md), alone on the GPU.
if wanted upcycle; then
    elapsed "upcycle"
    DEVICE=$DEVICE bash scripts/benchmarks/upcycle_stage.sh "$OUTPUT_DIR/upcycle" 2>&1 | tee "$OUTPUT_DIR/logs/upcycle.log"
fi

# The script keeps to its budget and writes its JSON after every group of points; the timeout is the backstop
# (on SIGTERM it writes what it measured).
if wanted train; then
    elapsed "train"
    # Mistral in a process of its own: its first eager step (SDPA with a sliding-window mask, torch 2.11+cu130,
    # H200) ended 0.6.6's run with a CUDA illegal memory access, which kills the process and every point after it.
    timeout -k 20 "$((TRAIN_SECONDS + 40))" python scripts/benchmarks/train_benchmark.py --device "$DEVICE" \
        --models bst-sh llama bst-residual bst-mh bst-mf --budget-seconds "$TRAIN_SECONDS" \
        --note "one GPU, alone; scripts/benchmarks/gpu_checks.sh train" \
        --output "$OUTPUT_DIR/benchmark_train_gpu.json" --figures-dir "$OUTPUT_DIR/figures" \
        > "$OUTPUT_DIR/logs/train.log" 2>&1 || echo "train: exit $?"
    grep -A30 "^Training tokens/s" "$OUTPUT_DIR/logs/train.log"
    timeout -k 20 "$((TRAIN_SECONDS / 2 + 40))" python scripts/benchmarks/train_benchmark.py --device "$DEVICE" \
        --models bst-sh mistral --budget-seconds "$((TRAIN_SECONDS / 2))" \
        --note "one GPU, alone; scripts/benchmarks/gpu_checks.sh train (Mistral apart)" --no-plots \
        --output "$OUTPUT_DIR/benchmark_train_gpu_mistral.json" > "$OUTPUT_DIR/logs/train_mistral.log" 2>&1 \
        || echo "train, Mistral: exit $?"
    grep -A30 "^Training tokens/s" "$OUTPUT_DIR/logs/train_mistral.log"
    if grep -q "CUDA error\|illegal memory access" "$OUTPUT_DIR/logs/train_mistral.log"; then
        # SDPA's kernel for a boolean sliding-window mask crashed again: Mistral's window block-sparse instead.
        timeout -k 20 "$((TRAIN_SECONDS / 2 + 40))" python scripts/benchmarks/train_benchmark.py --device "$DEVICE" \
            --models bst-sh mistral --budget-seconds "$((TRAIN_SECONDS / 2))" --baseline-attention flex_attention \
            --note "one GPU, alone; gpu_checks.sh train (Mistral apart, flex_attention after SDPA crashed)" \
            --no-plots --output "$OUTPUT_DIR/benchmark_train_gpu_mistral_flex.json" \
            > "$OUTPUT_DIR/logs/train_mistral_flex.log" 2>&1 || echo "train, Mistral (flex_attention): exit $?"
        grep -A30 "^Training tokens/s" "$OUTPUT_DIR/logs/train_mistral_flex.log"
    fi
    elapsed "profile of one layer"
    timeout -k 10 "$PROFILE_SECONDS" python scripts/benchmarks/benchmark.py --device "$DEVICE" --dtypes bfloat16 \
        --sections profile --profile-layers bst-sh-s4 bst-sh-s4-residual-swa bst-mh-s4 bst-mf-s4 llama \
        --profile-lengths 4k 16k \
        --hidden-size 1024 --num-heads 8 --intermediate-size 4096 --block-size 512 --no-plots \
        --note "one GPU, alone; scripts/benchmarks/gpu_checks.sh train" --output "$OUTPUT_DIR/profile_layers_gpu.json" \
        > "$OUTPUT_DIR/logs/profile.log" 2>&1 || echo "profile: exit $?"
    grep -E "^Profile of|operator calls" "$OUTPUT_DIR/logs/profile.log"
    elapsed "FFT convolution in fp32/fp16/bf16 against float64"
    timeout -k 10 60 python scripts/benchmarks/fft_precision.py --device "$DEVICE" \
        --note "one GPU, alone; scripts/benchmarks/gpu_checks.sh train" --output "$OUTPUT_DIR/fft_precision_gpu.json" \
        --figure "$OUTPUT_DIR/figures/fft_precision.png" > "$OUTPUT_DIR/logs/fft_precision.log" 2>&1 \
        || echo "fft precision: exit $?"
    cat "$OUTPUT_DIR/logs/fft_precision.log"
fi

# 2. Quality. MPS lets the small processes' kernels share the GPU instead of time-slicing it; without it the
# processes still run, slower.
if (wanted quality || wanted quality-more || wanted options) && [ "${DEVICE%%:*}" = cuda ] \
        && command -v nvidia-cuda-mps-control > /dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if timeout 20 nvidia-cuda-mps-control -d && timeout 60 python -c "import torch; torch.ones(1, device='cuda')"; then
        elapsed "CUDA MPS on"
    else
        timeout 10 sh -c 'echo quit | nvidia-cuda-mps-control'
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
        elapsed "CUDA MPS did not start: processes time-slice the GPU"
    fi
fi
launch() {  # name, then the experiment's selection flags; results in OUTPUT_DIR/${RUN_DIR:-runs}
    local name=$1 runs=$OUTPUT_DIR/${RUN_DIR:-runs}
    shift
    timeout "$QUALITY_SECONDS" python scripts/experiments/quality_experiment.py "${QUALITY_SETTINGS[@]}" "$@" \
        --output_json "$runs/$name.json" --figure_dir "$runs/figures-$name" \
        --markdown "$runs/$name.md" > "$OUTPUT_DIR/logs/$name.log" 2>&1 &
}
MAIN_MODELS=bst-sh-s4,slide,mistral-swa,llama,bst-mf-s4,bst-mh-s4,bst-sh-unstructured
if wanted quality; then
    elapsed "quality: seeds 0-2, ablations on books"
    for corpus in books code; do
        for seed in 0 1 2; do
            launch "main-$corpus-$seed" --corpora "$corpus" --seeds "$seed" --no_ablation --models "$MAIN_MODELS"
        done
    done
    for seed in 0 1 2; do
        launch "ablation-books-$seed" --corpora books --seeds "$seed" --ablations_only --models bst-sh-s4,slide \
            --ablations "bst-sh-s4 attend_previous_block;slide attend_previous_block;bst-sh-s4 in every layer"
    done
    wait
fi
if wanted quality-more; then
    elapsed "quality-more: RecurrentGemma, seeds 3-4, more ablations on books"
    for corpus in books code; do
        for seed in 0 1 2; do
            launch "recurrentgemma-$corpus-$seed" --corpora "$corpus" --seeds "$seed" --no_ablation \
                --models recurrentgemma
        done
        for seed in 3 4; do
            launch "more-$corpus-$seed-a" --corpora "$corpus" --seeds "$seed" --no_ablation \
                --models bst-sh-s4,slide,mistral-swa
            launch "more-$corpus-$seed-b" --corpora "$corpus" --seeds "$seed" --no_ablation \
                --models llama,bst-mf-s4,bst-mh-s4,bst-sh-unstructured
        done
    done
    for seed in 0 1 2; do
        launch "ablation-more-books-$seed" --corpora books --seeds "$seed" --ablations_only \
            --models bst-mh-s4,bst-mf-s4 --ablations "bst-mh-s4 attend_previous_block;bst-mf-s4 attend_previous_block"
    done
fi
if wanted options; then
    elapsed "options: the scaled gated backbone, the residual-only SSM with Mistral's window, seeds 0-4"
    mkdir -p "$OUTPUT_DIR/options"
    BACKBONE=(--gated_mlp --scaled_backbone --initializer_range 0.05)
    OPTION_MODELS=bst-sh-s4+residual+nocross+swa,slide,mistral-swa,bst-sh-s4,bst-sh-s4+residual+swa,slide+swa,llama
    OPTION_MODELS=$OPTION_MODELS,recurrentgemma
    for corpus in books code; do
        for seed in 0 1 2 3 4; do
            RUN_DIR=options launch "options-$corpus-$seed" "${BACKBONE[@]}" --corpora "$corpus" --seeds "$seed" \
                --no_ablation --models "$OPTION_MODELS"
        done
    done
    wait
    python scripts/experiments/quality_experiment.py "${QUALITY_SETTINGS[@]}" "${BACKBONE[@]}" --report_only \
        --corpora books,code --merge_json "$OUTPUT_DIR"/options/*.json \
        --output_json "$OUTPUT_DIR/options_results_gpu.json" --figure_dir "$OUTPUT_DIR/options-figures" \
        --markdown "$OUTPUT_DIR/quality_options_gpu.md" > "$OUTPUT_DIR/logs/options-merge.log" 2>&1 \
        || echo "options merge failed"
    tail -40 "$OUTPUT_DIR/logs/options-merge.log"
fi
wait
elapsed "quality processes done"
grep -h -o "\[[a-z]*\] [^:]* seed [0-9]*: train.*" "$OUTPUT_DIR"/logs/*.log
grep -l -E "Traceback|Error" "$OUTPUT_DIR"/logs/*.log && echo "(see those logs)"
ls "$OUTPUT_DIR"/runs/*.json > /dev/null 2>&1 || { elapsed "done (no quality runs)"; exit 0; }
python scripts/experiments/quality_experiment.py "${QUALITY_SETTINGS[@]}" --report_only --corpora books,code \
    --merge_json "$OUTPUT_DIR"/runs/*.json --output_json "$OUTPUT_DIR/quality_results_gpu.json" \
    --figure_dir "$OUTPUT_DIR/figures" --markdown "$OUTPUT_DIR/quality_gpu.md" > "$OUTPUT_DIR/logs/merge.log" 2>&1 \
    || { tail -20 "$OUTPUT_DIR/logs/merge.log"; echo "merge failed"; }
tail -40 "$OUTPUT_DIR/logs/merge.log"
elapsed "done"
