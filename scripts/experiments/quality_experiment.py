#!/usr/bin/env python
"""Does BST's SSM pay off? BST against the models a user would pick instead, at a budget a CPU affords, with length
generalisation and the loss by slot inside a block.

Every model is trained under the same budget (non-embedding parameters matched within 5% by solving each model's
`intermediate_size`, the same tokens in the same order, the same optimiser and schedule: scripts/train.py's parameter
groups), on a book corpus and on a code corpus, at a training length of 512 tokens, and evaluated on held-out
documents at 1x, 4x and 16x that length.

Models (`--models`; the default is bst-sh-s4, slide, mistral-swa, recurrentgemma, llama):

* `bst-sh-s4`, `bst-mh-s4`, `bst-mf-s4`: BST, single-head / multi-head / multi-filter, S4D kernels;
* `bst-sh-unstructured`, `bst-mf-unstructured`: BST with implicit (Hyena-style) kernels;
* `slide`: the same BST code with `bst_layers=[]`: plain block attention (a token sees the earlier tokens of its own
  block of `block_size`), no SSM, no cross-attention - BST without its SSM;
* `mistral-swa`: Transformers' `MistralForCausalLM` with `sliding_window=block_size` (a token sees the previous
  `block_size` tokens), a true sliding-window Transformer, the paper's "Slide";
* `recurrentgemma`: Transformers' RecurrentGemma (Griffin), RG-LRU recurrence and local attention over `block_size`;
* `llama`: Transformers' `LlamaForCausalLM`, full attention, its RoPE used as is beyond the training length.

A BST name may carry options of the SSM branch, joined by "+": `gate` (`ssm_gate`), `conv<k>` (`ssm_conv_size=k`),
`residual` (`ssm_residual`), `nocross` (with `residual`: `ssm_cross_attention=False`, the SSM reaches the model
through the residual branch only), e.g. `bst-sh-s4+gate+conv4+residual`; a BST or Slide name may carry `apb`
(`attend_previous_block`: self-attention sees the previous block too) or `swa` (`sliding_window_attention` as well: a
token sees exactly the last `block_size` tokens, as in `mistral-swa`), e.g. `slide+apb`. Llama and Mistral have
SwiGLU MLPs (gated, SiLU) and RecurrentGemma a gated GeLU MLP; BST and Slide have the paper's plain GeLU MLP unless
`--gated_mlp` gives them Llama's, so that BST, Slide, Mistral-SWA and Llama share one backbone. `--scaled_backbone`
gives all four RecurrentGemma's scales as well (Griffin's fan-in initialisation, embeddings times sqrt(hidden_size)).

Every trained BST model is also scored at 1x with its SSM outputs replaced by zeros (the SSM ablation: no context
states, no residual SSM branch): whether its real context states lower its perplexity.

The options one by one and together, against Slide and Mistral-SWA on one backbone, RecurrentGemma and Llama:

    python scripts/experiments/quality_experiment.py --gated_mlp --corpora books,code --seeds 0,1,2 --no_ablation \
        --models bst-sh-s4,bst-sh-s4+gate,bst-sh-s4+conv4,bst-sh-s4+residual,bst-sh-s4+gate+conv4+residual,slide,\
mistral-swa,recurrentgemma,llama

Evaluation: the held-out documents (id order, separated by the end-of-text token) form one token stream; `--eval_spans`
non-overlapping spans of 16 x 512 tokens are taken evenly spaced over it, and every span is scored as windows of 1x,
4x and 16x the training length: the same tokens are predicted at every length, so the numbers differ only by how
much context each prediction gets. At 1x the loss by slot inside a block is kept too (early slots 0-3 against the
second half of the block), and a validation perplexity every `--eval_every` steps gives the learning curves.

Every model gets every seed of `--seeds`, seed by seed. Then a small ablation (the recipe, previous-block attention)
runs on the first corpus. Results go to `--output_json` after every run (`--resume` skips finished runs; two
processes, one per core, can share the work with different `--seeds` and be merged with `--merge_json`), the figures
to `--figure_dir`, and the tables into `--markdown` between the `<!-- results:begin -->` and `<!-- results:end -->`
markers. `--report_only` rewrites the figures and tables from the JSON without training. docs/quality.md has the
commands that produced its figures.

    python scripts/experiments/quality_experiment.py --quick --work_dir /tmp/q --output_json /tmp/q/r.json \
        --figure_dir /tmp/q --markdown /tmp/q/q.md   # toy sizes, checks the plumbing
"""

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
import types

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError
from tqdm.auto import tqdm
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    RecurrentGemmaConfig,
    RecurrentGemmaForCausalLM,
)
from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaRglru
from transformers.utils import logging as hf_logging

from bst_tools.evaluation import loss_by_slot, ssm_zeroed
from bst_tools.tokenizer import EOS_TOKEN, train_bpe_tokenizer
from bst_tools.training import SSM_LEARNING_RATE_SCALE, optimizer_parameter_groups
from modeling_bst import BSTConfig, BSTForCausalLM
from modeling_bst.modeling_bst import fan_in_std


# The base models; BST names may add SSM options ("bst-sh-s4+gate+conv4", SSM_OPTIONS), BST and Slide names an
# attention span (BLOCK_OPTIONS: "slide+swa").
ALL_MODELS = (
    "bst-sh-s4",
    "bst-mh-s4",
    "bst-mf-s4",
    "bst-sh-unstructured",
    "bst-mf-unstructured",
    "slide",
    "mistral-swa",
    "recurrentgemma",
    "llama",
)
DEFAULT_MODELS = ("bst-sh-s4", "slide", "mistral-swa", "recurrentgemma", "llama")
BASELINES = ("slide", "mistral-swa", "recurrentgemma", "llama")
# "nocross": the SSM reaches the model through the residual branch only (needs "residual"). And "conv<taps>".
SSM_OPTIONS = {
    "gate": ("ssm_gate", True),
    "residual": ("ssm_residual", True),
    "nocross": ("ssm_cross_attention", False),
}
# BST and Slide: "apb" self-attention sees the previous block whole; "swa" sees exactly the last block_size tokens
# (Mistral's sliding window, computed over the own and previous block).
BLOCK_OPTIONS = {
    "apb": {"attend_previous_block": True},
    "swa": {"attend_previous_block": True, "sliding_window_attention": True},
}
RECURRENCE_CHUNK = 16  # time steps per chunk of chunked_rnn_scan
EARLY_SLOTS = 4  # "early-slot loss": the first 4 slots of a block, where block attention has almost no context
PARAMETER_TOLERANCE = 0.05
RESULTS_BEGIN, RESULTS_END = "<!-- results:begin -->", "<!-- results:end -->"

# Ablation runs: (name, base model, overrides), each on the first seed. Overrides are BST config fields, plus
# "old_recipe": the initialisation and optimiser of version 0.2 (skip term at one, cross half of o_proj random, SSM
# parameters at the model's learning rate with weight decay; the dt range is a config field); "ffn_of": the FFN width
# that matches another model to the parameter target, instead of this one's.
ABLATIONS = (
    (
        "bst-sh-s4 before the recipe",
        "bst-sh-s4",
        {"ssm_dt_min": 0.001, "ssm_dt_max": 0.1, "old_recipe": True},
    ),
    ("bst-sh-s4 attend_previous_block", "bst-sh-s4", {"attend_previous_block": True}),
    ("slide attend_previous_block", "slide", {"attend_previous_block": True}),
    ("bst-sh-s4 in every layer", "bst-sh-s4", {"bst_layers": "all"}),
    ("bst-mh-s4 attend_previous_block", "bst-mh-s4", {"attend_previous_block": True}),
    ("bst-mf-s4 attend_previous_block", "bst-mf-s4", {"attend_previous_block": True}),
    # Parameters deliberately unmatched: the FFN width of another model ("ffn_of"), to tell what the context path
    # buys from what its parameters cost the FFN.
    ("slide at bst-sh-s4's FFN width", "slide", {"ffn_of": "bst-sh-s4"}),
    ("bst-sh-s4 at slide's FFN width", "bst-sh-s4", {"ffn_of": "slide"}),
)


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data_dir", default="data", help="Holds CORPUS/{train,validation,test}.jsonl (prepare_data.py)."
    )
    data.add_argument("--corpora", default="books,code", help="Comma-separated corpora under --data_dir.")
    data.add_argument("--vocab_size", type=int, default=4096, help="Byte-level BPE vocabulary, one per corpus.")
    data.add_argument("--work_dir", default="runs/quality", help="Tokenizers and tokenised corpora are cached here.")

    model = parser.add_argument_group("models")
    model.add_argument(
        "--models", default=",".join(DEFAULT_MODELS), help=f"Comma-separated, from {list(ALL_MODELS)}."
    )
    model.add_argument("--hidden_size", type=int, default=128)
    model.add_argument("--num_layers", type=int, default=4)
    model.add_argument("--num_heads", type=int, default=4)
    model.add_argument("--block_size", type=int, default=128, help="W of BST and slide; Mistral's sliding window.")
    model.add_argument("--bst_layers", default="1,3", help="Which layers of the BST models are BST layers.")
    model.add_argument("--ssm_state_size", type=int, default=16)
    model.add_argument("--mf_context_states", type=int, default=8, help="S, the number of filters of 'mf' models.")
    model.add_argument(
        "--reference_intermediate_size",
        type=int,
        default=None,
        help="FFN width of bst-sh-s4, whose non-embedding parameter count every model is matched to. Default 4*hidden "
        "(8/3*hidden with --gated_mlp: the same parameters).",
    )
    model.add_argument(
        "--gated_mlp",
        action="store_true",
        help="BST and Slide get Llama's and Mistral's SwiGLU MLP (gated_mlp, silu) instead of the paper's GeLU MLP.",
    )
    model.add_argument(
        "--scaled_backbone",
        action="store_true",
        help="RecurrentGemma's scales for BST, Slide, Mistral and Llama alike: Griffin's initialisation "
        "(initializer_scheme='fan_in') and token embeddings multiplied by sqrt(hidden_size) (embedding_multiplier).",
    )
    model.add_argument(
        "--initializer_range",
        type=float,
        default=0.02,
        help="initializer_range of BST, Slide, Mistral and Llama: the std of every matrix, or with --scaled_backbone "
        "of the embeddings only (RecurrentGemma's embeddings: 0.05). RecurrentGemma keeps its own.",
    )

    train = parser.add_argument_group("training (identical for every model)")
    train.add_argument("--train_length", type=int, default=512)
    train.add_argument("--batch_size", type=int, default=8)
    train.add_argument("--max_steps", type=int, default=400)
    train.add_argument("--learning_rate", type=float, default=3e-3)
    train.add_argument(
        "--ssm_learning_rate_scale",
        type=float,
        default=SSM_LEARNING_RATE_SCALE,
        help="Learning rate of the SSM parameters as a multiple of --learning_rate (scripts/train.py's default).",
    )
    train.add_argument("--warmup_steps", type=int, default=20)
    train.add_argument("--weight_decay", type=float, default=0.1)
    train.add_argument("--data_seed", type=int, default=1234, help="Fixes the order of the training sequences.")
    train.add_argument("--seeds", default="0,1,2", help="Initialisation seeds of every model.")
    train.add_argument(
        "--extra_seeds",
        default="",
        help="More seeds for the best BST model (by validation at the first seed) and the baselines.",
    )
    train.add_argument(
        "--eval_every", type=int, default=50, help="Validation perplexity every this many steps (the learning curves)."
    )
    train.add_argument("--device", default="cpu", help="cpu or cuda.")
    train.add_argument("--bf16", action="store_true", help="bf16 autocast for training and evaluation (GPU).")
    train.add_argument(
        "--recurrentgemma_scan",
        choices=("loop", "chunked"),
        default="chunked",
        help="RecurrentGemma's recurrence: Transformers' loop over time steps, or the same recurrence chunk by chunk "
        "(chunked_rnn_scan; equal to the loop within float rounding; 1.4x faster on the 2-core CPU, and on the shared "
        "GPU 0.2 s a step where the loop took over 1 s).",
    )

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval_multipliers", default="1,4,16", help="Evaluation lengths, in training lengths.")
    evaluation.add_argument("--eval_spans", type=int, default=2, help="Spans of max-multiplier x train_length tokens.")
    evaluation.add_argument("--validation_spans", type=int, default=1, help="Validation spans (scored at 1x only).")

    output = parser.add_argument_group("output")
    output.add_argument("--output_json", default="docs/quality_results.json")
    output.add_argument("--figure_dir", default="docs/figures")
    output.add_argument("--markdown", default="docs/quality.md", help="Page whose results section is (re)written.")
    output.add_argument("--no_ablation", action="store_true", help="Skip the ablation runs.")
    output.add_argument(
        "--ablations_only",
        action="store_true",
        help="Run only the ablations (on the first corpus and first seed), e.g. in a process of their own.",
    )
    output.add_argument(
        "--ablations",
        default=None,
        help="Run only these ablations (names as in ABLATIONS, separated by ';'), e.g. on other seeds than the first.",
    )
    output.add_argument("--resume", action="store_true", help="Keep finished runs of --output_json, run the rest.")
    output.add_argument(
        "--merge_json",
        nargs="*",
        default=[],
        help="Result files of other processes of the same experiment (same settings, e.g. other --seeds run on the "
        "other core): their finished runs join --output_json's (implies --resume).",
    )
    output.add_argument(
        "--report_only",
        action="store_true",
        help="Train nothing: rewrite the targets, figure and markdown from --output_json (implies --resume).",
    )
    output.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads. 1 by default: on a shared 2-core machine two OpenMP threads competing with other "
        "jobs made a training step 5-30x slower (spinning at barriers) than one thread.",
    )
    output.add_argument(
        "--quick",
        action="store_true",
        help="Toy sizes (hidden 32, 2 layers, vocab 300, train length 32, 3 steps, first 40 training documents): "
        "checks the plumbing in about a minute. Quality numbers are meaningless.",
    )
    args = parser.parse_args(argv)
    args.command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + (argv or sys.argv[1:]))
    if args.quick:
        args.hidden_size, args.num_layers, args.num_heads, args.block_size = 32, 2, 2, 8
        args.vocab_size, args.train_length, args.batch_size, args.max_steps, args.warmup_steps = 300, 32, 2, 3, 1
        args.bst_layers, args.ssm_state_size, args.mf_context_states = "1", 8, 4
    args.max_train_documents = 40 if args.quick else None
    return check_args(parser, args)


def parse_int_list(text):
    return [int(item) for item in text.split(",") if item.strip() != ""]


def check_args(parser, args):
    """Everything that can be checked before any heavy work."""
    args.corpora = [c for c in args.corpora.split(",") if c]
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if base_model(m) not in ALL_MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(ALL_MODELS)}.")
    for name in [m for m in args.models if "+" in m]:
        try:
            option_fields(name)
        except ValueError as error:
            parser.error(f"--models: {error}")
    for corpus in args.corpora:
        for split in ("train", "validation", "test"):
            path = os.path.join(args.data_dir, corpus, f"{split}.jsonl")
            if not os.path.isfile(path):
                parser.error(
                    f"{path} does not exist. Build it with `python scripts/prepare_data.py --corpus {corpus} "
                    f"--output_dir {args.data_dir}`."
                )
    try:
        args.seeds, args.extra_seeds = parse_int_list(args.seeds), parse_int_list(args.extra_seeds)
        args.eval_multipliers = sorted(parse_int_list(args.eval_multipliers))
        args.bst_layers = parse_int_list(args.bst_layers)
    except ValueError as error:
        parser.error(
            f"--seeds, --extra_seeds, --eval_multipliers and --bst_layers take comma-separated integers: {error}"
        )
    if not args.seeds:
        parser.error("--seeds must list at least one seed.")
    unknown_ablations = set((args.ablations or "").split(";")) - {name for name, _, _ in ABLATIONS} - {""}
    if unknown_ablations:
        parser.error(f"--ablations: unknown {sorted(unknown_ablations)}; choose from {[n for n, _, _ in ABLATIONS]}.")
    if args.ablations_only and args.no_ablation:
        parser.error("--ablations_only and --no_ablation exclude each other.")
    if not args.eval_multipliers or args.eval_multipliers[0] < 1:
        parser.error(f"--eval_multipliers must be positive integers, got {args.eval_multipliers}.")
    bad_layers = [i for i in args.bst_layers if not 0 <= i < args.num_layers]
    if bad_layers or not args.bst_layers:
        parser.error(f"--bst_layers must list layers in [0, {args.num_layers}), got {args.bst_layers}.")
    if args.hidden_size % args.num_heads:
        parser.error(f"--hidden_size {args.hidden_size} is not divisible by --num_heads {args.num_heads}.")
    if args.train_length % args.block_size:
        parser.error(f"--train_length {args.train_length} must be a multiple of --block_size {args.block_size}.")
    if args.train_length < 2 * args.block_size:
        parser.error("--train_length must hold at least two blocks: the early-slot loss skips each window's first.")
    for name in ("train_length", "batch_size", "max_steps", "eval_spans", "validation_spans", "threads", "eval_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.reference_intermediate_size is None:
        args.reference_intermediate_size = 8 * args.hidden_size // 3 if args.gated_mlp else 4 * args.hidden_size
    for name in [m for m in args.models if m.startswith("bst-")]:
        try:
            BSTConfig(
                hidden_size=args.hidden_size,
                num_hidden_layers=args.num_layers,
                num_attention_heads=args.num_heads,
                **bst_fields(args, name),
            )
        except (ValueError, StrictDataclassClassValidationError) as error:  # e.g. an option the variant does not take
            parser.error(f"--models: {name}: {error}")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Data: one tokenizer per corpus, token streams, training sequences and evaluation spans
# ----------------------------------------------------------------------------------------------------------------


def read_texts(path, max_documents=None):
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                texts.append(json.loads(line)["text"])
            if max_documents is not None and len(texts) >= max_documents:
                break
    return texts


def load_corpus(args, corpus):
    """Trains (or loads) the corpus' tokenizer on its training split; returns the tokenizer and one token stream per
    split: documents in file (id) order, each followed by the end-of-text token."""
    corpus_dir = os.path.join(args.data_dir, corpus)
    # The cache is keyed by the corpus files' contents: a rebuilt corpus (another Python's stdlib) is re-tokenised.
    digest = hashlib.sha256()
    for split in ("train", "validation", "test"):
        with open(os.path.join(corpus_dir, f"{split}.jsonl"), "rb") as f:
            digest.update(f.read())
    data_sha256 = digest.hexdigest()
    cache_name = f"{corpus}-bpe{args.vocab_size}-{data_sha256[:12]}" + ("-quick" if args.quick else "")
    cache_dir = os.path.join(args.work_dir, cache_name)
    tokenizer_dir = os.path.join(cache_dir, "tokenizer")
    texts = {
        split: read_texts(
            os.path.join(corpus_dir, f"{split}.jsonl"), args.max_train_documents if split == "train" else None
        )
        for split in ("train", "validation", "test")
    }
    if os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    else:
        print(
            f"[{corpus}] training a byte-level BPE tokenizer ({args.vocab_size} tokens) on the training split",
            flush=True,
        )
        tokenizer = train_bpe_tokenizer(texts["train"], vocab_size=args.vocab_size, show_progress=False)
        tokenizer.save_pretrained(tokenizer_dir)
    streams = {}
    for split, split_texts in texts.items():
        path = os.path.join(cache_dir, f"{split}.npy")
        if os.path.isfile(path):
            streams[split] = np.load(path)
            continue
        eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
        ids = []
        for document_ids in tokenizer(split_texts, add_special_tokens=False)["input_ids"]:
            ids.extend(document_ids)
            ids.append(eos_id)
        streams[split] = np.asarray(ids, dtype=np.int32)
        np.save(path, streams[split])
    return tokenizer, streams, data_sha256


def training_sequences(stream, length, count, data_seed):
    """`count` sequences of `length` tokens: the stream cut into non-overlapping pieces, shuffled with `data_seed`.
    Every model sees exactly these, in this order. A budget larger than the stream takes further epochs, each a new
    permutation of the same pieces (the number of epochs is reported with the results)."""
    num_pieces = len(stream) // length
    if num_pieces < 1:
        raise ValueError(f"The training stream has {len(stream)} tokens, fewer than one sequence of {length}.")
    rng = np.random.default_rng(data_seed)
    epochs = math.ceil(count / num_pieces)
    order = np.concatenate([rng.permutation(num_pieces) for _ in range(epochs)])[:count]
    pieces = stream[: num_pieces * length].reshape(num_pieces, length)
    return torch.from_numpy(pieces[order].astype(np.int64))


def evaluation_spans(stream, span_length, count):
    """`count` non-overlapping spans of `span_length + 1` tokens, evenly spaced over the stream (the +1: every window
    of a span predicts the token after its last input, so all lengths score the same `span_length` targets)."""
    needed = span_length + 1
    if len(stream) < count * needed:
        raise ValueError(
            f"The held-out stream has {len(stream)} tokens, fewer than {count} spans of {needed}: lower --eval_spans "
            "or the largest --eval_multipliers."
        )
    starts = np.linspace(0, len(stream) - needed, count).round().astype(int) if count > 1 else np.array([0])
    return torch.from_numpy(np.stack([stream[s : s + needed] for s in starts]).astype(np.int64))


# ----------------------------------------------------------------------------------------------------------------
# Models and parameter matching
# ----------------------------------------------------------------------------------------------------------------


def base_model(model_name):
    """The model a name's "+"-joined options apply to: "bst-sh-s4+gate+swa" -> "bst-sh-s4"."""
    return model_name.split("+")[0]


def option_fields(model_name):
    """The BST config fields of the "+"-joined options of a model name: "bst-sh-s4+gate+conv4" -> ssm_gate=True,
    ssm_conv_size=4; "slide+apb" -> attend_previous_block=True; "slide+swa" -> sliding_window_attention=True too."""
    ssm_fields, block_fields = {}, {}
    for option in model_name.split("+")[1:]:
        if option in SSM_OPTIONS:
            field, value = SSM_OPTIONS[option]
            ssm_fields[field] = value
        elif option.startswith("conv") and option[4:].isdigit():
            ssm_fields["ssm_conv_size"] = int(option[4:])
        elif option in BLOCK_OPTIONS:
            block_fields.update(BLOCK_OPTIONS[option])
        else:
            raise ValueError(
                f"{model_name}: unknown option {option!r}; options are gate, residual, nocross, conv<taps>, apb, swa."
            )
    if ssm_fields and not model_name.startswith("bst-"):
        raise ValueError(f"{model_name}: SSM options apply to BST models only.")
    if block_fields and not model_name.startswith(("bst-", "slide")):
        raise ValueError(f"{model_name}: apb and swa apply to BST and Slide only.")
    return {**ssm_fields, **block_fields}


def bst_fields(args, model_name, overrides=None):
    overrides = {k: v for k, v in (overrides or {}).items() if k not in ("old_recipe", "ffn_of")}
    # Llama's and Mistral's MLP, for the same backbone (--gated_mlp).
    backbone = dict(gated_mlp=True, hidden_act="silu") if args.gated_mlp else {}
    if args.scaled_backbone:
        backbone.update(initializer_scheme="fan_in", embedding_multiplier=args.hidden_size**0.5)
    if base_model(model_name) == "slide":
        return dict(block_size=args.block_size, bst_layers=[], **backbone, **option_fields(model_name), **overrides)
    variant, kernel = base_model(model_name).split("-")[1:3]
    fields = dict(
        bst_variant=variant,
        ssm_kernel=kernel,
        bst_layers=list(args.bst_layers),
        ssm_state_size=args.ssm_state_size,
        block_size=args.block_size,
        **backbone,
        **option_fields(model_name),
    )
    if variant == "mf":
        fields["num_context_states"] = args.mf_context_states
    for key, value in overrides.items():
        fields[key] = list(range(args.num_layers)) if value == "all" else value
    return fields


def build_model(args, model_name, vocab_size, intermediate_size, overrides=None):
    """A freshly initialised model (the caller seeds torch). All models: tied embeddings, RMSNorm, RoPE, no biases."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        max_position_embeddings=args.train_length,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    if model_name != "recurrentgemma":
        common["initializer_range"] = args.initializer_range
    if model_name == "llama":
        # max_position_embeddings is the training length; the default RoPE computes its angles from the position
        # ids, so longer inputs run unchanged (tests/test_quality_experiment.py checks nothing is truncated).
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=args.num_heads))
        return scale_backbone(model) if args.scaled_backbone else model
    if model_name == "mistral-swa":
        model = MistralForCausalLM(
            MistralConfig(**common, num_key_value_heads=args.num_heads, sliding_window=args.block_size)
        )
        return scale_backbone(model) if args.scaled_backbone else model
    if model_name == "recurrentgemma":
        # Transformers' Griffin: RG-LRU recurrent blocks and local attention (window = block_size) in the ratio 2:1.
        model = RecurrentGemmaForCausalLM(
            RecurrentGemmaConfig(
                **common,
                num_key_value_heads=args.num_heads,
                head_dim=args.hidden_size // args.num_heads,
                lru_width=args.hidden_size,
                attention_window_size=args.block_size,
            )
        )
        if args.recurrentgemma_scan == "chunked":
            for module in model.modules():
                if isinstance(module, RecurrentGemmaRglru):  # this model's instances only, not the class
                    module._rnn_scan = types.MethodType(chunked_rnn_scan, module)
        return model
    model = BSTForCausalLM(BSTConfig(**common, **bst_fields(args, model_name, overrides)))
    if (overrides or {}).get("old_recipe"):
        with torch.no_grad():  # version 0.2's initialisation: skip term at one, random cross half of o_proj
            for layer in model.model.layers:
                if layer.is_bst_layer:
                    layer.ssm.skip.fill_(1.0)
                    torch.nn.init.normal_(layer.attention.o_proj.weight, std=model.config.initializer_range)
    return model


@torch.no_grad()
def scale_backbone(model):
    """--scaled_backbone for Transformers' Llama and Mistral: what BSTConfig's initializer_scheme="fan_in" and
    embedding_multiplier=sqrt(hidden_size) do in BST, applied from outside (their configs have no such fields).
    The same rule (`fan_in_std`; o_proj and down_proj write to the residual stream); embeddings unchanged."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            writes = name.endswith(("o_proj", "down_proj"))
            module.weight.normal_(0.0, fan_in_std(module.in_features, model.config.num_hidden_layers, writes))
    multiplier = model.config.hidden_size**0.5
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output * multiplier)
    return model


def chunked_rnn_scan(self, hidden_states, recurrent_gate, reset, recurrent_states, acc_dtype=torch.float32):
    """Transformers' `RecurrentGemmaRglru._rnn_scan`, the same recurrence h_t = a_t h_(t-1) + x_t (a_t = 0 at a
    reset), with its Python loop over time steps (a few GPU kernels per token and layer: the slowest run of the
    experiment) replaced by one over chunks of RECURRENCE_CHUNK steps. Inside a chunk, with L_t = sum of log a_r up
    to t: h_t = sum_(s <= t) exp(L_t - L_s) x_s + exp(L_t) h_(chunk start). 0 <= a <= 1, so no exponent is
    positive and nothing overflows. tests/test_quality_experiment.py checks it against the loop, gradients too."""
    batch_size, length, width = hidden_states.shape
    if length == 1:  # decoding: Transformers' own single-step update
        return type(self)._rnn_scan(self, hidden_states, recurrent_gate, reset, recurrent_states, acc_dtype)
    gate = (recurrent_gate * ~reset).to(acc_dtype)
    inputs = hidden_states.to(acc_dtype)
    padding = -length % RECURRENCE_CHUNK  # padded steps come last: they change no earlier output
    gate = F.pad(gate, (0, 0, 0, padding), value=1.0)
    inputs = F.pad(inputs, (0, 0, 0, padding))
    num_chunks = gate.shape[1] // RECURRENCE_CHUNK
    shape = (batch_size, num_chunks, RECURRENCE_CHUNK, width)
    cumulative_log = gate.clamp_min(1e-30).log().view(shape).cumsum(2)  # L_t inside each chunk (a reset: -69)
    exponents = cumulative_log[:, :, :, None] - cumulative_log[:, :, None]  # (batch, chunk, t, s, width)
    causal = torch.ones(RECURRENCE_CHUNK, RECURRENCE_CHUNK, dtype=torch.bool, device=gate.device).tril()[..., None]
    decay = torch.where(causal, exponents, float("-inf")).exp()
    within_chunk = torch.einsum("bktsd,bksd->bktd", decay, inputs.view(shape))
    state = torch.zeros(batch_size, width, dtype=acc_dtype, device=gate.device)
    if recurrent_states is not None:
        state = recurrent_states.to(device=gate.device, dtype=acc_dtype)
    outputs = []
    for chunk in range(num_chunks):
        chunk_states = within_chunk[:, chunk] + cumulative_log[:, chunk].exp() * state[:, None]
        outputs.append(chunk_states)
        state = chunk_states[:, -1]
    contextualized_states = torch.cat(outputs, dim=1)[:, :length]
    return contextualized_states.type(hidden_states.dtype), contextualized_states[:, -1]


def count_parameters(model):
    """(all parameters, parameters outside the tied embedding/LM head); shared tensors counted once."""
    total = sum(p.numel() for p in model.parameters())
    return total, total - model.get_input_embeddings().weight.numel()


def parameter_target(args, vocab_size):
    """The non-embedding parameter count every model is matched to: bst-sh-s4's at --reference_intermediate_size."""
    return count_parameters(build_model(args, "bst-sh-s4", vocab_size, args.reference_intermediate_size))[1]


def matched_intermediate_size(args, model_name, vocab_size, target, overrides=None):
    """The FFN width that brings the model's non-embedding parameters closest to `target`: the count is linear in
    `intermediate_size`, so two probe builds give the line."""
    low, high = args.hidden_size, 2 * args.hidden_size
    count_low = count_parameters(build_model(args, model_name, vocab_size, low, overrides))[1]
    count_high = count_parameters(build_model(args, model_name, vocab_size, high, overrides))[1]
    per_unit = (count_high - count_low) / (high - low)
    size = round(low + (target - count_low) / per_unit)
    if size < 1:
        raise ValueError(
            f"{model_name} {overrides or ''} has more non-embedding parameters than the target ({target}) even with "
            "no FFN: lower its SSM or context-state sizes, or raise --reference_intermediate_size."
        )
    return size


# ----------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------------------


def learning_rate_at(step, args):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, args, old_recipe=False):
    """AdamW with scripts/train.py's parameter groups; each group remembers its peak learning rate."""
    if old_recipe:  # version 0.2: SSM parameters with the others, weight decay on every matrix
        groups = [
            {"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": args.weight_decay},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ]
        for group in groups:
            group["lr"] = args.learning_rate
    else:
        groups = optimizer_parameter_groups(
            model, args.weight_decay, args.learning_rate, args.ssm_learning_rate_scale
        )
    for group in groups:
        group["peak_lr"] = group["lr"]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95))


def training_step(model, optimizer, batch, step, args) -> float:
    """One step of the schedule on `batch` (B, L): forward, loss, backward, clipping, AdamW. Returns the loss."""
    model.train()
    for group in optimizer.param_groups:
        group["lr"] = learning_rate_at(step, args) * group["peak_lr"] / args.learning_rate
    device = torch.device(args.device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16):
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def train(model, sequences, args, description, validation=None, old_recipe=False):
    """AdamW with scripts/train.py's parameter groups. Returns the training losses and the validation curve
    [(step, perplexity at 1x)] every --eval_every steps."""
    optimizer = make_optimizer(model, args, old_recipe)
    device = torch.device(args.device)
    losses, curve = [], []
    progress = tqdm(range(args.max_steps), desc=description, leave=False, mininterval=30)
    for step in progress:
        batch = sequences[step * args.batch_size : (step + 1) * args.batch_size].to(device)
        losses.append(round(training_step(model, optimizer, batch, step, args), 4))
        progress.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{description}: the training loss is {losses[-1]} at step {step}.")
        if validation is not None and ((step + 1) % args.eval_every == 0 or step + 1 == args.max_steps):
            curve.append((step + 1, perplexity(model, validation, args.train_length, args)))
    return losses, curve


@torch.no_grad()
def perplexity(model, spans, window, args):
    """Perplexity of the span targets when every span is cut into non-overlapping windows of `window` inputs, each
    window starting with no context. The model sees exactly `window` tokens per forward."""
    model.eval()
    device = torch.device(args.device)
    total_nll, total_tokens = 0.0, 0
    span_length = spans.shape[1] - 1
    for span in spans:
        for start in range(0, span_length, window):
            inputs = span[start : start + window][None].to(device)
            targets = span[start + 1 : start + window + 1][None].to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(input_ids=inputs, use_cache=False).logits
            if logits.shape[1] != inputs.shape[1]:
                raise RuntimeError(f"The model returned {logits.shape[1]} positions for {inputs.shape[1]} inputs.")
            total_nll += F.cross_entropy(logits[0].float(), targets[0], reduction="sum").item()
            total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


def slot_losses(model, spans, args):
    """Mean test loss by slot inside a block at the training length (windows' first blocks left out: no model has
    context there), with the early-slot (first EARLY_SLOTS slots) and late-slot (second half of the block) means."""
    window = args.train_length
    windows = torch.stack(
        [span[start : start + window + 1] for span in spans for start in range(0, spans.shape[1] - 1, window)]
    )
    model.eval()
    sums = loss_by_slot(
        model, windows, args.block_size, batch_size=8, device=torch.device(args.device), bf16=args.bf16
    )
    by_slot = (sums["nll"] / sums["count"]).tolist()
    return {
        "loss_by_slot": [round(v, 5) for v in by_slot],
        "early_slot_loss": sum(by_slot[:EARLY_SLOTS]) / EARLY_SLOTS,
        "late_slot_loss": sum(by_slot[args.block_size // 2 :]) / (args.block_size - args.block_size // 2),
    }


def ssm_ablation(model, spans, args):
    """Test perplexity and loss by slot at the training length with every SSM output replaced by zeros (context
    states, and the residual SSM branch when there is one): what the model's real context states are worth."""
    with ssm_zeroed(model):
        slots = slot_losses(model, spans, args)
        return {
            "test_perplexity": perplexity(model, spans, args.train_length, args),
            "early_slot_loss": slots["early_slot_loss"],
            "late_slot_loss": slots["late_slot_loss"],
        }


# ----------------------------------------------------------------------------------------------------------------
# Results: JSON, figure, markdown
# ----------------------------------------------------------------------------------------------------------------


def run_key(run):
    return f"{run['corpus']}|{run['name']}|{run['seed']}"


def save_results(results, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    os.replace(temporary, path)


def mean(values):
    return sum(values) / len(values)


def model_names(results):
    """The models that have runs: the base models in ALL_MODELS' order, then BST models with options as they came."""
    names = [run["name"] for run in results["runs"] if not run["ablation"]]
    return [name for name in ALL_MODELS if name in names] + list(dict.fromkeys(n for n in names if n not in ALL_MODELS))


def aggregate(results, corpus, name):
    """Mean test perplexity per evaluation length and the list of seeds, over the main runs of one model."""
    runs = [r for r in results["runs"] if r["corpus"] == corpus and r["name"] == name and not r["ablation"]]
    if not runs:
        return None
    lengths = list(runs[0]["test_perplexity"])
    return {
        "seeds": [r["seed"] for r in runs],
        "perplexity": {n: mean([r["test_perplexity"][n] for r in runs]) for n in lengths},
        "low": {n: min(r["test_perplexity"][n] for r in runs) for n in lengths},
        "high": {n: max(r["test_perplexity"][n] for r in runs) for n in lengths},
        "validation": mean([r["validation_perplexity"] for r in runs]),
        "early_slot_loss": mean([r["early_slot_loss"] for r in runs]),
        "late_slot_loss": mean([r["late_slot_loss"] for r in runs]),
        "train_seconds": mean([r["train_seconds"] for r in runs]),
        # Test perplexity at 1x with the SSM outputs zeroed (BST runs; None for others and for older results).
        "ssm_zeroed": mean([r["ssm_ablation"]["test_perplexity"] for r in runs])
        if all(r.get("ssm_ablation") for r in runs)
        else None,
        "run": runs[0],
    }


def best_bst(results, corpus):
    """The BST model with the lowest validation perplexity (1x) on `corpus` for the first seed: the model picked for
    the extra seeds, so later seeds cannot change the pick."""
    first_seed = results["settings"]["seeds"][0]
    candidates = [
        (r["validation_perplexity"], r["name"])
        for r in results["runs"]
        if r["corpus"] == corpus and r["name"].startswith("bst-") and r["seed"] == first_seed and not r["ablation"]
    ]
    return min(candidates)[1] if candidates else None


def evaluate_targets(results):
    """The quality targets for the best BST, each judged on the means over seeds (`met`) and seed by seed
    (`per_seed`, `every_seed`, over the seeds both models have). Comparisons without a threshold are reported only."""
    settings = results["settings"]
    lengths = [str(m * settings["train_length"]) for m in settings["eval_multipliers"]]
    short, long = lengths[0], lengths[-1]
    warmup = settings["warmup_steps"]

    def runs_of(corpus, name):
        return {
            r["seed"]: r
            for r in results["runs"]
            if r["corpus"] == corpus and r["name"] == name and not r["ablation"]
        }

    def compare(bst, other, value, predicate, describe):
        """value(run) -> number; predicate(bst_value, other_value) -> bool; describe(bst_mean, other_mean) -> str."""
        seeds = sorted(set(bst) & set(other))
        if not seeds:
            return None
        bst_mean = average([value(bst[s]) for s in seeds])
        other_mean = average([value(other[s]) for s in seeds])
        per_seed = {str(s): describe(value(bst[s]), value(other[s])) for s in seeds}
        met = None if predicate is None else bool(predicate(bst_mean, other_mean))
        every = None if predicate is None else all(predicate(value(bst[s]), value(other[s])) for s in seeds)
        return {"met": met, "every_seed": every, "numbers": describe(bst_mean, other_mean), "per_seed": per_seed}

    def ratio(a, b):
        return f"{a:.1f} vs {b:.1f} ({100 * (a / b - 1):+.1f}%)"

    def average(values):
        """The mean of numbers, or the pointwise mean of equally long lists (validation curves)."""
        if isinstance(values[0], list):
            return [mean(list(points)) for points in zip(*values)]
        return mean(values)

    def after_warmup(run):
        """Validation perplexities after warm-up."""
        return [value for step, value in run.get("validation_curve", []) if step > warmup]

    def worst_gap(bst_curve, other_curve):
        gaps = [b / o - 1 for b, o in zip(bst_curve, other_curve)]
        return f"worst {100 * max(gaps):+.1f}%" if gaps else "no curve"

    targets = {}
    for corpus in settings["corpora"]:
        best = best_bst(results, corpus)
        if best is None:
            continue
        bst = runs_of(corpus, best)
        slide, mistral, griffin, llama = (
            runs_of(corpus, name) for name in ("slide", "mistral-swa", "recurrentgemma", "llama")
        )

        def against_slide(other, name, note=""):
            """The early-slot and perplexity targets against a Slide model (no SSM) called `name`."""
            return [
                (
                    f"early-slot loss (slots 0-3) >= 0.1 nats below {name}'s{note}",
                    compare(
                        bst,
                        other,
                        lambda r: r["early_slot_loss"],
                        lambda b, o: o - b >= 0.1,
                        lambda b, o: f"{b:.3f} vs {o:.3f} ({b - o:+.3f} nats)",
                    ),
                ),
                (
                    f"perplexity at 1x <= 0.97x {name}'s{note}",
                    compare(bst, other, lambda r: r["test_perplexity"][short], lambda b, o: b <= 0.97 * o, ratio),
                ),
            ]

        rows = [
            (
                "never behind Slide at any validation after warm-up (largest gap)",
                compare(
                    bst,
                    slide,
                    after_warmup,
                    lambda b, o: all(vb <= vo for vb, vo in zip(b, o)),
                    worst_gap,
                ),
            ),
            *against_slide(slide, "Slide"),
        ]
        attention = [option for option in best.split("+")[1:] if option in BLOCK_OPTIONS]
        if attention:
            # With previous-block or sliding-window attention the BST sees more exact context than Slide; the model
            # without SSM that sees the same is Slide with the same option.
            same_attention = f"slide+{attention[0]}"
            rows += against_slide(runs_of(corpus, same_attention), same_attention, " (the same attention)")
        rows += [
            (
                "perplexity at 1x <= 1.0x Mistral-SWA's",
                compare(bst, mistral, lambda r: r["test_perplexity"][short], lambda b, o: b <= o, ratio),
            ),
            (
                "gap to RecurrentGemma at 1x (reported)",
                compare(bst, griffin, lambda r: r["test_perplexity"][short], None, ratio),
            ),
            (
                f"perplexity at {long} below Llama's",
                compare(bst, llama, lambda r: r["test_perplexity"][long], lambda b, o: b < o, ratio),
            ),
            (
                f"perplexity at {long} no worse than its own at {short}",
                compare(
                    bst,
                    bst,
                    lambda r: r["test_perplexity"][long] / r["test_perplexity"][short],
                    lambda b, o: b <= 1.0,
                    lambda b, o: f"x{b:.3f}",
                ),
            ),
            (
                "gap to Llama at 1x (reported)",
                compare(bst, llama, lambda r: r["test_perplexity"][short], None, ratio),
            ),
        ]
        if all(run.get("ssm_ablation") for run in bst.values()):
            rows.append(
                (
                    "perplexity at 1x below its own with the SSM outputs zeroed",
                    compare(
                        bst,
                        bst,
                        lambda r: r["test_perplexity"][short] / r["ssm_ablation"]["test_perplexity"],
                        lambda b, o: b < 1.0,
                        lambda b, o: f"x{b:.3f}",
                    ),
                )
            )
        targets[corpus] = {"best_bst": best, "targets": {label: row for label, row in rows if row is not None}}
    return targets


def plot_results(results, figure_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = [c for c in results["settings"]["corpora"] if any(r["corpus"] == c for r in results["runs"])]
    if not corpora:
        return []
    os.makedirs(figure_dir, exist_ok=True)

    def label_axis(axis, xlabel, ylabel, title):
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)

    def save(figure, filename):
        figure.tight_layout()
        path = os.path.join(figure_dir, filename)
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return path

    names = model_names(results)
    figure, axes = plt.subplots(1, len(corpora), figsize=(6.5 * len(corpora), 4.5), squeeze=False)
    for axis, corpus in zip(axes[0], corpora):
        for name in names:
            summary = aggregate(results, corpus, name)
            if summary is None:
                continue
            lengths = [int(n) for n in summary["perplexity"]]
            style = "--" if base_model(name) in BASELINES else "-"
            axis.plot(lengths, list(summary["perplexity"].values()), style, marker="o", label=name)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        label_axis(
            axis,
            f"evaluation length (tokens); trained at {results['settings']['train_length']}",
            "test perplexity (mean over seeds)",
            corpus,
        )
    path = save(figure, "quality_perplexity_vs_length.png")

    # Training curves of every main run: shows how much of the spread between models is spread between seeds.
    figure, axes = plt.subplots(1, len(corpora), figsize=(6.5 * len(corpora), 4.5), squeeze=False)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {name: palette[index % len(palette)] for index, name in enumerate(names)}
    for axis, corpus in zip(axes[0], corpora):
        labelled = set()
        for run in results["runs"]:
            if run["corpus"] != corpus or run["ablation"]:
                continue
            label = None if run["name"] in labelled else run["name"]
            labelled.add(run["name"])
            axis.plot(
                range(1, len(run["train_losses"]) + 1),
                run["train_losses"],
                color=colors[run["name"]],
                linewidth=0.8,
                alpha=0.8,
                label=label,
            )
        axis.set_ylim(top=min(9.0, axis.get_ylim()[1]))
        label_axis(axis, "training step", "training loss (one line per run)", corpus)
    loss_path = save(figure, "quality_training_loss.png")

    # Where in the block the loss is: the test loss by slot (mean over seeds), as the difference from Slide's, so
    # that the SSM's gain at the first slots and any cost at the late ones read off one axis.
    figure, axes = plt.subplots(1, len(corpora), figsize=(6.5 * len(corpora), 4.5), squeeze=False)
    for axis, corpus in zip(axes[0], corpora):
        curves = {}
        for name in names:
            by_seed = [r["loss_by_slot"] for r in results["runs"] if r["corpus"] == corpus and r["name"] == name]
            if by_seed:
                curves[name] = np.mean(by_seed, axis=0)
        reference = curves.get("slide")
        for name, curve in curves.items():
            style = "--" if base_model(name) in BASELINES else "-"
            values = curve - reference if reference is not None else curve
            axis.plot(range(len(curve)), values, style, color=colors[name], linewidth=1.0, label=name)
        axis.set_xscale("symlog", linthresh=4)
        label_axis(
            axis,
            "slot inside a block (first blocks of windows left out)",
            "test loss minus Slide's (nats)" if reference is not None else "test loss (nats)",
            f"{corpus}: loss by slot, mean over seeds",
        )
    return [path, loss_path, save(figure, "quality_loss_by_slot.png")]


def format_table(results, corpus):
    lengths = [str(m * results["settings"]["train_length"]) for m in results["settings"]["eval_multipliers"]]
    header = (
        "| model | seeds | "
        + " | ".join(f"test ppl @ {n} (min-max)" for n in lengths)
        + " | ppl @ 1x, SSM zeroed | early-slot loss | late-slot loss | val ppl @ 1x | params (non-emb.) | FFN "
        + "| tokens seen | train s / run |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name in model_names(results):
        summary = aggregate(results, corpus, name)
        if summary is None:
            continue
        run = summary["run"]
        cells = []
        for n in lengths:
            cell = f"{summary['perplexity'][n]:.1f}"
            if len(summary["seeds"]) > 1:
                cell += f" ({summary['low'][n]:.0f}-{summary['high'][n]:.0f})"
            cells.append(cell)
        parameters = f"{run['parameters'] / 1e6:.3f}M ({run['non_embedding_parameters'] / 1e6:.3f}M)"
        zeroed = "-" if summary["ssm_zeroed"] is None else f"{summary['ssm_zeroed']:.1f}"
        lines.append(
            f"| {name} | {','.join(map(str, summary['seeds']))} | {' | '.join(cells)} | {zeroed} | "
            f"{summary['early_slot_loss']:.3f} | {summary['late_slot_loss']:.3f} | {summary['validation']:.2f} | "
            f"{parameters} | {run['intermediate_size']} | {run['tokens_seen']:,} | {summary['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def format_paired(results, corpus):
    """Every model's test perplexity at 1x seed by seed, against Slide's and Mistral-SWA's of the same seed: at this
    budget only a gap that holds in every pair is evidence."""
    short = str(results["settings"]["eval_multipliers"][0] * results["settings"]["train_length"])
    by_seed = {}
    for run in results["runs"]:
        if run["corpus"] == corpus and not run["ablation"]:
            by_seed.setdefault(run["name"], {})[run["seed"]] = run["test_perplexity"][short]
    references = [name for name in ("slide", "mistral-swa") if name in by_seed]
    header = f"| model | test ppl @ {short} by seed | " + " | ".join(f"vs {name}, same seed" for name in references)
    lines = [header + " |", "|" + "---|" * (2 + len(references))]
    for name in model_names(results):
        if name not in by_seed:
            continue
        seeds = sorted(by_seed[name])
        cells = [", ".join(f"s{seed} {by_seed[name][seed]:.2f}" for seed in seeds)]
        for reference in references:
            pairs = [s for s in seeds if s in by_seed[reference]]
            ratios = [f"s{s} {100 * (by_seed[name][s] / by_seed[reference][s] - 1):+.1f}%" for s in pairs]
            cells.append("-" if name == reference or not pairs else ", ".join(ratios))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_ablation(results):
    runs = sorted((r for r in results["runs"] if r["ablation"]), key=lambda r: (r["corpus"], r["name"], r["seed"]))
    if not runs:
        return "(no ablation runs yet)"
    return "\n\n".join(
        format_corpus_ablation(results, corpus, [r for r in runs if r["corpus"] == corpus])
        for corpus in dict.fromkeys(r["corpus"] for r in runs)
    )


def format_corpus_ablation(results, corpus, runs):
    lengths = list(runs[0]["test_perplexity"])
    lines = [
        (
            f"Corpus `{corpus}`; each ablation run changes one default of the main runs and is shown under the main "
            "run of its base model with the same seed (marked \"default\")."
        ),
        "",
        "| run | seed | val ppl @ 1x | "
        + " | ".join(f"test ppl @ {n}" for n in lengths)
        + " | early-slot loss | late-slot loss | params (non-emb.) | FFN |",
        "|---|---|---|" + "---|" * len(lengths) + "---|---|---|---|",
    ]
    for run in runs:
        default = next(
            (
                r
                for r in results["runs"]
                if r["corpus"] == corpus
                and r["name"] == run["base_model"]
                and r["seed"] == run["seed"]
                and not r["ablation"]
            ),
            None,
        )
        for row in ([default] if default else []) + [run]:
            label = row["name"] + (" (default)" if row is default else "")
            lines.append(
                f"| {label} | {row['seed']} | {row['validation_perplexity']:.2f} | "
                + " | ".join(f"{row['test_perplexity'][n]:.2f}" for n in lengths)
                + f" | {row['early_slot_loss']:.3f} | {row['late_slot_loss']:.3f}"
                + f" | {row['non_embedding_parameters'] / 1e6:.3f}M | {row['intermediate_size']} |"
            )
    return "\n".join(lines)


def format_targets(targets):
    if not targets:
        return "(targets need the best BST and the baselines on a corpus)"
    lines = [
        "| corpus | best BST | target | verdict (means over seeds) | numbers (means) | per seed | every seed? |",
        "|---|---|---|---|---|---|---|",
    ]
    verdict = {True: "**met**", False: "**not met**", None: "reported"}
    every = {True: "yes", False: "no", None: "-"}
    for corpus, entry in targets.items():
        for label, row in entry["targets"].items():
            seeds = ", ".join(f"s{seed}: {value}" for seed, value in row["per_seed"].items())
            lines.append(
                f"| {corpus} | {entry['best_bst']} | {label} | {verdict[row['met']]} | {row['numbers']} | {seeds} | "
                f"{every[row['every_seed']]} |"
            )
    return "\n".join(lines)


def write_markdown(results, path, figures):
    settings = results["settings"]
    section = [
        RESULTS_BEGIN,
        "<!-- Written by scripts/experiments/quality_experiment.py; edits between these markers are overwritten. -->",
        "",
        f"Command: `{results['command']}`  ",
        (
            f"Status: {results['status']}; {len(results['runs'])} runs; "
            f"{sum(r['train_seconds'] + r['eval_seconds'] for r in results['runs']) / 60:.0f} min of training and "
            f"evaluation in all (summed over runs, which may have shared the machine) on {settings['machine']}."
        ),
        "",
    ]
    for corpus in settings["corpora"]:
        if any(r["corpus"] == corpus and not r["ablation"] for r in results["runs"]):
            section += [f"### `{corpus}`", "", format_table(results, corpus), "", format_paired(results, corpus), ""]
    for figure in figures:
        caption = os.path.splitext(os.path.basename(figure))[0].replace("_", " ")
        section += [f"![{caption}]({os.path.relpath(figure, os.path.dirname(os.path.abspath(path)))})", ""]
    section += [
        "### Targets",
        "",
        format_targets(results["targets"]),
        "",
        (
            "Numbers: BST first, the other model second (negative %: BST better). The verdict compares means over "
            "seeds; the last column asks whether every seed agrees. The early-slot loss is the mean test loss at "
            "the first 4 slots of a block, windows' first blocks left out."
        ),
        "",
        "### Ablation",
        "",
        format_ablation(results),
        "",
        RESULTS_END,
    ]
    section = "\n".join(section)
    page = "# Quality at small scale\n\n" + RESULTS_BEGIN + "\n" + RESULTS_END + "\n"
    if os.path.isfile(path):
        with open(path) as f:
            page = f.read()
    if RESULTS_BEGIN in page and RESULTS_END in page:
        before, rest = page.split(RESULTS_BEGIN, 1)
        after = rest.split(RESULTS_END, 1)[1]
        page = before + section + after
    else:
        page = page.rstrip("\n") + "\n\n" + section + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(page)


# ----------------------------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    started = time.time()
    settings = {
        key: value
        for key, value in vars(args).items()
        if key
        not in ("command", "resume", "report_only", "output_json", "figure_dir", "markdown", "work_dir", "threads")
    }
    defaults = {"gated_mlp": False, "scaled_backbone": False, "initializer_range": 0.02}
    for name, default in defaults.items():  # absent from the settings of results written before these arguments,
        if settings[name] == default:  # which resume unchanged
            del settings[name]
    settings["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {args.threads} threads"
    )
    if torch.device(args.device).type == "cuda" and torch.cuda.is_available():  # (--report_only runs anywhere)
        settings["machine"] += f", {torch.cuda.get_device_name(args.device)}"
    settings["slide_baseline"] = "BST code with bst_layers=[] (block attention, no SSM, no cross-attention)"
    results = {
        "command": args.command,
        "settings": settings,
        "status": "running",
        "wall_seconds": 0.0,
        "runs": [],
        "targets": {},
    }
    if args.report_only and not args.merge_json and not os.path.isfile(args.output_json):
        raise SystemExit(f"--report_only: {args.output_json} does not exist.")
    resumed = [args.output_json] if (args.resume or args.report_only or args.merge_json) else []
    statuses = []
    for path in [p for p in resumed + args.merge_json if os.path.isfile(p)]:
        with open(path) as f:
            previous = json.load(f)
        statuses.append(previous["status"])
        # Settings that only select which runs happen may differ; anything that changes a run's result may not.
        selection_only = (
            "machine",
            "models",
            "corpora",
            "seeds",
            "extra_seeds",
            "no_ablation",
            "ablations",
            "ablations_only",
            "report_only",
            "merge_json",
            "recurrentgemma_scan",  # how the same recurrence is computed (tested equal), not what is computed
        )
        changed = sorted(
            k
            for k in set(previous["settings"]) | set(settings)
            if k not in selection_only and previous["settings"].get(k) != settings.get(k)
        )
        if changed:
            raise SystemExit(f"{path} was written with other values of {changed}; drop --resume or move it.")
        known = {run_key(r) for r in results["runs"]}
        results["runs"] += [r for r in previous["runs"] if run_key(r) not in known]
        results["wall_seconds"] += previous.get("wall_seconds", 0.0)
        print(f"Resuming: {len(previous['runs'])} finished runs in {path}", flush=True)
    done = {run_key(r) for r in results["runs"]}
    previous_wall = results["wall_seconds"]

    def checkpoint(status="running"):
        results["status"] = status
        results["wall_seconds"] = previous_wall + time.time() - started
        results["targets"] = evaluate_targets(results)
        save_results(results, args.output_json)
        figures = plot_results(results, args.figure_dir)
        write_markdown(results, args.markdown, figures)

    if args.report_only:
        if not statuses:
            raise SystemExit(f"--report_only: none of {resumed + args.merge_json} exists.")
        results["settings"] = previous["settings"]
        # Merged processes may each have run other seeds or corpora: the report covers all of them.
        results["settings"]["seeds"] = sorted({run["seed"] for run in results["runs"]})
        run_corpora = {run["corpus"] for run in results["runs"]}
        results["settings"]["corpora"] = [c for c in args.corpora if c in run_corpora] + sorted(
            run_corpora - set(args.corpora)
        )
        results["command"] = args.command if args.merge_json else previous["command"]
        checkpoint("finished" if all(status == "finished" for status in statuses) else "running")
        print_summary(results)
        return results

    eval_lengths = [m * args.train_length for m in args.eval_multipliers]
    span_length = eval_lengths[-1]
    target = None

    def run_one(corpus, data, name, base_model, seed, overrides=None):
        key = f"{corpus}|{name}|{seed}"
        if key in done:
            return
        vocab_size = len(data["tokenizer"])
        width_of = (overrides or {}).get("ffn_of")
        if width_of:
            size = matched_intermediate_size(args, width_of, vocab_size, target)
        else:
            size = matched_intermediate_size(args, base_model, vocab_size, target, overrides)
        torch.manual_seed(seed)
        model = build_model(args, base_model, vocab_size, size, overrides).to(args.device)
        parameters, non_embedding = count_parameters(model)
        if not width_of and abs(non_embedding / target - 1) > PARAMETER_TOLERANCE:
            raise RuntimeError(f"{name}: {non_embedding} non-embedding parameters, more than 5% from {target}.")
        print(f"[{corpus}] {name} seed {seed}: {non_embedding:,} non-embedding parameters (FFN {size})", flush=True)
        train_started = time.time()
        old_recipe = bool((overrides or {}).get("old_recipe"))
        losses, curve = train(
            model, data["train"], args, f"{corpus} {name} s{seed}", data["validation"], old_recipe=old_recipe
        )
        train_seconds = time.time() - train_started
        eval_started = time.time()
        validation = curve[-1][1]
        test = {str(n): perplexity(model, data["test"], n, args) for n in eval_lengths}
        slots = slot_losses(model, data["test"], args)
        has_ssm = isinstance(model, BSTForCausalLM) and any(layer.ssm is not None for layer in model.model.layers)
        zeroed = ssm_ablation(model, data["test"], args) if has_ssm else None
        eval_seconds = time.time() - eval_started
        run = {
            "corpus": corpus,
            "name": name,
            "base_model": base_model,
            "seed": seed,
            "data_sha256": data["data_sha256"],
            "ablation": overrides is not None,
            "overrides": overrides,
            "config": model.config.to_diff_dict(),
            "parameters": parameters,
            "non_embedding_parameters": non_embedding,
            "parameter_target": target,
            "intermediate_size": size,
            "tokens_seen": args.max_steps * args.batch_size * args.train_length,
            "train_epochs": round(data["train_epochs"], 3),
            "train_seconds": round(train_seconds, 1),
            "eval_seconds": round(eval_seconds, 1),
            "final_train_loss": mean(losses[-5:]),
            "train_losses": losses,
            "validation_perplexity": validation,
            "validation_curve": curve,
            "test_perplexity": test,
            **slots,
            "ssm_ablation": zeroed,
        }
        results["runs"].append(run)
        done.add(key)
        ppl_text = ", ".join(f"{n}: {p:.2f}" for n, p in test.items())
        print(
            f"[{corpus}] {name} seed {seed}: train {train_seconds:.0f}s, eval {eval_seconds:.0f}s, loss "
            f"{run['final_train_loss']:.3f}, val ppl {validation:.2f}, test ppl {ppl_text}, early-slot loss "
            f"{run['early_slot_loss']:.3f}, late {run['late_slot_loss']:.3f}",
            flush=True,
        )
        checkpoint()

    corpus_data = {}
    for corpus in args.corpora:
        tokenizer, streams, data_sha256 = load_corpus(args, corpus)
        corpus_data[corpus] = data = {
            "tokenizer": tokenizer,
            "data_sha256": data_sha256,
            "train": training_sequences(
                streams["train"], args.train_length, args.max_steps * args.batch_size, args.data_seed
            ),
            "validation": evaluation_spans(streams["validation"], span_length, args.validation_spans),
            "test": evaluation_spans(streams["test"], span_length, args.eval_spans),
            "train_epochs": args.max_steps * args.batch_size / (len(streams["train"]) // args.train_length),
        }
        print(
            f"[{corpus}] {len(tokenizer)} tokens in the vocabulary; streams: "
            + ", ".join(f"{split} {len(stream):,}" for split, stream in streams.items())
            + f" tokens; test: {args.eval_spans} spans of {span_length:,}; training budget: "
            + f"{data['train_epochs']:.2f} epochs",
            flush=True,
        )
        if args.ablations_only:  # the ablations below match their own parameter target
            continue
        target = parameter_target(args, len(tokenizer))
        # Seed by seed, so that an experiment stopped early has every model at the same number of seeds.
        for seed in args.seeds:
            for name in args.models:
                run_one(corpus, data, name, name, seed)
        best = best_bst(results, corpus)
        for name in [best, *BASELINES]:
            if name in args.models:
                for seed in args.extra_seeds:
                    run_one(corpus, data, name, name, seed)

    if not args.no_ablation and args.corpora:
        corpus = args.corpora[0]
        target = parameter_target(args, len(corpus_data[corpus]["tokenizer"]))
        for name, base_model, overrides in ABLATIONS:
            if base_model in args.models and (args.ablations is None or name in args.ablations.split(";")):
                run_one(corpus, corpus_data[corpus], name, base_model, args.seeds[0], overrides)

    checkpoint("finished")
    print(f"Done in {(time.time() - started) / 60:.1f} min: {args.output_json}, {args.markdown}", flush=True)
    print_summary(results)
    return results


def print_summary(results):
    for corpus in results["settings"]["corpora"]:
        print(f"\n{corpus}\n" + format_table(results, corpus))
    print("\n" + format_targets(results["targets"]) + "\n\n" + format_ablation(results))


if __name__ == "__main__":
    main()
