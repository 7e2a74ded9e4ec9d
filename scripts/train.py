#!/usr/bin/env python
"""Train (or continue training) a causal language model - a Block-State Transformer by default - on raw text.

In the style of Transformers' `examples/pytorch/language-modeling/run_clm.py`: `HfArgumentParser` over
`ModelArguments`, `DataArguments` and `TrainingArguments`; `datasets` loads the text; documents are tokenised,
separated by the end-of-sequence token and packed into sequences of `--sequence_length` tokens; `Trainer` trains.

Start from a preset (a fresh model, and a byte-level BPE tokenizer trained on the training split unless
`--tokenizer_name` is given; the model's `vocab_size` follows the tokenizer):

    python scripts/prepare_data.py --corpus books
    python scripts/train.py --config_name configuration/bst-small.json --dataset_name data/books \
        --sequence_length 512 --output_dir runs/bst-small-books --max_steps 1000 --use_cpu

or from a checkpoint (`--model_name_or_path runs/bst-small-books`). Data: `--dataset_name` is a local folder
(`{train,validation,test}.jsonl` as written by prepare_data.py, or plain text files, one document per file) or any
`datasets.load_dataset` name when a hub is reachable; `--train_file`/`--validation_file` take `.jsonl` (one
document per line) or text files. Without a validation split, a reproducible document-level share of the training
documents is held out (`--validation_split_percentage`).

Two processes on one CPU machine (DDP over gloo): `torchrun --nproc_per_node 2 scripts/train.py ... --use_cpu`.
See docs/training.md for GPUs, FSDP and Accelerate.
"""

import argparse
import glob
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
import zipfile
from dataclasses import dataclass, field
from itertools import chain

import datasets
import numpy as np
import torch
import transformers
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

try:
    import modeling_bst  # noqa: F401  (registers model_type "bst" with the Auto classes)
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import modeling_bst  # noqa: F401

from train_tokenizer import train_bpe_tokenizer

logger = logging.getLogger(__name__)

TEXT_FILE_EXTENSIONS = (".txt", ".text", ".md", ".rst", ".py")
JSON_FILE_EXTENSIONS = (".jsonl", ".json")
# The SSM parameters' learning rate as a multiple of the model's (docs/quality.md, "Recipe").
SSM_LEARNING_RATE_SCALE = 0.5
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class ModelArguments:
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "A preset to train from scratch: a config JSON file (configuration/bst-small.json) or folder."
        },
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A checkpoint (folder saved by save_pretrained) to continue training from."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Override preset fields, e.g. 'num_hidden_layers=2,block_size=64'. Only with --config_name."
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "An existing tokenizer folder. Default: the checkpoint's tokenizer, or a byte-level BPE trained "
            "on the training split when starting from a preset."
        },
    )
    tokenizer_vocab_size: int | None = field(
        default=None,
        metadata={"help": "Vocabulary size of the BPE trained on the corpus. Default: the preset's vocab_size."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code shipped in a checkpoint."})
    ssm_learning_rate_scale: float = field(
        default=SSM_LEARNING_RATE_SCALE,
        metadata={
            "help": "Learning rate of the SSM sublayers' parameters (step sizes, state matrices, kernels, skip), as a "
            "multiple of --learning_rate; they never get weight decay. See docs/quality.md."
        },
    )
    sample_prompt: str | None = field(
        default=None,
        metadata={
            "help": "Print a pipeline('text-generation') sample for this prompt before and after training (sampled "
            "with a fixed seed, outside the training random state)."
        },
    )
    sample_new_tokens: int = field(default=60, metadata={"help": "Tokens generated for --sample_prompt."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A local folder ({train,validation,test}.jsonl, or text files = one document each) or a "
            "datasets.load_dataset name (needs a reachable hub)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration name for load_dataset."})
    train_file: str | None = field(
        default=None, metadata={"help": "A .jsonl file (one document per line) or text file."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Same formats as --train_file."})
    text_column: str = field(default="text", metadata={"help": "The column holding the text."})
    text_sample_by: str = field(
        default="document",
        metadata={"help": "How plain text files are cut into documents: 'document' (a file), 'paragraph' or 'line'."},
    )
    validation_split_percentage: float = field(
        default=5.0,
        metadata={"help": "Share of training documents held out for validation when there is no validation split."},
    )
    sequence_length: int | None = field(
        default=None,
        metadata={"help": "Tokens per packed training sequence. Default: the config's training_length."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep this many packed training sequences."})
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Evaluate on this many packed validation sequences, evenly spaced over the split."},
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})
    max_train_minutes: float | None = field(
        default=None, metadata={"help": "Stop training after this many minutes (wall clock), then save and evaluate."}
    )


def optimizer_parameter_groups(model, weight_decay, learning_rate, ssm_learning_rate_scale):
    """AdamW parameter groups: matrices with weight decay; vectors (norms, biases) without; the parameters of every
    SSM sublayer (`BSTStateSpace`) without weight decay and at `ssm_learning_rate_scale` x the learning rate.

    S4 and Mamba train their SSMs this way: weight decay would pull the log step sizes and the state matrices toward
    zero, which means towards one fixed time scale, whatever the data asks for."""
    ssm_parameters = {
        id(parameter)
        for module in model.modules()
        if type(module).__name__ == "BSTStateSpace"
        for parameter in module.parameters()
    }
    groups = {
        "decay": {"params": [], "weight_decay": weight_decay, "lr": learning_rate},
        "no_decay": {"params": [], "weight_decay": 0.0, "lr": learning_rate},
        "ssm": {"params": [], "weight_decay": 0.0, "lr": learning_rate * ssm_learning_rate_scale},
    }
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        if id(parameter) in ssm_parameters:
            groups["ssm"]["params"].append(parameter)
        elif parameter.dim() >= 2:
            groups["decay"]["params"].append(parameter)
        else:
            groups["no_decay"]["params"].append(parameter)
    return [group for group in groups.values() if group["params"]]


class PerplexityTrainer(Trainer):
    """Trainer that logs the validation perplexity, exp(eval_loss), next to every validation loss, trains with
    `optimizer_parameter_groups` (the SSM parameters in a group of their own) and saves the config users generate
    with."""

    def __init__(self, *args, ssm_learning_rate_scale=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.ssm_learning_rate_scale = ssm_learning_rate_scale

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(
            self.args, model
        )
        if not isinstance(optimizer_cls, type) or {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
            # Optimizer factories and optimizers that group parameters themselves (GaLore, LOMO, layer-wise) keep
            # Trainer's own grouping.
            return super().create_optimizer(model)
        groups = optimizer_parameter_groups(
            model, self.args.weight_decay, optimizer_kwargs["lr"], self.ssm_learning_rate_scale
        )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        # The Trainer would log such a loss as 0 (logging_nan_inf_filter), step on, and save NaN weights.
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Training loss is {loss.item()} at step {self.state.global_step + 1}: the weights or the gradients "
                "of the step before went non-finite (try a lower --learning_rate, --max_grad_norm, or fp32)."
            )
        return loss

    def _load_optimizer_and_scheduler(self, checkpoint):
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except (RuntimeError, OSError, EOFError, ValueError) as error:  # torch.load does not name the file
            raise RuntimeError(
                f"Could not load the optimizer or scheduler state (optimizer.pt, scheduler.pt) of {checkpoint}: {error}"
            ) from error

    def _issue_warnings_after_load(self, load_result):
        # A tied LM head is not saved (it is the embedding matrix, which is loaded): the Trainer would report it as
        # a missing key.
        parameters = dict(self.model.named_parameters(remove_duplicate=False))
        missing = set(load_result.missing_keys)
        loaded = [parameter for name, parameter in parameters.items() if name not in missing]
        tied = {name for name in missing if name in parameters and any(parameters[name] is p for p in loaded)}
        load_result.missing_keys[:] = [name for name in load_result.missing_keys if name not in tied]
        super()._issue_warnings_after_load(load_result)

    def log(self, logs, *args, **kwargs):
        if "eval_loss" in logs:
            logs["eval_perplexity"] = perplexity(logs["eval_loss"])
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir=None, _internal_call=False):
        # Trainer sets `config.use_cache = args.use_cache` (False: no cache is needed to train), and save_model would
        # write that into config.json, so the saved model would return no `past_key_values` and generate() would
        # re-run the whole prefix at every step. Save the inference setting; training goes on without a cache.
        config = getattr(self.model, "config", None)
        if config is None:
            return super().save_model(output_dir, _internal_call=_internal_call)
        name = first_non_finite_parameter(self.model)
        if name is not None:
            raise FloatingPointError(f"Not saving a broken model: {name} holds NaN or infinite values.")
        training_use_cache = config.use_cache
        config.use_cache = True
        try:
            super().save_model(output_dir, _internal_call=_internal_call)
        finally:
            config.use_cache = training_use_cache


class FiniteWeightsCallback(TrainerCallback):
    """Refuses to train weights that hold NaN or infinity (a checkpoint's or a continued model's): every step would
    spread them, and a NaN in a row of the embedding that no batch uses leaves the loss finite."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        name = first_non_finite_parameter(model)
        if name is not None:
            raise FloatingPointError(f"The model to train is broken: {name} holds NaN or infinite values.")


class TimeLimitCallback(TrainerCallback):
    """Ends training once a wall-clock budget is spent (the model is still saved and evaluated)."""

    def __init__(self, max_minutes):
        self.max_seconds = max_minutes * 60
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.start > self.max_seconds:
            logger.info(f"Time budget of {self.max_seconds / 60:g} minutes spent after {state.global_step} steps.")
            control.should_training_stop = True
        return control


def print_sample(model, tokenizer, prompt, max_new_tokens, title):
    """A pipeline sample from the model as it is now. Runs in a forked random state so that asking for a sample
    does not change the training run."""
    from transformers import pipeline

    was_training = model.training
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        generator = pipeline("text-generation", model=model.eval(), tokenizer=tokenizer, device=model.device)
        text = generator(prompt, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_k=50)
    model.train(was_training)
    print(f"--- {title} ---\n{text[0]['generated_text']}\n---", flush=True)


def perplexity(loss):
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


# ----------------------------------------------------------------------------------------------------------------
# Checks that run before any heavy work
# ----------------------------------------------------------------------------------------------------------------


def check_arguments(model_args, data_args, training_args):
    if (model_args.config_name is None) == (model_args.model_name_or_path is None):
        raise ValueError(
            "Give exactly one of --config_name (a preset such as configuration/bst-small.json, to train from "
            "scratch) and --model_name_or_path (a checkpoint to continue from)."
        )
    if model_args.config_overrides and model_args.model_name_or_path:
        raise ValueError("--config_overrides only applies to a preset (--config_name), not to a checkpoint.")
    for name in ("config_name", "model_name_or_path", "tokenizer_name"):
        path = getattr(model_args, name)
        if path is not None and not os.path.exists(path) and (path.startswith((".", "/")) or path.endswith(".json")):
            raise ValueError(f"--{name} {path!r} does not exist.")
    if data_args.dataset_name is None and data_args.train_file is None:
        raise ValueError("No training data: give --dataset_name (a folder or dataset name) or --train_file.")
    for name in ("train_file", "validation_file"):
        path = getattr(data_args, name)
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"--{name} {path!r} does not exist or is not a file.")
    if data_args.text_sample_by not in ("document", "paragraph", "line"):
        raise ValueError(f"--text_sample_by must be document, paragraph or line, got {data_args.text_sample_by!r}.")
    if data_args.sequence_length is not None and data_args.sequence_length < 2:
        raise ValueError(f"--sequence_length must be at least 2, got {data_args.sequence_length}.")
    if not 0 < data_args.validation_split_percentage < 100:
        raise ValueError(
            f"--validation_split_percentage must lie in (0, 100), got {data_args.validation_split_percentage}."
        )


def safetensors_problem(path: str) -> str | None:
    """Why a .safetensors file cannot be read in full, or None. A kill during a save leaves a file shorter than its
    header says; the safetensors library then reports "incomplete metadata" without naming the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return f"{size} bytes, too short to hold a header"
        header_length = int.from_bytes(prefix, "little")
        if 8 + header_length > size:
            return f"truncated inside its header ({size} bytes)"
        try:
            header = json.loads(f.read(header_length))
            end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return "its header is not valid safetensors JSON"
    if 8 + header_length + end != size:
        return f"truncated: its header describes {8 + header_length + end} bytes, the file has {size}"
    return None


def checkpoint_problem(folder):
    """Why a Trainer checkpoint folder cannot be resumed from, or None when it is complete. The Trainer writes
    trainer_state.json last, so a save that was killed leaves a folder without it (or with truncated files)."""
    state_path = os.path.join(folder, "trainer_state.json")
    if not os.path.isfile(state_path):
        return "no trainer_state.json (the save did not finish)"
    try:
        with open(state_path, encoding="utf-8") as f:
            json.load(f)
    except ValueError:
        return "trainer_state.json is not valid JSON"
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError):
            return "model.safetensors.index.json is not a valid index"
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        weight_files = ["model.safetensors"]
    elif os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        weight_files = []  # no cheap check of a pickle; the Trainer reports problems with it
    else:
        return "no model weights (model.safetensors)"
    for name in weight_files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        problem = safetensors_problem(path)
        if problem:
            return f"{name} is {problem}" if problem.startswith("truncated") else f"{name}: {problem}"
        tensor_name = first_non_finite_tensor(path)
        if tensor_name is not None:
            return f"{name} holds NaN or infinite values ({tensor_name})"
    # Without these the Trainer resumes with a fresh optimizer or schedule, silently: another run than the one saved.
    for name, what in (("optimizer.pt", "the optimizer"), ("scheduler.pt", "the learning-rate schedule")):
        if not os.path.isfile(os.path.join(folder, name)):
            return f"{name} is missing (resuming would restart {what})"
    # torch.save writes zip archives: a truncated one has lost the central directory at its end, and overwritten
    # bytes fail the CRC every entry carries (torch.load would only say "PytorchStreamReader failed reading file").
    torch_files = ["optimizer.pt", "scheduler.pt", "scaler.pt"] + glob.glob(os.path.join(folder, "rng_state*.pth"))
    for name in torch_files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if not zipfile.is_zipfile(path):
            return f"{os.path.basename(path)} is truncated (not a complete torch archive)"
        try:
            with zipfile.ZipFile(path) as archive:
                bad_entry = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
            bad_entry = f"{error}"
        if bad_entry is not None:
            return f"{os.path.basename(path)} is corrupted (entry {bad_entry} fails its check)"
    return None


def first_non_finite_tensor(path):
    """The name of the first floating-point tensor of a .safetensors file that holds a NaN or an infinity, or None."""
    with safe_open(path, framework="pt") as weights:
        for name in weights.keys():
            tensor = weights.get_tensor(name)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                return name
    return None


def first_non_finite_parameter(model):
    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter).all():
            return name
    return None


def find_resumable_checkpoint(output_dir):
    """The newest complete checkpoint-* folder in `output_dir` and the (folder, reason) pairs skipped on the way."""
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    steps = {}
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = pattern.match(name)
            if match and os.path.isdir(os.path.join(output_dir, name)):
                steps[name] = int(match.group(1))
    skipped = []
    for name in sorted(steps, key=steps.get, reverse=True):
        folder = os.path.join(output_dir, name)
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def check_block_size(config, sequence_length):
    block_size = getattr(config, "block_size", None)
    if block_size is not None and block_size > sequence_length:
        raise ValueError(
            f"The model's block_size ({block_size}) is larger than --sequence_length ({sequence_length}): every "
            "training sequence would fit in one attention block and the state-space context would never be used. "
            f"Use --sequence_length >= {block_size} (a multiple of it is best) or a smaller block_size."
        )


def check_tokenizer_matches_checkpoint(config, tokenizer):
    """A tokenizer from another model shows up as an index error in the middle of training, or not at all."""
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the checkpoint's embeddings hold only {config.vocab_size} "
            "(config.vocab_size): this tokenizer does not belong to this model. Use the tokenizer saved with the "
            "checkpoint (drop --tokenizer_name)."
        )
    if config.eos_token_id is not None and tokenizer.eos_token_id not in (None, config.eos_token_id):
        raise ValueError(
            f"The tokenizer's end-of-sequence id ({tokenizer.eos_token_id}) differs from the checkpoint's "
            f"eos_token_id ({config.eos_token_id}): this tokenizer does not belong to this model."
        )
    if len(tokenizer) < config.vocab_size:
        logger.warning(
            f"The tokenizer has {len(tokenizer)} tokens and the model {config.vocab_size} embeddings: fine if the "
            "embedding table was padded, wrong if the tokenizer comes from another model."
        )


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def _builder_and_kwargs(paths, data_args):
    """The `datasets` builder for a list of local files of one kind."""
    if all(path.endswith(JSON_FILE_EXTENSIONS) for path in paths):
        return "json", {}
    if any(path.endswith(JSON_FILE_EXTENSIONS) for path in paths):
        raise ValueError(f"Cannot mix JSON and plain text files in one split: {paths}")
    return "text", {"sample_by": data_args.text_sample_by}


def _load_local_files(data_files, data_args):
    builder, kwargs = _builder_and_kwargs([p for paths in data_files.values() for p in paths], data_args)
    return datasets.load_dataset(builder, data_files=data_files, **kwargs)


def _folder_data_files(folder):
    """Split files ({train,validation,test}.jsonl/.json/.txt) of a folder, or else all its text files as train."""
    data_files = {}
    for split in ("train", "validation", "test"):
        for extension in JSON_FILE_EXTENSIONS + (".txt",):
            path = os.path.join(folder, split + extension)
            if os.path.isfile(path):
                data_files[split] = [path]
                break
    if data_files:
        if "train" not in data_files:
            raise ValueError(f"{folder!r} has {sorted(data_files)} split files but no train file.")
        return data_files
    text_files = sorted(
        os.path.join(directory, name)
        for directory, _, names in os.walk(folder)
        for name in names
        if name.endswith(TEXT_FILE_EXTENSIONS)
    )
    if not text_files:
        raise ValueError(
            f"{folder!r} holds neither train.jsonl/train.txt nor text files ({', '.join(TEXT_FILE_EXTENSIONS)})."
        )
    return {"train": text_files}


def load_raw_datasets(data_args, splits=("train", "validation")):
    """A DatasetDict with exactly `splits`, each holding only non-empty documents. A missing validation split is
    carved out of the training documents (`split_by_document`)."""
    if data_args.train_file is not None or data_args.validation_file is not None:
        data_files = {"train": [data_args.train_file], "validation": [data_args.validation_file]}
        data_files = {split: files for split, files in data_files.items() if files[0] is not None}
    elif os.path.isdir(data_args.dataset_name):
        data_files = _folder_data_files(data_args.dataset_name)
    elif os.path.exists(data_args.dataset_name) or data_args.dataset_name.startswith((".", "/")):
        raise ValueError(f"--dataset_name {data_args.dataset_name!r} is neither a folder nor a dataset name.")
    else:
        data_files = None

    needed = set(splits)
    if "validation" in needed:
        needed.add("train")  # to carve validation documents from when there is no validation split
    if data_files is not None:
        # Load only what is needed: tokenising the test split while training would be wasted work.
        raw = _load_local_files({split: files for split, files in data_files.items() if split in needed}, data_args)
    else:
        try:
            raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        except Exception as error:  # hub unreachable, unknown name, ...: say what was tried
            raise ValueError(
                f"Could not load dataset {data_args.dataset_name!r} (not a local folder, so it was looked up on "
                f"the hub): {error}"
            ) from error
        raw = datasets.DatasetDict({split: raw[split] for split in raw if split in needed})

    for split in splits:
        if split not in raw and not (split == "validation" and "train" in raw):
            raise ValueError(f"The data has no {split} split (found: {sorted(raw)}).")
    for split in list(raw):
        if data_args.text_column not in raw[split].column_names:
            raise ValueError(
                f"The {split} split has no column {data_args.text_column!r} (columns: {raw[split].column_names}); "
                "set --text_column."
            )
        raw[split] = raw[split].filter(
            lambda batch: [bool(text and text.strip()) for text in batch[data_args.text_column]],
            batched=True,
            desc=f"Dropping empty {split} documents",
        )
        if len(raw[split]) == 0:
            raise ValueError(f"The {split} split is empty: no document holds any non-whitespace text.")
    if "validation" in splits and "validation" not in raw:
        raw["train"], raw["validation"] = split_by_document(
            raw["train"], data_args.validation_split_percentage, data_args.text_column
        )
    return datasets.DatasetDict({split: raw[split] for split in splits})


def split_by_document(dataset, percentage, text_column="text"):
    """Hold out a reproducible share of documents: rank them by the SHA-256 of their `id` (or of their text when
    there is no `id` column) and take the first ceil(percentage% * n) - at least one - as validation."""
    if len(dataset) < 2:
        raise ValueError(
            f"The training data holds {len(dataset)} document(s): too few to hold out validation documents. Give a "
            "--validation_file, use one document per line in a .jsonl file, or --text_sample_by paragraph."
        )
    keys = dataset["id"] if "id" in dataset.column_names else dataset[text_column]
    ranking = sorted(range(len(keys)), key=lambda i: (hashlib.sha256(str(keys[i]).encode()).hexdigest(), i))
    num_validation = max(1, math.ceil(len(keys) * percentage / 100))
    validation_indices = sorted(ranking[:num_validation])
    train_indices = sorted(ranking[num_validation:])
    return dataset.select(train_indices), dataset.select(validation_indices)


def tokenize_and_pack(raw_datasets, tokenizer, sequence_length, data_args, training_args):
    """Tokenise every document, end it with the end-of-sequence token (so the model learns where documents stop)
    and cut the concatenation into sequences of exactly `sequence_length` tokens. The remainder of each map batch
    (fewer than `sequence_length` tokens) is dropped."""
    eos_token_id = tokenizer.eos_token_id
    text_column = data_args.text_column

    def tokenize(batch):
        encoded = tokenizer(batch[text_column], add_special_tokens=False)
        return {"input_ids": [ids + [eos_token_id] for ids in encoded["input_ids"]]}

    def pack(batch):
        stream = list(chain.from_iterable(batch["input_ids"]))
        usable = (len(stream) // sequence_length) * sequence_length
        sequences = [stream[i : i + sequence_length] for i in range(0, usable, sequence_length)]
        return {"input_ids": sequences, "labels": [list(sequence) for sequence in sequences]}

    packed = datasets.DatasetDict()
    for split, dataset in raw_datasets.items():
        with training_args.main_process_first(desc=f"tokenising the {split} split"):
            tokenized = dataset.map(
                tokenize,
                batched=True,
                remove_columns=dataset.column_names,
                num_proc=data_args.preprocessing_num_workers,
                desc=f"Tokenising {split}",
            )
            packed[split] = tokenized.map(
                pack,
                batched=True,
                batch_size=1000,
                num_proc=data_args.preprocessing_num_workers,
                desc=f"Packing {split} into sequences of {sequence_length}",
            )
        logger.info(f"{split}: {len(dataset)} documents -> {len(packed[split])} sequences of {sequence_length} tokens")
        if len(packed[split]) == 0:
            raise ValueError(
                f"The {split} split ({len(dataset)} documents) holds fewer tokens than one sequence of "
                f"--sequence_length {sequence_length}: use more text or a shorter --sequence_length."
            )
    return packed


def evenly_spaced(dataset, count):
    """`count` rows spread over the whole dataset (a subset of validation sequences that still covers every
    validation document, unlike the first `count` rows)."""
    if count is None or count >= len(dataset):
        return dataset
    return dataset.select(np.unique(np.linspace(0, len(dataset) - 1, count).round().astype(int)).tolist())


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and model
# ----------------------------------------------------------------------------------------------------------------


def has_tokenizer(folder):
    return (
        folder is not None
        and os.path.isdir(folder)
        and any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)
    )


def load_preset_config(model_args):
    path = model_args.config_name
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            config_dict = json.load(f)
        if "model_type" not in config_dict:
            raise ValueError(f"{path!r} has no `model_type` field, so its model class is unknown.")
        config_dict.pop("architectures", None)
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    else:
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    if model_args.config_overrides:
        logger.info(f"Overriding config fields: {model_args.config_overrides}")
        config.update_from_string(model_args.config_overrides)
    return config


def get_tokenizer(model_args, training_args, raw_train, text_column, vocab_size, checkpoint):
    """The tokenizer, in order of preference: --tokenizer_name; the one saved in the checkpoint we resume or start
    from; a byte-level BPE trained on the training split (by the main process, saved in --output_dir, where the
    other processes then load it)."""
    if model_args.tokenizer_name is not None:
        return AutoTokenizer.from_pretrained(model_args.tokenizer_name, trust_remote_code=model_args.trust_remote_code)
    for folder in (checkpoint, model_args.model_name_or_path):
        if has_tokenizer(folder):
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=model_args.trust_remote_code)
    if model_args.model_name_or_path is not None:
        raise ValueError(
            f"The checkpoint {model_args.model_name_or_path!r} has no tokenizer files; give --tokenizer_name."
        )
    with training_args.main_process_first(desc="training the tokenizer"):
        if training_args.process_index > 0:
            return AutoTokenizer.from_pretrained(training_args.output_dir)
        logger.info(f"Training a byte-level BPE tokenizer ({vocab_size} tokens) on {len(raw_train)} documents")
        texts = (raw_train[i : i + 100][text_column] for i in range(0, len(raw_train), 100))
        tokenizer = train_bpe_tokenizer(chain.from_iterable(texts), vocab_size=vocab_size)
        tokenizer.save_pretrained(training_args.output_dir)
        return tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, TrainingArguments),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if argv is None:
        argv = sys.argv[1:]
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv=None):
    model_args, data_args, training_args = parse_args(argv)
    check_arguments(model_args, data_args, training_args)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    # This script's own messages (corpus and model sizes) on the main process; the libraries at --log_level.
    logger.setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    log_level = training_args.get_process_log_level()
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(
        f"Process {training_args.process_index} of {training_args.world_size}, device {training_args.device}, "
        f"bf16 {training_args.bf16}"
    )
    set_seed(training_args.seed)

    # Which checkpoint to resume from: an explicit path, or "last"/"true" for the newest complete one in --output_dir.
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is not None and checkpoint.lower() in ("last", "true"):
        checkpoint, skipped = find_resumable_checkpoint(training_args.output_dir)
        for folder, problem in skipped:
            logger.warning(f"--resume_from_checkpoint last: skipping {folder}: {problem}")
        if checkpoint is None:
            raise ValueError(
                f"--resume_from_checkpoint last: no complete checkpoint-* folder in {training_args.output_dir!r}"
                + (f" ({len(skipped)} incomplete ones skipped)." if skipped else ".")
            )
        logger.info(f"Resuming from {checkpoint}")
    elif checkpoint is not None:
        if not os.path.isdir(checkpoint):
            raise ValueError(f"--resume_from_checkpoint {checkpoint!r} is not a folder.")
        problem = checkpoint_problem(checkpoint)
        if problem:
            raise ValueError(f"--resume_from_checkpoint {checkpoint!r} cannot be resumed from: {problem}.")

    # The config first (cheap), so that shape mismatches fail before the data and the weights are loaded.
    from_checkpoint = model_args.model_name_or_path is not None
    if from_checkpoint:
        config = AutoConfig.from_pretrained(
            model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
        )
    else:
        config = load_preset_config(model_args)
    sequence_length = data_args.sequence_length or getattr(config, "training_length", None)
    if sequence_length is None:
        raise ValueError("The config records no training_length: give --sequence_length.")
    check_block_size(config, sequence_length)

    raw_datasets = load_raw_datasets(data_args)
    tokenizer = get_tokenizer(
        model_args,
        training_args,
        raw_datasets["train"],
        data_args.text_column,
        vocab_size=model_args.tokenizer_vocab_size or config.vocab_size,
        checkpoint=checkpoint,
    )
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no end-of-sequence token, which separates documents in packed sequences.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The saved tokenizer serves a decoder-only model: batched generate() needs left padding (training packs
    # sequences and pads nothing). save_pretrained writes `init_kwargs`, not the attribute, so both are set.
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    if from_checkpoint:
        check_tokenizer_matches_checkpoint(config, tokenizer)

    # The config records what the model was trained with: the tokenizer's special ids and the training length.
    if not from_checkpoint:
        config.vocab_size = len(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    # Only `training_length` records it: `max_position_embeddings` stays the (unbounded) input length generate()
    # and lm-evaluation-harness read, since BST runs at any length.
    config.training_length = sequence_length

    packed = tokenize_and_pack(raw_datasets, tokenizer, sequence_length, data_args, training_args)
    train_dataset = packed["train"]
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(data_args.max_train_samples, len(train_dataset))))
    eval_dataset = evenly_spaced(packed["validation"], data_args.max_eval_samples)

    if from_checkpoint:
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, config=config, trust_remote_code=model_args.trust_remote_code
        )
    else:
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
    num_parameters = sum(p.numel() for p in model.parameters())
    logger.info(f"{type(model).__name__}: {num_parameters / 1e6:.2f}M parameters, vocabulary {config.vocab_size}")
    # The checkpoint's generation config would otherwise keep the preset's special ids.
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    callbacks = [FiniteWeightsCallback()]
    if data_args.max_train_minutes:
        callbacks.append(TimeLimitCallback(data_args.max_train_minutes))
    trainer = PerplexityTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        callbacks=callbacks,
        ssm_learning_rate_scale=model_args.ssm_learning_rate_scale,
    )

    sample = model_args.sample_prompt is not None and trainer.is_world_process_zero()
    if sample:
        print_sample(model, tokenizer, model_args.sample_prompt, model_args.sample_new_tokens, "Sample before training")
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    if sample:
        print_sample(model, tokenizer, model_args.sample_prompt, model_args.sample_new_tokens, "Sample after training")
    trainer.save_model()  # model (safetensors) + tokenizer + config in --output_dir
    train_metrics = dict(train_result.metrics, train_sequences=len(train_dataset), sequence_length=sequence_length)
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)
    trainer.save_state()

    eval_metrics = trainer.evaluate()
    eval_metrics["eval_perplexity"] = perplexity(eval_metrics["eval_loss"])
    eval_metrics["eval_sequences"] = len(eval_dataset)
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    if trainer.is_world_process_zero():
        if trainer.state.global_step < trainer.state.max_steps:
            print(
                f"Training stopped after {trainer.state.global_step} of {trainer.state.max_steps} steps "
                "(--max_train_minutes): the model is less trained than planned."
            )
        print(
            f"Validation perplexity: {eval_metrics['eval_perplexity']:.2f} (loss {eval_metrics['eval_loss']:.4f} "
            f"over {len(eval_dataset)} sequences of {sequence_length} tokens); model and tokenizer saved in "
            f"{training_args.output_dir}"
        )
    return eval_metrics


if __name__ == "__main__":
    main()
