"""`torch.compile` of the BST forward pass on CPU (inductor) gives the eager logits.

BST declares `_can_compile_fullgraph = False` (the kernel memo and the input checks break the graph), so this compiles
with graph breaks allowed, as `torch.compile(model)` does by default. Compiling takes a few seconds per model.
"""

import os
import shutil

import pytest
import torch
from conftest import open_context_path, tiny_config

from modeling_bst import BSTForCausalLM


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
