"""scripts/train.py and scripts/evaluate.py end to end on a tiny BST, plus bf16 autocast, gradient checkpointing and
the checks on bad input. CPU only, no network."""

import json
import logging
import math
import os
import re
import shutil
import sysconfig
import zipfile

import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    default_data_collator,
    pipeline,
)

from conftest import load_script, logged_messages, tiny_config

from bst_tools.hub import stage_folder
from bst_tools.tokenizer import train_bpe_tokenizer
from modeling_bst import BSTConfig, BSTForCausalLM

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


train = load_script("train")
evaluate = load_script("evaluate")

TINY_PRESET = os.path.join(REPO_ROOT, "configuration", "bst-tiny.json")  # block_size 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small real corpus: standard-library modules, one document per file, with train/validation/test splits."""
    folder = tmp_path_factory.mktemp("corpus")
    stdlib = sysconfig.get_paths()["stdlib"]
    names = sorted(os.listdir(os.path.join(stdlib, "json"))) + sorted(os.listdir(os.path.join(stdlib, "email")))
    paths = [os.path.join(stdlib, d, n) for d in ("json", "email") for n in names if n.endswith(".py")]
    paths = [p for p in paths if os.path.isfile(p)]
    documents = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            documents.append({"id": os.path.relpath(path, stdlib), "text": f.read()[:4000]})
    splits = {"validation": documents[:2], "test": documents[2:4], "train": documents[4:]}
    for split, docs in splits.items():
        with open(folder / f"{split}.jsonl", "w") as f:
            for doc in docs:
                f.write(json.dumps(doc) + "\n")
    return folder


def base_argv(corpus, output_dir, *extra):
    return [
        "--config_name", TINY_PRESET,
        "--dataset_name", str(corpus),
        "--tokenizer_vocab_size", "300",
        "--sequence_length", "32",
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16",
        "--learning_rate", "3e-3",
        "--warmup_steps", "2",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--max_eval_samples", "32",
        "--use_cpu",
        "--report_to", "none",
        "--disable_tqdm", "true",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """One short training run shared by several tests: 30 steps of a tiny BST with its own BPE tokenizer."""
    output_dir = tmp_path_factory.mktemp("run")
    metrics = train.main(base_argv(corpus, output_dir, "--max_steps", "30"))
    return output_dir, metrics


def test_training_lowers_the_loss_and_saves_model_and_tokenizer(trained):
    output_dir, metrics = trained
    with open(output_dir / "trainer_state.json") as f:
        losses = [entry["loss"] for entry in json.load(f)["log_history"] if "loss" in entry]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # starts near ln(300) = 5.7
    assert math.isclose(metrics["eval_perplexity"], math.exp(metrics["eval_loss"]), rel_tol=1e-6)
    assert metrics["eval_perplexity"] < 300
    assert os.path.isfile(output_dir / "model.safetensors") and os.path.isfile(output_dir / "tokenizer.json")

    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    # vocab_size follows the trained tokenizer, special ids and the training length are recorded in the config.
    assert model.config.vocab_size == len(tokenizer) == 300
    assert (model.config.pad_token_id, model.config.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert model.config.training_length == 32
    assert model.config.max_position_embeddings == 2**20  # no maximum length: generate() and lm-eval read this


def test_saved_config_is_the_inference_config(trained):
    """Trainer turns the cache off for training; the saved model must still return one (generate() relies on it)."""
    output_dir, _ = trained
    with open(output_dir / "config.json") as f:
        assert json.load(f)["use_cache"] is True
    model = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    with torch.no_grad():
        outputs = model(input_ids=torch.tensor([[5, 6, 7, 8, 9]]))
    assert outputs.past_key_values is not None


def test_saved_folder_generates_through_pipeline(trained):
    output_dir, _ = trained
    generator = pipeline("text-generation", model=str(output_dir), device="cpu")
    text = generator("import json\n", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text.startswith("import json\n") and len(text) > len("import json\n")


def test_every_saved_tokenizer_pads_on_the_left(trained, corpus, tmp_path):
    """scripts/train.py's folder, scripts/train_tokenizer.py's and the staged folder of scripts/push_to_hub.py and
    scripts/convert_to_bst.py (`bst_tools.hub.stage_folder`) load with left padding, as a decoder-only model's
    batched generate() needs."""
    from types import SimpleNamespace

    train_tokenizer = load_script("train_tokenizer")
    output_dir, _ = trained
    train_tokenizer.main(
        ["--train_file", str(corpus / "train.jsonl"), "--vocab_size", "300", "--output_dir", str(tmp_path / "bpe")]
    )
    right_padded = AutoTokenizer.from_pretrained(output_dir, padding_side="right")
    stage_folder(tiny_model(), right_padded, SimpleNamespace(save=lambda path: None), tmp_path / "staged")
    for folder in (output_dir, tmp_path / "bpe", tmp_path / "staged"):
        assert AutoTokenizer.from_pretrained(folder).padding_side == "left", folder


def test_saved_tokenizers_keep_their_chat_template(trained, corpus, tmp_path):
    """A chat model's tokenizer (an upcycled Instruct model's) keeps its chat template through continued training
    (scripts/train.py) and staging (scripts/push_to_hub.py, scripts/convert_to_bst.py): the server's chat endpoint
    needs it."""
    from types import SimpleNamespace

    output_dir, _ = trained
    template = "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{% endfor %}"
    shutil.copytree(output_dir, tmp_path / "chat", ignore=shutil.ignore_patterns("checkpoint-*"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "chat")
    tokenizer.chat_template = template
    tokenizer.save_pretrained(tmp_path / "chat")
    train.main(
        base_argv(corpus, tmp_path / "continued", "--max_steps", "1")[2:]
        + ["--model_name_or_path", str(tmp_path / "chat")]
    )
    stage_folder(tiny_model(), tokenizer, SimpleNamespace(save=lambda path: None), tmp_path / "staged")
    for folder in (tmp_path / "continued", tmp_path / "staged"):
        assert AutoTokenizer.from_pretrained(folder).chat_template == template, folder


def test_saved_folder_generates_a_batch_as_its_rows_alone(trained):
    """Two prompts of different lengths in one batch padded by the saved tokenizer: the same greedy tokens and scores
    as each prompt alone. (Prompts of 5 and 11 tokens: not multiples of the block size, 8.)"""
    output_dir, _ = trained
    model = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    text_ids = tokenizer("from email import message\nclass Parser:\n    pass\n").input_ids
    prompts = [text_ids[:5], text_ids[:11]]
    settings = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")  # padded as the saved tokenizer says
    with torch.no_grad():
        together = model.generate(**batch, **settings)
        for row, prompt in enumerate(prompts):
            alone = model.generate(input_ids=torch.tensor([prompt]), **settings)
            assert together.sequences[row, batch.input_ids.shape[1] :].tolist() == alone.sequences[0, -6:].tolist()
            for step_together, step_alone in zip(together.scores, alone.scores):
                torch.testing.assert_close(step_together[row], step_alone[0], rtol=1e-4, atol=1e-5)


def test_sample_before_and_after_training_leaves_the_run_unchanged(corpus, tmp_path, capsys):
    def losses(output_dir):
        with open(output_dir / "trainer_state.json") as f:
            return [entry["loss"] for entry in json.load(f)["log_history"] if "loss" in entry]

    train.main(base_argv(corpus, tmp_path / "plain", "--max_steps", "3"))
    capsys.readouterr()
    prompt = "import json\n"
    argv = base_argv(corpus, tmp_path / "sampled", "--max_steps", "3")
    train.main(argv + ["--sample_prompt", prompt, "--sample_new_tokens", "8"])
    output = capsys.readouterr().out
    before = output.split("--- Sample before training ---\n")[1].split("\n---")[0]
    after = output.split("--- Sample after training ---\n")[1].split("\n---")[0]
    assert before.startswith(prompt) and after.startswith(prompt) and len(after) > len(prompt)
    # The samples draw from a forked random state: training is exactly the run without them.
    assert losses(tmp_path / "sampled") == losses(tmp_path / "plain")


def test_resume_from_checkpoint(corpus, tmp_path):
    train.main(base_argv(corpus, tmp_path, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"))
    assert os.path.isdir(tmp_path / "checkpoint-2")
    with open(tmp_path / "checkpoint-2" / "config.json") as f:
        assert json.load(f)["use_cache"] is True  # intermediate checkpoints serve too
    with logged_messages(logging.getLogger("transformers.trainer")) as messages:
        train.main(base_argv(corpus, tmp_path, "--max_steps", "4", "--resume_from_checkpoint", "last"))
    with open(tmp_path / "trainer_state.json") as f:
        state = json.load(f)
    assert state["global_step"] == 4
    # The resumed run logged only steps 3 and 4: it did not start over.
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3, 4]
    # The tied LM head is not stored (it is the embedding matrix): no warning that it is missing.
    assert not [message for message in messages if "missing keys" in message]


def test_resume_last_skips_checkpoints_whose_save_was_interrupted(corpus, tmp_path, caplog):
    train.main(base_argv(corpus, tmp_path, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1"))
    # checkpoint-2: killed before trainer_state.json (written last); checkpoint-3: a truncated model.safetensors.
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / "checkpoint-3")
    os.remove(tmp_path / "checkpoint-2" / "trainer_state.json")
    weights = tmp_path / "checkpoint-3" / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    assert train.find_resumable_checkpoint(str(tmp_path)) == (
        str(tmp_path / "checkpoint-1"),
        [
            (str(tmp_path / "checkpoint-3"),
             f"model.safetensors is truncated: its header describes {size} bytes, the file has {size // 2}"),
            (str(tmp_path / "checkpoint-2"), "no trainer_state.json (the save did not finish)"),
        ],
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="train"):
        train.main(base_argv(corpus, tmp_path, "--max_steps", "3", "--resume_from_checkpoint", "last"))
    assert "skipping" in caplog.text and "checkpoint-3: model.safetensors is truncated" in caplog.text
    with open(tmp_path / "trainer_state.json") as f:
        state = json.load(f)
    assert state["global_step"] == 3
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3]  # resumed after step 1

    # Naming the broken checkpoint explicitly fails before any work, naming the file.
    with pytest.raises(ValueError, match="checkpoint-3.*model.safetensors is truncated"):
        train.main(base_argv(corpus, tmp_path, "--resume_from_checkpoint", str(tmp_path / "checkpoint-3")))


def test_resume_last_skips_checkpoints_without_optimizer_or_scheduler(corpus, tmp_path, caplog):
    """Without the optimizer or scheduler state the Trainer would resume with fresh ones: a different run."""
    train.main(base_argv(corpus, tmp_path, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1"))
    os.remove(tmp_path / "checkpoint-3" / "optimizer.pt")
    os.remove(tmp_path / "checkpoint-2" / "scheduler.pt")
    assert train.find_resumable_checkpoint(str(tmp_path)) == (
        str(tmp_path / "checkpoint-1"),
        [
            (str(tmp_path / "checkpoint-3"), "optimizer.pt is missing (resuming would restart the optimizer)"),
            (str(tmp_path / "checkpoint-2"), "scheduler.pt is missing (resuming would restart the learning-rate schedule)"),
        ],
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="train"):
        train.main(base_argv(corpus, tmp_path, "--max_steps", "3", "--resume_from_checkpoint", "last"))
    assert "checkpoint-3: optimizer.pt is missing" in caplog.text
    with open(tmp_path / "trainer_state.json") as f:
        state = json.load(f)
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3]  # resumed after step 1


def test_corrupted_optimizer_state_is_named(corpus, tmp_path, caplog):
    """Bytes overwritten inside optimizer.pt: still a zip archive, but its CRCs no longer match."""
    train.main(base_argv(corpus, tmp_path, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1"))
    optimizer_path = tmp_path / "checkpoint-2" / "optimizer.pt"
    data = bytearray(optimizer_path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    optimizer_path.write_bytes(bytes(data))
    assert zipfile.is_zipfile(optimizer_path)
    problem = train.checkpoint_problem(str(tmp_path / "checkpoint-2"))
    assert problem.startswith("optimizer.pt is corrupted (")
    with caplog.at_level("WARNING", logger="train"):
        train.main(base_argv(corpus, tmp_path, "--max_steps", "3", "--resume_from_checkpoint", "last"))
    assert f"checkpoint-2: {problem}" in caplog.text
    with pytest.raises(ValueError, match="checkpoint-2.*optimizer.pt is corrupted"):
        train.main(base_argv(corpus, tmp_path, "--resume_from_checkpoint", str(tmp_path / "checkpoint-2")))


def write_non_finite_weight(folder, name="model.embed_tokens.weight"):
    """A NaN in the last embedding row (a token the tiny corpus may never use) of the folder's model.safetensors."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    weights = load_file(path)
    weights[name][-1, 0] = float("nan")
    save_file(weights, path, metadata={"format": "pt"})


def test_non_finite_weights_stop_training_and_resuming(corpus, tmp_path, caplog):
    train.main(base_argv(corpus, tmp_path, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1"))
    write_non_finite_weight(tmp_path / "checkpoint-2")
    problem = "model.safetensors holds NaN or infinite values (model.embed_tokens.weight)"
    assert train.find_resumable_checkpoint(str(tmp_path)) == (
        str(tmp_path / "checkpoint-1"), [(str(tmp_path / "checkpoint-2"), problem)]
    )  # fmt: skip
    with pytest.raises(ValueError, match=f"checkpoint-2.*{re.escape(problem)}"):
        train.main(base_argv(corpus, tmp_path, "--resume_from_checkpoint", str(tmp_path / "checkpoint-2")))
    # Continuing from such a folder (--model_name_or_path) stops before the first step, naming the tensor.
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / "nan-model")
    with pytest.raises(FloatingPointError, match="model.embed_tokens.weight holds NaN or infinite values"):
        train.main(
            base_argv(corpus, tmp_path / "continued", "--max_steps", "2")[2:]
            + ["--model_name_or_path", str(tmp_path / "nan-model")]
        )


def test_non_finite_loss_stops_training(corpus, tmp_path):
    """A learning rate that blows the weights up: training stops at the first non-finite loss, and saves nothing."""
    with pytest.raises(FloatingPointError, match=r"Training loss is (nan|inf|-inf) at step \d+"):
        train.main(base_argv(corpus, tmp_path, "--max_steps", "6", "--learning_rate", "1e30", "--max_grad_norm", "0"))
    assert not os.path.exists(tmp_path / "model.safetensors")


def test_continue_from_checkpoint_and_evaluate_lengths(trained, corpus, tmp_path):
    output_dir, _ = trained
    metrics = train.main(
        base_argv(corpus, tmp_path, "--max_steps", "2")[2:] + ["--model_name_or_path", str(output_dir)]
    )
    assert metrics["eval_perplexity"] < 300

    report = evaluate.main(
        ["--model_name_or_path", str(tmp_path), "--dataset_name", str(corpus), "--max_tokens", "1024"]
    )
    assert [row["length"] for row in report["results"]] == [32, 128, 512]
    # Every length scores the same 1024 tokens (one fewer prediction per window).
    assert [row["predicted_tokens"] for row in report["results"]] == [1024 - 32, 1024 - 8, 1024 - 2]
    assert all(math.isfinite(row["perplexity"]) and row["perplexity"] < 300 for row in report["results"])
    assert os.path.isfile(tmp_path / "perplexity_vs_length.json")
    assert os.path.getsize(tmp_path / "perplexity_vs_length.png") > 1000


def test_evaluate_reports_loss_by_slot_with_and_without_ssm(trained, corpus, tmp_path):
    output_dir, _ = trained
    report = evaluate.main(
        ["--model_name_or_path", str(output_dir), "--dataset_name", str(corpus), "--max_tokens", "1024",
         "--ssm_ablation", "--output_dir", str(tmp_path)]
    )  # fmt: skip
    assert report["block_size"] == 8 and report["loss_by_slot_length"] == 32
    first, longest = report["results"][0], report["results"][-1]
    slots = first["loss_by_slot"]
    # 32 windows of 32 tokens; positions 8..30 are counted (after the first block): slot 7 predicts twice per window.
    assert slots["count"] == [96] * 7 + [64]
    assert [group["slots"] for group in slots["groups"]] == ["0-3", "4-7"]
    mean = lambda a, b: sum(l * c for l, c in zip(slots["loss"][a:b], slots["count"][a:b])) / sum(slots["count"][a:b])
    assert slots["groups"][0]["loss"] == pytest.approx(mean(0, 4))
    assert slots["context_gain"] == pytest.approx(mean(0, 4) - mean(4, 8))
    # The ablation runs at the training length only, on the same windows, and zeroing the SSM changes the loss.
    without = first["loss_by_slot_without_ssm"]
    assert without["count"] == slots["count"] and "loss_by_slot_without_ssm" not in longest
    assert abs(first["loss_without_ssm"] - first["loss"]) > 1e-3
    assert longest["loss_by_slot"]["count"] == [2 * (512 // 8 - 1)] * 7 + [2 * (512 // 8 - 1) - 2]
    with open(tmp_path / "perplexity_vs_length.json") as f:
        assert json.load(f)["results"][0]["loss_by_slot"]["loss"] == pytest.approx(slots["loss"])
    assert os.path.getsize(tmp_path / "loss_by_slot.png") > 1000



# ----------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before any training starts
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train.PerplexityTrainer, "train", fail)


def test_missing_data_path(no_training, tmp_path):
    argv = base_argv(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(ValueError, match="neither a folder nor a dataset name"):
        train.main(argv)
    argv[argv.index("--dataset_name")] = "--train_file"
    with pytest.raises(ValueError, match="does not exist or is not a file"):
        train.main(argv)


def test_empty_corpus(no_training, tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "\n\n"}) + "\n")
    with pytest.raises(ValueError, match="train split is empty"):
        train.main(base_argv(tmp_path, tmp_path / "out"))


def test_block_size_larger_than_sequence_length(no_training, corpus, tmp_path):
    argv = base_argv(corpus, tmp_path / "out", "--config_overrides", "block_size=64")
    with pytest.raises(ValueError, match=r"block_size \(64\) is larger than --sequence_length \(32\)"):
        train.main(argv)


def test_tokenizer_that_does_not_match_the_checkpoint(no_training, trained, corpus, tmp_path):
    output_dir, _ = trained
    with open(corpus / "train.jsonl") as f:
        texts = [json.loads(line)["text"] for line in f]
    train_bpe_tokenizer(texts, vocab_size=500, show_progress=False).save_pretrained(tmp_path / "big_tokenizer")
    argv = base_argv(corpus, tmp_path / "out")[2:] + [
        "--model_name_or_path", str(output_dir), "--tokenizer_name", str(tmp_path / "big_tokenizer"),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="tokenizer has 500 tokens but the checkpoint's embeddings hold only 300"):
        train.main(argv)


def test_preset_and_checkpoint_are_exclusive(no_training, trained, corpus, tmp_path):
    output_dir, _ = trained
    with pytest.raises(ValueError, match="exactly one of --config_name"):
        train.main(base_argv(corpus, tmp_path) + ["--model_name_or_path", str(output_dir)])


# ----------------------------------------------------------------------------------------------------------------
# Mixed precision and gradient checkpointing
# ----------------------------------------------------------------------------------------------------------------


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return BSTForCausalLM(BSTConfig.from_json_file(TINY_PRESET))


def test_bf16_autocast_on_cpu_trains_without_nans(tmp_path):
    model = tiny_model()
    generator = torch.Generator().manual_seed(0)
    # A learnable pattern: repeated random phrases of 8 tokens.
    phrases = torch.randint(2, 128, (4, 8), generator=generator)
    rows = [phrases[torch.randint(0, 4, (8,), generator=generator)].flatten() for _ in range(64)]
    dataset = Dataset.from_dict({"input_ids": [r.tolist() for r in rows], "labels": [r.tolist() for r in rows]})
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, bf16=True, max_steps=12, per_device_train_batch_size=8,
        learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator)
    lm_head_dtypes = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: lm_head_dtypes.append(output.dtype))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # The training forward really ran under bf16 autocast (the Trainer casts the outputs back to fp32 afterwards).
    assert lm_head_dtypes and set(lm_head_dtypes) == {torch.bfloat16}


def test_ssm_parameters_get_their_own_optimiser_group(tmp_path):
    """No weight decay and `ssm_learning_rate_scale` x the learning rate for every SSM parameter, in the optimiser
    that Trainer builds; everything else as Trainer would group it (matrices decayed, vectors not)."""
    model = BSTForCausalLM(tiny_config(num_hidden_layers=3, bst_layers=[1]))
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.1, use_cpu=True, report_to=[])
    trainer = train.PerplexityTrainer(model=model, args=args, ssm_learning_rate_scale=0.25)
    optimizer = trainer.create_optimizer()
    ssm_ids = {id(p) for p in model.model.layers[1].ssm.parameters()}
    groups = {
        (group["lr"], group["weight_decay"]): {id(p) for p in group["params"]} for group in optimizer.param_groups
    }
    assert groups[(0.25e-3, 0.0)] == ssm_ids
    decayed = groups[(1e-3, 0.1)]
    assert id(model.model.layers[0].attention.q_proj.weight) in decayed and not decayed & ssm_ids
    assert id(model.model.norm.weight) in groups[(1e-3, 0.0)]
    assert sum(len(ids) for ids in groups.values()) == len(list(model.parameters()))
