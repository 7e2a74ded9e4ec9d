"""PEFT LoRA on BST: adapters on the attention projections and on the projections of the SSM context states train,
and merging them into the base weights gives the adapted model's logits.

Module names (per layer, `model.layers.<i>.attention.<name>`):
    q_proj, k_proj, v_proj, o_proj              block self-attention (o_proj also mixes the cross-attention heads)
    cross_q_proj, context_k_proj, context_v_proj cross-attention to the SSM context states (BST layers only)
"""

import pytest
import torch
from conftest import open_context_path, tiny_config

from modeling_bst import BSTForCausalLM


peft = pytest.importorskip("peft")

ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
CONTEXT_MODULES = ["cross_q_proj", "context_k_proj", "context_v_proj"]


def train_lora(config, target_modules, steps=5):
    """Wraps a tiny model with LoRA, trains a few steps; returns the PEFT model, the base weights before training and
    a batch."""
    torch.manual_seed(0)
    model = open_context_path(BSTForCausalLM(config))  # LoRA on the context path must reach the output
    base_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules)
    peft_model = peft.get_peft_model(model, lora_config)
    input_ids = torch.randint(2, config.vocab_size, (2, 21))  # 2 full blocks of 8 + a partial one
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(steps):
        loss = peft_model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return peft_model.eval(), base_state, input_ids, losses


@pytest.mark.parametrize(
    "variant,kernel", [("sh", "s4"), ("mf", "unstructured"), ("mh", "s4")], ids=["sh-s4", "mf-unstructured", "mh-s4"]
)
def test_lora_targets_attention_and_context_projections(variant, kernel):
    peft_model, _, _, _ = train_lora(
        tiny_config(bst_variant=variant, ssm_kernel=kernel, bst_layers=[1]), ATTENTION_MODULES + CONTEXT_MODULES
    )
    adapted = {name.split(".base_layer")[0] for name, _ in peft_model.named_modules() if name.endswith(".base_layer")}
    # Layer 0 is a plain block-attention layer (no context projections); layer 1 is a BST layer.
    expected = {f"layers.0.attention.{name}" for name in ATTENTION_MODULES}
    expected |= {f"layers.1.attention.{name}" for name in ATTENTION_MODULES + CONTEXT_MODULES}
    assert {name.split("model.")[-1] for name in adapted} == expected


@pytest.mark.parametrize(
    "variant,kernel",
    [
        ("sh", "s4"),
        ("mf", "unstructured"),
        ("mh", "s4"),
    ],
    ids=["sh-s4", "mf-unstructured", "mh-s4"],
)
def test_lora_trains_and_merged_model_matches(variant, kernel):
    config = tiny_config(bst_variant=variant, ssm_kernel=kernel, bst_layers=[1])
    peft_model, base_state, input_ids, losses = train_lora(config, ATTENTION_MODULES + CONTEXT_MODULES)
    assert losses[-1] < losses[0], f"LoRA training did not lower the loss: {losses}"

    # Only the adapters trained: the base weights are untouched.
    base_model = peft_model.get_base_model()
    for name, tensor in base_model.state_dict().items():
        if "lora_" not in name:
            torch.testing.assert_close(tensor, base_state[name.replace(".base_layer", "")], rtol=0, atol=0)

    with torch.no_grad():
        adapted_logits = peft_model(input_ids=input_ids).logits
        peft_model.disable_adapter_layers()
        base_logits = peft_model(input_ids=input_ids).logits
        peft_model.enable_adapter_layers()
    assert (adapted_logits - base_logits).abs().max() > 1e-3

    merged = peft_model.merge_and_unload()
    assert type(merged) is BSTForCausalLM
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        merged_logits = merged(input_ids=input_ids).logits
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "variant",
    [
        "sh",
        "mf",
        "mh",
    ],
)
def test_lora_on_context_projections_alone_changes_the_output(variant):
    """Adapters on the context projections only: they must reach the forward pass (and so receive gradients)."""
    config = tiny_config(bst_variant=variant, bst_layers=[1])
    peft_model, _, input_ids, _ = train_lora(config, CONTEXT_MODULES, steps=3)
    lora_b = [p for name, p in peft_model.named_parameters() if "lora_B" in name and "context_k_proj" in name]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b), "context_k_proj adapters received no gradient"
    with torch.no_grad():
        adapted_logits = peft_model(input_ids=input_ids).logits
        merged_logits = peft_model.merge_and_unload()(input_ids=input_ids).logits
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-4, atol=1e-4)


def test_saved_adapter_reloads(tmp_path):
    config = tiny_config(bst_layers=[1])
    peft_model, _, input_ids, _ = train_lora(config, ATTENTION_MODULES + CONTEXT_MODULES, steps=2)
    peft_model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)
    base = open_context_path(BSTForCausalLM(config))  # the same base weights as train_lora's
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=input_ids).logits, peft_model(input_ids=input_ids).logits, rtol=0, atol=1e-6
        )
