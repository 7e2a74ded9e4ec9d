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

Writes a Markdown table to stdout, `perplexity_vs_length.json` and `perplexity_vs_length.png` to `--output_dir`
(default: the model folder).
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import DataArguments, load_raw_datasets  # noqa: E402  (also registers the "bst" model type)


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


@torch.no_grad()
def score_windows(model, windows, tokens_per_batch, device, bf16):
    """Summed next-token negative log-likelihood and number of predicted tokens over a set of windows."""
    length = windows.shape[1]
    batch_size = max(1, tokens_per_batch // length)
    total_nll, total_predicted = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=f"length {length}", leave=False):
        input_ids = torch.from_numpy(windows[start : start + batch_size]).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=input_ids, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="sum")
        total_nll += nll.item()
        total_predicted += input_ids[:, 1:].numel()
    return total_nll, total_predicted


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

    results = []
    for length in lengths:
        # Cut every chunk into non-overlapping windows of `length` tokens (any remainder is dropped).
        per_chunk = chunks.shape[1] // length
        windows = chunks[:, : per_chunk * length].reshape(-1, length)
        start = time.perf_counter()
        nll, predicted = score_windows(model, windows, args.tokens_per_batch, device, args.bf16)
        seconds = time.perf_counter() - start
        loss = nll / predicted
        results.append(
            {
                "length": length,
                "times_training_length": length / training_length,
                "windows": len(windows),
                "predicted_tokens": predicted,
                "loss": loss,
                "perplexity": math.exp(loss),
                "tokens_per_second": windows.size / seconds,
            }
        )

    print()
    print("| length | x training | windows | predicted tokens | loss | perplexity | tokens/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in results:
        print(
            f"| {row['length']} | {row['times_training_length']:g} | {row['windows']} | {row['predicted_tokens']} | "
            f"{row['loss']:.4f} | {row['perplexity']:.2f} | {row['tokens_per_second']:.0f} |"
        )

    output_dir = args.output_dir or args.model_name_or_path
    os.makedirs(output_dir, exist_ok=True)
    report = {
        "model": args.model_name_or_path,
        "data": args.eval_file or f"{args.dataset_name}:{split}",
        "documents": len(documents),
        "split_tokens": int(len(stream)),
        "training_length": training_length,
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
    return report


if __name__ == "__main__":
    main()
