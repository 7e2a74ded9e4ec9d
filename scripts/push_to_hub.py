#!/usr/bin/env python
"""Publish a trained BST model on the Hugging Face Hub, loadable with `trust_remote_code=True`.

The script stages ONE folder and uploads exactly that folder (`huggingface_hub.upload_folder`):

    config.json               BST config, with `auto_map` pointing at the code files below
    configuration_bst.py      the model code, copied flat by `save_pretrained` (imports torch/transformers only)
    modeling_bst.py
    ssm_ops.py
    cache_bst.py
    model.safetensors         weights
    generation_config.json    generation defaults (token ids filled in from the tokenizer when missing)
    tokenizer.json, tokenizer_config.json, ...
    README.md                 model card rendered from model_cards/README_template.md, config and evaluation JSON

`--dry_run` writes that folder to `--output_dir` and uploads nothing. Before uploading (and in a dry run) the folder is
loaded in a fresh Python process in which the `modeling_bst` package cannot be imported, and its logits are compared
with the model's: what a Hub user without our package gets (`--skip_verify` turns this off).

Example:

    python scripts/push_to_hub.py --model_dir runs/bst-small --repo_id your-name/bst-small \\
        --eval_json runs/bst-small/perplexity_vs_length.json --corpus_manifest data/books/manifest.json --dry_run

The training data in the card comes from the corpus manifest written by scripts/prepare_data.py (`--corpus_manifest`;
by default the `manifest.json` next to the evaluation data named in the evaluation JSON): which sources, which
package versions, how many documents per split. `datasets` in the card metadata lists Hub dataset ids only
(`--dataset`); our corpora are not Hub datasets, so by default it is left out rather than filled with a local path.

`--length_eval_json` (repeatable) takes the `length_evaluation.json` of scripts/evaluate_length.py instead: the
card shows its perplexity table (the source, StreamingLLM and BSTs on the same tokens), this model's row in bold.

Evaluation JSON (written by scripts/evaluate.py), read tolerantly:

    {"model": "...", "dataset": "...", "split": "test",
     "results": [{"eval_length": 512, "perplexity": 12.3, "tokens": 65536}, ...]}

Per result, the length may also be called `length`, `seq_len`, `sequence_length` or `context_length`, the perplexity
`ppl`, or it is computed as exp(`loss` | `nll` | `eval_loss`) when only the mean loss in nats is given; `tokens` may be
`num_tokens` or `n_tokens`. `results` may also be a mapping {length: perplexity}, or the file a bare list of results.
"""

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id

from bst_tools.hub import add_card_arguments, build_model_card, stage_folder, verify_remote_loading
from bst_tools.tokenizer import TOKENIZER_FILES


REPO_ROOT = Path(__file__).resolve().parent.parent

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

_LENGTH_KEYS = ("eval_length", "length", "seq_len", "sequence_length", "context_length")
_PERPLEXITY_KEYS = ("perplexity", "ppl")
_LOSS_KEYS = ("loss", "nll", "eval_loss")
_TOKEN_KEYS = ("tokens", "num_tokens", "n_tokens", "predicted_tokens")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model_dir", required=True, help="Folder written by save_pretrained / Trainer (config.json + weights).")
    add("--tokenizer_dir", help="Folder with the tokenizer files (default: --model_dir).")
    add("--eval_json", help="Evaluation results written by scripts/evaluate.py (format above).")
    add(
        "--length_eval_json",
        action="append",
        default=[],
        help="A length_evaluation.json of scripts/evaluate_length.py (repeatable): its perplexity table (the source, "
        "StreamingLLM and BSTs on the same tokens) goes into the card, one table per file.",
    )
    add(
        "--length_eval_model",
        help="This model's name in the --length_eval_json files (default: `BST <name of --model_dir>`, the name "
        "scripts/evaluate_length.py gives it).",
    )
    add(
        "--corpus_manifest",
        help="manifest.json of the training corpus (scripts/prepare_data.py). Default: the manifest.json in the folder "
        "of the evaluation data named by --eval_json, when there is one.",
    )
    add_card_arguments(parser)  # --repo_id, --training_data, --dataset, --license, ..., --card_template
    add("--output_dir", help="Where to stage the upload (default: outputs/hub/<name> if --dry_run, else a temp dir).")
    add("--overwrite", action="store_true", help="Empty --output_dir first if it is not empty.")
    add("--dry_run", action="store_true", help="Write the folder that would be uploaded; upload nothing.")
    add("--skip_verify", action="store_true", help="Do not load the folder in a process without modeling_bst.")
    add("--private", action="store_true", help="Create the Hub repository as private.")
    add("--revision", help="Branch to push to (default: main).")
    add("--commit_message", default="Upload Block-State Transformer", help="Commit message of the upload.")
    add("--token", help="Hub token (default: the one saved by `hf auth login`, or $HF_TOKEN).")
    return parser.parse_args(argv)


def read_evaluation(path):
    """Reads an evaluation JSON into {"model", "dataset", "split", "results": [{eval_length, perplexity, tokens}]}.

    Tolerant of the key spellings listed in the module docstring; raises ValueError naming what is missing.
    """
    with open(path) as handle:
        try:
            raw = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
    if isinstance(raw, list):
        raw = {"results": raw}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object with a `results` list, got {type(raw).__name__}.")
    rows = raw.get("results", raw.get("perplexity_by_length"))
    if isinstance(rows, dict):  # {"512": 12.3, ...}
        rows = [{"eval_length": length, "perplexity": value} for length, value in rows.items()]
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: no `results` list of per-length perplexities found (keys: {sorted(raw)}).")

    def first(row, keys):
        return next((row[key] for key in keys if row.get(key) is not None), None)

    results = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: results[{index}] should be an object, got {row!r}.")
        length = first(row, _LENGTH_KEYS)
        perplexity = first(row, _PERPLEXITY_KEYS)
        if perplexity is None and first(row, _LOSS_KEYS) is not None:
            perplexity = math.exp(float(first(row, _LOSS_KEYS)))
        if length is None or perplexity is None:
            raise ValueError(
                f"{path}: results[{index}] needs a length (one of {_LENGTH_KEYS}) and a perplexity (one of "
                f"{_PERPLEXITY_KEYS}, or a mean loss in nats: {_LOSS_KEYS}); got keys {sorted(row)}."
            )
        tokens = first(row, _TOKEN_KEYS)
        tokens = None if tokens is None else int(tokens)
        results.append({"eval_length": int(length), "perplexity": float(perplexity), "tokens": tokens})
    results.sort(key=lambda result: result["eval_length"])
    # scripts/evaluate.py writes "data" as "<dataset>:<split>".
    dataset = raw.get("dataset") or raw.get("eval_dataset") or raw.get("data")
    split = raw.get("split")
    if split is None and isinstance(dataset, str) and ":" in dataset:
        split = dataset.rsplit(":", 1)[1]
    return {"model": raw.get("model"), "dataset": dataset, "split": split, "results": results}


def read_length_evaluation(path, model_name):
    """The perplexity table of a scripts/evaluate_length.py JSON, for the card: {"caption", "lengths", "rows": [{"model",
    "this_model", "cells"}]}, a cell being "perplexity (last-quarter perplexity)" or "-" where the model skipped a
    length. Raises ValueError naming what is missing (`model_name` among them)."""
    with open(path) as handle:
        try:
            raw = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
    missing = [key for key in ("text", "total_tokens", "lengths", "models") if key not in raw]
    if missing:
        raise ValueError(f"{path} is not a length evaluation of scripts/evaluate_length.py: no {missing}.")
    if model_name not in raw["models"]:
        raise ValueError(
            f"{path} has no model named {model_name!r} (it has {sorted(raw['models'])}): pass --length_eval_model."
        )
    rows = []
    for name, results in raw["models"].items():
        by_length = {row["length"]: row for row in results["perplexity"]}
        cells = [
            f"{by_length[length]['perplexity']:.2f} ({by_length[length]['last_quarter_perplexity']:.2f})"
            if length in by_length else "-"
            for length in raw["lengths"]
        ]
        rows.append({"model": name, "this_model": name == model_name, "cells": cells})
    caption = (
        f"Perplexity on {raw['total_tokens']:,} tokens of {raw['text']}, cut into non-overlapping windows of each "
        "length: every model and every length scores the same tokens (the perplexity of each window's last quarter "
        f"in brackets). From `{Path(path).name}`, written by scripts/evaluate_length.py of bst-transformers."
    )
    return {"caption": caption, "lengths": [f"{length:,}" for length in raw["lengths"]], "rows": rows}


def read_corpus_manifest(path):
    """The corpus summary for the card: {"corpus", "sources", "splits", "python_version"}, without the per-document
    list (which can be long)."""
    with open(path) as handle:
        try:
            manifest = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
    missing = [key for key in ("corpus", "sources", "splits") if key not in manifest]
    if missing:
        raise ValueError(f"{path} is not a corpus manifest of scripts/prepare_data.py: no {missing}.")
    return {key: manifest.get(key) for key in ("corpus", "sources", "splits", "python_version")}


def default_corpus_manifest(evaluation):
    """scripts/evaluate.py names its data `<corpus folder>:<split>`; prepare_data.py writes manifest.json there."""
    data = (evaluation or {}).get("dataset")
    if not data:
        return None
    folder = data.rsplit(":", 1)[0] if ":" in data else data
    path = Path(folder) / "manifest.json"
    return path if path.is_file() else None


def check_inputs(args):
    """Every check that needs no model: fail fast, naming the problem, before any heavy work."""
    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as error:
        raise SystemExit(f"--repo_id {args.repo_id!r} is not a valid Hub repository id: {error}")
    model_dir = Path(args.model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise SystemExit(f"--model_dir {model_dir} has no config.json: pass a folder written by save_pretrained.")
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type != "bst":
        raise SystemExit(f"{config_path} has model_type {model_type!r}; this script publishes BST models ('bst').")
    if not any((model_dir / name).is_file() for name in WEIGHT_FILES):
        raise SystemExit(f"--model_dir {model_dir} has no weights (looked for {', '.join(WEIGHT_FILES)}).")
    tokenizer_dir = Path(args.tokenizer_dir or args.model_dir)
    if not any((tokenizer_dir / name).is_file() for name in TOKENIZER_FILES):
        raise SystemExit(
            f"No tokenizer in {tokenizer_dir} (looked for {', '.join(TOKENIZER_FILES)}): pass --tokenizer_dir."
        )
    if not Path(args.card_template).is_file():
        raise SystemExit(f"--card_template {args.card_template} does not exist.")
    evaluation = None
    if args.eval_json:
        if not Path(args.eval_json).is_file():
            raise SystemExit(f"--eval_json {args.eval_json} does not exist.")
        try:
            evaluation = read_evaluation(args.eval_json)
        except ValueError as error:
            raise SystemExit(str(error))
    args.length_evaluations = []
    model_name = args.length_eval_model or f"BST {model_dir.resolve().name}"
    for path in args.length_eval_json:
        if not Path(path).is_file():
            raise SystemExit(f"--length_eval_json {path} does not exist.")
        try:
            args.length_evaluations.append(read_length_evaluation(path, model_name))
        except ValueError as error:
            raise SystemExit(str(error))
    if args.corpus_manifest and not Path(args.corpus_manifest).is_file():
        raise SystemExit(f"--corpus_manifest {args.corpus_manifest} does not exist.")
    manifest_path = args.corpus_manifest or default_corpus_manifest(evaluation)
    args.corpus = None
    if manifest_path:
        try:
            args.corpus = read_corpus_manifest(manifest_path)
        except ValueError as error:
            raise SystemExit(str(error))
    return evaluation


def prepare_output_dir(args):
    """Returns (folder, whether it is a temporary folder to delete after the upload)."""
    if args.output_dir is None:
        if not args.dry_run:
            return Path(tempfile.mkdtemp(prefix="bst-hub-")), True
        args.output_dir = str(REPO_ROOT / "outputs" / "hub" / args.repo_id.split("/")[-1])
    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        # The folder is uploaded as it is: stale files from an earlier run would be published too.
        if not args.overwrite:
            raise SystemExit(f"--output_dir {output_dir} is not empty; pass --overwrite to replace its content.")
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir, False


def fill_generation_token_ids(model, tokenizer):
    """generate() needs eos/pad ids; a model trained from scratch often has them only in its tokenizer."""
    generation_config = model.generation_config
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(generation_config, name, None) is None and getattr(tokenizer, name, None) is not None:
            setattr(generation_config, name, getattr(tokenizer, name))
    if generation_config.pad_token_id is None and generation_config.eos_token_id is not None:
        generation_config.pad_token_id = generation_config.eos_token_id


def main(argv=None):
    args = parse_args(argv)
    evaluation = check_inputs(args)
    output_dir, is_temporary = prepare_output_dir(args)

    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from modeling_bst import BSTForCausalLM  # also registers BST for auto-class export (`pip install -e .`)

    steps = ["load model and tokenizer", "write folder", "verify remote-code loading", "upload"]
    if args.skip_verify:
        steps.remove("verify remote-code loading")
    if args.dry_run:
        steps.remove("upload")
    progress = tqdm(total=len(steps), desc="push_to_hub", unit="step")

    progress.set_postfix_str(steps[0])
    model = BSTForCausalLM.from_pretrained(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_dir or args.model_dir)
    if len(tokenizer) > model.config.vocab_size:
        raise SystemExit(
            f"The tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size} embeddings."
        )
    fill_generation_token_ids(model, tokenizer)
    progress.update()

    progress.set_postfix_str("write folder")
    card = build_model_card(model, tokenizer, evaluation, args)
    stage_folder(model, tokenizer, card, output_dir)
    progress.update()

    if not args.skip_verify:
        progress.set_postfix_str("verify remote-code loading")
        difference = verify_remote_loading(model, output_dir, model.config.vocab_size)
        progress.update()
        tqdm.write(f"Remote-code load check passed (max |logit difference| = {difference:.2e}).")

    files = sorted(path for path in output_dir.rglob("*") if path.is_file())
    total_bytes = sum(path.stat().st_size for path in files)
    if args.dry_run:
        progress.close()
        print(f"Dry run: {len(files)} files ({total_bytes / 1e6:.1f} MB) in {output_dir}, nothing uploaded:")
        for path in files:
            print(f"  {path.relative_to(output_dir)}  ({path.stat().st_size} bytes)")
        return output_dir

    from huggingface_hub import HfApi

    progress.set_postfix_str("upload")
    api = HfApi(token=args.token)
    api.create_repo(args.repo_id, private=args.private, exist_ok=True)
    if args.revision:
        api.create_branch(args.repo_id, branch=args.revision, exist_ok=True)
    commit = api.upload_folder(
        repo_id=args.repo_id, folder_path=output_dir, revision=args.revision, commit_message=args.commit_message
    )
    progress.update()
    progress.close()
    print(f"Uploaded {len(files)} files ({total_bytes / 1e6:.1f} MB) to {commit.commit_url}")
    if is_temporary:
        shutil.rmtree(output_dir)
    return output_dir


if __name__ == "__main__":
    main()
