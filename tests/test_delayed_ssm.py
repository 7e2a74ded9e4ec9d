"""scripts/experiments/delayed_ssm.py: the SSM filters delayed by D tokens while upcycling and scoring (seconds)."""

import json

import pytest
from conftest import load_script, tiny_config
import torch
from test_evaluate_length import character_tokenizer, tiny_llama

from bst_tools.evaluation import ssm_zeroed
from modeling_bst import BSTForCausalLM
from modeling_bst.modeling_bst import BlockLayout

pytestmark = pytest.mark.lab

delayed_ssm = load_script("experiments/delayed_ssm")

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. " * 8


def test_delayed_filters_read_only_inputs_at_least_the_delay_back():
    """Float64: delayed by 5, the SSM output at t is sum_{l>=5} K[l] u[t-l] (no skip term), K the module's filter;
    the skip is held at zero and frozen; on exit the hooks are gone."""
    model = BSTForCausalLM(tiny_config()).double().eval()
    ssm = model.model.layers[0].ssm
    torch.nn.init.normal_(ssm.skip)
    inputs = torch.randn(2, 24, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    layout = BlockLayout.build(torch.ones(2, 24, dtype=torch.bool), torch.zeros(2, dtype=torch.long), 8, False, False)
    with torch.no_grad():
        taps = ssm.kernel(24)[:, 0]  # (D, L)
        with delayed_ssm.ssm_delayed(model, 5) as delayed_count:
            delayed = ssm(inputs, layout, None)[..., 0]
        assert not ssm.kernel_generator._forward_hooks
    reference = torch.stack([
        sum((taps[:, lag] * inputs[:, t - lag] for lag in range(5, t + 1)), torch.zeros_like(inputs[:, 0]))
        for t in range(24)
    ], dim=1)
    assert delayed_count == 2
    torch.testing.assert_close(delayed, reference, rtol=1e-10, atol=1e-10)
    assert torch.equal(ssm.skip, torch.zeros_like(ssm.skip)) and not ssm.skip.requires_grad


def test_upcycles_with_the_delay_and_scores_the_delayed_model(tmp_path):
    """Two upcycling steps with the SSM of layer 1 delayed by 16 tokens: the saved skip is zero; scored with the
    delay, positions before 16 are the model with its SSM zeroed (nothing that far back to read), and the JSON has
    both rows."""
    source = tmp_path / "llama"
    tiny_llama().save_pretrained(source)
    character_tokenizer().save_pretrained(source)
    (source / "book.txt").write_text(TEXT)
    results = delayed_ssm.main([
        "--delay", "16", "--lengths", "32", "--total_tokens", "64", "--",
        "--model_name_or_path", str(source), "--text_files", str(source / "book.txt"), "--block_size", "8",
        "--attend_previous_block", "--bst_layers", "1", "--sequence_length", "32", "--max_steps", "2",
        "--batch_size", "2", "--learning_rate", "1e-2", "--output_dir", str(tmp_path / "out"),
    ])
    assert json.loads((tmp_path / "out" / "delayed_ssm_evaluation.json").read_text()) == results
    assert list(results["models"]) == ["delayed SSM", "delayed SSM, outputs zeroed"]
    assert [row["length"] for row in results["models"]["delayed SSM"]] == [32]

    model = BSTForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(model.model.layers[1].ssm.skip, torch.zeros_like(model.model.layers[1].ssm.skip))
    input_ids = torch.randint(4, 40, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), delayed_ssm.ssm_delayed(model, 16):
        delayed = model(input_ids=input_ids, use_cache=False).logits
        with ssm_zeroed(model):
            zeroed = model(input_ids=input_ids, use_cache=False).logits
    torch.testing.assert_close(delayed[:, :16], zeroed[:, :16], rtol=0, atol=1e-4)  # up to FFT rounding
    assert (delayed[:, 16:] - zeroed[:, 16:]).abs().max() > 1e-2  # the trained SSM path reads what lies 16 back
