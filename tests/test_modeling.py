"""The model: configuration, SSM math, causality, padding, shapes, losses, save/load, bad input."""

import glob
import math
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import VARIANTS_AND_KERNELS, fresh_copy, tiny_config, tiny_model
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from modeling_bst import BSTCache, BSTConfig, BSTForCausalLM, BSTModel
from modeling_bst.modeling_bst import BSTS4DKernel
from modeling_bst.ssm_ops import CausalFFTConvolution, causal_fft_conv, real_vandermonde_sum, vandermonde_reduce



# --- configuration -----------------------------------------------------------------------------------------------


def test_config_round_trip(tmp_path):
    config = tiny_config(bst_variant="mf", ssm_kernel="unstructured", bst_layers=[1])
    config.save_pretrained(tmp_path)
    expected = config.to_diff_dict()
    assert BSTConfig.from_pretrained(tmp_path).to_diff_dict() == expected
    auto_loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(auto_loaded, BSTConfig)
    assert auto_loaded.to_diff_dict() == expected
    assert BSTConfig.from_json_file(tmp_path / "config.json").to_diff_dict() == expected


def test_config_derives_filter_counts_and_layers():
    assert BSTConfig(bst_variant="sh").num_context_states == 1
    assert BSTConfig(bst_variant="mh", num_attention_heads=8).num_context_states == 8
    assert BSTConfig(bst_variant="mf").num_context_states == 32
    assert BSTConfig(num_hidden_layers=3).bst_layers == [0, 1, 2]
    assert BSTConfig(hidden_size=64, num_attention_heads=4).head_dim == 16


def test_layer_types_use_transformers_names_and_follow_bst_layers():
    """BST layers are "hybrid" (attention + an SSM state), the others "chunked_attention" (blocks); Transformers'
    validation and `DynamicCache(config=...)` accept them."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicSlidingWindowLayer, LinearAttentionAndFullAttentionLayer

    config = tiny_config(num_hidden_layers=3, bst_layers=[1])
    assert config.layer_types == ["chunked_attention", "hybrid", "chunked_attention"]
    config.validate_layer_type()
    layers = DynamicCache(config=config).layers
    assert [type(layer) for layer in layers] == [
        DynamicSlidingWindowLayer, LinearAttentionAndFullAttentionLayer, DynamicSlidingWindowLayer
    ]
    assert layers[0].sliding_window == 8 and not hasattr(config, "sliding_window")
    with pytest.raises(ValueError, match="`layer_types` follows from"):
        tiny_config(layer_types=["full_attention"] * 2)


def test_no_maximum_length_and_training_length_kept_apart(tmp_path):
    """`max_position_embeddings` is what generate() and lm-evaluation-harness read as the longest input; BST has none.
    The training length lives in `training_length`."""
    config = tiny_config(training_length=64)
    assert (config.training_length, config.max_position_embeddings) == (64, 2**20)
    # lm-evaluation-harness scores log-likelihoods in windows of the first of these attributes it finds.
    first_length = next(getattr(config, name) for name in ("n_positions", "max_position_embeddings", "n_ctx")
                        if getattr(config, name, None) is not None)  # fmt: skip
    assert first_length >= 16 * config.training_length
    for path in sorted(glob.glob("configuration/bst-*.json")):
        preset = BSTConfig.from_json_file(path)
        assert preset.max_position_embeddings == 2**20 and preset.training_length in (32, 512, 4096), path


def test_old_config_with_training_length_in_max_position_embeddings_still_loads(tmp_path):
    """Checkpoints saved before `training_length` existed stored the training length in max_position_embeddings."""
    model = tiny_model()
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    old = json.loads(config_path.read_text())
    old.pop("training_length")
    old["max_position_embeddings"] = 512
    config_path.write_text(json.dumps(old))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (loaded.config.training_length, loaded.config.max_position_embeddings) == (512, 2**20)
    input_ids = torch.randint(2, 97, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)
    # Saved again, it is a new-style config.
    loaded.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert (resaved["training_length"], resaved["max_position_embeddings"]) == (512, 2**20)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(training_length=0), "training_length"),
        (dict(bst_variant="xx"), "bst_variant"),
        (dict(ssm_kernel="s5"), "ssm_kernel"),
        (dict(bst_layers=[0, 2]), "bst_layers"),
        (dict(bst_layers=[-1]), "bst_layers"),
        (dict(bst_layers=[1, 1]), "bst_layers"),
        (dict(hidden_size=30), "divisible"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(block_size=0), "block_size"),
        (dict(num_hidden_layers=-1), "num_hidden_layers"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(ssm_state_size=7), "ssm_state_size"),
        (dict(bst_variant="mh", num_context_states=2), "num_context_states"),
        (dict(bst_variant="sh", num_context_states=3), "num_context_states"),
        (dict(ssm_dt_min=0.5, ssm_dt_max=0.1), "ssm_dt_min"),
    ],
)
def test_bad_config_values_are_rejected_by_name(fields, message):
    # huggingface_hub's @strict wraps our ValueError; its message carries ours.
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match=message):
        tiny_config(**fields)


@pytest.mark.parametrize("path", sorted(glob.glob("configuration/bst-*.json")))
def test_every_preset_builds(path):
    config = BSTConfig.from_json_file(path)
    with torch.device("meta"):
        model = BSTForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())
    if path.endswith("-base.json"):
        # The paper's base rows: 12 layers, d_model 1024, 8 heads, FFN 4096, W = 512, 32k vocabulary, ~200M.
        assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (12, 1024, 8)
        assert (config.intermediate_size, config.block_size, config.vocab_size) == (4096, 512, 32000)
        assert 190e6 < parameters < 230e6
    assert json.load(open(path))["model_type"] == "bst"


def test_auto_classes_resolve_to_bst(tmp_path):
    config = tiny_config()
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, BSTForCausalLM)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), BSTForCausalLM)
    assert AutoConfig.for_model("bst").__class__ is BSTConfig


# --- SSM math ------------------------------------------------------------------------------------------------------


def test_fft_convolution_equals_direct_causal_convolution():
    inputs = torch.randn(2, 3, 50)
    kernel = torch.randn(3, 2, 50)
    expected = torch.zeros(2, 3, 2, 50)
    for t in range(50):
        # y[t] = sum_{s <= t} k[t - s] u[s]
        expected[..., t] = torch.einsum("bds,dcs->bdc", inputs[..., : t + 1], kernel[..., : t + 1].flip(-1))
    torch.testing.assert_close(causal_fft_conv(inputs, kernel), expected, atol=1e-4, rtol=1e-4)


def test_fft_convolution_gradients_equal_the_direct_convolution_gradients():
    """The hand-written backward (correlations through real FFTs) against autograd through the direct sum, in fp64,
    plus torch's numerical gradcheck."""
    inputs = torch.randn(2, 3, 40, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(3, 4, 40, dtype=torch.float64, requires_grad=True)
    grad_output = torch.randn(2, 3, 4, 40, dtype=torch.float64)
    direct = torch.stack(
        [torch.einsum("bds,dcs->bdc", inputs[..., : t + 1], kernel[..., : t + 1].flip(-1)) for t in range(40)], -1
    )
    expected = torch.autograd.grad(direct, (inputs, kernel), grad_output)
    fft = CausalFFTConvolution.apply(inputs, kernel)
    torch.testing.assert_close(fft, direct)
    for actual, reference in zip(torch.autograd.grad(fft, (inputs, kernel), grad_output), expected):
        torch.testing.assert_close(actual, reference)
    small = (inputs[:1, :2, :9].detach().requires_grad_(), kernel[:2, :2, :9].detach().requires_grad_())
    assert torch.autograd.gradcheck(CausalFFTConvolution.apply, small)


@pytest.mark.parametrize("length", [1, 7, 64, 1000])
def test_vandermonde_power_split_equals_naive_powers(length):
    log_z = torch.complex(-torch.rand(5, 4) * 0.1, torch.randn(5, 4))
    coefficients = torch.randn(3, 5, 4, dtype=torch.complex64)
    powers = torch.exp(log_z[..., None] * torch.arange(length))  # (H, N, L)
    expected = torch.einsum("bhn,hnl->bhl", coefficients, powers)
    torch.testing.assert_close(real_vandermonde_sum(coefficients, log_z, length), expected.real, atol=2e-4, rtol=1e-4)
    values = torch.randn(3, 5, length)
    expected_reduce = torch.einsum("bhl,hnl->bhn", values.to(torch.complex64), powers)
    torch.testing.assert_close(vandermonde_reduce(values, log_z), expected_reduce, atol=1e-3, rtol=1e-4)


def test_s4_kernel_equals_its_recurrence_unrolled():
    config = tiny_config()
    kernel_module = BSTS4DKernel(config, channels=6)
    kernel_module.reset_parameters()
    length = 40
    with torch.no_grad():
        kernel = kernel_module(length)  # (H, L)
        log_da, c_db = kernel_module.discretize()
        # Impulse response of s_k = dA s_{k-1} + (C dB) u_k, y_k = 2 Re(sum_n s_k).
        state = torch.zeros_like(c_db)
        responses = []
        for step in range(length):
            state = torch.exp(log_da) * state + c_db * (1.0 if step == 0 else 0.0)
            responses.append(2 * state.sum(-1).real)
    torch.testing.assert_close(kernel, torch.stack(responses, -1).float(), atol=1e-5, rtol=1e-4)


# --- causality, lengths, padding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, kernel", VARIANTS_AND_KERNELS)
def test_no_output_depends_on_a_later_token(variant, kernel):
    model = tiny_model(bst_variant=variant, ssm_kernel=kernel)
    input_ids = torch.randint(2, 97, (2, 29))
    with torch.no_grad():
        reference = model(input_ids).logits
        for position in (0, 7, 8, 13, 28):  # block starts, ends and middles
            changed = input_ids.clone()
            changed[:, position] = (changed[:, position] + 1) % 95 + 2
            logits = model(changed).logits
            torch.testing.assert_close(logits[:, :position], reference[:, :position], atol=1e-5, rtol=0)
            assert (logits[:, position] - reference[:, position]).abs().max() > 1e-4


def test_bst_layers_select_which_layers_have_an_ssm():
    model = tiny_model(num_hidden_layers=3, bst_layers=[1])
    assert [layer.ssm is not None for layer in model.model.layers] == [False, True, False]
    assert not hasattr(model.model.layers[0].attention, "cross_q_proj")


@pytest.mark.parametrize("variant", ["sh", "mh", "mf"])
def test_context_states_reach_tokens_in_later_blocks(variant):
    """Long-range path: with the SSM, a token in block 0 influences block 3; without BST layers it cannot."""
    input_ids = torch.randint(2, 97, (1, 32))
    changed = input_ids.clone()
    changed[0, 2] = (changed[0, 2] + 1) % 95 + 2
    with torch.no_grad():
        with_ssm = tiny_model(bst_variant=variant)
        assert (with_ssm(input_ids).logits[0, 24:] - with_ssm(changed).logits[0, 24:]).abs().max() > 1e-5
        without = tiny_model(bst_layers=[])
        assert (without(input_ids).logits[0, 8:] - without(changed).logits[0, 8:]).abs().max() == 0


@pytest.mark.parametrize("length", [1, 5, 8, 17, 300])
def test_any_length_works(length):
    model = tiny_model(bst_variant="mf")
    longest = torch.randint(0, 97, (2, 300))
    with torch.no_grad():
        logits = model(longest[:, :length]).logits
        reference = model(longest).logits[:, :length]
    assert logits.shape == (2, length, 97)
    # Partial blocks, one block, many blocks: a prefix gets what it gets inside a longer input.
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant, kernel", VARIANTS_AND_KERNELS)
def test_padding_never_changes_real_token_outputs(variant, kernel):
    model = tiny_model(bst_variant=variant, ssm_kernel=kernel)
    row = torch.randint(2, 97, (1, 13))
    with torch.no_grad():
        alone = model(row).logits[0]
        for pad_positions in ([0, 1, 2], [13, 14], [0, 5, 9, 15]):  # left, right, interleaved
            length = 13 + len(pad_positions)
            real = torch.tensor([p not in pad_positions for p in range(length)])
            padded = torch.zeros(1, length, dtype=torch.long)
            padded[0, real] = row[0]
            logits = model(padded, attention_mask=real[None].long()).logits[0]
            torch.testing.assert_close(logits[real], alone, atol=1e-5, rtol=1e-5)
            assert (logits[~real] == 0).all()


def test_eager_and_sdpa_attention_agree():
    config = tiny_config(bst_variant="sh")
    eager = BSTForCausalLM._from_config(config, attn_implementation="eager").eval()
    sdpa = BSTForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    input_ids = torch.randint(0, 97, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(eager(input_ids).logits, sdpa(input_ids).logits, atol=1e-5, rtol=1e-5)


# --- outputs, loss, training -----------------------------------------------------------------------------------------


def test_output_options():
    model = tiny_model()
    input_ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(input_ids, output_hidden_states=True)
        assert len(full.hidden_states) == model.config.num_hidden_layers + 1
        assert full.hidden_states[0].shape == (2, 12, 32)
        kept = model(input_ids, logits_to_keep=3).logits
        torch.testing.assert_close(kept, full.logits[:, -3:])
        chosen = model(input_ids, logits_to_keep=torch.tensor([0, 5])).logits
        torch.testing.assert_close(chosen, full.logits[:, [0, 5]])
        as_tuple = model(input_ids, return_dict=False, use_cache=False)
        assert isinstance(as_tuple, tuple)
        torch.testing.assert_close(as_tuple[0], full.logits)
        base = BSTModel(model.config).eval()
        base.load_state_dict(model.model.state_dict())
        torch.testing.assert_close(base(input_ids).last_hidden_state, base.norm(full.hidden_states[-1]))


def test_loss_matches_shifted_cross_entropy_and_ignores_minus_100():
    model = tiny_model()
    input_ids = torch.randint(0, 97, (2, 12))
    labels = input_ids.clone()
    labels[0, :4] = -100
    output = model(input_ids, labels=labels)
    expected = F.cross_entropy(output.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(output.loss, expected)
    summed = model(input_ids, labels=labels, num_items_in_batch=torch.tensor(10)).loss
    torch.testing.assert_close(summed, expected * (labels[:, 1:] != -100).sum() / 10)


@pytest.mark.parametrize("variant, kernel", [("sh", "s4"), ("mf", "unstructured")])
def test_gradient_checkpointing_gives_the_same_gradients(variant, kernel):
    model = tiny_model(bst_variant=variant, ssm_kernel=kernel).train()
    input_ids = torch.randint(0, 97, (2, 20))
    layer_calls = []
    model.model.layers[0].input_layernorm.register_forward_pre_hook(lambda *args: layer_calls.append(1))

    def gradients():
        model.zero_grad()
        layer_calls.clear()
        model(input_ids, labels=input_ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, len(layer_calls)

    plain, calls = gradients()
    # What scripts/train.py's --activation_checkpointing (alias --gradient_checkpointing) does.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed, calls_checkpointed = gradients()
    assert (calls, calls_checkpointed) == (1, 2)  # the checkpointed layer really ran again in the backward pass
    assert plain.keys() == checkpointed.keys()
    assert any("ssm.kernel_generator" in name for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_every_parameter_gets_a_gradient():
    model = tiny_model(bst_variant="mf").train()
    input_ids = torch.randint(0, 97, (2, 20))
    model(input_ids, labels=input_ids).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_mh_context_projection_batched_path_equals_module_path():
    """"mh" projects filter h with head h's rows only; a hooked projection (LoRA, FSDP) runs the module on every filter
    and keeps the diagonal. Both must give the same logits and gradients."""
    model = tiny_model(bst_variant="mh").train()
    input_ids = torch.randint(0, 97, (2, 20))

    def logits_and_grads():
        model.zero_grad()
        output = model(input_ids, labels=input_ids)
        output.loss.backward()
        return output.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "context" in n}

    batched_logits, batched_grads = logits_and_grads()
    projections = [m for n, m in model.named_modules() if n.endswith(("context_k_proj", "context_v_proj"))]
    handles = [projection.register_forward_hook(lambda module, args, output: None) for projection in projections]
    module_logits, module_grads = logits_and_grads()
    for handle in handles:
        handle.remove()
    assert projections and batched_grads
    torch.testing.assert_close(batched_logits, module_logits, rtol=1e-5, atol=1e-5)
    for name in batched_grads:
        torch.testing.assert_close(batched_grads[name], module_grads[name], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_forward_and_backward_follow_fp32():
    model = tiny_model(bst_variant="mh").train()
    input_ids = torch.randint(0, 97, (2, 20))
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    fp32_gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_loss = model(input_ids, labels=input_ids).loss
    bf16_loss.backward()
    assert abs(bf16_loss.item() - loss.item()) < 0.02 * loss.item()
    for name, gradient in fp32_gradients.items():
        similarity = F.cosine_similarity(model.get_parameter(name).grad.flatten(), gradient.flatten(), dim=0)
        assert similarity > 0.98, (name, similarity.item())


def test_weights_are_tied_and_resizing_keeps_them_tied():
    model = tiny_model()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.resize_token_embeddings(120)
    assert model.config.vocab_size == 120
    assert model.lm_head.weight.shape == (120, 32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert model(torch.tensor([[119, 3, 5]])).logits.shape == (1, 3, 120)


# --- save / load -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, kernel", [("sh", "s4"), ("mh", "unstructured"), ("mf", "s4")])
def test_save_and_load_is_exact_and_uses_safetensors(tmp_path, variant, kernel):
    model = tiny_model(bst_variant=variant, ssm_kernel=kernel)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded = BSTForCausalLM.from_pretrained(tmp_path).eval()
    for (name, expected), (_, actual) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(expected, actual), name
    input_ids = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, loaded(input_ids).logits)


def test_loading_an_incompatible_checkpoint_fails_clearly(tmp_path):
    tiny_model(hidden_size=32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="do not have the shapes its configuration gives them") as raised:
        BSTForCausalLM.from_pretrained(tmp_path, hidden_size=64, intermediate_size=64)
    assert "ignore_mismatched_sizes" in str(raised.value.__cause__)  # Transformers' own error, kept as the cause


# --- bad input -------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 6))
    with pytest.raises(ValueError, match="exactly one of"):
        model(ids, inputs_embeds=torch.randn(2, 6, 32))
    with pytest.raises(ValueError, match="exactly one of"):
        model()
    with pytest.raises(ValueError, match="outside \\[0, 97\\)"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="outside"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="integer token ids"):
        model(ids.float())
    with pytest.raises(ValueError, match="shape \\(batch, length\\)"):
        model(ids[0])
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.randn(2, 6, 31))
    with pytest.raises(TypeError, match="floating point"):
        model(inputs_embeds=torch.ones(2, 6, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(TypeError, match="BSTCache"):
        model(ids, past_key_values=DynamicCache(), use_cache=True)


def test_inputs_embeds_equal_input_ids_path():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=model.model.embed_tokens(ids)).logits, model(ids).logits)


@pytest.mark.parametrize("variant", ["sh", "mh", "mf"])
def test_a_new_bst_model_computes_what_the_same_model_without_ssm_computes(variant):
    """The cross-attention half of o_proj and the skip term start at zero: before training, a BST layer is its
    SSM-free self, so the context path grows only as far as training finds it useful (docs/quality.md)."""
    model = BSTForCausalLM(tiny_config(bst_variant=variant)).eval()
    layer = model.model.layers[0]
    inner = layer.attention.o_proj.in_features // 2
    weight = layer.attention.o_proj.weight
    assert weight[:, inner:].abs().max() == 0 and weight[:, :inner].std() > 0
    assert layer.ssm.skip.abs().max() == 0
    input_ids = torch.randint(2, 97, (2, 29))
    with torch.no_grad():
        logits = model(input_ids).logits
        for layer in model.model.layers:
            layer.ssm.register_forward_hook(lambda module, inputs, output: torch.zeros_like(output))
        torch.testing.assert_close(model(input_ids).logits, logits, rtol=0, atol=0)


# --- no hidden state, precision, dtypes, clear errors ------------------------------------------------------------------


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
