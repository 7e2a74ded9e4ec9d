"""`torch.compile` of the BST forward pass on CPU (inductor) gives the eager logits.

A decoding step on a static `BSTCache` compiles as one graph (`_can_compile_fullgraph = True`): no data-dependent
branch, every cached tensor updated in place. The multi-token forward compiles with graph breaks allowed, as
`torch.compile(model)` does by default. Compiling takes a few seconds per model.
"""

import os
import shutil

import pytest
import torch
from conftest import open_context_path, tiny_config

from transformers import CompileConfig

from modeling_bst import BSTCache, BSTForCausalLM


# Inductor generates and builds C++ on CPU.
pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("clang++") is None,
    reason="torch.compile (inductor) needs a C++ compiler on CPU; none found",
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "variant,kernel", [("sh", "s4"), ("mf", "unstructured")], ids=["sh-s4", "mf-unstructured"]
)
def test_compiled_forward_matches_eager(variant, kernel):
    config = tiny_config(bst_variant=variant, ssm_kernel=kernel, bst_layers=[1])
    model = open_context_path(BSTForCausalLM(config)).eval()
    input_ids = torch.randint(2, model.config.vocab_size, (2, 21))  # 2 full blocks of 8 + a partial one
    compiled = torch.compile(model)
    with torch.no_grad():
        expected = model(input_ids=input_ids, use_cache=False).logits
        actual = compiled(input_ids=input_ids, use_cache=False).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_compiled_decoding_steps_match_eager():
    """The generation hot path: decoding steps through a compiled forward on a cache filled by an eager prefill of a
    left-padded batch. (Compiling the padded prefill itself works too but takes ~30 s on 2 cores.)"""
    model = open_context_path(BSTForCausalLM(tiny_config(bst_layers=[1]))).eval()
    input_ids = torch.randint(2, model.config.vocab_size, (2, 13))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # left padding, as batched generation uses
    next_ids = torch.randint(2, model.config.vocab_size, (2, 2))
    compiled = torch.compile(model)
    with torch.no_grad():
        eager_cache = model(input_ids=input_ids, attention_mask=attention_mask).past_key_values
        compiled_cache = model(input_ids=input_ids, attention_mask=attention_mask).past_key_values
        for step in range(next_ids.shape[1]):
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_ids[:, :1])], dim=1)
            token = next_ids[:, step : step + 1]
            eager = model(input_ids=token, attention_mask=attention_mask, past_key_values=eager_cache)
            actual = compiled(input_ids=token, attention_mask=attention_mask, past_key_values=compiled_cache)
            torch.testing.assert_close(actual.logits, eager.logits, rtol=1e-5, atol=1e-5)
            eager_cache, compiled_cache = eager.past_key_values, actual.past_key_values


@pytest.mark.parametrize(
    "variant, kernel, attend_previous_block",
    [("sh", "s4", False), ("mf", "unstructured", False), ("mh", "s4", True)],
    ids=["sh-s4", "mf-unstructured", "mh-s4-previous-block"],
)
def test_a_decoding_step_on_a_static_cache_has_no_graph_break(variant, kernel, attend_previous_block):
    """Left-padded rows (at different slots of their blocks) and an attention mask, as batched generate() sends."""
    config = tiny_config(bst_variant=variant, ssm_kernel=kernel, attend_previous_block=attend_previous_block)
    model = open_context_path(BSTForCausalLM(config)).eval()
    assert model._can_compile_fullgraph
    input_ids = torch.randint(2, model.config.vocab_size, (2, 13))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    cache = BSTCache(model.config, static=True, max_cache_len=32)
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache)
        step_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        explanation = torch._dynamo.explain(model)(
            input_ids=input_ids[:, :1], attention_mask=step_mask, past_key_values=cache
        )
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_compiled_static_generation_equals_eager_dynamic_generation():
    """generate() compiles the decoding step itself when the cache is compileable (on CPU only when asked to)."""
    model = open_context_path(BSTForCausalLM(tiny_config(bst_layers=[1]))).eval()
    prompt = torch.randint(2, model.config.vocab_size, (2, 11))
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="default")  # fullgraph: a break would raise
    compile_config._compile_all_devices = True
    settings = dict(
        attention_mask=mask, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        eager = model.generate(prompt, **settings)
        compiled = model.generate(prompt, cache_implementation="static", compile_config=compile_config, **settings)
    assert hasattr(model, "_compiled_call")  # the decoding steps ran through torch.compile
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(compiled.logits, 1), torch.stack(eager.logits, 1), rtol=1e-5, atol=1e-5)


def test_compiled_unstructured_generation_compiles_one_step_for_prompts_of_many_lengths():
    """The static cache's "unstructured" history and taps are sized by a power of two of the generation length, not by
    the prompt: prompts of nine lengths share one compiled decoding step (under fullgraph a ninth recompilation would
    exceed dynamo's limit and raise)."""
    from torch._dynamo.utils import counters

    model = open_context_path(BSTForCausalLM(tiny_config(ssm_kernel="unstructured", bst_layers=[1]))).eval()
    prompt = torch.randint(2, model.config.vocab_size, (1, 26))
    compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    compile_config._compile_all_devices = True
    settings = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    counters.clear()
    with torch.no_grad():
        for length in range(18, 27):  # generation lengths 22-30: caches of 32 positions
            compiled = model.generate(
                prompt[:, :length], cache_implementation="static", compile_config=compile_config, **settings
            )
        eager = model.generate(prompt, **settings)
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(compiled.logits, 1), torch.stack(eager.logits, 1), rtol=1e-5, atol=1e-5)
