"""scripts/experiments/far_context_swap.py: how much a model's loss depends on the particular text beyond its window."""

import pytest
from conftest import load_script, tiny_model
import torch

pytestmark = pytest.mark.lab

far_context_swap = load_script("experiments/far_context_swap")

WINDOW, SWAP_END, SINKS = 40, 16, 2  # blocks of 8 (tiny_config): scored positions 24 .. 31


def variants():
    generator = torch.Generator().manual_seed(0)
    original = torch.randint(2, 97, (3, WINDOW), generator=generator)
    foreign = torch.randint(2, 97, (3, SWAP_END), generator=generator)
    return {
        "original": original,
        "same kind": far_context_swap.swapped(original, original.roll(-1, dims=0), SINKS, SWAP_END),
        "other kind": far_context_swap.swapped(original, foreign, SINKS, SWAP_END),
    }


def test_scored_span_and_swapped_text():
    assert far_context_swap.scored_span(16, 8, 40) == (24, 32)
    assert far_context_swap.scored_span(16, 8, 32) == (24, 31)  # the window's last position predicts nothing
    with pytest.raises(ValueError, match="multiple of the block size"):
        far_context_swap.scored_span(12, 8, 40)
    with pytest.raises(ValueError, match="must hold"):
        far_context_swap.scored_span(16, 8, 28)
    texts = variants()
    original, same = texts["original"], texts["same kind"]
    assert torch.equal(same[:, :SINKS], original[:, :SINKS]) and torch.equal(same[:, SWAP_END:], original[:, SWAP_END:])
    assert torch.equal(same[0, SINKS:SWAP_END], original[1, SINKS:SWAP_END])


def test_attention_alone_cannot_see_the_far_text_but_an_ssm_can():
    """One layer with previous-block attention: without an SSM the scored positions never see tokens before SWAP_END,
    so every swap changes their loss by exactly 0; with an SSM layer the swap changes it, all of it through the SSM
    path (zeroed, the change is exactly 0 again)."""
    span = far_context_swap.scored_span(SWAP_END, 8, WINDOW)
    texts = variants()
    attention_only = tiny_model(num_hidden_layers=1, bst_layers=[], attend_previous_block=True)
    result = far_context_swap.evaluate_model(attention_only, texts, span, delay=None)
    assert set(result) == {"as trained"}
    for effect in result["as trained"]["swap_minus_original"].values():
        assert effect["mean"] == 0.0 and effect["windows"] == 3

    with_ssm = tiny_model(num_hidden_layers=1, bst_layers=[0], attend_previous_block=True)
    result = far_context_swap.evaluate_model(with_ssm, texts, span, delay=None)
    for name in ("same kind", "other kind"):
        assert abs(result["as trained"]["swap_minus_original"][name]["mean"]) > 1e-4
        assert result["SSM outputs zeroed"]["swap_minus_original"][name]["mean"] == 0.0
        torch.testing.assert_close(result["SSM part of the swap effect"][name]["mean"],
                                   result["as trained"]["swap_minus_original"][name]["mean"])


def test_a_delay_past_the_far_text_hides_it_from_the_ssm():
    """Delayed by 8, the SSM of the scored positions 24 .. 31 still reads the far text; delayed by 32 it reads nothing
    there (t - 32 < 0), so no swap reaches them beyond the FFT convolution's float32 round-off."""
    span = far_context_swap.scored_span(SWAP_END, 8, WINDOW)
    model = tiny_model(num_hidden_layers=1, bst_layers=[0], attend_previous_block=True)
    reaching = far_context_swap.evaluate_model(model, variants(), span, delay=8)
    assert abs(reaching["as trained"]["swap_minus_original"]["other kind"]["mean"]) > 1e-4
    blind = far_context_swap.evaluate_model(model, variants(), span, delay=32)
    assert abs(blind["as trained"]["swap_minus_original"]["other kind"]["mean"]) < 1e-5  # FFT round-off only
