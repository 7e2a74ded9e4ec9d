"""No silent wrong outputs (issue 12): nothing hidden on modules, honoured caches, fp32 SSM parameters, precision at
long lengths, safe resume, and clear errors for inputs, configs, caches and checkpoints that do not fit."""

import math

import pytest
import torch
from conftest import open_context_path, tiny_config

from modeling_bst import BSTCache, BSTForCausalLM
from modeling_bst.modeling_bst import BSTS4DKernel


def tiny_model(**overrides) -> BSTForCausalLM:
    """With the context path open (conftest.open_context_path): these tests need the SSM to reach the output."""
    return open_context_path(BSTForCausalLM(tiny_config(**overrides))).eval()


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


# --- 1, 3, 4: no state hidden on modules ---------------------------------------------------------------------------


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


@pytest.mark.parametrize("variant, kernel", [("sh", "s4"), ("mf", "unstructured")])
def test_a_training_step_builds_no_cache_unless_one_is_asked_for(variant, kernel, monkeypatch):
    """In training mode the saved default (`use_cache=True`) builds no generation cache and no final SSM state (they
    cost 2x-8x a step), as in Mamba2; `use_cache=True` passed to the call still does. Same loss and gradients."""
    model = tiny_model(bst_variant=variant, ssm_kernel=kernel).train()
    assert model.config.use_cache
    built = []
    make_cache = BSTCache.__init__
    monkeypatch.setattr(
        BSTCache, "__init__", lambda cache, *args, **kwargs: built.append(make_cache(cache, *args, **kwargs))
    )
    input_ids = torch.randint(2, 97, (2, 21))
    outputs, gradients = {}, {}
    for use_cache in (None, False):
        model.zero_grad()
        outputs[use_cache] = model(input_ids, labels=input_ids, use_cache=use_cache)
        outputs[use_cache].loss.backward()
        gradients[use_cache] = [parameter.grad.clone() for parameter in model.parameters()]
    assert outputs[None].past_key_values is None and built == []
    assert torch.equal(outputs[None].loss, outputs[False].loss)
    assert all(torch.equal(a, b) for a, b in zip(gradients[None], gradients[False]))
    assert isinstance(model(input_ids, labels=input_ids, use_cache=True).past_key_values, BSTCache)
    assert len(built) == 1


def test_a_passed_cache_under_gradient_checkpointing_in_training_is_refused():
    model = tiny_model()
    input_ids = torch.randint(2, 97, (1, 12))
    with torch.no_grad():
        cache = model(input_ids[:, :6], use_cache=True).past_key_values
    model.activation_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(input_ids[:, 6:], past_key_values=cache)


# --- 6: precision at long lengths -----------------------------------------------------------------------------------


def reference_s4_kernel(module: BSTS4DKernel, length: int) -> torch.Tensor:
    """K[l] = 2 Re(sum_n C_n dB_n dA_n^l) from the same parameters, all in float64, with the naive table of powers."""
    a = torch.complex(-torch.exp(module.log_neg_a_real.double()), module.a_imag.double())
    dt_a = torch.exp(module.log_dt.double())[:, None] * a
    c_db = torch.view_as_complex(module.c.double().contiguous()) * torch.expm1(dt_a) / a
    pieces = []
    for start in range(0, length, 8192):
        steps = torch.arange(start, min(length, start + 8192), dtype=torch.float64)
        pieces.append(2 * (c_db[..., None] * torch.exp(dt_a[..., None] * steps)).sum(-2).real)
    return torch.cat(pieces, -1)


def relative_kernel_error(kernel: torch.Tensor, reference: torch.Tensor) -> float:
    """Worst channel's max |error| over its max |tap|."""
    kernel, reference = kernel.detach().double(), reference.detach()
    return float(((kernel - reference).abs().amax(-1) / reference.abs().amax(-1)).max())


def slow_s4_kernel(channels: int = 12) -> BSTS4DKernel:
    """Step sizes over four decades and modes that barely decay: the phase of dA^l then matters at every l."""
    module = BSTS4DKernel(tiny_config(), channels)
    module.reset_parameters()
    with torch.no_grad():
        module.log_dt.copy_(torch.linspace(math.log(1e-4), math.log(1.0), channels))
        module.log_neg_a_real[: channels // 2].fill_(math.log(1e-4))  # slow modes; the rest keep A = -1/2 + i pi n
    return module


def test_s4_kernel_is_accurate_to_1e_5_at_64k_tokens_for_any_step_size():
    # Before: exp(l log dA) in complex64, 1.4e-3 at 16k and 2.9e-3 at 64k. Now ~4e-7.
    module = slow_s4_kernel()
    with torch.no_grad():
        kernel = module(65536)
    assert kernel.dtype == torch.float32
    assert relative_kernel_error(kernel, reference_s4_kernel(module, 65536)) < 1e-5


def test_cached_equals_full_forward_at_16k_tokens_with_slow_modes():
    model = tiny_model(num_hidden_layers=1, ssm_state_size=64)
    generator = model.model.layers[0].ssm.kernel_generator
    with torch.no_grad():
        generator.log_neg_a_real.fill_(math.log(1e-5))
        generator.log_dt.copy_(torch.linspace(math.log(1e-3), math.log(1e-1), generator.log_dt.shape[0]))
    context_states = []
    model.model.layers[0].ssm.register_forward_hook(lambda module, args, output: context_states.append(output))
    input_ids = torch.randint(2, 97, (1, 16384))
    with torch.no_grad():
        full = model(input_ids, use_cache=False).logits
        cache = model(input_ids[:, :16380], use_cache=True).past_key_values
        steps = [model(input_ids[:, t : t + 1], past_key_values=cache).logits for t in range(16380, 16384)]
        decoded = torch.cat(steps, 1)
        cache = model(input_ids[:, :5000], use_cache=True).past_key_values
        chunked = model(input_ids[:, 5000:], past_key_values=cache).logits
    full_states = context_states[0]
    decoded_states = torch.cat(context_states[2:6], 1)
    chunked_states = context_states[-1]
    scale = full_states.abs().max()
    # Before: 9.9e-3 (3.5e-5 of the states' scale) after a 16k prefill. Now ~3e-7 of the scale.
    assert (decoded_states - full_states[:, -4:]).abs().max() / scale < 1e-5
    assert (chunked_states - full_states[:, 5000:]).abs().max() / scale < 1e-5
    assert (decoded - full[:, -4:]).abs().max() < 1e-4
    assert (chunked - full[:, 5000:]).abs().max() < 1e-4


def test_a_float64_model_computes_the_ssm_and_its_ffts_in_float64():
    model = tiny_model(num_hidden_layers=1).double()
    ssm = model.model.layers[0].ssm
    dtypes = []
    ssm.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    input_ids = torch.randint(2, 97, (2, 40))
    with torch.no_grad():
        kernel = ssm.kernel_generator(2000)
        full = model(input_ids).logits
        embeds = model.model.embed_tokens(input_ids)
        from_embeds = model(inputs_embeds=embeds).logits
        cache = model(input_ids[:, :13], use_cache=True).past_key_values
        continued = torch.cat([model(input_ids[:, t : t + 1], past_key_values=cache).logits for t in range(13, 40)], 1)
    assert kernel.dtype == torch.float64 and set(dtypes) == {torch.float64}
    # float32 anywhere on the way would leave errors of ~1e-7.
    assert relative_kernel_error(kernel, reference_s4_kernel(ssm.kernel_generator, 2000)) < 1e-12
    assert full.dtype == torch.float64
    torch.testing.assert_close(from_embeds, full, rtol=0, atol=1e-12)
    # The RMS norms and RoPE compute in float32 whatever the model's dtype (as in Llama): ~5e-8 here.
    torch.testing.assert_close(continued, full[:, 13:], rtol=0, atol=1e-6)


# --- 5: SSM parameters stay fp32 in a bf16 model --------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["s4", "unstructured"])
def test_from_pretrained_in_bf16_keeps_the_ssm_parameters_in_fp32(kernel, tmp_path):
    model = tiny_model(bst_variant="mh", ssm_kernel=kernel)
    model.save_pretrained(tmp_path)
    loaded = BSTForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    dtypes = {name: p.dtype for name, p in loaded.named_parameters()}
    assert {dtypes[name] for name in dtypes if ".ssm." in name} == {torch.float32}
    assert {dtypes[name] for name in dtypes if ".ssm." not in name} == {torch.bfloat16}
    for name, parameter in model.named_parameters():
        if ".ssm." in name:
            assert torch.equal(loaded.get_parameter(name), parameter), name  # not rounded on the way
    in_fp16 = BSTForCausalLM.from_pretrained(tmp_path, dtype=torch.float16)
    assert {p.dtype for name, p in in_fp16.named_parameters() if ".ssm." in name} == {torch.float32}
    input_ids = torch.randint(2, 97, (2, 200))
    with torch.no_grad():
        reference = model(input_ids).logits
        kept = loaded(input_ids).logits.float()
        cache = loaded(input_ids[:, :150], use_cache=True).past_key_values
        continued = loaded(input_ids[:, 150:], past_key_values=cache).logits.float()
        rounded = model.to(torch.bfloat16)(input_ids).logits.float()  # a plain cast rounds the SSM parameters too
    assert (kept - reference).abs().max() < (rounded - reference).abs().max()
    assert (kept - reference).abs().max() < 0.02
    assert (continued - kept[:, 150:]).abs().max() < 0.02


@pytest.mark.parametrize("variant", ["sh", "mh", "mf"])
@pytest.mark.parametrize("kernel", ["s4", "unstructured"])
def test_the_ssm_computes_in_fp32_under_bf16_autocast(variant, kernel):
    """Under autocast the SSM's own matmuls (kernel power tables, "mf" block sums) must not drop to bf16: its outputs
    equal the fp32 ones, in training (no cache) and with a cache. Before the fix the "s4" kernel was off by ~3e-3 of its
    largest tap, and "mf" crashed on CUDA."""
    model = tiny_model(bst_variant=variant, ssm_kernel=kernel, bst_layers=[0]).train()
    ssm = model.model.layers[0].ssm
    outputs = []
    ssm.register_forward_hook(lambda module, args, output: outputs.append(output))
    input_ids = torch.randint(2, 97, (2, 300))
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(input_ids, use_cache=False)
            with torch.no_grad():
                model(input_ids, use_cache=True)
    plain, plain_cached, autocast, autocast_cached = outputs
    assert autocast.dtype == autocast_cached.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(autocast_cached, plain_cached, rtol=0, atol=1e-6)


# --- 8: clear errors for what does not fit ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(ssm_dt_max=math.inf), "ssm_dt_max"),
        (dict(ssm_dt_min=math.nan), "ssm_dt_min"),
        (dict(rms_norm_eps=-1e-6), "rms_norm_eps"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(rope_theta=-10.0), "rope_theta"),
        (dict(rope_theta=math.inf), "rope_theta"),
        (dict(hidden_act="nope"), "hidden_act.*gelu"),
    ],
)
def test_config_values_that_would_give_nan_or_key_errors_are_rejected_by_name(fields, message):
    from huggingface_hub.errors import StrictDataclassClassValidationError

    with pytest.raises((ValueError, StrictDataclassClassValidationError), match=message):
        tiny_config(**fields)


def test_empty_inputs_and_mismatched_embedding_dtypes_raise_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="`input_ids` is empty"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="`input_ids` is empty"):
        model(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="`inputs_embeds` is empty"):
        model(inputs_embeds=torch.zeros(1, 0, 32))
    with pytest.raises(TypeError, match="torch.float64.*torch.float32"):
        model(inputs_embeds=torch.randn(1, 5, 32, dtype=torch.float64))


@pytest.mark.parametrize(
    "other",
    [
        dict(ssm_kernel="unstructured"),  # same tensor shapes, different state: silently restarted at zero before
        dict(bst_variant="mf"),
        dict(ssm_state_size=4),
        dict(block_size=4),
        dict(bst_layers=[1]),
    ],
)
def test_a_cache_made_by_another_configuration_is_refused(other):
    maker, user = tiny_model(**other), tiny_model()
    input_ids = torch.randint(2, 97, (1, 12))
    with torch.no_grad():
        cache = maker(input_ids, use_cache=True).past_key_values
        field = next(iter(other))
        with pytest.raises(ValueError, match=f"another model configuration: {field}="):
            user(input_ids[:, :1], past_key_values=cache)
        with pytest.raises(ValueError, match=field):
            user.generate(input_ids, past_key_values=cache, max_new_tokens=2)


def test_a_cache_filled_by_a_copy_of_another_dtype_is_refused():
    """A cache from a bf16 copy of the same model, passed to the fp32 model: before, a scatter dtype error."""
    model = tiny_model()
    copy = fresh_copy(model).to(torch.bfloat16)
    input_ids = torch.randint(2, 97, (1, 12))
    with torch.no_grad():
        cache = copy(input_ids, use_cache=True).past_key_values
        with pytest.raises(ValueError, match=r"torch\.bfloat16 weights, and this model's weights are torch\.float32"):
            model(input_ids[:, :1], past_key_values=cache)
        with pytest.raises(ValueError, match=r"torch\.bfloat16 .* torch\.float32"):
            model.generate(input_ids, past_key_values=cache, max_new_tokens=2)
        copy(input_ids[:, :1], past_key_values=cache)  # the model that filled it continues it


@pytest.mark.parametrize(
    "edit",
    [dict(ssm_kernel="unstructured"), dict(ssm_kernel="s4")],
)
def test_a_checkpoint_whose_config_was_edited_fails_to_load(edit, tmp_path):
    import json

    saved_kernel = "unstructured" if edit.get("ssm_kernel") == "s4" else "s4"
    tiny_model(ssm_kernel=saved_kernel).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(config))
    field = next(iter(edit))
    with pytest.raises(ValueError, match=f"SSM/context weights do not fit.*{field}.*missing.*unexpected"):
        BSTForCausalLM.from_pretrained(tmp_path)


def test_loading_info_is_still_returned_on_request(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model, info = BSTForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(model, BSTForCausalLM) and not info["missing_keys"] and not info["unexpected_keys"]


def test_generate_refuses_an_attention_mask_shorter_than_the_input():
    model = tiny_model()
    input_ids = torch.randint(2, 97, (1, 10))
    with pytest.raises(ValueError, match=r"attention_mask.*\(1, 10\).*\(1, 4\)"):
        model.generate(input_ids, attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=3)
    with torch.no_grad():
        generated = model.generate(input_ids, attention_mask=torch.ones(1, 10, dtype=torch.long), max_new_tokens=3)
    assert generated.shape == (1, 13)
