#!/usr/bin/env python
"""Perplexity of a saved causal language model on a held-out split, at several evaluation lengths.

The split's documents are tokenised, each ended by the end-of-sequence token, and concatenated in document order.
From that stream, `--max_tokens` tokens are taken as evenly spaced chunks of the longest evaluation length; every
evaluation length L cuts the same chunks into non-overlapping windows of L tokens and evaluates each window on its
own (no state carried between windows). All lengths therefore score the same text, and the differences between them
come from how much context the model gets. The default lengths are 1x, 4x and 16x the training length
(`config.training_length`, which scripts/train.py sets to `--sequence_length`): a model that generalises
beyond its training length gets a lower perplexity at longer lengths, one that does not gets a higher one.

    python scripts/evaluate.py --model_name_or_path runs/quickstart --dataset_name data/books --split test

Loss by slot inside a block: window position t predicts token t + 1 and sits at slot t % W, W = config.block_size
for a BST (or `--block_size`, which puts a model without blocks, such as Llama, on the same slots; without either the
diagnostic is skipped). Self-attention never crosses a block boundary, so at the first slots only the SSM can bring
context from earlier blocks: a block-attention model without SSM has a high loss at slot 0 that falls with the slot, a
full-attention model is flat. Predictions in the first block of each window are left out (no model has anything
before them). Reported for every length in the JSON and, at the training length, as a table by slot group, a plot, and
the "context gain": mean loss at slots 0-3 minus mean loss over the last half of the block (nats).
`--ssm_ablation` (BST) scores the training-length windows again with every SSM output replaced by zeros (forward
hooks), which shows how much of that the SSM accounts for. `loss_by_slot()` lives in bst_tools/evaluation.py.

Writes Markdown tables to stdout, `perplexity_vs_length.json`, `perplexity_vs_length.png` and `loss_by_slot.png` to
`--output_dir` (default: the model folder).
"""

import argparse
import json
import math
import os
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import modeling_bst  # noqa: F401  (registers model_type "bst" with the Auto classes; `pip install -e .`)
from bst_tools.data import DataArguments, load_raw_datasets
from bst_tools.evaluation import loss_by_slot, ssm_zeroed, summarise_slots


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="A folder saved by scripts/train.py.")
    parser.add_argument("--tokenizer_name", default=None, help="Default: the tokenizer saved with the model.")
    parser.add_argument("--dataset_name", default=None, help="A local folder ({split}.jsonl) or a dataset name.")
    parser.add_argument("--eval_file", default=None, help="A .jsonl or text file to evaluate instead.")
    parser.add_argument("--split", default="test", help="Which split of --dataset_name. Default: test.")
    parser.add_argument("--text_column", default="text")
    parser.add_argument(
        "--training_length",
        type=int,
        default=None,
        help="The length the model was trained at. Default: config.training_length.",
    )
    parser.add_argument(
        "--length_multipliers",
        default="1,4,16",
        help="Evaluation lengths as multiples of the training length. Default: 1,4,16.",
    )
    parser.add_argument(
        "--lengths", default=None, help="Explicit evaluation lengths (overrides --length_multipliers)."
    )
    parser.add_argument(
        "--max_tokens",
        type=int,
        default=2**17,
        help="Tokens scored per length: whole chunks of the longest length, at least one. Default: 131072.",
    )
    parser.add_argument(
        "--tokens_per_batch", type=int, default=16384, help="Batch size in tokens (at least 1 window)."
    )
    parser.add_argument(
        "--block_size",
        type=int,
        default=None,
        help="Block size W of the loss-by-slot diagnostic. Default: config.block_size (BST). Models without blocks "
        "(Llama, Mistral) have no default: pass the W of the BST you compare them with, or the diagnostic is skipped.",
    )
    parser.add_argument(
        "--ssm_ablation",
        action="store_true",
        help="BST only: score the training-length windows a second time with every SSM output replaced by zeros, "
        "to show how much of the loss by slot the SSM accounts for (one more pass over the 1x windows).",
    )
    parser.add_argument("--bf16", action="store_true", help="Evaluate under bf16 autocast.")
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--output_dir", default=None, help="Where the JSON and PNG go. Default: the model folder.")
    parser.add_argument("--no_plot", action="store_true", help="Skip the PNG (no matplotlib needed).")
    return parser.parse_args(argv)


def evaluation_lengths(args, training_length):
    if args.lengths:
        lengths = [int(value) for value in args.lengths.split(",")]
    else:
        lengths = [int(round(float(value) * training_length)) for value in args.length_multipliers.split(",")]
    if any(length < 2 for length in lengths):
        raise ValueError(f"Evaluation lengths must be at least 2 tokens, got {lengths}.")
    return sorted(set(lengths))


def token_stream(documents, tokenizer, text_column):
    """All documents of the split as one stream of token ids, each document ended by the end-of-sequence token."""
    tokenized = documents.map(
        lambda batch: {
            "input_ids": [
                ids + [tokenizer.eos_token_id]
                for ids in tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
            ]
        },
        batched=True,
        remove_columns=documents.column_names,
        desc="Tokenising",
    )
    return np.fromiter((token for ids in tokenized["input_ids"] for token in ids), dtype=np.int64)


def select_chunks(stream, chunk_length, max_tokens):
    """Evenly spaced, non-overlapping chunks of `chunk_length` tokens, at most `max_tokens` tokens in all."""
    available = len(stream) // chunk_length
    if available == 0:
        raise ValueError(
            f"The split holds {len(stream)} tokens, fewer than the longest evaluation length ({chunk_length}). "
            "Evaluate at shorter lengths (--lengths) or on a larger split."
        )
    count = max(1, min(available, max_tokens // chunk_length))
    starts = np.linspace(0, available - 1, count).round().astype(int) * chunk_length
    return np.stack([stream[start : start + chunk_length] for start in starts])


def format_slot_table(row, block_size):
    """Markdown table of the loss by slot group at one evaluation length, with the SSM-ablated column when present."""
    slots, ablated = row["loss_by_slot"], row.get("loss_by_slot_without_ssm")

    def cell(value):
        return "n/a" if value is None else f"{value:.4f}"

    lines = [
        f"Next-token loss by slot inside a block (block_size {block_size}) at length {row['length']}; slot = "
        f"position % block_size of the predicting token; blocks after the first of each window:",
        "",
        "| slots | predictions | loss | " + ("loss without SSM | " if ablated else "") + "accuracy |",
        "|---|---:|---:|" + ("---:|" if ablated else "") + "---:|",
    ]
    for index, group in enumerate(slots["groups"]):
        first, end = (int(slot) for slot in group["slots"].split("-"))
        hits = sum(a * c for a, c in zip(slots["accuracy"][first : end + 1], slots["count"][first : end + 1]) if c)
        accuracy = hits / group["count"] if group["count"] else None
        extra = f"{cell(ablated['groups'][index]['loss'])} | " if ablated else ""
        lines.append(f"| {group['slots']} | {group['count']} | {cell(group['loss'])} | {extra}{cell(accuracy)} |")
    early_end = min(4, block_size // 2) - 1
    extra = f"{cell(ablated['context_gain'])} | " if ablated else ""
    lines.append(
        f"| context gain (slots 0-{early_end} minus {block_size // 2}-{block_size - 1}, nats) | | "
        f"{cell(slots['context_gain'])} | {extra}|"
    )
    return "\n".join(lines)


def plot_slots(row, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for key, label in (("loss_by_slot", "model"), ("loss_by_slot_without_ssm", "SSM outputs zeroed")):
        if row.get(key) is not None:
            line = axis.plot(range(len(row[key]["loss"])), row[key]["loss"], marker=".", alpha=0.4, label=label)[0]
            # Per-slot values are noisy (few predictions each); the group means carry the comparison.
            for group in row[key]["groups"]:
                first, last = (int(slot) for slot in group["slots"].split("-"))
                axis.hlines(group["loss"], first, last, color=line.get_color(), linewidth=2.5)
    # symlog: the first slots, where a block has no context of its own yet, get as much room as the rest.
    axis.set_xscale("symlog", linthresh=4)
    axis.set_xlabel("slot inside the block (position % block_size); thick: mean over slot groups")
    axis.set_ylabel("next-token loss (nats)")
    axis.set_title(title, fontsize=9)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot(results, training_length, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [row["length"] for row in results]
    perplexities = [row["perplexity"] for row in results]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(lengths, perplexities, marker="o")
    axis.axvline(training_length, color="gray", linestyle="--", label=f"training length ({training_length})")
    axis.set_xscale("log", base=2)
    axis.set_xticks(lengths, [str(length) for length in lengths])
    axis.set_xlabel("evaluation length (tokens, non-overlapping windows)")
    axis.set_ylabel("perplexity")
    axis.set_title(title)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.model_name_or_path):
        raise ValueError(f"--model_name_or_path {args.model_name_or_path!r} is not a folder.")
    if (args.dataset_name is None) == (args.eval_file is None):
        raise ValueError("give exactly one of --dataset_name and --eval_file.")
    if args.eval_file is not None and not os.path.isfile(args.eval_file):
        raise ValueError(f"--eval_file {args.eval_file!r} does not exist.")
    if (
        args.dataset_name is not None
        and not os.path.exists(args.dataset_name)
        and args.dataset_name.startswith((".", "/"))
    ):
        raise ValueError(f"--dataset_name {args.dataset_name!r} does not exist.")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size "
            f"({model.config.vocab_size}): it does not belong to this model."
        )
    # Older BST configs stored the training length in max_position_embeddings; BSTConfig moves it to
    # training_length on load. Other models have no training_length: fall back to their maximum length.
    training_length = (
        args.training_length
        or getattr(model.config, "training_length", None)
        or getattr(model.config, "max_position_embeddings", None)
    )
    if not training_length:
        raise ValueError("The config records no training length: give --training_length.")
    lengths = evaluation_lengths(args, training_length)
    block_size = args.block_size or getattr(model.config, "block_size", None)
    if block_size is not None and block_size < 2:
        raise ValueError(f"--block_size must be at least 2, got {block_size}.")
    if args.ssm_ablation and model.config.model_type != "bst":
        raise ValueError(f"--ssm_ablation needs a BST model; this one is {model.config.model_type!r}.")
    # The slot table, plot and SSM ablation use the training length (or the evaluated length closest to it); every
    # length gets its per-slot arrays in the JSON.
    slot_length = min(lengths, key=lambda length: abs(length - training_length))

    if args.eval_file is not None:
        split = "validation"
        data_args = DataArguments(validation_file=args.eval_file, text_column=args.text_column)
    else:
        split = args.split
        data_args = DataArguments(dataset_name=args.dataset_name, text_column=args.text_column)
    documents = load_raw_datasets(data_args, splits=(split,))[split]
    stream = token_stream(documents, tokenizer, args.text_column)
    chunks = select_chunks(stream, max(lengths), args.max_tokens)
    print(
        f"{args.model_name_or_path}: {len(documents)} {split} documents, {len(stream)} tokens; scoring "
        f"{chunks.size} of them at lengths {lengths} (training length {training_length})"
    )
    if block_size is None:
        print("No block size (the config has none and --block_size was not given): no loss by slot.")

    def score(windows, length):
        """One pass over the windows: overall loss, and the per-slot summary when there is a block size."""
        batch_size = max(1, args.tokens_per_batch // length)
        if block_size is None:  # the overall loss only; one "block" as long as the window keeps every position
            return loss_by_slot(model, windows, length, batch_size, device, args.bf16, skip_first_block=False), None
        stats = loss_by_slot(model, windows, block_size, batch_size, device, args.bf16)
        return stats, summarise_slots(stats) if stats["count"].sum() > 0 else None

    results = []
    for length in lengths:
        # Cut every chunk into non-overlapping windows of `length` tokens (any remainder is dropped).
        per_chunk = chunks.shape[1] // length
        windows = torch.from_numpy(chunks[:, : per_chunk * length].reshape(-1, length))
        start = time.perf_counter()
        stats, slots = score(windows, length)
        seconds = time.perf_counter() - start
        loss = stats["total_nll"] / stats["total_count"]
        row = {
            "length": length,
            "times_training_length": length / training_length,
            "windows": len(windows),
            "predicted_tokens": stats["total_count"],
            "loss": loss,
            "perplexity": math.exp(loss),
            "tokens_per_second": windows.numel() / seconds,
        }
        if block_size is not None:
            # Blocks after the first of each window only (see loss_by_slot); None when the window holds one block.
            row["loss_by_slot"] = slots
        if args.ssm_ablation and length == slot_length:
            with ssm_zeroed(model):
                ablated_stats, ablated_slots = score(windows, length)
            row["loss_without_ssm"] = ablated_stats["total_nll"] / ablated_stats["total_count"]
            row["loss_by_slot_without_ssm"] = ablated_slots
        results.append(row)

    print()
    print("| length | x training | windows | predicted tokens | loss | perplexity | tokens/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in results:
        print(
            f"| {row['length']} | {row['times_training_length']:g} | {row['windows']} | {row['predicted_tokens']} | "
            f"{row['loss']:.4f} | {row['perplexity']:.2f} | {row['tokens_per_second']:.0f} |"
        )

    slot_row = next(row for row in results if row["length"] == slot_length)
    if block_size is not None and slot_row["loss_by_slot"] is None:
        print(f"\nNo loss by slot: windows of {slot_length} tokens hold a single block of {block_size}.")
    elif block_size is not None:
        print()
        print(format_slot_table(slot_row, block_size))

    output_dir = args.output_dir or args.model_name_or_path
    os.makedirs(output_dir, exist_ok=True)
    report = {
        "model": args.model_name_or_path,
        "data": args.eval_file or f"{args.dataset_name}:{split}",
        "documents": len(documents),
        "split_tokens": int(len(stream)),
        "training_length": training_length,
        "block_size": block_size,
        "loss_by_slot_length": slot_length if block_size is not None else None,
        "device": str(device),
        "bf16": args.bf16,
        "results": results,
    }
    json_path = os.path.join(output_dir, "perplexity_vs_length.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nWrote {json_path}")
    if not args.no_plot:
        png_path = os.path.join(output_dir, "perplexity_vs_length.png")
        title = f"{os.path.basename(os.path.normpath(args.model_name_or_path))} on {report['data']}"
        plot(results, training_length, title, png_path)
        print(f"Wrote {png_path}")
        if block_size is not None and slot_row["loss_by_slot"] is not None:
            slots_path = os.path.join(output_dir, "loss_by_slot.png")
            plot_slots(slot_row, f"{title}, length {slot_length}", slots_path)
            print(f"Wrote {slots_path}")
    return report


if __name__ == "__main__":
    main()
