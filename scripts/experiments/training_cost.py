#!/usr/bin/env python
"""Training cost of the quality experiment's models, as ratios to BST-SH measured in one run on this machine.

Each model is built as scripts/experiments/quality_experiment.py builds it (the same flags; FFN width solved to the
same non-embedding parameter count) and takes the experiment's training step (forward, loss, backward, clipping,
AdamW; batch --batch_size x --train_length of random tokens). The models take their steps in turn, round after
round, so that a slow moment of a shared machine hits every model alike; a model's cost is its median step time, and
its ratio to the first model of --models is the median over rounds of the per-round ratios, with the spread of those
ratios (10th-90th percentile) beside it. Compare ratios, not seconds.

    python scripts/experiments/training_cost.py --gated_mlp --scaled_backbone --initializer_range 0.05 --rounds 12 \\
        --models bst-sh-s4,bst-sh-s4+residual+nocross+swa,bst-sh-s4+residual+swa,slide,slide+swa,mistral-swa \\
        --output_json docs/training_cost_cpu.json

Every flag not listed below is quality_experiment.py's (model shape, backbone, batch); --corpora and --models of that
script are set from here.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_experiment  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", required=True, help="Comma-separated quality_experiment names; the first is the "
                        "reference of the ratios.")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=12, help="Timed steps of each model.")
    parser.add_argument("--warmup_rounds", type=int, default=2, help="Untimed steps of each model first.")
    parser.add_argument("--vocab_size", type=int, default=4096, help="The experiment's tokenizer size.")
    parser.add_argument("--output_json", required=True)
    args, rest = parser.parse_known_args(argv)
    if args.rounds < 1 or args.warmup_rounds < 0:
        parser.error("--rounds must be at least 1 and --warmup_rounds at least 0.")
    experiment = quality_experiment.parse_args(rest + ["--corpora", "", "--models", args.models])
    return args, experiment


def quantile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def measure(args, experiment, command):
    torch.set_num_threads(experiment.threads)
    names = experiment.models
    target = quality_experiment.parameter_target(experiment, args.vocab_size)
    models, optimizers, facts = {}, {}, {}
    for name in names:
        size = quality_experiment.matched_intermediate_size(experiment, name, args.vocab_size, target)
        torch.manual_seed(0)
        model = quality_experiment.build_model(experiment, name, args.vocab_size, size).to(experiment.device)
        models[name], optimizers[name] = model, quality_experiment.make_optimizer(model, experiment)
        facts[name] = {"non_embedding_parameters": quality_experiment.count_parameters(model)[1],
                       "intermediate_size": size}  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    shape = (experiment.batch_size, experiment.train_length)
    step_seconds = {name: [] for name in names}
    for round_index in range(args.warmup_rounds + args.rounds):
        batch = torch.randint(args.vocab_size, shape, generator=generator).to(experiment.device)
        for name in names:
            started = time.perf_counter()
            quality_experiment.training_step(models[name], optimizers[name], batch, round_index, experiment)
            if round_index >= args.warmup_rounds:
                step_seconds[name].append(time.perf_counter() - started)
        print(f"round {round_index + 1}/{args.warmup_rounds + args.rounds}: "
              + ", ".join(f"{name} {seconds[-1]:.2f} s" for name, seconds in step_seconds.items() if seconds),
              flush=True)  # fmt: skip
    first = names[0]
    for name in names:
        ratios = [mine / theirs for mine, theirs in zip(step_seconds[name], step_seconds[first])]
        facts[name].update(
            median_step_seconds=statistics.median(step_seconds[name]),
            step_seconds=step_seconds[name],
            time_ratio_to_reference=statistics.median(ratios),
            time_ratio_spread=[quantile(ratios, 0.1), quantile(ratios, 0.9)],
        )
    return {
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{experiment.threads} threads",
        "reference": first,
        "batch": list(shape),
        "models": facts,
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, experiment = parse_args(argv)
    report = measure(args, experiment, "python scripts/experiments/training_cost.py " + " ".join(argv))
    Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"Training step time relative to {report['reference']} ({report['machine']}):")
    for name, facts in report["models"].items():
        low, high = facts["time_ratio_spread"]
        print(f"  {name}: x{facts['time_ratio_to_reference']:.3f} ({low:.3f}-{high:.3f}), "
              f"{facts['median_step_seconds']:.3f} s a step, FFN {facts['intermediate_size']}")  # fmt: skip
    return report


if __name__ == "__main__":
    main()
