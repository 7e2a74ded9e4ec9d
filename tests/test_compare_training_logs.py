"""scripts/experiments/compare_training_logs.py: the paired step-by-step comparison of two upcycling runs."""

import json

import pytest
from conftest import load_script

pytestmark = pytest.mark.lab

compare = load_script("experiments/compare_training_logs")


def write_run(folder, losses, **manifest):
    folder.mkdir()
    log = [{"step": step, "loss": loss, "seconds": step} for step, loss in losses.items()]
    (folder / "training_log.json").write_text(json.dumps(log))
    (folder / "data_manifest.json").write_text(json.dumps({"seed": 0, "sequence_length": 64, "max_steps": 4,
                                                           "corpus_tokens": 1000, **manifest}))


def test_paired_difference_over_the_shared_steps_in_range(tmp_path):
    """Steps 2-4 are shared and in range (run b stopped at 4): differences -0.5, -0.1, +0.3 -> mean -0.1, sample
    standard deviation 0.4, standard error 0.4 / sqrt(3); run a lower at 2 of 3 steps."""
    write_run(tmp_path / "a", {1: 9.0, 2: 2.5, 3: 2.9, 4: 3.3, 5: 1.0})
    write_run(tmp_path / "b", {1: 1.0, 2: 3.0, 3: 3.0, 4: 3.0})
    result = compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--first_step", "2"])
    assert (result["steps"], result["count"], result["steps_a_lower"]) == ([2, 4], 3, 2)
    assert result["mean_difference"] == pytest.approx(-0.1)
    assert result["standard_error"] == pytest.approx(0.4 / 3**0.5)
    assert (result["mean_loss_a"], result["mean_loss_b"]) == (pytest.approx(2.9), pytest.approx(3.0))


def test_runs_that_saw_other_sequences_are_refused(tmp_path):
    write_run(tmp_path / "a", {1: 3.0, 2: 3.0})
    write_run(tmp_path / "b", {1: 3.0, 2: 3.0}, seed=1)
    with pytest.raises(SystemExit, match="seed"):
        compare.main([str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(ValueError, match="share 1 step"):
        compare.paired_difference({1: 3.0, 2: 3.0}, {2: 3.0}, first_step=1)
