#!/usr/bin/env python
"""Train a byte-level BPE tokenizer on a corpus and save it as a `PreTrainedTokenizerFast`.

Byte-level BPE (GPT-2's scheme) needs no unknown token and keeps every byte of the input, whitespace included,
which matters for source code. `<|endoftext|>` is both the beginning- and end-of-sequence token (training
separates documents with it); `<|pad|>` is a separate padding token so that padding never masks a real
end-of-document label.

`scripts/train.py` calls `train_bpe_tokenizer` itself when no `--tokenizer_name` is given; this script is for
training one tokenizer once and sharing it between runs:

    python scripts/train_tokenizer.py --train_file data/books/train.jsonl --vocab_size 8192 --output_dir runs/tok
"""

import argparse
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN]  # ids 0 and 1, as in the presets in configuration/


def train_bpe_tokenizer(texts, vocab_size=8192, min_frequency=2, show_progress=True):
    """Train a byte-level BPE on an iterable of strings; returns a `PreTrainedTokenizerFast` whose vocabulary,
    special tokens included, has exactly `vocab_size` entries (fewer only if the corpus is too small to learn that
    many merges)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"`vocab_size` must be at least {256 + len(SPECIAL_TOKENS)} (all bytes + special tokens).")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        padding_side="left",  # for a decoder-only model: batched generate() continues each row from its last token
    )


def iterate_texts(path, text_column="text"):
    """Texts of a .jsonl file (one JSON object per line) or of a plain text file (the whole file)."""
    if path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)[text_column]
    else:
        with open(path, encoding="utf-8") as f:
            yield f.read()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_file", required=True, help="A .jsonl file (one document per line) or a text file.")
    parser.add_argument("--text_column", default="text", help="The text field of the .jsonl records.")
    parser.add_argument("--vocab_size", type=int, default=8192, help="Vocabulary size, special tokens included.")
    parser.add_argument("--min_frequency", type=int, default=2, help="Minimum count of a pair to be merged.")
    parser.add_argument("--output_dir", required=True, help="Where to save the tokenizer (save_pretrained).")
    args = parser.parse_args(argv)

    if not os.path.isfile(args.train_file):
        parser.error(f"--train_file {args.train_file!r} does not exist.")
    tokenizer = train_bpe_tokenizer(
        iterate_texts(args.train_file, args.text_column), args.vocab_size, args.min_frequency
    )
    tokenizer.save_pretrained(args.output_dir)
    print(f"Saved a byte-level BPE tokenizer with {len(tokenizer)} tokens to {args.output_dir}")


if __name__ == "__main__":
    main()
