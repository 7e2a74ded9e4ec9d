"""scripts/experiments/upcycle_report.py: a stage summary trimmed for docs/results without losing a cited number."""

import json

import pytest
from conftest import load_script

pytestmark = pytest.mark.lab

upcycle_report = load_script("experiments/upcycle_report")

SOURCE_LOG = """Converting and de-quantizing GGUF tensors...: 100%
Evaluating source (full attention)
   2,048 tokens: perplexity 9.916 (6.9 s)
  32,768 tokens: perplexity 295.632 (15.3 s)
Evaluating StreamingLLM (4 sinks + 1,024 window, chunks of 1,024)
"""


def slot_summary(block_size=4):
    return {"block_size": block_size, "loss": [2.0] * block_size, "accuracy": [0.5] * block_size,
            "count": [3] * block_size, "groups": [{"slots": "0-3", "loss": 2.123456789, "count": 12}],
            "context_gain": 0.0123456789}


def summary():
    row = {"length": 8, "perplexity": 9.123456789, "last_quarter_perplexity": 9.0, "loss_by_position": [],
           "loss_by_slot": slot_summary()}
    log = [{"step": step, "loss": 2.5 - step / 100, "seconds": step / 2} for step in range(1, 26)]
    return {
        "settings": {"DEVICE": "cuda"}, "same_steps": True, "data": {"corpus_tokens": 100},
        "parts": [{"part": "upcycled", "exit": 0, "seconds": 10, "timed_out": False},
                  {"part": "eval-source", "exit": 124, "seconds": 150, "timed_out": True}],
        "training": {"upcycled": {"steps": 25, "first_loss": 2.49, "log": log}},
        "evaluation_text": {"text": "CPython 3.12.3 standard-library docstrings", "total_tokens": 16, "lengths": [8],
                            "passkey_trials": 1},
        "evaluation": {"BST upcycled": {"perplexity": [row], "passkey": {"8": 1.0}}},
        "far_context_swap": {"window": 16, "models": {"upcycled": {"as trained": {
            "loss": {"original": 2.3}, "swap_minus_original": {"same kind": {"mean": 0.001, "standard_error": 0.0004}},
            "per_window": {"original": [2.3, 2.3]}}}}},
    }


def test_the_report_keeps_every_cited_number_and_drops_the_bulk(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "eval-source.log").write_text(SOURCE_LOG)
    (tmp_path / "summary.json").write_text(json.dumps(summary()))
    result = upcycle_report.main([str(tmp_path / "summary.json"), "--logs", str(logs),
                                  "--output", str(tmp_path / "report.json")])
    assert json.loads((tmp_path / "report.json").read_text()) == result
    row = result["evaluation"]["BST upcycled"]["perplexity"][0]
    assert row["perplexity"] == 9.12346 and row["loss_by_slot"] == {
        "block_size": 4, "groups": [{"slots": "0-3", "loss": 2.12346, "count": 12}], "context_gain": 0.01235}
    assert result["evaluation"]["BST upcycled"]["passkey"] == {"8": 1.0}
    training = result["training"]["upcycled"]
    assert [entry["step"] for entry in training["log_every_10th_step"]] == [10, 20, 25] and "log" not in training
    assert training["steps"] == 25 and training["first_loss"] == 2.49
    printed = result["timed_out_evaluations_printed"]["perplexity"]
    assert printed == {"source (full attention)": {"2048": 9.916, "32768": 295.632}}
    swap = result["far_context_swap"]["models"]["upcycled"]["as trained"]
    assert "per_window" not in swap and swap["swap_minus_original"]["same kind"]["mean"] == 0.001


def test_printed_perplexities_read_a_log_and_skip_models_without_rows():
    assert upcycle_report.printed_perplexities(SOURCE_LOG) == {"source (full attention)": {2048: 9.916, 32768: 295.632}}
    assert upcycle_report.printed_perplexities("no evaluation here") == {}


def test_evaluations_of_the_same_tokens_merge_and_others_are_refused(tmp_path):
    def evaluation(name, lengths, fingerprint="abc"):
        rows = [{"length": length, "perplexity": 9.0, "last_quarter_perplexity": 9.0, "loss_by_position": [],
                 "loss_by_slot": slot_summary()} for length in lengths]
        return {"text": "CPython 3.12.1 standard-library docstrings", "token_ids_sha256": fingerprint,
                "total_tokens": 32, "lengths": lengths, "passkey_trials": 1,
                "models": {name: {"perplexity": rows, "passkey": {}}}}

    paths = [tmp_path / f"{index}.json" for index in range(4)]
    paths[0].write_text(json.dumps(evaluation("StreamingLLM", [8, 32])))
    paths[1].write_text(json.dumps(evaluation("BST upcycled", [8, 16, 32])))
    paths[2].write_text(json.dumps(evaluation("BST other text", [8], fingerprint="def")))
    paths[3].write_text(json.dumps(evaluation("StreamingLLM", [16])))
    merged = upcycle_report.merged_evaluations(paths[:2])
    assert merged["lengths"] == [8, 16, 32] and list(merged["models"]) == ["StreamingLLM", "BST upcycled"]
    with pytest.raises(ValueError, match="did not score the same tokens"):
        upcycle_report.merged_evaluations(paths[:3])
    with pytest.raises(ValueError, match="already has"):
        upcycle_report.merged_evaluations([paths[0], paths[3]])
    (tmp_path / "summary.json").write_text(json.dumps(summary()))
    upcycle_report.main([str(tmp_path / "summary.json"), "--output", str(tmp_path / "report.json"),
                         "--length_evaluations", *map(str, paths[:2]), "--merged_output", str(tmp_path / "m.json")])
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["models"]["BST upcycled"]["perplexity"][0]["loss_by_slot"]["groups"][0]["loss"] == 2.12346
    assert "loss" not in written["models"]["BST upcycled"]["perplexity"][0]["loss_by_slot"]
