"""`torch.compile` of the BST forward pass on CPU (inductor) gives the eager logits.

A decoding step on a static `BSTCache` compiles as one graph (`_can_compile_fullgraph = True`): no data-dependent
branch, every cached tensor updated in place. A training forward (no cache) compiles as one graph too, for every
variant, kernel and attention option, and its loss and gradients equal eager's; `Trainer(torch_compile=True)` trains
as the eager Trainer does. Compiling takes seconds to a minute per model on 2 CPU cores.
"""

import os
import shutil

import pytest
import torch
from conftest import open_context_path, tiny_config
from datasets import Dataset
from torch._dynamo.utils import counters

from transformers import CompileConfig, Trainer, TrainingArguments, default_data_collator

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


@pytest.mark.parametrize(
    "options, prompt_length, steps",
    [({}, 13, 2), (dict(attend_previous_block=True, num_sink_tokens=2), 20, 4)],
    ids=["block", "previous-block-sinks"],
)
def test_compiled_decoding_steps_match_eager(options, prompt_length, steps):
    """The generation hot path: decoding steps through a compiled forward on a cache filled by an eager prefill of a
    left-padded batch. (Compiling the padded prefill itself works too but takes ~30 s on 2 cores.) With previous-block
    attention and sinks, the steps reach the third block (sinks in view) and row 1 closes a block (W = 8): a compiled
    step updates the previous block without a host sync, which eager steps do only when a block closes."""
    model = open_context_path(BSTForCausalLM(tiny_config(bst_layers=[1], **options))).eval()
    input_ids = torch.randint(2, model.config.vocab_size, (2, prompt_length))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # left padding, as batched generation uses
    next_ids = torch.randint(2, model.config.vocab_size, (2, steps))
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
    "variant, kernel, attention",
    [
        ("sh", "s4", {}),
        ("mf", "unstructured", {}),
        ("mh", "s4", dict(attend_previous_block=True)),
        ("sh", "s4", dict(attend_previous_block=True, sliding_window_attention=True)),
        ("sh", "s4", dict(ssm_residual=True, ssm_cross_attention=False, ssm_conv_size=4)),
    ],
    ids=["sh-s4", "mf-unstructured", "mh-s4-previous-block", "sh-s4-sliding-window", "sh-s4-residual-only"],
)
def test_a_decoding_step_on_a_static_cache_has_no_graph_break(variant, kernel, attention):
    """Left-padded rows (at different slots of their blocks) and an attention mask, as batched generate() sends."""
    config = tiny_config(bst_variant=variant, ssm_kernel=kernel, **attention)
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


# ---------------------------------------------------------------------------------------------------------------------
# Training: the forward and backward of a training step compile as one graph each (no cache, as Trainer trains).


def _training_inputs(model, padded: bool):
    """Two rows of 21 tokens (2 full blocks of 8 + a partial one) with the attention mask Trainer's collators pass:
    all ones, or the second row right-padded with its labels ignored there."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, model.config.vocab_size, (2, 21), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if padded:
        attention_mask[1, 15:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)


@pytest.mark.parametrize(
    "variant, kernel, attend_previous_block, num_sink_tokens, sliding_window_attention",
    [
        ("sh", "s4", False, 0, False),
        ("sh", "unstructured", True, 2, False),
        ("mh", "s4", True, 0, False),
        ("mh", "unstructured", False, 2, False),
        ("mf", "s4", True, 2, False),
        ("mf", "unstructured", False, 0, False),
        ("sh", "s4", True, 0, True),
    ],
    ids=["sh-s4", "sh-unstructured-previous-block-sinks", "mh-s4-previous-block", "mh-unstructured-sinks",
         "mf-s4-previous-block-sinks", "mf-unstructured", "sh-s4-sliding-window-residual-only"],
)  # fmt: skip
def test_training_forward_has_no_graph_break(
    variant, kernel, attend_previous_block, num_sink_tokens, sliding_window_attention
):
    """Dynamo traces the autograd Functions' backward passes while it traces their forward, so a training forward in
    one graph also gives one backward graph. The swa case has the SSM options on, the residual-only layer among them."""
    options = dict(ssm_residual=True, ssm_cross_attention=False, ssm_conv_size=4) if sliding_window_attention else {}
    config = tiny_config(
        bst_variant=variant, ssm_kernel=kernel, attend_previous_block=attend_previous_block,
        num_sink_tokens=num_sink_tokens, sliding_window_attention=sliding_window_attention, num_hidden_layers=1,
        **options,
    )  # fmt: skip
    model = BSTForCausalLM(config).train()
    explanation = torch._dynamo.explain(model)(**_training_inputs(model, padded=False))
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize(
    "variant, attend_previous_block, num_sink_tokens",
    [("mh", True, 0), ("mf", False, 2)],
    ids=["mh-s4-previous-block", "mf-s4-sinks"],
)
def test_compiled_training_step_matches_eager(variant, attend_previous_block, num_sink_tokens):
    """One forward and backward through Dynamo and AOTAutograd in one graph each (fullgraph: a break would raise), on
    a right-padded batch: the loss and every parameter's gradient are eager's. "mh" and "mf" "s4" run every autograd
    Function of the SSM. (Inductor's numbers: `test_trainer_with_torch_compile_trains_as_eager`.)"""
    config = tiny_config(
        bst_variant=variant, attend_previous_block=attend_previous_block, num_sink_tokens=num_sink_tokens,
        num_hidden_layers=1,
    )  # fmt: skip
    model = open_context_path(BSTForCausalLM(config)).train()
    inputs = _training_inputs(model, padded=True)
    eager_loss = model(**inputs).loss
    eager_loss.backward()
    eager_gradients = {name: parameter.grad for name, parameter in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled_loss = torch.compile(model, backend="aot_eager", fullgraph=True)(**inputs).loss
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-8)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        torch.testing.assert_close(
            parameter.grad, eager_gradients[name], rtol=1e-6, atol=1e-8, msg=lambda message: f"{name}: {message}"
        )


def _train_two_steps(output_dir, **compile_settings):
    """Two steps of a tiny BST through Trainer on CPU; returns the logged losses and the trained parameters. SGD: Adam
    would turn a gradient of 1e-12 against an exact 0 (an unused token's embedding) into a whole learning-rate step."""
    torch.manual_seed(0)
    model = BSTForCausalLM(tiny_config(num_hidden_layers=1, bst_layers=[0]))
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(2, model.config.vocab_size, (4, 21), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[3, 17:] = 0  # a right-padded row, as a padding collator makes one
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    dataset = Dataset.from_dict(
        {"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(), "labels": labels.tolist()}
    )
    args = TrainingArguments(
        output_dir=str(output_dir), use_cpu=True, max_steps=2, per_device_train_batch_size=2, optim="sgd",
        learning_rate=0.1,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0, **compile_settings,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def test_trainer_with_torch_compile_trains_as_eager(tmp_path):
    """`Trainer(torch_compile=True)` compiles the model with inductor: no graph break, and after two SGD steps the
    losses and parameters are eager's (so are the gradients, to the learning rate's factor)."""
    eager_losses, eager_parameters = _train_two_steps(tmp_path / "eager")
    counters.clear()
    compiled_losses, compiled_parameters = _train_two_steps(tmp_path / "compiled", torch_compile=True)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # one graph, compiled once for both steps
    assert len(compiled_losses) == 2
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for name, parameter in compiled_parameters.items():
        torch.testing.assert_close(parameter, eager_parameters[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
