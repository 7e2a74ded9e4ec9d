"""scripts/evaluate_length.py: StreamingLLM on a Llama, the passkey harness, and windows that give every model the same
tokens; on tiny random models (seconds)."""

import json
import re

import pytest
from conftest import load_script
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bst_tools.docstrings import documents_of, stdlib_docstring_documents
from bst_tools import conversion, evaluation

evaluate_length = load_script("evaluate_length")

CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?"


def character_tokenizer():
    """Offline character-level tokenizer: 4 special tokens, then CHARACTERS (digits included, for passkeys)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(CHARACTERS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()  # characters back to text without spaces between them
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )


def tiny_llama(vocab_size=len(CHARACTERS) + 4):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def ids(length, vocab_size=len(CHARACTERS) + 4, seed=1):
    return torch.randint(4, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


def test_streaming_llm_is_the_full_model_while_the_context_fits():
    """sinks + window >= everything before every chunk: StreamingLLM's losses are the full model's."""
    model, sequence = tiny_llama(), ids(40)
    full_nll, full_hits = evaluate_length.next_token_losses(model, sequence)
    with torch.no_grad():  # next_token_losses itself, against the model's own logits
        logits = model(input_ids=sequence).logits[0, :-1]
    torch.testing.assert_close(full_nll, torch.nn.functional.cross_entropy(logits, sequence[0, 1:], reduction="none"))
    nll, hits = evaluate_length.streaming_llm_losses(model, sequence, window=36, sinks=4, chunk=8)
    torch.testing.assert_close(nll, full_nll, rtol=0, atol=1e-5)
    assert torch.equal(hits, full_hits)


def test_streaming_llm_keeps_sinks_and_window_with_positions_inside_the_cache():
    """Past sinks + window, a chunk starting at s is scored after [the first `sinks` tokens, tokens s-W..s-1] run as
    one fresh sequence (positions 0.. inside the cache); the earlier chunks are still the full model's; no forward
    holds more than sinks + window + chunk + 1 tokens."""
    model, sequence = tiny_llama(), ids(40)
    forward_lengths = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: forward_lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    nll, _ = evaluate_length.streaming_llm_losses(model, sequence, window=12, sinks=2, chunk=6)
    hook.remove()
    assert max(forward_lengths) <= 2 + 12 + 6 + 1 and len(forward_lengths) == 7  # chunks at 0, 6, ..., 36
    full_nll, _ = evaluate_length.next_token_losses(model, sequence)
    torch.testing.assert_close(nll[:18], full_nll[:18], rtol=0, atol=1e-5)  # chunks at 0, 6, 12: 12 <= 2 + 12
    assert (nll[18:] - full_nll[18:]).abs().max() > 1e-3  # the chunk at 18 has lost tokens 2..5
    cache = torch.cat([sequence[0, :2], sequence[0, 18 - 12 : 18]])
    expected, _ = evaluate_length.next_token_losses(model, torch.cat([cache, sequence[0, 18:25]])[None])
    torch.testing.assert_close(nll[18:24], expected[len(cache) :], rtol=0, atol=1e-5)
    assert evaluate_length.streaming_context(30, 4, 8).tolist() == [0, 1, 2, 3] + list(range(22, 30))


def test_streaming_llm_generation_matches_generate_while_the_context_fits():
    model, prompt = tiny_llama(), ids(10)
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
    generated = evaluate_length.streaming_llm_generate(model, prompt, 5, window=16, sinks=4)
    assert torch.equal(generated, expected[:, 10:])


def passkey_in_prompt(tokenizer):
    """A model rigged to answer right: it reads the passkey off the prompt."""

    def generate_answer(prompt):
        passkey = re.search(r"pass key is (\d{5})", tokenizer.decode(prompt[0])).group(1)
        return torch.tensor([tokenizer(passkey, add_special_tokens=False).input_ids])

    return generate_answer


def test_passkey_harness_scores_a_rigged_model_one_and_a_wrong_one_zero():
    tokenizer = character_tokenizer()
    accuracy = evaluate_length.passkey_accuracy(passkey_in_prompt(tokenizer), tokenizer, [10, 300], trials=4)
    assert accuracy == {10: 1.0, 300: 1.0}
    wrong = evaluate_length.passkey_accuracy(lambda prompt: torch.tensor([[8] * 5]), tokenizer, [10], trials=4)
    assert wrong == {10: 0.0}
    prompt = evaluate_length.passkey_prompt(tokenizer, 12345, distance=300, lead=7)
    text = tokenizer.decode(prompt[0])
    needle = " The pass key is 12345. Remember it. 12345 is the pass key. "
    assert text.count("12345") == 2 and text.endswith(" " + evaluate_length.PASSKEY_QUESTION)
    assert len(text) == 7 + len(needle) + 300 + 1 + len(evaluate_length.PASSKEY_QUESTION)  # one token per character
    assert text[7 + len(needle) : 7 + len(needle) + 20] == evaluate_length.PASSKEY_FILLER[7 : 7 + 20]


def test_greedy_answer_is_what_generate_decodes():
    model, tokenizer = tiny_llama(), character_tokenizer()
    prompt = evaluate_length.passkey_prompt(tokenizer, 54321, distance=20, lead=3)
    answer = evaluate_length.greedy_answer(model)(prompt)
    assert answer.shape == (1, evaluate_length.PASSKEY_NEW_TOKENS)


def test_every_length_and_every_model_scores_the_same_tokens():
    stream = torch.arange(64)
    seen = {}

    def recorder(name):
        def loss_function(window):
            seen.setdefault(name, []).append(window[0])
            return torch.zeros(window.shape[1] - 1), torch.zeros(window.shape[1] - 1, dtype=torch.bool)

        return loss_function

    for length in (8, 16, 64):
        for name in ("a", "b"):
            result = evaluate_length.score(recorder((name, length)), stream, length, block_size=None)
            assert result["predictions"] == 64 - 64 // length
        assert torch.equal(torch.cat(seen[("a", length)]), stream) and torch.equal(torch.cat(seen[("b", length)]), stream)
    with pytest.raises(ValueError, match="multiple of every length"):
        evaluate_length.windows(stream, 24)


def test_loss_by_slot_equals_evaluate_py(tmp_path):
    """The per-slot sums from per-position losses match bst_tools.evaluation.loss_by_slot on a converted BST."""
    model = conversion.convert_model(tiny_llama(), block_size=8, bst_layers=[1])
    stream = ids(96, seed=2)[0]
    result = evaluate_length.score(lambda w: evaluate_length.next_token_losses(model, w), stream, 32, block_size=8)
    reference = evaluation.loss_by_slot(model, stream.view(-1, 32), 8, 3, torch.device("cpu"))
    expected = evaluation.summarise_slots(reference)
    assert result["loss_by_slot"]["count"] == expected["count"]
    torch.testing.assert_close(torch.tensor(result["loss_by_slot"]["loss"]), torch.tensor(expected["loss"]))
    torch.testing.assert_close(torch.tensor(result["loss"]), torch.tensor(reference["total_nll"] / reference["total_count"]))


def test_command_line_on_tiny_folders(tmp_path):
    """The whole command: a source Llama folder and a BST converted from it with W = 64 (so it IS the source in windows
    of up to 64 tokens), StreamingLLM, passkeys; JSON and Markdown written; same tokens for every model."""
    tokenizer = character_tokenizer()
    source = tiny_llama()
    source.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    conversion.convert_to_bst(str(tmp_path / "llama"), str(tmp_path / "bst"), block_size=64, bst_layers=[],
                                  verify_remote_code=False)
    results = evaluate_length.main([
        "--source", str(tmp_path / "llama"), "--bst", str(tmp_path / "bst"), "--lengths", "32,64,128",
        "--total_tokens", "128", "--streaming_window", "16", "--sinks", "2", "--streaming_chunk", "8",
        "--passkey_distances", "8", "--passkey_trials", "2", "--output_dir", str(tmp_path / "out"),
    ])
    saved = json.loads((tmp_path / "out" / "length_evaluation.json").read_text())
    source_rows, bst_rows = saved["models"]["source (full attention)"]["perplexity"], saved["models"]["BST bst"]["perplexity"]
    assert [row["predictions"] for row in source_rows] == [row["predictions"] for row in bst_rows] == [124, 126, 127]
    for source_row, bst_row in zip(source_rows[:2], bst_rows[:2]):
        assert source_row["perplexity"] == pytest.approx(bst_row["perplexity"], rel=1e-5)
    assert bst_rows[2]["perplexity"] != pytest.approx(source_rows[2]["perplexity"], rel=1e-4)
    assert bst_rows[2]["loss_by_slot"]["block_size"] == 64 and "loss_by_slot" not in bst_rows[1]
    streaming = saved["models"]["StreamingLLM (2 sinks + 16 window, chunks of 8)"]["perplexity"]
    assert streaming[0]["perplexity"] != pytest.approx(source_rows[0]["perplexity"], rel=1e-4)
    assert set(saved["models"]["BST bst"]["passkey"]) == {"8"}
    table = (tmp_path / "out" / "length_evaluation.md").read_text()
    assert "| BST bst |" in table and "Passkey retrieval" in table and "slots 0-3" in table
    assert results["total_tokens"] == 128
    skipped = evaluate_length.main([
        "--source", str(tmp_path / "llama"), "--lengths", "32,64", "--total_tokens", "64", "--source_max_length", "32",
        "--streaming_window", "0", "--passkey_distances", "8,40", "--passkey_trials", "1",
        "--output_dir", str(tmp_path / "out2"),
    ])["models"]["source (full attention)"]
    assert [row["length"] for row in skipped["perplexity"]] == [32] and list(skipped["passkey"]) == [8]


def test_streaming_llm_answers_passkeys_with_its_generation_window(tmp_path, monkeypatch):
    """--streaming_generation_window: the window StreamingLLM's passkey answers keep (its chunked scoring keeps
    --streaming_window plus the place in the chunk), named in its row; default: --streaming_window."""
    tiny_llama().save_pretrained(tmp_path / "llama")
    character_tokenizer().save_pretrained(tmp_path / "llama")
    windows = []
    generate = evaluate_length.streaming_llm_generate
    monkeypatch.setattr(evaluate_length, "streaming_llm_generate",
                        lambda model, prompt, new, window, sinks: windows.append(window) or generate(model, prompt, new, window, sinks))
    options = ["--source", str(tmp_path / "llama"), "--lengths", "32", "--total_tokens", "32", "--source_max_length", "0",
               "--streaming_window", "16", "--sinks", "2", "--streaming_chunk", "8", "--passkey_distances", "8",
               "--passkey_trials", "1"]
    models = evaluate_length.main([*options, "--streaming_generation_window", "32", "--output_dir", str(tmp_path / "a")])
    assert list(models["models"]) == ["source (full attention)", "StreamingLLM (2 sinks + 16 window, chunks of 8; passkeys with 32)"]
    assert windows == [32]
    evaluate_length.main([*options, "--output_dir", str(tmp_path / "b")])
    assert windows == [32, 16]



def test_ssm_ablation_scores_each_bst_with_ssm_layers_again_with_its_ssm_silenced(tmp_path):
    """--ssm_ablation: a BST with SSM layers is scored a second time with its SSM outputs zeroed, which is the same
    model with the cross-attention half of its o_proj zeroed (zero context states give zero cross-attention values);
    with --ssm_reach_limit, a third time with its SSM filters cut (perplexity only, no passkeys). A BST without SSM
    layers gets no such rows."""
    tokenizer = character_tokenizer()
    tiny_llama().save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    for name, bst_layers in (("with_ssm", [1]), ("block_only", [])):
        conversion.convert_to_bst(str(tmp_path / "llama"), str(tmp_path / name), block_size=8, bst_layers=bst_layers,
                                  verify_remote_code=False)
    bst = AutoModelForCausalLM.from_pretrained(tmp_path / "with_ssm")
    with torch.no_grad():  # the conversion starts the cross-attention half of o_proj at zero: give the context a say
        torch.nn.init.normal_(bst.model.layers[1].attention.o_proj.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    bst.save_pretrained(tmp_path / "with_ssm")
    results = evaluate_length.main([
        "--bst", str(tmp_path / "with_ssm"), str(tmp_path / "block_only"), "--ssm_ablation", "--ssm_reach_limit", "8",
        "--lengths", "32", "--total_tokens", "64", "--passkey_distances", "8", "--passkey_trials", "1", "--output_dir", str(tmp_path / "out"),
    ])
    assert list(results["models"]) == ["BST with_ssm", "BST with_ssm, SSM outputs zeroed",
                                       "BST with_ssm, SSM reach cut at 8 tokens", "BST block_only"]
    cut = results["models"]["BST with_ssm, SSM reach cut at 8 tokens"]
    assert cut["passkey"] == {}
    stream = evaluate_length.token_stream(stdlib_docstring_documents(), tokenizer, 64)
    assert results["token_ids_sha256"] == evaluate_length.stream_fingerprint(stream)
    assert results["token_ids_sha256"] != evaluate_length.stream_fingerprint(stream.roll(1))
    with evaluation.ssm_reach_limited(bst.eval(), 8):
        cut_reference = evaluate_length.score(lambda w: evaluate_length.next_token_losses(bst, w), stream, 32, 8)
    assert cut["perplexity"][0]["perplexity"] == pytest.approx(cut_reference["perplexity"], rel=1e-6)
    real, zeroed = (results["models"][name]["perplexity"][0] for name in ("BST with_ssm", "BST with_ssm, SSM outputs zeroed"))
    assert zeroed["perplexity"] != pytest.approx(real["perplexity"], rel=1e-3)
    assert cut["perplexity"][0]["perplexity"] != pytest.approx(real["perplexity"], rel=1e-4)
    assert set(results["models"]["BST with_ssm, SSM outputs zeroed"]["passkey"]) == {8}
    inner_size = bst.config.num_attention_heads * bst.config.head_dim
    with torch.no_grad():
        bst.model.layers[1].attention.o_proj.weight[:, inner_size:] = 0
    reference = evaluate_length.score(lambda w: evaluate_length.next_token_losses(bst.eval(), w), stream, 32, 8)
    assert zeroed["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-5)
    assert real["perplexity"] != pytest.approx(reference["perplexity"], rel=1e-3)


def test_loss_by_position_groups_each_window_by_doubling_positions():
    """Two windows of 1,024 tokens (1,023 predictions each), the loss of a prediction its position plus 1,000 x its
    window: groups 0-255, 256-511, 512-1,022, each the mean over both windows; a window shorter than 256 is one group."""
    positions = torch.arange(1023, dtype=torch.float)
    nll = torch.cat([positions, positions + 1000])
    groups = evaluate_length.loss_by_position(nll, 1024)
    assert [group["positions"] for group in groups] == ["0-255", "256-511", "512-1022"]
    assert [group["loss"] for group in groups] == [pytest.approx(127.5 + 500), pytest.approx(383.5 + 500),
                                                  pytest.approx(767 + 500)]
    assert evaluate_length.loss_by_position(torch.ones(3 * 31), 32) == [{"positions": "0-30", "loss": 1.0}]
    table = evaluate_length.markdown_tables({
        "total_tokens": 2046, "text": "t", "lengths": [1024], "passkey_trials": 1,
        "models": {"m": {"perplexity": [{"length": 1024, "perplexity": 2.0, "last_quarter_perplexity": 2.0,
                                         "loss_by_position": groups}], "passkey": {}}},
    })
    assert "Loss by position in windows of 1,024 tokens" in table and "| m | 627.500 | 883.500 | 1267.000 |" in table


def test_another_interpreter_lists_its_own_docstrings(tmp_path):
    """--docstrings_python: the documents come from that interpreter, which parses its own library (here the same
    Python, so the same documents and version); an interpreter that is missing or fails is a clear error."""
    import platform
    import sys

    documents, version = documents_of(sys.executable)
    assert version == platform.python_version() and documents == list(stdlib_docstring_documents())
    assert len(documents) > 100 and all(len(document) >= 200 for document in documents)
    with pytest.raises(ValueError, match="no such interpreter"):
        documents_of(str(tmp_path / "python-missing"))
    failing = tmp_path / "python-failing"
    failing.write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
    failing.chmod(0o755)
    with pytest.raises(ValueError, match="could not list its docstrings: broken"):
        documents_of(str(failing))


def test_each_length_is_saved_as_it_is_scored(tmp_path, monkeypatch):
    """length_evaluation.json is rewritten after every length and model: a process that a time limit stops keeps the
    rows it finished (here the passkeys of the source fail after both of its lengths were scored)."""
    tiny_llama().save_pretrained(tmp_path / "llama")
    character_tokenizer().save_pretrained(tmp_path / "llama")

    def stopped(*args, **kwargs):
        raise TimeoutError("stopped by the time limit")

    monkeypatch.setattr(evaluate_length, "passkey_accuracy", stopped)
    with pytest.raises(TimeoutError):
        evaluate_length.main(["--source", str(tmp_path / "llama"), "--lengths", "16,32", "--total_tokens", "32",
                              "--streaming_window", "8", "--streaming_chunk", "8", "--output_dir", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "length_evaluation.json").read_text())
    assert list(saved["models"]) == ["source (full attention)"]
    assert [row["length"] for row in saved["models"]["source (full attention)"]["perplexity"]] == [16, 32]
    assert saved["models"]["source (full attention)"]["passkey"] == {}
