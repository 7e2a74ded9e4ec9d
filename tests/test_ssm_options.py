"""Options of the SSM branch, off by default: `ssm_gate` (the SSM output times act(W_g x)), `ssm_conv_size` (a short
causal convolution on the SSM input) and `ssm_residual` (Griffin's gated projection of the SSM output into the residual
stream). Each is checked against its definition written out in float64, for causality, and for generation: the cached
paths equal the full forward pass, compared as logits, with a cache of constant size."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VARIANTS_AND_KERNELS, open_context_path, run_in_chunks, tiny_config
from huggingface_hub.errors import StrictDataclassClassValidationError
from test_convert import blockwise_source_logits, input_ids, random_source

from bst_tools import conversion
from modeling_bst import BSTConfig, BSTForCausalLM


BLOCK, TAPS = 8, 4
OPTION_PARAMETERS = ("conv_weight", "context_gate_proj", "residual_gate_proj", "residual_out_proj")


# The SSM through the residual branch only (no cross-attention), with the short convolution's state too.
RESIDUAL_ONLY = dict(ssm_residual=True, ssm_cross_attention=False, ssm_conv_size=TAPS)
# Every option set the generation tests run: each variant with all that applies to it, and the residual-only layer.
GENERATION_CASES = [(v, k, "all") for v, k in VARIANTS_AND_KERNELS] + [
    ("sh", "s4", "residual only"),
    ("mh", "unstructured", "residual only"),
]


def options_of(variant: str, options: str) -> dict:
    return all_options(variant) if options == "all" else RESIDUAL_ONLY


def all_options(variant: str) -> dict:
    """Every option that applies to `variant` ("mf" reads its SSM at block ends only: no residual branch)."""
    return dict(ssm_gate=True, ssm_conv_size=TAPS, ssm_residual=variant != "mf")


def options_model(dtype=torch.float32, **overrides) -> BSTForCausalLM:
    """A tiny model with the context path and the residual SSM branch open (both start at zero), so that every
    option reaches the logits."""
    model = open_context_path(BSTForCausalLM(tiny_config(**overrides))).to(dtype).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.residual_out_proj is not None:
                torch.nn.init.normal_(layer.residual_out_proj.weight, std=0.1)
    return model


def without(model: BSTForCausalLM, *options: str) -> BSTForCausalLM:
    """The same weights in a model with `options` off (their parameters dropped)."""
    config = model.config.to_dict()
    config.update({name: 0 if name == "ssm_conv_size" else False for name in options})
    plain = BSTForCausalLM(BSTConfig.from_dict(config)).to(model.dtype).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(any(part in name for part in OPTION_PARAMETERS) for name in unexpected)
    return plain


def block_end_positions(length: int) -> list[int]:
    """Where "mf" reads its SSM: the last position of every block, the chunk's last for a partial last block."""
    return [min(end, length - 1) for end in range(BLOCK - 1, math.ceil(length / BLOCK) * BLOCK, BLOCK)]


# --- configuration ---------------------------------------------------------------------------------------------------


def test_options_are_off_by_default_and_add_no_parameters():
    config = BSTConfig()
    assert (config.ssm_gate, config.ssm_conv_size, config.ssm_residual) == (False, 0, False)
    names = [name for name, _ in BSTForCausalLM(tiny_config()).named_parameters()]
    assert not [name for name in names if any(part in name for part in OPTION_PARAMETERS)]
    names = [name for name, _ in BSTForCausalLM(tiny_config(**all_options("sh"))).named_parameters()]
    assert sum(any(part in name for part in OPTION_PARAMETERS) for name in names) == 2 * 4  # 2 BST layers


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(ssm_conv_size=-1), "ssm_conv_size"),
        (dict(ssm_conv_size=1), "ssm_conv_size"),
        (dict(ssm_residual=True, bst_variant="mf"), "ssm_residual.*mf"),
        (dict(ssm_gate=True, bst_layers=[]), "ssm_gate.*bst_layers"),
        (dict(ssm_conv_size=4, bst_layers=[]), "ssm_conv_size.*bst_layers"),
        (dict(ssm_cross_attention=False), "ssm_cross_attention=False.*ssm_residual"),
        (dict(ssm_cross_attention=False, ssm_residual=True, ssm_gate=True), "ssm_gate.*ssm_cross_attention"),
    ],
)
def test_bad_option_values_are_rejected_by_name(fields, message):
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match=message):
        tiny_config(**fields)


# --- each option against its definition, in float64 -----------------------------------------------------------------


@pytest.mark.parametrize("variant", ["sh", "mh", "mf"])
@torch.no_grad()
def test_the_gate_multiplies_the_ssm_output_by_act_of_a_projection_of_the_layer_input(variant):
    """context states = y * gelu(W_g x), x the normalised layer input; "mf": at the block ends it reads."""
    model = options_model(torch.float64, bst_variant=variant, ssm_gate=True, num_hidden_layers=1)
    layer = model.model.layers[0]
    seen = {}
    layer.ssm.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    layer.ssm.register_forward_hook(lambda module, args, output: seen.update(y=output))
    layer.attention.register_forward_pre_hook(lambda module, args: seen.update(context=args[3]))
    model(torch.randint(2, 97, (2, 29)))
    x = seen["x"] if variant != "mf" else seen["x"][:, block_end_positions(29)]
    expected = seen["y"] * F.gelu(x @ layer.context_gate_proj.weight.T)[..., None]
    assert seen["context"].dtype == torch.float64 and seen["y"].abs().max() > 0
    torch.testing.assert_close(seen["context"], expected, rtol=0, atol=1e-12)


def direct_causal_convolution(inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x'[t] = sum_k w[k] x[t - K + 1 + k], zeros before the start, as a loop: inputs (B, T, D), weight (D, K)."""
    taps = weight.shape[1]
    output = torch.zeros_like(inputs)
    for t in range(inputs.shape[1]):
        for k in range(taps):
            if t - taps + 1 + k >= 0:
                output[:, t] += weight[:, k] * inputs[:, t - taps + 1 + k]
    return output


@pytest.mark.parametrize("variant, kernel", VARIANTS_AND_KERNELS)
@torch.no_grad()
def test_the_short_convolution_is_a_causal_depthwise_convolution_before_the_ssm(variant, kernel):
    """The model with the convolution = the model without it whose SSM is fed the convolved input."""
    model = options_model(torch.float64, bst_variant=variant, ssm_kernel=kernel, ssm_conv_size=TAPS)
    plain = without(model, "ssm_conv_size")
    for layer, plain_layer in zip(model.model.layers, plain.model.layers):
        weight = layer.ssm.conv_weight
        assert weight.shape == (32, TAPS) and weight.abs().max() > 0
        plain_layer.ssm.register_forward_pre_hook(
            lambda module, args, weight=weight: (direct_causal_convolution(args[0], weight), *args[1:])
        )
    ids = torch.randint(2, 97, (2, 29))
    logits = model(ids).logits
    assert (logits - without(model, "ssm_conv_size")(ids).logits).abs().max() > 1e-6  # the convolution matters
    torch.testing.assert_close(logits, plain(ids).logits, rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant, kernel", [(v, k) for v, k in VARIANTS_AND_KERNELS if v != "mf"])
@torch.no_grad()
def test_the_residual_branch_adds_a_gated_projection_of_the_ssm_output(variant, kernel):
    """h = u + attention + W_o (mean_c y_c * gelu(W_r x)), then the FFN: the model without the branch, with that term
    added to its attention output."""
    model = options_model(torch.float64, bst_variant=variant, ssm_kernel=kernel, ssm_residual=True)
    plain = without(model, "ssm_residual")
    for layer, plain_layer in zip(model.model.layers, plain.model.layers):
        seen = {}
        plain_layer.ssm.register_forward_pre_hook(lambda module, args, seen=seen: seen.update(x=args[0]))
        plain_layer.ssm.register_forward_hook(lambda module, args, output, seen=seen: seen.update(y=output))

        def add_branch(module, args, output, seen=seen, layer=layer):
            gate = F.gelu(seen["x"] @ layer.residual_gate_proj.weight.T)
            return output + (seen["y"].mean(-1) * gate) @ layer.residual_out_proj.weight.T

        plain_layer.attention.register_forward_hook(add_branch)
    ids = torch.randint(2, 97, (2, 29))
    logits = model(ids).logits
    assert (logits - without(model, "ssm_residual")(ids).logits).abs().max() > 1e-6  # the branch matters
    torch.testing.assert_close(logits, plain(ids).logits, rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant, kernel", [(v, k) for v, k in VARIANTS_AND_KERNELS if v != "mf"])
@torch.no_grad()
def test_without_cross_attention_a_bst_layer_is_one_whose_cross_attention_outputs_zero(variant, kernel):
    """`ssm_cross_attention=False`: the same weights in the model with cross-attention, the cross half of o_proj at
    zero, give the same logits (float64); the layer has no cross-attention parameters and caches no context keys."""
    model = options_model(torch.float64, bst_variant=variant, ssm_kernel=kernel, **RESIDUAL_ONLY)
    assert not [name for name, _ in model.named_parameters() if "cross_q_proj" in name or "context_" in name]
    crossed = BSTForCausalLM(tiny_config(**{**model.config.to_dict(), "ssm_cross_attention": True}))
    crossed = crossed.to(torch.float64).eval()
    weights = model.state_dict()
    for index, layer in enumerate(crossed.model.layers):
        o_proj = layer.attention.o_proj.weight.detach().clone()
        own = weights[f"model.layers.{index}.attention.o_proj.weight"]
        o_proj[:, : own.shape[1]], o_proj[:, own.shape[1] :] = own, 0
        weights[f"model.layers.{index}.attention.o_proj.weight"] = o_proj
    missing, unexpected = crossed.load_state_dict(weights, strict=False)
    assert not unexpected and all("cross_q_proj" in name or "context_" in name for name in missing) and missing
    ids = torch.randint(2, 97, (2, 29))
    filters_convolved = []
    watch = [layer.ssm.register_forward_hook(lambda m, a, out: filters_convolved.append(out.shape[-1]))
             for layer in model.model.layers if layer.ssm is not None]
    logits = model(ids, use_cache=False).logits
    for hook in watch:
        hook.remove()
    # Only the mean over filters is read: without a cache "mh" convolves with the mean of its H filters, once (the
    # crossed model below convolves each filter and takes the mean: the float64 reference).
    assert filters_convolved == [1] * len(watch)
    silence = [layer.ssm.register_forward_hook(lambda m, a, out: torch.zeros_like(out)) for layer in model.model.layers
               if layer.ssm is not None]
    assert (logits - model(ids).logits).abs().max() > 1e-6  # the SSM reaches the logits
    for hook in silence:
        hook.remove()
    torch.testing.assert_close(logits, crossed(ids).logits, rtol=0, atol=1e-10)
    cache = model(ids, use_cache=True).past_key_values
    assert all(layer.context_keys is None for layer in cache.layers)


@torch.no_grad()
def test_a_new_model_with_every_option_computes_what_it_computes_without_its_ssm():
    """The residual branch's output projection starts at zero, as the cross half of o_proj does: a new model is its
    SSM-free self, and so is the model whose SSM outputs are replaced by zeros (the SSM ablation) once trained."""
    model = BSTForCausalLM(tiny_config(**all_options("sh"))).eval()
    assert all(layer.residual_out_proj.weight.abs().max() == 0 for layer in model.model.layers)
    ids = torch.randint(2, 97, (2, 29))
    logits = model(ids).logits
    hooks = [
        layer.ssm.register_forward_hook(lambda module, args, output: torch.zeros_like(output))
        for layer in model.model.layers
    ]
    torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=0)
    for hook in hooks:
        hook.remove()
    # Trained (random) branches: zeroing the SSM outputs closes the context path and the residual branch alike.
    opened = options_model(**all_options("sh"))
    closed = without(opened, "ssm_residual")
    with torch.no_grad():
        for layer in closed.model.layers:
            layer.attention.o_proj.weight[:, layer.attention.o_proj.in_features // 2 :] = 0
    for layer in opened.model.layers:
        layer.ssm.register_forward_hook(lambda module, args, output: torch.zeros_like(output))
    torch.testing.assert_close(opened(ids).logits, closed(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("source_type", ["llama", "qwen2"])
@torch.no_grad()
def test_a_converted_model_with_every_option_still_equals_its_source(source_type):
    source = random_source(source_type)
    for block_size, length in ((16, 13), (8, 21)):
        for options in (all_options("sh"), RESIDUAL_ONLY):
            model = conversion.convert_model(source, block_size, [0, 2], ssm_state_size=8, **options)
            assert model.model.layers[2].residual_out_proj is not None
            ids = input_ids(length)
            torch.testing.assert_close(model(input_ids=ids).logits, blockwise_source_logits(source, ids, block_size))
    card = conversion.describe_conversion("source", source.config, model.config)
    assert "the SSM and the residual SSM branch of the BST layers (0, 2) are new" in card
    assert "with the residual branch's output projection at zero" in card


# --- causality and generation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, kernel, options", GENERATION_CASES)
@torch.no_grad()
def test_no_output_depends_on_a_later_token(variant, kernel, options):
    model = options_model(bst_variant=variant, ssm_kernel=kernel, **options_of(variant, options))
    ids = torch.randint(2, 97, (2, 29))
    reference = model(ids).logits
    for position in (0, 7, 8, 13, 28):
        changed = ids.clone()
        changed[:, position] = (changed[:, position] + 1) % 95 + 2
        logits = model(changed).logits
        torch.testing.assert_close(logits[:, :position], reference[:, :position], atol=1e-5, rtol=0)
        assert (logits[:, position] - reference[:, position]).abs().max() > 1e-4


@pytest.mark.parametrize("variant, kernel, options", GENERATION_CASES)
@torch.no_grad()
def test_cached_and_chunked_paths_equal_the_full_forward(variant, kernel, options):
    model = options_model(bst_variant=variant, ssm_kernel=kernel, **options_of(variant, options))
    ids = torch.randint(2, 97, (2, 37))
    full = model(ids, use_cache=False).logits
    # Decoding, uneven chunks, and a prompt shorter than the convolution's K - 1 cached inputs.
    for chunks in ([11] + [1] * 26, [5, 3, 8, 13, 8], [2, 1, 1, 33]):
        logits, cache = run_in_chunks(model, ids, chunks)
        assert (logits - full).abs().max() < 1e-4, chunks
    assert cache.layers[0].short_conv_inputs.shape == (2, 32, TAPS - 1)


@pytest.mark.parametrize("variant, kernel, options", GENERATION_CASES)
@torch.no_grad()
def test_left_padded_chunks_and_decoding_equal_each_row_alone(variant, kernel, options):
    """Padding enters neither the SSM state nor the short convolution's inputs."""
    model = options_model(bst_variant=variant, ssm_kernel=kernel, **options_of(variant, options))
    short, long = torch.randint(2, 97, (1, 12)), torch.randint(2, 97, (1, 23))
    batch, mask = torch.zeros(2, 23, dtype=torch.long), torch.zeros(2, 23, dtype=torch.long)
    batch[0, 11:], mask[0, 11:] = short[0], 1
    batch[1], mask[1] = long[0], 1
    alone_short, alone_long = model(short).logits[0], model(long).logits[0]
    # The short row is all padding in the first chunk, partly in the second; then single steps.
    batched, _ = run_in_chunks(model, batch, [7, 5, 1, 1, 9], attention_mask=mask)
    assert (batched[0, 11:] - alone_short).abs().max() < 1e-4
    assert (batched[1] - alone_long).abs().max() < 1e-4


@pytest.mark.parametrize(
    "variant, kernel, options", [("sh", "s4", "all"), ("mh", "unstructured", "all"), ("mf", "s4", "all"),
                                 ("sh", "s4", "residual only")]
)  # fmt: skip
@torch.no_grad()
def test_generate_logits_equal_the_full_forward(variant, kernel, options):
    model = options_model(bst_variant=variant, ssm_kernel=kernel, **options_of(variant, options))
    prompt = torch.randint(2, 97, (1, 10))
    settings = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    generated = model.generate(prompt, **settings)
    full = model(generated.sequences).logits[0, 9:-1]
    assert (torch.stack(generated.logits, 1)[0] - full).abs().max() < 1e-4
    if variant == "sh":  # beam search reorders the cache rows, the short convolution's inputs among them
        beams = dict(num_beams=3, do_sample=False, num_return_sequences=2, max_new_tokens=8)
        assert torch.equal(model.generate(prompt, **beams), model.generate(prompt, use_cache=False, **beams))


@pytest.mark.parametrize("variant, options", [("sh", "all"), ("mh", "all"), ("mf", "all"), ("sh", "residual only")])
@torch.no_grad()
def test_the_s4_generation_state_has_a_constant_size(variant, options):
    model = options_model(bst_variant=variant, **options_of(variant, options))

    def cache_bytes(context):
        cache = model(torch.randint(2, 97, (1, context)), use_cache=True).past_key_values
        model(torch.randint(2, 97, (1, 1)), past_key_values=cache, use_cache=True)
        return cache.nbytes()

    assert cache_bytes(2 * BLOCK) == cache_bytes(16 * BLOCK) > 0


@torch.no_grad()
def test_a_cache_made_without_the_short_convolution_is_refused():
    model = options_model(ssm_conv_size=TAPS)
    cache = without(model, "ssm_conv_size")(torch.randint(2, 97, (1, 5)), use_cache=True).past_key_values
    with pytest.raises(ValueError, match="ssm_conv_size=0"):
        model(torch.randint(2, 97, (1, 1)), past_key_values=cache)


def test_every_option_parameter_gets_a_gradient():
    for variant, options in (("sh", "all"), ("mf", "all"), ("sh", "residual only")):
        model = options_model(bst_variant=variant, **options_of(variant, options)).train()
        ids = torch.randint(2, 97, (2, 29))
        model(ids, labels=ids).loss.backward()
        for name, parameter in model.named_parameters():
            if any(part in name for part in OPTION_PARAMETERS):
                assert parameter.grad is not None and parameter.grad.abs().max() > 0, name


# --- checkpoints and presets ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value", [("ssm_gate", True), ("ssm_conv_size", TAPS), ("ssm_residual", True)])
@pytest.mark.parametrize("saved_with_option", [True, False])
def test_a_checkpoint_loaded_with_the_option_flipped_fails_clearly(option, value, saved_with_option, tmp_path):
    off = 0 if option == "ssm_conv_size" else False
    BSTForCausalLM(tiny_config(**{option: value if saved_with_option else off})).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[option] = off if saved_with_option else value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"SSM/context weights do not fit.*{option}"):
        BSTForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("saved_with_cross_attention", [True, False])
def test_a_checkpoint_loaded_with_cross_attention_flipped_fails_clearly(saved_with_cross_attention, tmp_path):
    """The o_proj of a layer with cross-attention is twice as wide: Transformers refuses the size, or our check the
    missing/unexpected cross-attention weights; either way nothing loads silently."""
    BSTForCausalLM(tiny_config(ssm_residual=True, ssm_cross_attention=saved_with_cross_attention)).save_pretrained(
        tmp_path
    )
    config = json.loads((tmp_path / "config.json").read_text())
    config["ssm_cross_attention"] = not saved_with_cross_attention
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises((ValueError, RuntimeError), match="o_proj|ssm_cross_attention"):
        BSTForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "name",
    [
        "bst-sh-s4-modern.json",
        "bst-sh-s4-modern-ssm-options.json",
        "slide-modern.json",
        "bst-sh-s4-modern-scaled.json",
        "slide-modern-scaled.json",
        "bst-sh-s4-modern-scaled-residual-swa.json",
    ],
)
def test_modern_backbone_presets_build(name):
    config = BSTConfig.from_json_file(f"configuration/{name}")
    assert config.gated_mlp and config.hidden_act == "silu"  # Llama's and Mistral's SwiGLU MLP
    scaled = "-scaled" in name  # RecurrentGemma's scales (docs/design.md)
    assert config.initializer_scheme == ("fan_in" if scaled else "normal")
    assert config.embedding_multiplier == (config.hidden_size**0.5 if scaled else 1.0)
    assert config.initializer_range == (0.05 if scaled else 0.02)  # with "fan_in", the embeddings' std
    assert (config.num_hidden_layers, config.hidden_size, config.block_size) == (12, 1024, 512)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in BSTForCausalLM(config).parameters())
    assert 150e6 < parameters < 230e6
    assert (config.bst_layers == []) == name.startswith("slide")


def test_from_pretrained_in_bf16_keeps_only_the_ssm_module_in_fp32(tmp_path):
    """The option projections are not part of the `ssm` module: they load in the model's dtype, and the model runs."""
    model = options_model(**all_options("sh"))
    model.save_pretrained(tmp_path)
    loaded = BSTForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    dtypes = {name: parameter.dtype for name, parameter in loaded.named_parameters()}
    assert dtypes["model.layers.0.ssm.conv_weight"] == dtypes["model.layers.0.ssm.skip"] == torch.float32
    assert {dtypes[name] for name in dtypes if ".ssm." not in name} == {torch.bfloat16}
    ids = torch.randint(2, 97, (2, 29))
    with torch.no_grad():
        difference = (loaded(ids).logits.float() - model(ids).logits).abs().max()
    assert difference < 0.05
