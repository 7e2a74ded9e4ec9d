"""The backbone's scales, as RecurrentGemma has them: `initializer_scheme="fan_in"` (Griffin's initialisation) and
`embedding_multiplier` (embeddings times sqrt(hidden_size)). Checked as numbers: the standard deviation of every
matrix, the model's outputs against the same model fed scaled embeddings, cached generation against the full pass, and
the quality experiment's `--scaled_backbone`, which gives Llama and Mistral the same scales."""

import os

import pytest
import torch
from conftest import run_in_chunks, tiny_config
from huggingface_hub.errors import StrictDataclassClassValidationError

from modeling_bst import BSTConfig, BSTForCausalLM
from test_quality_experiment import quality_experiment


WIDE = dict(hidden_size=256, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4)


def std(parameter: torch.Tensor) -> float:
    return parameter.detach().double().std().item()


@torch.no_grad()
def test_fan_in_scales_readers_by_their_width_and_writers_by_depth_too():
    torch.manual_seed(0)
    options = dict(gated_mlp=True, hidden_act="silu", ssm_gate=True, ssm_conv_size=4, ssm_residual=True)
    model = BSTForCausalLM(tiny_config(**WIDE, **options, initializer_scheme="fan_in"))
    layers, width, ffn = 4, 256, 384
    layer = model.model.layers[0]
    attention = layer.attention
    for reader in (attention.q_proj, attention.k_proj, attention.cross_q_proj, attention.context_v_proj,
                   layer.mlp.gate_proj, layer.mlp.up_proj, layer.context_gate_proj, layer.residual_gate_proj):
        assert std(reader.weight) == pytest.approx(width**-0.5, rel=0.03)
    assert std(layer.mlp.down_proj.weight) == pytest.approx((2 / layers / ffn) ** 0.5, rel=0.03)
    self_half, cross_half = attention.o_proj.weight.chunk(2, dim=1)
    assert std(self_half) == pytest.approx((2 / layers / width) ** 0.5, rel=0.03)
    assert not cross_half.any() and not layer.residual_out_proj.weight.any()  # still start at zero
    assert std(model.model.embed_tokens.weight[1:]) == pytest.approx(0.02, rel=0.05)  # initializer_range
    normal = BSTForCausalLM(tiny_config(**WIDE, **options))
    assert std(normal.model.layers[0].mlp.down_proj.weight) == pytest.approx(0.02, rel=0.03)  # the default: Llama's
    assert std(normal.model.layers[0].attention.q_proj.weight) == pytest.approx(0.02, rel=0.03)


@torch.no_grad()
def test_loading_a_fan_in_checkpoint_keeps_its_weights(tmp_path):
    model = BSTForCausalLM(tiny_config(initializer_scheme="fan_in", embedding_multiplier=4.0)).eval()
    model.save_pretrained(tmp_path)
    loaded = BSTForCausalLM.from_pretrained(tmp_path).eval()
    assert (loaded.config.initializer_scheme, loaded.config.embedding_multiplier) == ("fan_in", 4.0)
    for (name, saved), restored in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(saved, restored), name


@torch.no_grad()
def test_the_embedding_multiplier_scales_the_first_layers_input_only():
    torch.manual_seed(0)
    scaled = BSTForCausalLM(tiny_config(embedding_multiplier=5.0)).eval()
    plain = BSTForCausalLM(tiny_config()).eval()
    plain.load_state_dict(scaled.state_dict())
    ids = torch.randint(2, 97, (2, 21))
    embeddings = scaled.get_input_embeddings()(ids)
    expected = plain(inputs_embeds=5.0 * embeddings, use_cache=False).logits
    assert torch.allclose(scaled(ids, use_cache=False).logits, expected, atol=1e-5)
    assert torch.allclose(scaled(inputs_embeds=embeddings, use_cache=False).logits, expected, atol=1e-5)
    assert (scaled(ids, use_cache=False).logits - plain(ids, use_cache=False).logits).abs().max() > 1e-2
    assert torch.equal(scaled.lm_head.weight, scaled.model.embed_tokens.weight)  # the tied head is not scaled


@pytest.mark.parametrize("variant", ["sh", "mf"])
@torch.no_grad()
def test_cached_decoding_with_the_scaled_backbone_equals_the_full_forward(variant):
    torch.manual_seed(0)
    config = tiny_config(bst_variant=variant, initializer_scheme="fan_in", embedding_multiplier=32**0.5)
    model = BSTForCausalLM(config).eval()
    ids = torch.randint(2, 97, (2, 30))
    full = model(ids, use_cache=False).logits
    logits, _ = run_in_chunks(model, ids, [9] + [1] * 21)
    assert (logits - full).abs().max() < 1e-4


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(initializer_scheme="xavier"), "initializer_scheme"),
        (dict(embedding_multiplier=0.0), "embedding_multiplier"),
        (dict(embedding_multiplier=float("nan")), "embedding_multiplier"),
        (dict(initializer_range=-0.02), "initializer_range"),
    ],
)
def test_bad_scale_values_are_rejected_by_name(fields, message):
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match=message):
        BSTConfig(**fields)


@torch.no_grad()
def test_scaled_backbone_gives_bst_slide_llama_and_mistral_the_same_scales():
    common = ["--quick", "--data_dir", os.path.dirname(__file__), "--corpora", ""]
    args = quality_experiment.parse_args(common + ["--gated_mlp", "--scaled_backbone"])
    multiplier = args.hidden_size**0.5
    torch.manual_seed(0)
    slide = quality_experiment.build_model(args, "slide", 300, 384)
    assert (slide.config.initializer_scheme, slide.config.embedding_multiplier) == ("fan_in", multiplier)
    for name in ("llama", "mistral-swa"):
        model = quality_experiment.build_model(args, name, 300, 384).eval()
        ours, theirs = slide.model.layers[0], model.model.layers[0]
        for projection in ("q_proj", "o_proj"):
            expected = std(getattr(ours.attention, projection).weight)
            assert std(getattr(theirs.self_attn, projection).weight) == pytest.approx(expected, rel=0.05), name
        for projection in ("up_proj", "down_proj"):
            expected = std(getattr(ours.mlp, projection).weight)
            assert std(getattr(theirs.mlp, projection).weight) == pytest.approx(expected, rel=0.05), name
        ids = torch.randint(2, 300, (1, 17))
        embeddings = model.get_input_embeddings().weight[ids]
        hooked = model(input_ids=ids).logits
        model.get_input_embeddings()._forward_hooks.clear()
        assert torch.allclose(model(inputs_embeds=multiplier * embeddings).logits, hooked, atol=1e-5), name
    plain = quality_experiment.parse_args(common + ["--gated_mlp"])
    assert quality_experiment.build_model(plain, "slide", 300, 40).config.embedding_multiplier == 1.0
    wide = quality_experiment.parse_args(common + ["--scaled_backbone", "--initializer_range", "0.05"])
    for name in ("slide", "llama", "mistral-swa"):  # the embeddings' std, for every model alike
        embeddings = quality_experiment.build_model(wide, name, 3000, 40).get_input_embeddings().weight
        assert std(embeddings) == pytest.approx(0.05, rel=0.05), name
