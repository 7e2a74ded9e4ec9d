"""scripts/benchmarks/upcycle_stage.sh (gpu_checks.sh's `upcycle` stage) end to end on the CPU at toy sizes: a tiny
GGUF written here, its token file, the upcycled and control runs, the conversion, the five evaluations and the
summary. Minutes on 2 busy cores (seven Python processes): marked `lab`."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import load_script
from test_convert import random_source, write_llama_gguf

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / "scripts" / "benchmarks" / "upcycle_stage.sh"
TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on in the sun. " * 12
TINY_SETTINGS = {
    "DEVICE": "cpu", "SMOLLM2_SHA256": "skip", "UPCYCLE_BLOCK_SIZE": "8", "UPCYCLE_SINKS": "2",
    "UPCYCLE_BST_LAYERS": "1", "UPCYCLE_STEPS": "2", "UPCYCLE_BATCH_SIZE": "2", "UPCYCLE_SEQUENCE_LENGTH": "32",
    "EVAL_LENGTHS": "32,64", "EVAL_TOKENS": "128", "EVAL_SWAP_TOKENS": "128", "EVAL_PASSKEYS": "16", "EVAL_PASSKEY_TRIALS": "1",
    # A shared 2-core machine runs the seven processes many times slower than a GPU machine's 16 cores.
    "UPCYCLE_RUN_SECONDS": "500", "UPCYCLE_CONVERT_SECONDS": "500", "EVAL_SECONDS": "500",
}


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    """(a tiny GGUF, its token file of TEXT, the token count)."""
    folder = tmp_path_factory.mktemp("stage-inputs")
    write_llama_gguf(folder / "tiny.gguf", random_source("llama", vocab_size=300, max_position_embeddings=512))
    (folder / "text.txt").write_text(TEXT)
    saved = load_script("upcycle").main([
        "--gguf_file", str(folder / "tiny.gguf"), "--text_files", str(folder / "text.txt"),
        "--save_training_tokens", str(folder / "tokens.pt"),
    ])
    return folder / "tiny.gguf", folder / "tokens.pt", saved["tokens"]


def run_stage(output_dir, gguf, tokens, **settings):
    environment = {**os.environ, **TINY_SETTINGS, "SMOLLM2_GGUF": str(gguf), "UPCYCLE_TOKENS": str(tokens), **settings}
    result = subprocess.run(["bash", str(STAGE), str(output_dir)], env=environment, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((output_dir / "upcycle_summary.json").read_text()), result.stdout


def test_stage_runs_end_to_end_and_always_writes_its_summary(tiny_inputs, tmp_path):
    gguf, tokens, token_count = tiny_inputs
    summary, stdout = run_stage(tmp_path / "stage", gguf, tokens, UPCYCLE_MODELS_DIR=str(tmp_path / "models"),
                                UPCYCLE_SSM_OPTIONS="--ssm_gate --ssm_residual")
    parts = {part["part"]: part["exit"] for part in summary["parts"]}
    assert parts == {"converted": 0, "upcycled": 0, "control": 0, "eval-source": 0, "eval-upcycled": 0,
                     "eval-control": 0, "eval-converted": 0, "far-context-swap": 0}, stdout
    for run in ("upcycled", "control"):
        training = summary["training"][run]
        assert (training["steps"], training["tokens_trained"], training["stopped_by_max_seconds"]) == (2, 128, False)
    assert summary["same_steps"] and summary["data"]["corpus_tokens"] == token_count
    assert summary["data"]["sources"][0]["tokens"] == token_count
    config = summary["training"]["upcycled"]["config"]
    assert (config["bst_layers"], config["num_sink_tokens"], config["attend_previous_block"]) == ([1], 2, True)
    assert (config["ssm_gate"], config["ssm_residual"], config["ssm_conv_size"]) == (True, True, 0)
    assert (config["ssm_dt_min"], config["ssm_dt_max"]) == (1.2e-4, 2e-3)  # the stage's step sizes, past the window
    control = summary["training"]["control"]["config"]
    assert control["bst_layers"] == [] and control["num_sink_tokens"] == 2
    assert (tmp_path / "models" / "converted" / "config.json").is_file()
    assert all((tmp_path / "stage" / f"{run}_trained_weights.safetensors").is_file() for run in ("upcycled", "control"))
    assert not (tmp_path / "stage" / "upcycled").exists()
    names = sorted(summary["evaluation"])
    assert names == ["BST control", "BST converted", "BST upcycled", "BST upcycled, SSM outputs zeroed",
                     "BST upcycled, SSM reach cut at 16 tokens",  # 2W: what the SSM brings from beyond the window
                     "StreamingLLM (2 sinks + 8 window, chunks of 8; passkeys with 16)", "source (full attention)"]
    for name, results in summary["evaluation"].items():
        assert [row["length"] for row in results["perplexity"]] == [32, 64]
        assert all(row["predictions"] == 128 - 128 // row["length"] for row in results["perplexity"])
        assert list(results["passkey"]) == ([] if "reach cut" in name else ["16"])  # the cut scores, never decodes

    swap = summary["far_context_swap"]
    assert (swap["window"], swap["swap_end"], swap["sinks"], swap["total_tokens"]) == (32, 16, 2, 128)
    assert sorted(swap["models"]) == ["control", "upcycled"]
    assert set(swap["models"]["upcycled"]["SSM part of the swap effect"]) == {"same kind", "other kind"}
    assert swap["models"]["upcycled"]["SSM part of the swap effect"]["other kind"]["windows"] == 4
    assert "far-context swap, upcycled, SSM part of the swap effect: same kind" in stdout

    # A model file that is not the pinned one stops the stage before any run, and the summary says why.
    summary, _ = run_stage(tmp_path / "refused", gguf, tokens, SMOLLM2_SHA256="0" * 64)
    assert [part["exit"] for part in summary["parts"]] == [1] and "sha256 check" in summary["parts"][0]["part"]
    assert summary["training"] == {} and summary["evaluation"] == {} and summary["far_context_swap"] is None
