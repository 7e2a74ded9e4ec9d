"""scripts/benchmarks/decode_at_length.py: decoding speed and cache bytes of a converted BST against its source, on
tiny models (blocks of 8 tokens, previous-block attention and 2 sinks), in seconds."""

import json

import pytest
import torch
from test_benchmark import BENCHMARKS_DIR, load_by_path
from test_convert import random_source

from bst_tools import conversion


pytestmark = pytest.mark.lab

BLOCK, SINKS = 8, 2


@pytest.fixture(scope="module")
def decode_script():
    import sys

    if "bst_benchmark" not in sys.modules:
        load_by_path("bst_benchmark", BENCHMARKS_DIR / "bst_benchmark" / "__init__.py")
    return load_by_path("decode_at_length_script", BENCHMARKS_DIR / "decode_at_length.py")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decode")
    source = random_source("llama", max_position_embeddings=256)
    bst = conversion.convert_model(source, BLOCK, [], attend_previous_block=True, num_sink_tokens=SINKS)
    source.save_pretrained(folder / "source")
    bst.save_pretrained(folder / "bst")
    return folder


def test_bst_cache_bytes_stay_while_the_source_cache_grows_with_the_context(decode_script, folders, tmp_path):
    output = tmp_path / "decoding.json"
    results = decode_script.main([
        "--source", str(folders / "source"), "--bst", str(folders / "bst"), "--contexts", "24,72",
        "--new_tokens", "4", "--rounds", "2", "--warmup_steps", "1", "--source_prefill_max", "24", "--output", str(output),
        "--threads", str(torch.get_num_threads()),
    ])
    assert json.loads(output.read_text()) == json.loads(json.dumps(results))
    config = json.loads((folders / "source" / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    # fp32 keys and values of every cached position, in every layer.
    bytes_per_position = config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * 4
    rows = {(row["model"], row["context"], row["cache_from"][:7]): row for row in results["rows"]}
    assert sorted(rows) == [("bst", 24, "prefill"), ("bst", 72, "prefill"), ("source", 24, "filled "),
                            ("source", 24, "prefill"), ("source", 72, "filled ")]
    for context in (24, 72):
        assert rows["source", context, "filled "]["cache_bytes_after_prompt"] == (context - 1) * bytes_per_position
        assert rows["source", context, "filled "]["cache_bytes_after_decoding"] == (context - 1 + 2 * 4) * bytes_per_position
        # The BST holds the current and the previous block and the sinks (plus a token counter per layer), whatever
        # the context.
        bst_bytes = (2 * BLOCK + SINKS) * bytes_per_position + config["num_hidden_layers"] * 8
        assert rows["bst", context, "prefill"]["cache_bytes_after_prompt"] == bst_bytes
        assert rows["bst", context, "prefill"]["cache_bytes_after_decoding"] == bst_bytes
        # Two rounds of 4 tokens: 3 timed steps each, less one warm-up step.
        assert len(rows["bst", context, "prefill"]["step_ms"]) == 2 * 3 - 1
    # A filled cache has the shapes of a prefill's.
    assert rows["source", 24, "prefill"]["cache_bytes_after_prompt"] == 23 * bytes_per_position
    assert rows["source", 72, "filled "]["prefill_seconds"] is None
    summary = {line["context"]: line for line in results["summary"]}
    assert summary[24]["source_cache_from"] == "prefill" and summary[72]["source_cache_from"].startswith("filled")
    assert summary[72]["speedup"] == pytest.approx(
        rows["source", 72, "filled "]["ms_per_token"] / rows["bst", 72, "prefill"]["ms_per_token"]
    )


def test_a_filled_cache_continues_like_any_cache(decode_script):
    """Its keys/values are random, but generate() takes it as a prefilled one: same shapes, same position count."""
    source = random_source("llama", max_position_embeddings=256)
    cache = decode_script.filled_cache(source.config, 30)
    assert cache.get_seq_length() == 30
    prompt = torch.randint(3, source.config.vocab_size, (1, 31))
    output, step_ms = decode_script.generate_steps(source, prompt, cache, new_tokens=4)
    assert output.shape == (1, 35) and cache.get_seq_length() == 34 and len(step_ms) == 3
