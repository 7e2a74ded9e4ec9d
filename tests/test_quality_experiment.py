"""Smoke test of scripts/experiments/quality_experiment.py --quick: toy corpora and toy models, end to end (no quality claims)."""

import importlib.util
import json
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


pytestmark = pytest.mark.lab


def load_experiment_script(name):
    """scripts/experiments/<name>.py, imported by its path (scripts/ is not a package)."""
    path = Path(__file__).resolve().parent.parent / "scripts" / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


quality_experiment = load_experiment_script("quality_experiment")


WORDS = "the king queen sword crown castle river night day speaks enters exits lord lady good ill fair".split()


def write_toy_corpus(folder, seed):
    """Three splits of word soup, long enough for one evaluation span of 16 x 32 tokens."""
    rng = random.Random(seed)
    os.makedirs(folder)
    for split, documents in (("train", 12), ("validation", 2), ("test", 2)):
        with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
            for index in range(documents):
                text = " ".join(rng.choice(WORDS) for _ in range(600))
                f.write(json.dumps({"id": f"{split}-{index}", "source": "toy", "text": text}) + "\n")


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    write_toy_corpus(root / "data" / "prose", seed=0)
    write_toy_corpus(root / "data" / "code", seed=1)
    argv = [
        "--quick",
        "--data_dir",
        str(root / "data"),
        "--corpora",
        "prose,code",
        "--work_dir",
        str(root / "work"),
        "--output_json",
        str(root / "results.json"),
        "--figure_dir",
        str(root / "figures"),
        "--markdown",
        str(root / "quality.md"),
        "--eval_spans",
        "1",
        "--threads",
        "1",
        "--models",
        ",".join(quality_experiment.ALL_MODELS),
        "--seeds",
        "0",
        "--extra_seeds",
        "1",
    ]
    torch.manual_seed(0)
    returned = quality_experiment.main(argv)
    with open(root / "results.json") as f:
        saved = json.load(f)
    return root, returned, saved


def test_json_structure(quick_results):
    _, returned, saved = quick_results
    assert saved["status"] == "finished"
    assert saved["runs"] == json.loads(json.dumps(returned["runs"]))
    main_runs = [r for r in saved["runs"] if not r["ablation"]]
    for corpus in ("prose", "code"):
        names = {r["name"] for r in main_runs if r["corpus"] == corpus}
        assert names == set(quality_experiment.ALL_MODELS)
        # The best BST and every baseline get the extra seed; the other BST variants do not.
        seeds = {
            name: sorted(r["seed"] for r in main_runs if r["corpus"] == corpus and r["name"] == name) for name in names
        }
        best = quality_experiment.best_bst(saved, corpus)
        for name in names:
            assert seeds[name] == ([0, 1] if name in (best, *quality_experiment.BASELINES) else [0])
    ablation_runs = [r for r in saved["runs"] if r["ablation"]]
    assert [r["name"] for r in ablation_runs] == [name for name, _, _ in quality_experiment.ABLATIONS]
    assert all(r["corpus"] == "prose" for r in ablation_runs)


def run_of(results, run, name=None):
    """The main run of `name` (default: the ablation's base model), same corpus and seed."""
    key = (run["corpus"], name or run["base_model"], run["seed"], False)
    return next(r for r in results["runs"] if (r["corpus"], r["name"], r["seed"], r["ablation"]) == key)


def test_same_budget_and_finite_perplexities(quick_results):
    _, _, saved = quick_results
    lengths = ["32", "128", "512"]  # 1x, 4x, 16x the toy training length
    for run in saved["runs"]:
        assert list(run["test_perplexity"]) == lengths
        assert all(math.isfinite(p) and p > 1 for p in run["test_perplexity"].values())
        assert math.isfinite(run["validation_perplexity"])
        assert run["tokens_seen"] == 3 * 2 * 32
        assert len(run["train_losses"]) == 3
        width_of = (run["overrides"] or {}).get("ffn_of")
        if width_of:  # deliberately unmatched: the named model's FFN width (its main run, same corpus and seed)
            named = run_of(saved, run, width_of)
            assert run["intermediate_size"] == named["intermediate_size"] != run_of(saved, run)["intermediate_size"]
        else:
            assert abs(run["non_embedding_parameters"] / run["parameter_target"] - 1) <= 0.05
        # Loss by slot at 1x (block 8 in --quick) and the validation curve (the last step at least).
        assert len(run["loss_by_slot"]) == 8 and all(math.isfinite(v) and v > 0 for v in run["loss_by_slot"])
        assert run["early_slot_loss"] == pytest.approx(sum(run["loss_by_slot"][:4]) / 4)
        assert run["late_slot_loss"] == pytest.approx(sum(run["loss_by_slot"][4:]) / 4)
        assert run["validation_curve"][-1][0] == 3 and run["validation_curve"][-1][1] == run["validation_perplexity"]
    slide = next(r for r in saved["runs"] if r["name"] == "slide")
    assert slide["config"]["bst_layers"] == []


def test_targets_table_figure_and_markdown(quick_results):
    root, _, saved = quick_results
    assert set(saved["targets"]) == {"prose", "code"}
    for entry in saved["targets"].values():
        rows = entry["targets"]
        assert len(rows) == 9  # every target has its models in the quick run (the SSM ablation too)
        for label, row in rows.items():
            assert (row["met"] is None) == label.endswith("(reported)")
            assert set(row["per_seed"]) == {"0", "1"}
    assert (root / "figures" / "quality_perplexity_vs_length.png").stat().st_size > 1000
    assert (root / "figures" / "quality_loss_by_slot.png").stat().st_size > 1000
    page = (root / "quality.md").read_text()
    assert page.count(quality_experiment.RESULTS_BEGIN) == 1 and page.count(quality_experiment.RESULTS_END) == 1
    assert "| llama |" in page and "test ppl @ 512" in page and "### Ablation" in page


def test_markdown_keeps_text_outside_the_markers(quick_results, tmp_path):
    _, _, saved = quick_results
    page = tmp_path / "page.md"
    begin, end = quality_experiment.RESULTS_BEGIN, quality_experiment.RESULTS_END
    page.write_text(f"# Title\n\nIntro.\n\n{begin}\nstale results\n{end}\n\nOutro.\n")
    quality_experiment.write_markdown(saved, str(page), [])
    text = page.read_text()
    assert text.startswith("# Title\n\nIntro.\n\n") and text.endswith("\n\nOutro.\n") and "stale results" not in text


def test_llama_is_not_truncated_beyond_max_position_embeddings():
    """max_position_embeddings is the training length: a longer input must run on all positions, unchanged."""
    args = quality_experiment.parse_args(["--quick", "--data_dir", os.path.dirname(__file__), "--corpora", ""])
    torch.manual_seed(0)
    model = quality_experiment.build_model(args, "llama", 300, 64).eval()
    tokens = torch.randint(0, 300, (1, 4 * args.train_length))
    with torch.no_grad():
        long_logits = model(input_ids=tokens).logits
        short_logits = model(input_ids=tokens[:, : args.train_length]).logits
    assert long_logits.shape[1] == tokens.shape[1]
    torch.testing.assert_close(long_logits[:, : args.train_length], short_logits, atol=1e-4, rtol=1e-4)


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        quality_experiment.parse_args(["--models", "bst-xx", "--corpora", ""])
    with pytest.raises(SystemExit):
        quality_experiment.parse_args(["--data_dir", "/nonexistent", "--corpora", "books"])


def test_report_of_no_results_is_refused_by_name(tmp_path):
    missing = str(tmp_path / "none.json")
    with pytest.raises(SystemExit, match="none of .*none.json"):
        quality_experiment.main(["--corpora", "", "--report_only", "--output_json", missing, "--merge_json", missing])


def test_training_sequences_take_further_epochs_as_new_permutations():
    """A budget beyond the stream repeats every piece once per epoch, in a fresh order; within one epoch the order
    is the one a single-epoch budget gives (so smaller budgets reproduce earlier runs)."""
    stream = np.arange(10 * 4)  # 10 pieces of 4 tokens: piece k starts with token 4k
    one_epoch = quality_experiment.training_sequences(stream, 4, 10, data_seed=7)
    two_and_a_half = quality_experiment.training_sequences(stream, 4, 25, data_seed=7)
    first_pieces = two_and_a_half[:, 0] // 4
    assert torch.equal(two_and_a_half[:10], one_epoch)
    assert sorted(first_pieces[10:20].tolist()) == list(range(10))
    assert not torch.equal(first_pieces[10:20], first_pieces[:10])
    assert len(set(first_pieces[20:].tolist())) == 5
    assert torch.equal(quality_experiment.training_sequences(stream, 4, 6, data_seed=7), one_epoch[:6])


def test_ablations_only_excludes_no_ablation():
    with pytest.raises(SystemExit):
        quality_experiment.parse_args(["--ablations_only", "--no_ablation", "--corpora", ""])


def test_chunked_recurrentgemma_scan_equals_transformers_loop():
    """Same logits and gradients as Transformers' time-step loop, at a length that is no multiple of the chunk.
    Both accumulate in float32 (Transformers' default), in another order: float32 rounding is the tolerance; the
    next test checks the recurrence itself in float64."""
    args = quality_experiment.parse_args(["--quick", "--data_dir", os.path.dirname(__file__), "--corpora", ""])
    models = {}
    for scan in ("loop", "chunked"):
        args.recurrentgemma_scan = scan
        torch.manual_seed(0)
        models[scan] = quality_experiment.build_model(args, "recurrentgemma", 300, 64)
    tokens = torch.randint(0, 300, (2, 3 * quality_experiment.RECURRENCE_CHUNK + 5))
    outputs = {scan: model(input_ids=tokens, labels=tokens, use_cache=False) for scan, model in models.items()}
    torch.testing.assert_close(outputs["chunked"].logits, outputs["loop"].logits, atol=2e-5, rtol=1e-4)
    for output in outputs.values():
        output.loss.backward()
    for (name, loop_parameter), chunked_parameter in zip(
        models["loop"].named_parameters(), models["chunked"].parameters()
    ):
        torch.testing.assert_close(chunked_parameter.grad, loop_parameter.grad, atol=2e-5, rtol=1e-3, msg=name)


def test_chunked_scan_resets_and_carries_a_state_like_the_loop():
    """Resets in the middle of a sequence (a = 0), a given initial state, single-step decoding."""
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaRglru

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(2, 37, 8, generator=generator, dtype=torch.float64)
    gate = torch.rand(2, 37, 8, generator=generator, dtype=torch.float64)
    reset = torch.zeros(2, 37, 1, dtype=torch.bool)
    reset[0, 20] = reset[1, 0] = True
    initial = torch.randn(2, 8, generator=generator, dtype=torch.float64)
    for length in (37, 1):
        expected = RecurrentGemmaRglru._rnn_scan(None, inputs[:, :length], gate[:, :length], reset[:, :length],
                                                 initial, torch.float64)
        got = quality_experiment.chunked_rnn_scan(
            RecurrentGemmaRglru.__new__(RecurrentGemmaRglru), inputs[:, :length], gate[:, :length],
            reset[:, :length], initial, torch.float64,
        )
        for got_tensor, expected_tensor in zip(got, expected):
            torch.testing.assert_close(got_tensor, expected_tensor, atol=1e-12, rtol=1e-10)


def test_ssm_options_in_model_names_and_the_gated_backbone():
    """`bst-sh-s4+gate+conv4+residual` sets the options; --gated_mlp gives BST and Slide the MLP Llama and Mistral have
    (SwiGLU); the SSM ablation zeroes every SSM output."""
    common = ["--quick", "--data_dir", os.path.dirname(__file__), "--corpora", ""]
    name = "bst-sh-s4+gate+conv4+residual"
    args = quality_experiment.parse_args(common + ["--models", f"{name},slide,llama", "--gated_mlp"])
    fields = quality_experiment.bst_fields(args, name)
    assert (fields["ssm_gate"], fields["ssm_conv_size"], fields["ssm_residual"]) == (True, 4, True)
    assert args.reference_intermediate_size == 8 * args.hidden_size // 3
    torch.manual_seed(0)
    bst = quality_experiment.build_model(args, name, 300, 40).eval()
    slide = quality_experiment.build_model(args, "slide", 300, 40)
    llama = quality_experiment.build_model(args, "llama", 300, 40)
    for model in (bst, slide):
        assert model.config.gated_mlp and model.config.hidden_act == llama.config.hidden_act == "silu"
    assert not quality_experiment.build_model(quality_experiment.parse_args(common), "slide", 300, 40).config.gated_mlp
    residual_only = quality_experiment.build_model(args, "bst-sh-s4+residual+nocross", 300, 40)
    assert not residual_only.config.ssm_cross_attention and residual_only.config.ssm_residual
    assert not hasattr(residual_only.model.layers[1].attention, "cross_q_proj")
    for bad in ("bst-sh-s4+gates", "bst-sh-s4+conv", "bst-mf-s4+residual", "slide+gate", "bst-sh-s4+nocross"):
        with pytest.raises(SystemExit):
            quality_experiment.parse_args(common + ["--models", bad])
    layer = bst.model.layers[1]
    torch.nn.init.normal_(layer.residual_out_proj.weight)
    torch.nn.init.normal_(layer.attention.o_proj.weight)
    spans = torch.randint(2, 300, (1, 2 * args.train_length + 1))
    with torch.no_grad():
        real = quality_experiment.perplexity(bst, spans, args.train_length, args)
        zeroed = quality_experiment.ssm_ablation(bst, spans, args)
        layer.residual_out_proj.weight.zero_()
        o_proj = layer.attention.o_proj.weight
        o_proj[:, o_proj.shape[1] // 2 :] = 0
        closed = quality_experiment.perplexity(bst, spans, args.train_length, args)
    assert zeroed["test_perplexity"] == pytest.approx(closed, rel=1e-5) and real != pytest.approx(closed, rel=1e-5)
    assert not bst.model.layers[1].ssm._forward_hooks  # the ablation's hooks are gone


def test_ablation_table_has_every_corpus():
    def run(corpus, name, ablation, perplexity_value, size):
        return {
            "corpus": corpus, "name": name, "base_model": "slide", "seed": 0, "ablation": ablation,
            "validation_perplexity": perplexity_value, "test_perplexity": {"512": perplexity_value},
            "early_slot_loss": 5.0, "late_slot_loss": 4.0, "non_embedding_parameters": 900_000, "intermediate_size": size,
        }

    ablation = "slide at bst-sh-s4's FFN width"
    results = {"runs": [
        run("books", "slide", False, 106.87, 432), run("books", ablation, True, 111.25, 341),
        run("code", "slide", False, 145.7, 432), run("code", ablation, True, 160.5, 341),
    ]}
    text = quality_experiment.format_ablation(results)
    books, code = text.split("\n\nCorpus `code`")
    assert books.startswith("Corpus `books`")
    assert "| slide (default) | 0 | 106.87 | 106.87 |" in books and f"| {ablation} | 0 | 111.25 |" in books
    assert "| slide (default) | 0 | 145.70 |" in code and "| 160.50 | 5.000 | 4.000 | 0.900M | 341 |" in code
    assert "106.87" not in code


def test_previous_block_attention_in_model_names_and_its_own_slide():
    """`+apb` sets attend_previous_block on BST and Slide (only there), `+swa` the sliding window too; a best BST with
    either is also judged against Slide with the same option, the model that sees the same exact context without an
    SSM."""
    common = ["--quick", "--data_dir", os.path.dirname(__file__), "--corpora", ""]
    args = quality_experiment.parse_args(common + ["--models", "bst-sh-s4+gate+apb,slide+apb"])
    assert quality_experiment.bst_fields(args, "slide+apb")["attend_previous_block"] is True
    assert quality_experiment.bst_fields(args, "slide+apb")["bst_layers"] == []
    fields = quality_experiment.bst_fields(args, "bst-sh-s4+gate+apb")
    assert fields["attend_previous_block"] is True and fields["ssm_gate"] is True
    assert quality_experiment.build_model(args, "slide+apb", 300, 40).config.attend_previous_block
    assert not quality_experiment.build_model(args, "slide", 300, 40).config.attend_previous_block
    swa = quality_experiment.bst_fields(args, "slide+swa")
    assert swa["attend_previous_block"] is True and swa["sliding_window_attention"] is True
    assert quality_experiment.build_model(args, "bst-sh-s4+gate+swa", 300, 40).config.sliding_window_attention
    for bad in ("mistral-swa+apb", "llama+apb", "slide+apb+gate", "llama+swa"):
        with pytest.raises(SystemExit):
            quality_experiment.parse_args(common + ["--models", bad])

    def run(name, seed, perplexity_value, early):
        return {
            "corpus": "books", "name": name, "seed": seed, "ablation": False, "validation_perplexity": perplexity_value,
            "test_perplexity": {"32": perplexity_value}, "early_slot_loss": early, "validation_curve": [],
        }

    settings = {"corpora": ["books"], "seeds": [0, 1], "train_length": 32, "eval_multipliers": [1], "warmup_steps": 1}
    runs = [run("bst-sh-s4+apb", 0, 90.0, 4.0), run("bst-sh-s4+apb", 1, 96.0, 4.2),
            run("slide+apb", 0, 100.0, 4.2), run("slide+apb", 1, 98.0, 4.25), run("slide", 0, 110.0, 4.6)]
    rows = quality_experiment.evaluate_targets({"settings": settings, "runs": runs})["books"]["targets"]
    same_attention = rows["perplexity at 1x <= 0.97x slide+apb's (the same attention)"]
    assert same_attention["per_seed"] == {"0": "90.0 vs 100.0 (-10.0%)", "1": "96.0 vs 98.0 (-2.0%)"}
    assert same_attention["met"] is True and same_attention["every_seed"] is False  # mean 93 vs 99, seed 1 -2%
    early = rows["early-slot loss (slots 0-3) >= 0.1 nats below slide+apb's (the same attention)"]
    assert early["met"] is True and early["every_seed"] is False
    assert rows["perplexity at 1x <= 0.97x Slide's"]["per_seed"] == {"0": "90.0 vs 110.0 (-18.2%)"}


def test_paired_table_compares_each_seed_with_the_same_seed():
    def run(name, seed, perplexity_value):
        return {
            "corpus": "code", "name": name, "seed": seed, "ablation": False, "test_perplexity": {"512": perplexity_value},
        }

    results = {"settings": {"eval_multipliers": [1, 4], "train_length": 512}, "runs": [
        run("slide", 0, 100.0), run("slide", 1, 80.0), run("mistral-swa", 0, 90.0),
        run("bst-sh-s4+residual", 0, 95.0), run("bst-sh-s4+residual", 1, 84.0), run("books-only", 0, 1.0),
    ]}
    results["runs"][-1]["corpus"] = "books"
    lines = quality_experiment.format_paired(results, "code").splitlines()
    assert lines[0] == "| model | test ppl @ 512 by seed | vs slide, same seed | vs mistral-swa, same seed |"
    assert "| slide | s0 100.00, s1 80.00 | - | s0 +11.1% |" in lines
    assert "| mistral-swa | s0 90.00 | s0 -10.0% | - |" in lines
    assert "| bst-sh-s4+residual | s0 95.00, s1 84.00 | s0 -5.0%, s1 +5.0% | s0 +5.6% |" in lines
    assert not any("books-only" in line for line in lines)


def test_training_cost_times_the_experiments_models_round_robin(tmp_path):
    """scripts/experiments/training_cost.py builds the models as the experiment does (the same parameter target) and
    reports each one's step time as a ratio to the first model, per round; the reference's own ratio is exactly 1."""
    training_cost = load_experiment_script("training_cost")
    output = tmp_path / "cost.json"
    report = training_cost.main([
        "--quick", "--gated_mlp", "--models", "bst-sh-s4,bst-sh-s4+residual+nocross+swa,slide", "--rounds", "3",
        "--warmup_rounds", "1", "--vocab_size", "300", "--output_json", str(output),
    ])  # fmt: skip
    assert json.loads(output.read_text()) == report and report["reference"] == "bst-sh-s4"
    facts = report["models"]
    assert facts["bst-sh-s4"]["time_ratio_to_reference"] == 1.0 and facts["bst-sh-s4"]["time_ratio_spread"] == [1, 1]
    counts = [model["non_embedding_parameters"] for model in facts.values()]
    assert max(counts) / min(counts) < 1.05  # matched as in the experiment
    # Without cross-attention's four matrices the residual-only BST gets a wider FFN than the plain one.
    assert facts["bst-sh-s4+residual+nocross+swa"]["intermediate_size"] > facts["bst-sh-s4"]["intermediate_size"]
    for model in facts.values():
        assert len(model["step_seconds"]) == 3 and model["median_step_seconds"] > 0
        ratios = [mine / theirs for mine, theirs in zip(model["step_seconds"], facts["bst-sh-s4"]["step_seconds"])]
        assert model["time_ratio_to_reference"] == pytest.approx(sorted(ratios)[1], rel=1e-12)
