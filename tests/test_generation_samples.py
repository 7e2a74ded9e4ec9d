"""scripts/experiments/generation_samples.py: readable samples through pipeline(), on a tiny BST with a character
tokenizer and a chat template, in seconds (the scripts/serve.py request is tests/test_serve.py's subject)."""

import json

import pytest
import torch
from conftest import SCRIPTS_DIR, tiny_config
from test_serve import character_tokenizer

from modeling_bst import BSTForCausalLM


pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def samples_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("generation_samples_script",
                                                  SCRIPTS_DIR / "experiments" / "generation_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("samples") / "model"
    tokenizer = character_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    torch.manual_seed(0)
    # No end-of-sequence token, so that every sample has exactly its new tokens.
    model = BSTForCausalLM(tiny_config(vocab_size=len(tokenizer), eos_token_id=None, attend_previous_block=True))
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_samples_are_the_model_own_greedy_and_seeded_generations(samples_script, folder, tmp_path):
    output = tmp_path / "samples.json"
    arguments = ["--model", str(folder), "--short_prompt", "the sea is", "--short_question", "why",
                 "--long_prompt_tokens", "2000", "--short_new_tokens", "7", "--long_new_tokens", "5", "--skip_serve",
                 "--threads", str(torch.get_num_threads()),
                 "--output", str(output)]
    results = samples_script.main(arguments)
    assert json.loads(output.read_text()) == json.loads(json.dumps(results, ensure_ascii=False))
    samples = {(sample["name"], sample["mode"]): sample for sample in results["samples"]}
    assert sorted(samples) == sorted((name, mode) for name in ("short, plain", "short, chat", "long, plain",
                                                               "long, chat") for mode in ("greedy", "sampled"))
    model = BSTForCausalLM.from_pretrained(folder).eval()
    tokenizer = character_tokenizer()

    def greedy(text):
        prompt = tokenizer(text, return_tensors="pt").input_ids
        output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=7, do_sample=False)
        return tokenizer.decode(output[0, prompt.shape[1] :], skip_special_tokens=True)

    assert samples["short, plain", "greedy"]["output"] == greedy("the sea is") == "sssssss"
    assert samples["short, chat", "greedy"]["prompt"] == "<why>"
    assert samples["short, chat", "greedy"]["output"] == greedy("<why>")
    # The long document (at most 2,000 tokens, one per character) and the question after it.
    question = "\n\nQuestion: " + samples_script.LONG_QUESTION + "\nAnswer:"
    assert samples["long, plain", "greedy"]["prompt_tokens"] <= 2000 + len(question)
    assert samples["long, plain", "greedy"]["prompt_tail"].endswith("Answer:")
    # The same seed, the same sample.
    again = samples_script.main(arguments)
    assert [sample["output"] for sample in again["samples"]] == [sample["output"] for sample in results["samples"]]


def test_the_long_document_ends_at_the_last_paragraph_that_fits(samples_script):
    from pydoc_data.topics import topics

    tokenizer = character_tokenizer()
    document = samples_script.long_document(tokenizer, "types", 1000)
    assert topics["types"].startswith(document + "\n\n")
    paragraphs = topics["types"].split("\n\n")
    kept = document.count("\n\n") + 1
    assert len("\n\n".join(paragraphs[:kept])) <= 1000 < len("\n\n".join(paragraphs[: kept + 1])) + 2
    with pytest.raises(ValueError, match="not a pydoc_data topic"):
        samples_script.long_document(tokenizer, "no such topic", 1000)
