"""Attention sinks (`num_sink_tokens`): every block past the first window also attends to the sequence's first k
tokens, placed just before its window, as StreamingLLM runs a pretrained model in constant memory."""

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


BLOCK, SINKS = 8, 3


@pytest.mark.parametrize("attend_previous_block", [False, True])
@torch.no_grad()
def test_a_converted_llama_sees_the_sinks_right_before_its_window(attend_previous_block):
    """Token p of a block past the first window gets the source's logits for the input [first k tokens, window up to
    p]: the sinks at positions 0..k-1, the window right after them, as StreamingLLM lays out its cache. With
    previous-block attention a second layer's window would reach further back through the first's, so one layer."""
    source = random_source("llama", num_hidden_layers=1 if attend_previous_block else 3)
    model = conversion.convert_model(
        source, BLOCK, [], num_sink_tokens=SINKS, attend_previous_block=attend_previous_block
    ).eval()
    ids = input_ids(4 * BLOCK + 5, batch=1)
    logits = model(input_ids=ids).logits
    first_window_block = 2 if attend_previous_block else 1
    for position in range(first_window_block * BLOCK, ids.shape[1]):
        window_start = (position // BLOCK - (1 if attend_previous_block else 0)) * BLOCK
        streamed = torch.cat([ids[:, :SINKS], ids[:, window_start : position + 1]], dim=1)
        expected = source(input_ids=streamed).logits[0, -1]
        torch.testing.assert_close(logits[0, position], expected, rtol=0, atol=2e-5, msg=f"position {position}")
    # Inside the first window the sinks are ordinary tokens of the window: nothing changes there.
    without_sinks = conversion.convert_model(source, BLOCK, [], attend_previous_block=attend_previous_block)
    first_window = first_window_block * BLOCK
    torch.testing.assert_close(logits[:, :first_window], without_sinks.eval()(input_ids=ids).logits[:, :first_window])


@pytest.mark.parametrize("variant, kernel", VARIANTS_AND_KERNELS)
@pytest.mark.parametrize("attend_previous_block", [False, True])
@torch.no_grad()
def test_cached_and_chunked_decoding_equal_the_full_forward_with_left_padding(variant, kernel, attend_previous_block):
    """Rows of 8 (= W), 13 and 21 real tokens, left-padded: prefill, then one token at a time, and uneven chunks; the
    sinks fill during prefill or during decoding (a 2-token prompt)."""
    config = tiny_config(
        bst_variant=variant, ssm_kernel=kernel, attend_previous_block=attend_previous_block, num_sink_tokens=SINKS,
        num_key_value_heads=2,
    )
    model = open_context_path(BSTForCausalLM(config)).eval()
    assert_left_padded_decoding_equals_the_full_forward(model)


@pytest.mark.parametrize("attend_previous_block", [False, True])
@torch.no_grad()
def test_no_output_depends_on_a_later_token(attend_previous_block):
    model = open_context_path(
        BSTForCausalLM(tiny_config(num_sink_tokens=SINKS, attend_previous_block=attend_previous_block))
    ).eval()
    ids = torch.randint(2, 97, (1, 33))
    reference = model(input_ids=ids).logits
    for changed in (0, 2, 3, 8, 20, 32):
        edited = ids.clone()
        edited[0, changed] = (edited[0, changed] + 1) % 95 + 2
        logits = model(input_ids=edited).logits
        # atol: the FFT convolution mixes every position into its rounding (~1e-7), not into its values.
        torch.testing.assert_close(logits[:, :changed], reference[:, :changed], rtol=0, atol=1e-6)
        assert (logits[:, changed] - reference[:, changed]).abs().max() > 1e-4


@torch.no_grad()
def test_generate_with_a_static_cache_equals_the_dynamic_one():
    model = open_context_path(BSTForCausalLM(tiny_config(num_sink_tokens=SINKS, attend_previous_block=True))).eval()
    ids = torch.randint(2, 97, (2, 5))
    generated = {
        implementation: model.generate(
            ids, max_new_tokens=20, do_sample=False, output_logits=True, return_dict_in_generate=True,
            cache_implementation=implementation,
        )
        for implementation in (None, "static")
    }
    torch.testing.assert_close(torch.stack(generated["static"].logits), torch.stack(generated[None].logits))
    full = model(input_ids=generated[None].sequences[:, :-1]).logits[:, 4:]
    torch.testing.assert_close(torch.stack(generated[None].logits, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("count", [-1, BLOCK + 1])
def test_more_sinks_than_a_block_or_negative_are_refused(count):
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match="`num_sink_tokens` must lie in"):
        BSTConfig(block_size=BLOCK, num_sink_tokens=count)


def test_the_converter_command_line_sets_sinks_and_previous_block(tmp_path):
    from test_push import make_tokenizer

    random_source("llama").save_pretrained(tmp_path / "llama")
    make_tokenizer().save_pretrained(tmp_path / "llama")
    convert_to_bst.main([
        "--model_name_or_path", str(tmp_path / "llama"), "--output_dir", str(tmp_path / "bst"), "--block_size", "8",
        "--bst_layers", "none", "--attend_previous_block", "--num_sink_tokens", "2", "--skip_verify",
    ])  # fmt: skip
    config = BSTConfig.from_pretrained(tmp_path / "bst")
    assert (config.attend_previous_block, config.num_sink_tokens, config.bst_layers) == (True, 2, [])
