"""Raw text for the entry points: the data arguments of scripts/train.py and the document loader that
scripts/train.py and scripts/evaluate.py read their splits with."""

import hashlib
import math
import os
from dataclasses import dataclass, field

import datasets

TEXT_FILE_EXTENSIONS = (".txt", ".text", ".md", ".rst", ".py")
JSON_FILE_EXTENSIONS = (".jsonl", ".json")


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
