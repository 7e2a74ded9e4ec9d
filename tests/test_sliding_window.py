"""`sliding_window_attention`: with `attend_previous_block`, a token sees exactly the last W tokens, as Mistral's
`sliding_window=W` does; the cache is the previous-block cache (2W slots)."""

import pytest
import torch
from conftest import (
    VARIANTS_AND_KERNELS,
    assert_left_padded_decoding_equals_the_full_forward,
    open_context_path,
    tiny_config,
)
from huggingface_hub.errors import StrictDataclassClassValidationError
from test_convert import convert_to_bst, input_ids, random_source

from bst_tools import conversion

from modeling_bst import BSTConfig, BSTForCausalLM


BLOCK = 8


@torch.no_grad()
def test_a_converted_mistral_computes_what_mistral_computes():
    """Mistral with `sliding_window=W`, converted without SSM layers: the same logits at every position, three layers
    deep (a second layer's window reaches further back through the first's, exactly as in Mistral)."""
    source = random_source("mistral", sliding_window=BLOCK)
    model = conversion.convert_model(
        source, BLOCK, [], attend_previous_block=True, sliding_window_attention=True
    ).eval()
    ids = input_ids(5 * BLOCK + 3)
    torch.testing.assert_close(model(input_ids=ids).logits, source(input_ids=ids).logits, rtol=0, atol=2e-5)
    # Without the sliding window the previous block is seen whole: the logits past the first block differ.
    whole_block = conversion.convert_model(source, BLOCK, [], attend_previous_block=True).eval()
    differences = (whole_block(input_ids=ids).logits - source(input_ids=ids).logits).abs().amax(-1)
    assert differences[:, :BLOCK].max() < 2e-5 and differences[:, BLOCK + 1 :].min() > 1e-3


@pytest.mark.parametrize("variant, kernel", VARIANTS_AND_KERNELS)
@torch.no_grad()
def test_cached_and_chunked_decoding_equal_the_full_forward_with_left_padding(variant, kernel):
    """Rows of 8 (= W), 13 and 21 real tokens, left-padded: prefill, then one token at a time, and uneven chunks."""
    config = tiny_config(
        bst_variant=variant, ssm_kernel=kernel, attend_previous_block=True, sliding_window_attention=True,
        num_key_value_heads=2,
    )
    model = open_context_path(BSTForCausalLM(config)).eval()
    assert_left_padded_decoding_equals_the_full_forward(model)


@torch.no_grad()
def test_no_output_depends_on_a_later_token_or_one_out_of_the_window():
    """Changing token p changes the logits at p..p+W-1 of a layer-deep model (one layer: the window is exact) and at
    no earlier position."""
    config = tiny_config(attend_previous_block=True, sliding_window_attention=True, num_hidden_layers=1, bst_layers=[])
    model = BSTForCausalLM(config).to(torch.float64).eval()
    ids = torch.randint(2, 97, (1, 4 * BLOCK))
    logits = model(input_ids=ids).logits
    for position in (3, BLOCK + 5, 2 * BLOCK):
        changed = ids.clone()
        changed[0, position] = (ids[0, position] + 1) % 95 + 2
        moved = (model(input_ids=changed).logits - logits).abs().amax(-1)[0]
        assert moved[:position].max() == 0
        assert moved[position : position + BLOCK].min() > 0
        assert moved[position + BLOCK :].max() == 0


def test_bad_combinations_are_named():
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match="attend_previous_block"):
        BSTConfig(**tiny_config().to_dict() | dict(sliding_window_attention=True))
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match="num_sink_tokens"):
        BSTConfig(
            **tiny_config().to_dict() | dict(attend_previous_block=True, sliding_window_attention=True, num_sink_tokens=2)
        )


def convert_a_mistral_with_the_sliding_window(folder, sliding_window):
    """A random Mistral with `sliding_window`, saved with a tokenizer and converted by the command line at W=BLOCK
    with --sliding_window_attention. Returns the source."""
    from test_push import make_tokenizer

    source = random_source("mistral", sliding_window=sliding_window)
    source.save_pretrained(folder / "mistral")
    make_tokenizer().save_pretrained(folder / "mistral")
    convert_to_bst.main([
        "--model_name_or_path", str(folder / "mistral"), "--output_dir", str(folder / "bst"), "--block_size",
        str(BLOCK), "--bst_layers", "none", "--attend_previous_block", "--sliding_window_attention", "--skip_verify",
    ])  # fmt: skip
    return source


@torch.no_grad()
def test_the_converter_command_line_converts_a_mistral_window_exactly(tmp_path, capsys):
    source = convert_a_mistral_with_the_sliding_window(tmp_path, BLOCK)
    # Exact at every position, so the self-check runs past the first block, where the window slides.
    assert f"Self-check: logits on {BLOCK + 128} tokens" in capsys.readouterr().out
    model = BSTForCausalLM.from_pretrained(tmp_path / "bst").eval()
    assert model.config.sliding_window_attention and model.config.attend_previous_block
    assert f"restricted to the last {BLOCK} tokens (a sliding window)" in (tmp_path / "bst" / "README.md").read_text()
    ids = input_ids(4 * BLOCK + 1)
    torch.testing.assert_close(model(input_ids=ids).logits, source(input_ids=ids).logits, rtol=0, atol=2e-5)


@torch.no_grad()
def test_a_window_narrower_than_the_sources_is_said_not_silent(tmp_path, capsys):
    """A Mistral with a 2W window converted with a W-token window agrees with its source on the first block only:
    the converter says so (and which --block_size would be exact); the self-check stays inside that block."""
    source = convert_a_mistral_with_the_sliding_window(tmp_path, 2 * BLOCK)
    printed = capsys.readouterr().out
    assert f"of the source the last {2 * BLOCK} tokens: they agree on the first {BLOCK} tokens only" in printed
    assert f"--block_size {2 * BLOCK} would make them agree at every position" in printed
    assert f"Self-check: logits on {BLOCK} tokens" in printed
    model = BSTForCausalLM.from_pretrained(tmp_path / "bst").eval()
    ids = input_ids(3 * BLOCK)
    difference = (model(input_ids=ids).logits - source(input_ids=ids).logits).abs()
    assert difference[:, :BLOCK].max() < 2e-5 and difference[:, BLOCK:].max() > 1e-3
