"""Generation: the cached paths equal the full forward pass, compared as logits, and generate()/pipeline() work."""

import math

import pytest
import torch
from conftest import VARIANTS_AND_KERNELS, fresh_copy, logged_messages, run_in_chunks, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, pipeline

from modeling_bst import BSTCache
from modeling_bst.cache_bst import BSTLayerCache
from modeling_bst.modeling_bst import BSTS4DKernel


LENGTH = 37  # four full blocks of 8 and a partial one



@pytest.mark.parametrize("variant, kernel", VARIANTS_AND_KERNELS)
def test_full_forward_equals_prefill_plus_decode_equals_chunked_prefill(variant, kernel):
    model = tiny_model(bst_variant=variant, ssm_kernel=kernel, num_hidden_layers=3, bst_layers=[0, 2])
    input_ids = torch.randint(2, 97, (2, LENGTH))
    with torch.no_grad():
        full = model(input_ids, use_cache=False).logits
        decoded, _ = run_in_chunks(model, input_ids, [11] + [1] * (LENGTH - 11))
        chunked, _ = run_in_chunks(model, input_ids, [5, 3, 8, 13, 8])
        aligned, _ = run_in_chunks(model, input_ids, [16, 8, 13])  # chunks that start exactly on block boundaries
    assert (decoded - full).abs().max() < 1e-4
    assert (chunked - full).abs().max() < 1e-4
    assert (aligned - full).abs().max() < 1e-4


@pytest.mark.parametrize("attend_previous_block", [False, True])
@pytest.mark.parametrize("variant, kernel", VARIANTS_AND_KERNELS)
def test_chunks_with_left_padding_equal_each_row_alone(variant, kernel, attend_previous_block):
    model = tiny_model(bst_variant=variant, ssm_kernel=kernel, attend_previous_block=attend_previous_block)
    short, long = torch.randint(2, 97, (1, 12)), torch.randint(2, 97, (1, 23))
    batch = torch.zeros(2, 23, dtype=torch.long)
    mask = torch.zeros(2, 23, dtype=torch.long)
    batch[0, 11:], mask[0, 11:] = short[0], 1
    batch[1], mask[1] = long[0], 1
    with torch.no_grad():
        alone_short, alone_long = model(short).logits[0], model(long).logits[0]
        batched, _ = run_in_chunks(model, batch, [7, 5, 1, 1, 9], attention_mask=mask)
    assert (batched[0, 11:] - alone_short).abs().max() < 1e-4
    assert (batched[1] - alone_long).abs().max() < 1e-4


@pytest.mark.parametrize("attend_previous_block", [False, True])
@pytest.mark.parametrize("variant, kernel", VARIANTS_AND_KERNELS)
def test_decoding_steps_that_read_all_slots_equal_each_row_alone(variant, kernel, attend_previous_block, monkeypatch):
    """On accelerators a decoding step attends to all W slots with a mask (fixed shapes; `step_reads_all_slots`): the
    same logits as each row alone, with left-padded rows at different slots of their blocks."""
    from modeling_bst import modeling_bst

    model = tiny_model(bst_variant=variant, ssm_kernel=kernel, attend_previous_block=attend_previous_block)
    short, long = torch.randint(2, 97, (1, 12)), torch.randint(2, 97, (1, 23))
    batch, mask = torch.zeros(2, 23, dtype=torch.long), torch.zeros(2, 23, dtype=torch.long)
    batch[0, 11:], mask[0, 11:] = short[0], 1
    batch[1], mask[1] = long[0], 1
    monkeypatch.setattr(modeling_bst, "step_reads_all_slots", lambda device: True)
    layout = modeling_bst.BlockLayout.build(
        torch.ones(2, 1, dtype=torch.bool), torch.tensor([3, 5]), 8, has_cache=True, has_padding=False
    )
    expected = [[True] * 4 + [False] * 4, [True] * 6 + [False] * 2]
    assert layout.step_span == 8 and layout.step_mask[:, 0, 0].tolist() == expected
    with torch.no_grad():
        alone_short, alone_long = model(short).logits[0], model(long).logits[0]
        batched, _ = run_in_chunks(model, batch, [5] + [1] * 18, attention_mask=mask)
    assert (batched[0, 11:] - alone_short).abs().max() < 1e-4
    assert (batched[1] - alone_long).abs().max() < 1e-4


@pytest.mark.parametrize("variant, kernel", VARIANTS_AND_KERNELS)
def test_greedy_generate_logits_equal_the_full_forward(variant, kernel):
    model = tiny_model(bst_variant=variant, ssm_kernel=kernel)
    prompt = torch.randint(2, 97, (1, 10))
    with torch.no_grad():
        generated = model.generate(
            prompt, max_new_tokens=30, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        step_logits = torch.stack(generated.logits, dim=1)[0]  # (30, V)
        full = model(generated.sequences).logits[0, 9:-1]
        chunked = model.generate(
            prompt, max_new_tokens=30, do_sample=False, prefill_chunk_size=3,
            output_logits=True, return_dict_in_generate=True,
        )
    assert (step_logits - full).abs().max() < 1e-4
    assert (torch.stack(chunked.logits, dim=1)[0] - step_logits).abs().max() < 1e-4
    assert torch.equal(chunked.sequences, generated.sequences)


@pytest.mark.parametrize("variant, kernel", [("sh", "s4"), ("mf", "s4"), ("mh", "unstructured")])
def test_left_padded_batch_generation_equals_each_row_alone(variant, kernel):
    model = tiny_model(bst_variant=variant, ssm_kernel=kernel)
    prompts = [torch.randint(2, 97, (1, n)) for n in (5, 14, 9)]
    width = max(p.shape[1] for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, prompt in enumerate(prompts):
        batch[row, width - prompt.shape[1] :] = prompt[0]
        mask[row, width - prompt.shape[1] :] = 1
    settings = dict(max_new_tokens=20, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, **settings)
        for row, prompt in enumerate(prompts):
            alone = model.generate(prompt, **settings)
            difference = (torch.stack(together.logits, 1)[row] - torch.stack(alone.logits, 1)[0]).abs().max()
            assert difference < 1e-4


def test_generation_continues_from_returned_past_key_values():
    model = tiny_model(bst_variant="mf")
    prompt = torch.randint(2, 97, (1, 6))
    settings = dict(do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        straight = model.generate(prompt, max_new_tokens=24, **settings)
        first = model.generate(prompt, max_new_tokens=12, **settings)
        # generate() gets the whole sequence so far and slices off what the cache has already seen.
        second = model.generate(first.sequences, past_key_values=first.past_key_values, max_new_tokens=12, **settings)
    assert torch.equal(second.sequences, straight.sequences)
    continued = torch.stack(first.logits + second.logits, 1)
    assert (continued - torch.stack(straight.logits, 1)).abs().max() < 1e-4


@pytest.mark.parametrize("variant, kernel", [("sh", "s4"), ("mf", "unstructured")])
def test_beam_search_and_sampling_equal_their_uncached_runs(variant, kernel):
    model = tiny_model(bst_variant=variant, ssm_kernel=kernel)
    prompt = torch.randint(2, 97, (2, 7))
    with torch.no_grad():
        for settings in (
            dict(num_beams=3, do_sample=False, num_return_sequences=2),
            dict(do_sample=True, temperature=0.7, top_k=10, top_p=0.9),
        ):
            torch.manual_seed(1)
            cached = model.generate(prompt, max_new_tokens=15, **settings)
            torch.manual_seed(1)
            uncached = model.generate(prompt, max_new_tokens=15, use_cache=False, **settings)
            assert cached.shape[1] == 22
            assert torch.equal(cached, uncached)


def test_generation_runs_far_past_the_training_length():
    model = tiny_model()  # training_length=32
    with torch.no_grad():
        generated = model.generate(torch.randint(2, 97, (1, 4)), max_new_tokens=300, min_new_tokens=300)
        assert generated.shape == (1, 304)
        logits = model(generated).logits
    # Greedy decoding through the cache, 10x past the training length, picked what one full forward ranks first.
    assert torch.equal(logits[0, 3:-1].argmax(-1), generated[0, 4:])


@pytest.mark.parametrize(
    "variant, kernel, attend_previous_block",
    [("sh", "s4", False), ("mf", "unstructured", False), ("mh", "s4", True)],
)
def test_static_cache_generation_equals_dynamic_generation(variant, kernel, attend_previous_block):
    """`cache_implementation="static"`: fixed shapes and addresses (what a compiled step needs), the same logits."""
    model = tiny_model(bst_variant=variant, ssm_kernel=kernel, attend_previous_block=attend_previous_block)
    prompt = torch.randint(2, 97, (2, 10))
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    settings = dict(
        attention_mask=mask, max_new_tokens=20, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        dynamic = model.generate(prompt, **settings)
        static = model.generate(prompt, cache_implementation="static", **settings)
        beams = [model.generate(prompt, num_beams=2, max_new_tokens=8, **implementation)
                 for implementation in ({}, {"cache_implementation": "static"})]
    cache = static.past_key_values
    assert cache.static and cache.is_compileable and not dynamic.past_key_values.is_compileable
    assert torch.equal(static.sequences, dynamic.sequences)
    assert (torch.stack(static.logits, 1) - torch.stack(dynamic.logits, 1)).abs().max() < 1e-5
    assert torch.equal(beams[0], beams[1])


def test_a_static_unstructured_cache_refuses_to_continue_past_max_cache_len():
    """It holds the last `max_cache_len` SSM inputs; continuing past them would silently drop the oldest."""
    model = tiny_model(ssm_kernel="unstructured")
    input_ids = torch.randint(2, 97, (1, 30))
    settings = dict(do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        full = model(input_ids).logits
        cache = BSTCache(model.config, static=True, max_cache_len=16)
        model(input_ids[:, :14], past_key_values=cache)
        model(input_ids[:, 14:16], past_key_values=cache)
        with pytest.raises(ValueError, match=r"max_cache_len=16 SSM inputs .* 17 positions do not fit"):
            model(input_ids[:, 16:17], past_key_values=cache)
        fitting = BSTCache(model.config, static=True, max_cache_len=30)  # up to max_cache_len: the full forward
        continued = [model(input_ids[:, :14], past_key_values=fitting).logits]
        continued += [model(input_ids[:, t : t + 1], past_key_values=fitting).logits for t in range(14, 30)]
        assert (torch.cat(continued, 1) - full).abs().max() < 1e-4
        first = model.generate(input_ids[:, :6], max_new_tokens=8, cache_implementation="static", **settings)
        with pytest.raises(ValueError, match=r"max_cache_len=16 SSM inputs .* 26 positions do not fit"):
            model.generate(first.sequences, past_key_values=first.past_key_values, max_new_tokens=13, **settings)
        # The generate() that makes the cache can size it for the whole conversation.
        first = model.generate(input_ids[:, :6], max_new_tokens=8, cache_implementation="static", max_cache_len=26,
                               **settings)
        second = model.generate(first.sequences, past_key_values=first.past_key_values, max_new_tokens=13, **settings)
    expected = model(second.sequences).logits[:, 13:-1]
    assert (torch.stack(second.logits, 1) - expected).abs().max() < 1e-4


def test_the_cache_speaks_the_cache_layer_api():
    """Each layer is a `BSTLayerCache` (a LinearAttentionLayer with block key/value slots): the "s4" state is its
    recurrent state, the "unstructured" inputs its conv state, the block keys/values its keys/values (W slots)."""
    model = tiny_model(num_hidden_layers=3, bst_layers=[1])
    with torch.no_grad():
        cache = model(torch.randint(2, 97, (2, 13)), use_cache=True).past_key_values
    assert all(isinstance(layer, BSTLayerCache) for layer in cache.layers)
    assert cache.has_previous_state(1) and not cache.has_previous_state(0)
    state = cache.get_recurrent_state(1)
    assert state.shape == (2, 32, 4) and state.dtype == torch.complex128  # (B, D*C, N/2)
    assert cache.layers[0].keys.shape == (2, 8, 4, 8)  # (B, W, H, d)
    address = cache.layers[0].keys.data_ptr()
    with torch.no_grad():
        model(torch.randint(2, 97, (2, 1)), past_key_values=cache)
    assert cache.layers[0].keys.data_ptr() == address and cache.get_recurrent_state(1) is state  # updated in place
    unstructured = tiny_model(ssm_kernel="unstructured", bst_layers=[1])
    with torch.no_grad():
        cache = unstructured(torch.randint(2, 97, (2, 13)), use_cache=True).past_key_values
    assert cache.layers[1].conv_states[0].shape == (2, 32, 13)  # (B, D, inputs so far)


def test_s4_cache_size_is_constant_and_unstructured_history_grows():
    def cache_bytes(model, context):
        with torch.no_grad():
            cache = model(torch.randint(2, 97, (1, context)), use_cache=True).past_key_values
            model(torch.randint(2, 97, (1, 1)), past_key_values=cache, use_cache=True)
        return cache.nbytes()

    for variant in ("sh", "mh", "mf"):
        s4_model = tiny_model(bst_variant=variant)
        assert cache_bytes(s4_model, 2 * 8) == cache_bytes(s4_model, 16 * 8) > 0
    unstructured = tiny_model(ssm_kernel="unstructured")
    assert cache_bytes(unstructured, 16 * 8) > cache_bytes(unstructured, 2 * 8)

    def static_cache_bytes(model, context):
        cache = BSTCache(model.config, static=True, max_cache_len=200)
        with torch.no_grad():
            model(torch.randint(2, 97, (1, context)), past_key_values=cache)
            model(torch.randint(2, 97, (1, 1)), past_key_values=cache)
        return cache.nbytes()

    # A static cache holds `max_cache_len` "unstructured" inputs and taps: a fixed size too.
    assert static_cache_bytes(unstructured, 2 * 8) == static_cache_bytes(unstructured, 16 * 8) > 0


def test_cache_batch_operations_and_reset():
    model = tiny_model(bst_variant="mf")
    input_ids = torch.randint(2, 97, (3, 11))
    with torch.no_grad():
        cache = model(input_ids, use_cache=True).past_key_values
        next_tokens = torch.randint(2, 97, (3, 1))
        reference = model(next_tokens, past_key_values=cache, use_cache=True).logits
        cache = model(input_ids, use_cache=True).past_key_values
        cache.reorder_cache(torch.tensor([2, 0, 1]))
        reordered = model(next_tokens[[2, 0, 1]], past_key_values=cache, use_cache=True).logits
        assert (reordered - reference[[2, 0, 1]]).abs().max() < 1e-5
        cache = model(input_ids, use_cache=True).past_key_values
        cache.batch_repeat_interleave(2)
        repeated = model(next_tokens.repeat_interleave(2, 0), past_key_values=cache, use_cache=True).logits
        assert (repeated - reference.repeat_interleave(2, 0)).abs().max() < 1e-5
        cache.batch_select_indices(torch.tensor([0, 2]))
        assert cache.batch_size == 2
    with pytest.raises(NotImplementedError, match="cropped"):
        cache.crop(3)


def test_cache_reset_zeroes_in_place_and_starts_new_sequences():
    """`reset` keeps every tensor and its address (CUDA graphs replay on them) and zeroes it; the next forward starts
    new sequences, equal to those on a new cache."""
    model = tiny_model(bst_variant="mf", attend_previous_block=True, bst_layers=[1])
    input_ids = torch.randint(2, 97, (2, 11))
    with torch.no_grad():
        cache = model(torch.randint(2, 97, (2, 13)), use_cache=True).past_key_values
        model(input_ids[:, :1], past_key_values=cache)
        tensors = [cache.layers[0].keys, cache.layers[0].previous_keys, cache.layers[1].context_states,
                   cache.layers[1].recurrent_states[0], cache.layers[1].seen_tokens, cache.consumed]
        addresses = [tensor.data_ptr() for tensor in tensors]
        cache.reset()
        assert all(not tensor.any() for tensor in tensors) and cache.get_seq_length() == 0
        assert not cache.has_previous_state(1) and cache.layers[1].discretization is None
        continued = [model(input_ids[:, :7], past_key_values=cache).logits]
        continued += [model(input_ids[:, t : t + 1], past_key_values=cache).logits for t in range(7, 11)]
        fresh, _ = run_in_chunks(model, input_ids, [7, 1, 1, 1, 1])
    assert torch.equal(torch.cat(continued, 1), fresh)
    after = [cache.layers[0].keys, cache.layers[0].previous_keys, cache.layers[1].context_states,
             cache.layers[1].recurrent_states[0], cache.layers[1].seen_tokens, cache.consumed]
    assert [tensor.data_ptr() for tensor in after] == addresses


def test_offloading_and_prefetching_cache_layers_keeps_decoding_exact():
    """`offload`/`prefetch` move every tensor of a layer (block slots, SSM history, counters, taps) and back."""
    model = tiny_model(ssm_kernel="unstructured", attend_previous_block=True)
    input_ids = torch.randint(2, 97, (2, 12))
    with torch.no_grad():
        reference, _ = run_in_chunks(model, input_ids, [10, 1, 1])
        cache = model(input_ids[:, :10], use_cache=True).past_key_values
        for layer in cache.layers:
            layer.offload()
            layer.prefetch()
        steps = [model(input_ids[:, t : t + 1], past_key_values=cache).logits for t in (10, 11)]
    assert torch.equal(torch.cat(steps, 1), reference[:, 10:])


def test_cache_rejects_a_batch_of_another_size():
    model = tiny_model()
    with torch.no_grad():
        cache = model(torch.randint(2, 97, (2, 5)), use_cache=True).past_key_values
        with pytest.raises(ValueError, match="2 rows"):
            model(torch.randint(2, 97, (3, 1)), past_key_values=cache)
    assert isinstance(cache, BSTCache)


def word_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(95)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def test_text_generation_pipeline(tmp_path):
    model = tiny_model()
    tokenizer = word_tokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path), device="cpu")
    prompt = "w5 w6 w7"
    result = generator(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert result.startswith(prompt)
    expected = model.generate(tokenizer(prompt, return_tensors="pt").input_ids, max_new_tokens=12, do_sample=False)
    token_ids = generator(prompt, max_new_tokens=12, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    assert list(token_ids) == expected[0].tolist()
    batch = generator(["w1 w2", "w3 w4 w5 w6 w7 w8 w9"], max_new_tokens=5, do_sample=False, batch_size=2)
    assert len(batch) == 2


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default")
def test_generate_neither_warns_nor_stops_at_the_training_length():
    """generate() reads `max_position_embeddings` as the longest input: it warns past it and caps its default
    `max_length` with it. BST has no maximum length, so neither may happen at the training length (32 here)."""
    from transformers.utils import logging as transformers_logging

    model = tiny_model()
    assert model.config.training_length == 32 and model.config.max_position_embeddings == 2**20
    with logged_messages(transformers_logging.get_logger("transformers")) as messages, torch.no_grad():
        long_run = model.generate(torch.randint(2, 97, (1, 4)), max_new_tokens=60, min_new_tokens=60)
        default_run = model.generate(torch.randint(2, 97, (1, 40)))  # default: 20 new tokens
    assert long_run.shape == (1, 64)
    assert default_run.shape == (1, 60)  # an old config (max_position_embeddings=32) stopped this at 32 tokens
    assert not [message for message in messages if "predefined maximum length" in message]


# --- caches that are continued, refused or rebuilt --------------------------------------------------------------------


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


def test_generate_refuses_an_attention_mask_shorter_than_the_input():
    model = tiny_model()
    input_ids = torch.randint(2, 97, (1, 10))
    with pytest.raises(ValueError, match=r"attention_mask.*\(1, 10\).*\(1, 4\)"):
        model.generate(input_ids, attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=3)
    with torch.no_grad():
        generated = model.generate(input_ids, attention_mask=torch.ones(1, 10, dtype=torch.long), max_new_tokens=3)
    assert generated.shape == (1, 13)
