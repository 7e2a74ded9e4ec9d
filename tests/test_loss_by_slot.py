"""The loss-by-slot diagnostic (bst_tools/evaluation.py) and its SSM ablation hooks: counts and
values. Tiny random models."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from bst_tools.evaluation import loss_by_slot, slot_groups, ssm_reach_limited, ssm_zeroed, summarise_slots
from modeling_bst import BSTForCausalLM
from modeling_bst.modeling_bst import BlockLayout

CPU = torch.device("cpu")


def random_windows(num_windows, length, vocab_size=97, seed=0):
    return torch.randint(2, vocab_size, (num_windows, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BSTForCausalLM(tiny_config(bst_variant="sh", ssm_kernel="s4")).eval()


def test_counts_per_slot():
    # Windows of 34 tokens, blocks of 8: positions 0..32 predict. Skipping the first block leaves positions 8..32:
    # slot 0 at 8, 16, 24, 32 (4 per window), every other slot 3 times per window.
    model = BSTForCausalLM(tiny_config()).eval()
    stats = loss_by_slot(model, random_windows(3, 34), 8, 2, CPU)
    assert stats["count"].tolist() == [12] + [9] * 7
    assert stats["total_count"] == 3 * 33
    # Every position counted: positions 0..32 -> slot 0 five times, slots 1-7 four times per window.
    stats = loss_by_slot(model, random_windows(3, 34), 8, 2, CPU, skip_first_block=False)
    assert stats["count"].tolist() == [15] + [12] * 7
    # A window of exactly one block: nothing after the first block, and the last slot never predicts.
    stats = loss_by_slot(model, random_windows(2, 8), 8, 2, CPU)
    assert stats["count"].sum() == 0 and stats["total_count"] == 14


def test_per_slot_losses_average_back_to_the_overall_loss(model):
    windows = random_windows(4, 40)
    stats = loss_by_slot(model, windows, 8, 3, CPU, skip_first_block=False)
    with torch.no_grad():
        reference = model(input_ids=windows, labels=windows).loss.item()  # mean next-token loss over all positions
    assert stats["total_nll"] / stats["total_count"] == pytest.approx(reference, rel=1e-5)
    assert stats["nll"].sum().item() == pytest.approx(stats["total_nll"], rel=1e-9)
    assert stats["count"].sum().item() == stats["total_count"]


def test_per_slot_values_match_a_direct_computation(model):
    windows = random_windows(3, 32)
    stats = loss_by_slot(model, windows, 8, 2, CPU)
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]
    nll = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")  # (3, 31)
    hits = logits.argmax(-1) == windows[:, 1:]
    for slot in range(8):
        positions = [t for t in range(8, 31) if t % 8 == slot]
        assert stats["nll"][slot].item() == pytest.approx(nll[:, positions].sum().item(), rel=1e-5)
        assert stats["correct"][slot].item() == hits[:, positions].sum().item()
    # One window at a time gives the same sums as several per batch.
    one_by_one = loss_by_slot(model, windows, 8, 1, CPU)
    torch.testing.assert_close(one_by_one["nll"], stats["nll"], rtol=1e-6, atol=1e-6)


def test_slot_groups_and_summary():
    assert slot_groups(128) == [(0, 4), (4, 16), (16, 64), (64, 128)]
    assert slot_groups(512) == [(0, 4), (4, 16), (16, 64), (64, 256), (256, 512)]
    assert slot_groups(8) == [(0, 4), (4, 8)]
    stats = {
        "nll": torch.tensor([8.0, 6.0, 6.0, 4.0, 3.0, 3.0, 2.0, 2.0], dtype=torch.float64),
        "correct": torch.tensor([0, 1, 1, 1, 2, 2, 2, 2]),
        "count": torch.tensor([2, 2, 2, 2, 2, 2, 2, 1]),
    }
    summary = summarise_slots(stats)
    assert summary["loss"] == [4.0, 3.0, 3.0, 2.0, 1.5, 1.5, 1.0, 2.0]
    assert summary["accuracy"][0] == 0.0 and summary["accuracy"][7] == 2.0
    assert [group["slots"] for group in summary["groups"]] == ["0-3", "4-7"]
    assert summary["groups"][0]["loss"] == pytest.approx(24 / 8)
    assert summary["groups"][1]["loss"] == pytest.approx(10 / 7)
    # Slots 0-3 (3.0 per prediction) minus the last half of the block, slots 4-7 (10 / 7 per prediction).
    assert summary["context_gain"] == pytest.approx(3.0 - 10 / 7)


def test_ssm_ablation_changes_nothing_without_bst_layers():
    model = BSTForCausalLM(tiny_config(bst_layers=[])).eval()
    windows = random_windows(2, 32)
    stats = loss_by_slot(model, windows, 8, 2, CPU)
    with ssm_zeroed(model) as hooked:
        ablated = loss_by_slot(model, windows, 8, 2, CPU)
    assert hooked == 0
    assert torch.equal(ablated["nll"], stats["nll"]) and ablated["total_nll"] == stats["total_nll"]


@pytest.mark.parametrize("variant", ["sh", "mf"])
def test_ssm_ablation_changes_a_model_whose_ssm_matters(variant):
    model = BSTForCausalLM(tiny_config(bst_variant=variant)).eval()
    with torch.no_grad():  # a freshly initialised cross-attention half of o_proj is zero: give the context a say
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.attention.o_proj.weight, std=0.5)
    windows = random_windows(2, 32)
    stats = loss_by_slot(model, windows, 8, 2, CPU)
    seen = []
    with ssm_zeroed(model) as hooked:
        # A hook registered after the ablation's sees the output that the layer goes on with.
        recorder = model.model.layers[0].ssm.register_forward_hook(lambda module, inputs, output: seen.append(output))
        ablated = loss_by_slot(model, windows, 8, 2, CPU)
        recorder.remove()
    assert hooked == 2  # both layers of the tiny config are BST layers
    # "mf" reads its SSM at the 4 block ends of the 32 tokens only.
    expected_shape = (2, 32) if variant == "sh" else (2, 4)
    assert len(seen) == 1 and seen[0].shape[:2] == expected_shape and torch.count_nonzero(seen[0]) == 0
    assert (ablated["nll"] - stats["nll"]).abs().max() > 1e-3
    # The hooks are gone after the block: the same numbers as before.
    again = loss_by_slot(model, windows, 8, 2, CPU)
    torch.testing.assert_close(again["nll"], stats["nll"], rtol=0, atol=0)



@pytest.mark.parametrize("kernel", ["s4", "unstructured"])
def test_ssm_reach_limit_is_the_convolution_with_the_filter_cut(kernel):
    """Float64: with the reach cut at 5 taps, the SSM's output at t is sum_{l<5} K[l] u[t-l] + skip u[t], K the
    module's own filter; outside the block the SSM reads all of u[0..t] again."""
    config = tiny_config(ssm_kernel=kernel)
    model = BSTForCausalLM(config).double().eval()
    ssm = model.model.layers[0].ssm
    torch.nn.init.normal_(ssm.skip)  # the initialisation starts it at zero, which would hide the skip term
    inputs = torch.randn(2, 24, config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    layout = BlockLayout.build(torch.ones(2, 24, dtype=torch.bool), torch.zeros(2, dtype=torch.long), 8, False, False)
    with torch.no_grad():
        taps = ssm.kernel(24)[:, 0]  # (D, L): one filter per channel ("sh")
        skip = ssm.skip[:, 0]
        uncut = ssm(inputs, layout, None)[..., 0]
        with ssm_reach_limited(model, 5) as cut_count:
            cut = ssm(inputs, layout, None)[..., 0]
        again = ssm(inputs, layout, None)[..., 0]

    def reference(reach):  # direct time-domain sums, (B, T, D)
        return torch.stack([
            sum(taps[:, lag] * inputs[:, t - lag] for lag in range(min(reach, t + 1))) + skip * inputs[:, t]
            for t in range(24)
        ], dim=1)

    assert cut_count == 2
    torch.testing.assert_close(cut, reference(5), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(uncut, reference(24), rtol=1e-10, atol=1e-10)
    assert torch.equal(again, uncut)


def test_ssm_reach_limit_changes_only_positions_past_it():
    """Logits of the whole model: a cut at the window's length changes nothing, a cut at 8 tokens changes no position
    before 8 (no SSM input further back exists there) and every position from 8 on."""
    model = BSTForCausalLM(tiny_config()).eval()
    with torch.no_grad():  # a freshly initialised cross-attention half of o_proj is zero: give the context a say
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.attention.o_proj.weight, std=0.5, generator=torch.Generator().manual_seed(0))
        windows = random_windows(2, 32)
        logits = model(input_ids=windows, use_cache=False).logits
        with ssm_reach_limited(model, 32):
            same = model(input_ids=windows, use_cache=False).logits
        with ssm_reach_limited(model, 8):
            cut = model(input_ids=windows, use_cache=False).logits
    assert torch.equal(same, logits)
    torch.testing.assert_close(cut[:, :8], logits[:, :8], rtol=0, atol=1e-5)  # equal up to the FFT's rounding
    assert (cut[:, 8:] - logits[:, 8:]).abs().amax(-1).min() > 1e-4


def test_ssm_reach_limit_refuses_what_it_cannot_cut():
    model = BSTForCausalLM(tiny_config()).eval()
    windows = random_windows(1, 16)
    with pytest.raises(ValueError, match="use_cache=False"), ssm_reach_limited(model, 8), torch.no_grad():
        model(input_ids=windows, use_cache=True)
    with pytest.raises(ValueError, match="at least 1"), ssm_reach_limited(model, 0):
        pass
    with pytest.raises(ValueError, match='"mf" with "s4"'), ssm_reach_limited(BSTForCausalLM(tiny_config(bst_variant="mf")), 8):
        pass
