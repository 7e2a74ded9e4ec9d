import importlib.util
import logging
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from modeling_bst import BSTConfig, BSTForCausalLM


SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "scripts"
VARIANTS_AND_KERNELS = [(v, k) for v in ("sh", "mh", "mf") for k in ("s4", "unstructured")]


def tiny_config(**overrides) -> BSTConfig:
    """A model small enough to run every test in milliseconds, with blocks of 8 tokens so that short sequences
    already cross several block boundaries."""
    fields = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        block_size=8,
        ssm_state_size=8,
        training_length=32,
        pad_token_id=0,
        eos_token_id=1,
    )
    fields.update(overrides)
    if fields.get("bst_variant") == "mf" and "num_context_states" not in overrides:
        fields["num_context_states"] = 4
    return BSTConfig(**fields)


def open_context_path(model):
    """A new BST layer starts as its SSM-free self: the cross-attention half of `o_proj` is zero, so nothing reaches
    the output (or gets a gradient) through the context states. Tests of that path give it the self half's scale."""
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.is_bst_layer:
                torch.nn.init.normal_(layer.attention.o_proj.weight, std=model.config.initializer_range)
    return model


def tiny_model(**overrides) -> BSTForCausalLM:
    """A tiny model in eval mode with its context path open, so that the SSM reaches the logits."""
    return open_context_path(BSTForCausalLM(tiny_config(**overrides))).eval()


def fresh_copy(model: BSTForCausalLM) -> BSTForCausalLM:
    """A new model with the same weights: what the outputs must be when nothing is remembered between calls."""
    copied = BSTForCausalLM(model.config).eval()
    copied.load_state_dict(model.state_dict())
    return copied


@contextmanager
def logged_messages(logger: logging.Logger):
    """Collects the messages `logger` emits inside the block (libraries' loggers need not propagate to caplog)."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def run_in_chunks(model, input_ids, chunk_sizes, attention_mask=None):
    """Feeds `input_ids` chunk by chunk through one cache; returns the concatenated logits and the cache."""
    cache, logits, start = None, [], 0
    for size in chunk_sizes:
        mask = None if attention_mask is None else attention_mask[:, : start + size]
        output = model(input_ids[:, start : start + size], attention_mask=mask, past_key_values=cache, use_cache=True)
        cache = output.past_key_values
        logits.append(output.logits)
        start += size
    assert start == input_ids.shape[1]
    return torch.cat(logits, dim=1), cache


@torch.no_grad()
def assert_left_padded_decoding_equals_the_full_forward(model):
    """Rows of 8, 13 and 21 real tokens, left-padded: prefill, then one token at a time, and uneven chunks, equal the
    full forward pass as logits; so does each row alone."""
    ids = torch.randint(2, 97, (3, 21))
    mask = torch.ones_like(ids)
    mask[0, :13], mask[1, :8] = 0, 0
    full = model(input_ids=ids, attention_mask=mask).logits * mask[..., None]
    for chunks in ([2] + [1] * 19, [11] + [1] * 10, [5, 9, 7]):
        chunked, _ = run_in_chunks(model, ids, chunks, attention_mask=mask)
        torch.testing.assert_close(chunked * mask[..., None], full, rtol=0, atol=1e-5, msg=str(chunks))
    for row in range(3):
        alone = model(input_ids=ids[row : row + 1, mask[row].bool()]).logits[0]
        torch.testing.assert_close(full[row, mask[row].bool()], alone, rtol=0, atol=1e-5)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def load_script(name: str):
    """scripts/NAME.py, imported by its path (scripts/ is not a package) under a private module name: a module called
    `evaluate` would shadow the Hugging Face library."""
    spec = importlib.util.spec_from_file_location(f"bst_scripts_{name}", SCRIPTS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
