"""The byte-level BPE tokenizer that scripts/train.py trains when given none, scripts/train_tokenizer.py trains on
request, and the quality experiment trains per corpus.

Byte-level BPE (GPT-2's scheme) needs no unknown token and keeps every byte of the input, whitespace included,
which matters for source code. `<|endoftext|>` is both the beginning- and end-of-sequence token (training
separates documents with it); `<|pad|>` is a separate padding token so that padding never masks a real
end-of-document label.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# The files of a saved tokenizer: a folder holding one of them has a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

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
