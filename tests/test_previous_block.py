"""`attend_previous_block`: self-attention over the token's own block and the whole previous block.

Checked against a dense reference (RoPE at absolute positions, an explicit (L, L) mask), for its receptive field,
and for generation: cached and chunked paths equal the full forward pass, compared as logits (left padding:
tests/test_generation.py)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import VARIANTS_AND_KERNELS, open_context_path, run_in_chunks, tiny_config

from modeling_bst import BSTForCausalLM
from modeling_bst.modeling_bst import apply_rotary


BLOCK = 8


def previous_block_model(**overrides) -> BSTForCausalLM:
    """A tiny model with its context path open (conftest.open_context_path), so that the SSM reaches the logits."""
    return open_context_path(BSTForCausalLM(tiny_config(attend_previous_block=True, **overrides))).eval()


def test_equals_dense_rope_attention_masked_to_the_previous_and_own_block():
    """RoPE sees the true distance p - q between any two tokens of the two blocks, as full attention would."""
    model = previous_block_model(num_hidden_layers=1, bst_layers=[])
    input_ids = torch.randint(2, 97, (2, 29))
    layer, attention = model.model.layers[0], model.model.layers[0].attention
    length, heads, head_dim = 29, attention.num_heads, attention.head_dim
    positions = torch.arange(length)
    rotations = model.model.rotary_emb(positions[None])
    with torch.no_grad():
        embeddings = model.model.embed_tokens(input_ids)
        normed = layer.input_layernorm(embeddings)
        shape = (2, length, heads, head_dim)
        query = apply_rotary(attention.q_proj(normed).view(shape), rotations).transpose(1, 2)
        key = apply_rotary(attention.k_proj(normed).view(shape), rotations).transpose(1, 2)
        value = attention.v_proj(normed).view(shape).transpose(1, 2)
        block = positions // BLOCK
        mask = (positions[None, :] <= positions[:, None]) & (block[None, :] >= block[:, None] - 1)
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask).transpose(1, 2).flatten(2)
        hidden = embeddings + attention.o_proj(attended)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        expected = model.lm_head(model.model.norm(hidden))
        torch.testing.assert_close(model(input_ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_receptive_field_is_the_previous_block_and_the_own_block_up_to_the_token():
    model = previous_block_model(num_hidden_layers=1, bst_layers=[])
    input_ids = torch.randint(2, 97, (1, 3 * BLOCK + 5))
    with torch.no_grad():
        reference = model(input_ids).logits[0]
        for changed_position in (0, 7, 8, 13, 16, 27):
            changed = input_ids.clone()
            changed[0, changed_position] = (changed[0, changed_position] + 1) % 95 + 2
            moved = (model(changed).logits[0] - reference).abs().amax(-1) > 1e-6  # (L,)
            for position in range(input_ids.shape[1]):
                sees = changed_position <= position and changed_position // BLOCK >= position // BLOCK - 1
                assert bool(moved[position]) == sees, (changed_position, position)


@pytest.mark.parametrize("variant, kernel", VARIANTS_AND_KERNELS)
def test_cached_and_chunked_paths_equal_the_full_forward(variant, kernel):
    model = previous_block_model(bst_variant=variant, ssm_kernel=kernel, num_hidden_layers=3, bst_layers=[0, 2])
    input_ids = torch.randint(2, 97, (2, 37))
    with torch.no_grad():
        full = model(input_ids, use_cache=False).logits
        for chunks in ([11] + [1] * 26, [1] * 37, [5, 3, 8, 13, 8], [16, 8, 13]):
            logits, cache = run_in_chunks(model, input_ids, chunks)
            assert (logits - full).abs().max() < 1e-4, chunks
    # The cache holds two blocks of keys/values per layer, whatever the length.
    assert cache.layers[1].previous_keys.shape[1] == BLOCK


def test_generate_equals_the_full_forward():
    model = previous_block_model(bst_variant="sh")
    prompt = torch.randint(2, 97, (1, 10))
    settings = dict(max_new_tokens=30, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        generated = model.generate(prompt, **settings)
        full = model(generated.sequences).logits[0, 9:-1]
        chunked = model.generate(prompt, prefill_chunk_size=3, **settings)
    step_logits = torch.stack(generated.logits, dim=1)[0]
    assert (step_logits - full).abs().max() < 1e-4
    assert (torch.stack(chunked.logits, dim=1)[0] - step_logits).abs().max() < 1e-4


@pytest.mark.parametrize("variant, kernel", VARIANTS_AND_KERNELS)
def test_left_padded_row_whose_prompt_fills_whole_blocks_decodes_as_alone(variant, kernel):
    """A left-padded row whose prompt ends exactly on a block boundary, next to a longer row: its decoding steps
    (logits and greedy tokens) equal the row alone, for blocks of several sizes."""
    for block_size in (1, 3, 8):
        model = previous_block_model(bst_variant=variant, ssm_kernel=kernel, block_size=block_size)
        short, long = torch.randint(2, 97, (1, 2 * block_size)), torch.randint(2, 97, (1, 2 * block_size + 3))
        batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
        mask = (batch != 0).long()
        settings = dict(max_new_tokens=block_size + 2, do_sample=False, output_logits=True)
        with torch.no_grad():
            together = model.generate(batch, attention_mask=mask, return_dict_in_generate=True, **settings)
            alone = model.generate(short, return_dict_in_generate=True, **settings)
        difference = (torch.stack(together.logits, 1)[0] - torch.stack(alone.logits, 1)[0]).abs().max()
        assert difference < 1e-4, (block_size, difference)
        assert torch.equal(together.sequences[0, 3:], alone.sequences[0]), block_size
