"""No silent wrong outputs (issue 12): nothing hidden on modules, honoured caches, fp32 SSM parameters, precision at
long lengths, safe resume, and clear errors for inputs, configs, caches and checkpoints that do not fit."""

import math

import pytest
import torch
from conftest import tiny_config

from modeling_bst import BSTCache, BSTForCausalLM
from modeling_bst.modeling_bst import BSTS4DKernel


def tiny_model(**overrides) -> BSTForCausalLM:
    return BSTForCausalLM(tiny_config(**overrides)).eval()


def fresh_copy(model: BSTForCausalLM) -> BSTForCausalLM:
    """A new model with the same weights: what the outputs must be when nothing is remembered between calls."""
    copied = BSTForCausalLM(model.config).eval()
    copied.load_state_dict(model.state_dict())
    return copied


def tensors_held_outside_parameters(model: torch.nn.Module) -> list[str]:
    """Module attributes, other than parameters and buffers, that hold a tensor (directly or in a tuple/list/dict)."""

    def holds_tensor(value) -> bool:
        if isinstance(value, torch.Tensor):
            return True
        if isinstance(value, (tuple, list)):
            return any(holds_tensor(v) for v in value)
        if isinstance(value, dict):
            return any(holds_tensor(v) for v in value.values())
        return False

    found = []
    for module_name, module in model.named_modules():
        for attribute, value in vars(module).items():
            if attribute in ("_parameters", "_buffers", "_modules"):
                continue
            if holds_tensor(value) or "memo" in attribute:
                found.append(f"{module_name}.{attribute}")
    return found


# --- 1, 3, 4: no state hidden on modules -------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["s4", "unstructured"])
def test_no_tensors_are_kept_on_modules_after_forward_and_generate(kernel):
    model = tiny_model(bst_variant="mf", ssm_kernel=kernel)
    input_ids = torch.randint(2, 97, (1, 300))
    with torch.no_grad():
        model(input_ids)
        model(input_ids[:, :20], use_cache=True)
        model.generate(input_ids[:, :5], max_new_tokens=5, do_sample=False)
    with torch.inference_mode():
        model(input_ids)
    assert tensors_held_outside_parameters(model) == []


@pytest.mark.parametrize("kernel", ["s4", "unstructured"])
def test_data_edits_of_ssm_parameters_change_the_outputs(kernel):
    """EMA copies, hand-written SGD and weight copies write through `.data`, which does not bump `_version`."""
    model = tiny_model(ssm_kernel=kernel)
    input_ids = torch.randint(2, 97, (2, 30))
    with torch.no_grad():
        before = model(input_ids).logits
        for parameter in model.model.layers[0].ssm.kernel_generator.parameters():
            parameter.data.mul_(1.5)
        after = model(input_ids).logits
        expected = fresh_copy(model)(input_ids).logits
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-6)


def test_a_new_cache_sees_the_current_parameters():
    """Generation reuses the kernel values for the life of one cache; the next generate() starts from the edited
    parameters."""
    model = tiny_model()
    prompt = torch.randint(2, 97, (1, 9))
    settings = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        model.generate(prompt, **settings)
        for layer in model.model.layers:
            layer.ssm.kernel_generator.log_dt.data.add_(1.0)
        edited = torch.stack(model.generate(prompt, **settings).logits, 1)
        expected = torch.stack(fresh_copy(model).generate(prompt, **settings).logits, 1)
    torch.testing.assert_close(edited, expected, rtol=0, atol=1e-6)


def test_training_after_inference_mode_evaluation_with_frozen_ssm_parameters():
    """PEFT's LoRA freezes the SSM; the evaluation before training runs under inference mode."""
    model = tiny_model()
    input_ids = torch.randint(2, 97, (2, 20))
    for layer in model.model.layers:
        layer.ssm.kernel_generator.requires_grad_(False)
    with torch.inference_mode():
        model.eval()
        model(input_ids)
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    assert model.lm_head.weight.grad is not None


@pytest.mark.parametrize("kernel", ["s4", "unstructured"])
def test_decoding_does_not_regenerate_the_kernel_per_token(kernel, monkeypatch):
    model = tiny_model(ssm_kernel=kernel, bst_layers=[0])
    calls = {"kernel": 0, "discretize": 0}
    generator = model.model.layers[0].ssm.kernel_generator
    generator.register_forward_hook(lambda *args: calls.__setitem__("kernel", calls["kernel"] + 1))
    if kernel == "s4":
        discretize = BSTS4DKernel.discretize

        def counted(self):
            calls["discretize"] += 1
            return discretize(self)

        monkeypatch.setattr(BSTS4DKernel, "discretize", counted)
    with torch.no_grad():
        model.generate(torch.randint(2, 97, (1, 10)), max_new_tokens=60, min_new_tokens=60, do_sample=False)
    if kernel == "s4":
        assert calls == {"kernel": 0, "discretize": 1}  # once per cache
    else:
        assert calls["kernel"] <= 4  # taps of 10, 20, 40, 80 tokens: doubled when the history outgrows them


# --- 2: a passed cache is honoured ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["s4", "unstructured"])
def test_a_passed_cache_is_continued_even_with_use_cache_false(kernel):
    model = tiny_model(bst_variant="mf", ssm_kernel=kernel)
    input_ids = torch.randint(2, 97, (2, 30))
    with torch.no_grad():
        full = model(input_ids).logits
        cache = model(input_ids[:, :20], use_cache=True).past_key_values
        continued = model(input_ids[:, 20:], past_key_values=cache, use_cache=False)
        # A config saved after gradient-checkpointed training says use_cache=False.
        model.config.use_cache = False
        cache = model(input_ids[:, :20], past_key_values=BSTCache(model.config)).past_key_values
        from_config = model(input_ids[:, 20:], past_key_values=cache).logits
    assert continued.past_key_values is not None and continued.past_key_values.get_seq_length() == 30
    torch.testing.assert_close(continued.logits, full[:, 20:], rtol=0, atol=1e-4)
    torch.testing.assert_close(from_config, full[:, 20:], rtol=0, atol=1e-4)


def test_a_passed_cache_under_gradient_checkpointing_in_training_is_refused():
    model = tiny_model()
    input_ids = torch.randint(2, 97, (1, 12))
    with torch.no_grad():
        cache = model(input_ids[:, :6], use_cache=True).past_key_values
    model.activation_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(input_ids[:, 6:], past_key_values=cache)
