"""lm-evaluation-harness scores a BST unchanged through its `HFLM` wrapper (docs/evaluation.md).

Runs when lm-eval is installed (`pip install -e ".[eval]"`), skipped otherwise. Every lm-eval number is compared with
one plain forward pass of the model.
"""

import logging
import os
import sys
import sysconfig

import pytest
import torch
import torch.nn.functional as F
from conftest import logged_messages, tiny_config

from modeling_bst import BSTForCausalLM


lm_eval_huggingface = pytest.importorskip("lm_eval.models.huggingface", reason="lm-eval is not installed")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from train_tokenizer import train_bpe_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def lm():
    """A tiny BST (training length 32, blocks of 8) and a byte-level BPE of 300 tokens, wrapped as lm-eval does."""
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py"), encoding="utf-8") as f:
        tokenizer = train_bpe_tokenizer([f.read()], vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    model = BSTForCausalLM(tiny_config(vocab_size=300, bst_layers=[1], pad_token_id=0, eos_token_id=1)).eval()
    with logged_messages(logging.getLogger("lm_eval")) as messages:
        # backend="causal": BST is a causal LM that Transformers' own registries do not list; saying so replaces
        # lm-eval's "HF model type is neither marked as CausalLM or Seq2SeqLM" guess with a statement.
        wrapped = lm_eval_huggingface.HFLM(
            pretrained=model, tokenizer=tokenizer, backend="causal", device="cpu", batch_size=2
        )
    assert not [message for message in messages if "neither marked as CausalLM" in message]
    return wrapped, model, tokenizer


def log_probabilities(model, input_ids):
    """log p(input_ids[t] | input_ids[:t]) for t >= 1, from one forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([input_ids])).logits[0]
    return F.log_softmax(logits[:-1].float(), dim=-1).gather(1, torch.tensor(input_ids[1:])[:, None])[:, 0]


TEXT = "def wrap(text, width=70):\n    return TextWrapper(width=width).wrap(text)\n" * 3


def test_window_is_not_the_training_length(lm):
    wrapped, model, _ = lm
    # lm-eval cuts rolling log-likelihoods into windows of max_length; BST has no maximum length.
    assert wrapped.max_length == model.config.max_position_embeddings == 2**20
    assert wrapped.max_length >= 16 * model.config.training_length


def test_loglikelihood_rolling_is_one_forward_pass(lm):
    from lm_eval.api.instance import Instance

    wrapped, model, tokenizer = lm
    tokens = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(tokens) > 3 * model.config.training_length  # several training lengths, many blocks: one window
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(TEXT,), idx=0)
    (score,) = wrapped.loglikelihood_rolling([request], disable_tqdm=True)
    # lm-eval predicts every token of the text, the first one from its prefix token.
    expected = log_probabilities(model, [wrapped.prefix_token_id] + tokens).sum().item()
    assert score == pytest.approx(expected, rel=1e-5, abs=1e-3)


def test_loglikelihood_and_greedy_flag(lm):
    from lm_eval.api.instance import Instance

    wrapped, model, tokenizer = lm
    # Boundaries where the byte-level pre-tokenizer splits anyway (a space, a letter/punctuation change).
    pairs = [("def wrap(text", ", width=70):"), ("import", " textwrap")]
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)
    ]
    results = wrapped.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (score, is_greedy) in zip(pairs, results):
        # As lm-eval splits a pair: the tokens of the whole text, the context's share first.
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        assert ids[: len(context_ids)] == context_ids
        continuation_ids = ids[len(context_ids) :]
        expected = log_probabilities(model, ids)[len(context_ids) - 1 :]
        assert score == pytest.approx(expected.sum().item(), rel=1e-5, abs=1e-4)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, len(context_ids) - 1 : -1]
        assert is_greedy == bool((logits.argmax(-1) == torch.tensor(continuation_ids)).all())


def test_generate_until_is_greedy_generate(lm):
    from lm_eval.api.instance import Instance

    wrapped, model, tokenizer = lm
    prompt = "def wrap(text, width=70):\n"
    request = Instance(
        request_type="generate_until",
        doc={},
        arguments=(prompt, {"until": ["\u2603"], "max_gen_toks": 12, "do_sample": False}),
        idx=0,
    )
    (generated,) = wrapped.generate_until([request], disable_tqdm=True)
    input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=1)
    expected = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert generated == expected and len(generated) > 0


def test_project_task_loads_without_warnings(tmp_path, monkeypatch):
    """configuration/lm_eval/bst_books_test.yaml states each metric's aggregation and direction: lm-eval loads it
    with the values it would have guessed, and without a warning."""
    from lm_eval.tasks import TaskManager

    (tmp_path / "data" / "books").mkdir(parents=True)
    (tmp_path / "data" / "books" / "test.jsonl").write_text('{"text": "To be, or not to be."}\n')
    monkeypatch.chdir(tmp_path)  # the task reads data/books/test.jsonl relative to where lm_eval runs
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with logged_messages(logging.getLogger("lm_eval")) as messages:
        loaded = TaskManager(include_path=os.path.join(repo_root, "configuration", "lm_eval")).load(["bst_books_test"])
    task = loaded["tasks"]["bst_books_test"]
    assert [message for message in messages if "is defined, but" in message] == []
    assert task.higher_is_better() == {"word_perplexity": False, "byte_perplexity": False, "bits_per_byte": False}
    assert len(task.test_docs()) == 1
