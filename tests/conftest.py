import pytest
import torch

from modeling_bst import BSTConfig


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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
