#!/usr/bin/env python
"""Training throughput of BST language models against Llama and Mistral at the shapes people train, in one run.

Shapes (`--shapes`):
- `base`: the configuration/bst-{sh,mh,mf}-s4-base.json presets: 12 layers, d 1024, 8 heads, FFN 4096, W 512, SSM in
  layers 2, 5, 8, 11, vocabulary 32000 ("mf": 32 filters).
- `smollm2`: the upcycled SmolLM2-135M: 30 layers, d 576, 9 heads / 3 key-value heads, SwiGLU 1536, W 1024 with the
  previous block and 4 attention sinks, vocabulary 49152, SSM in layers 10 and 20.
Models (`--models`): BST-SH, MH, MF, and "bst-residual", the SSM through the residual branch only (on `base` the
preset configuration/bst-sh-s4-modern-scaled-residual-swa.json), each against Transformers' LlamaForCausalLM and
MistralForCausalLM (sliding window W) of the same width, depth, heads and vocabulary with SDPA attention, their FFN
width solved to match BST-SH's parameter count.

What one point is: a training step as `Trainer(bf16=True)` takes it (fp32 weights, forward and loss under bf16
autocast, backward, AdamW fused on CUDA), on random tokens, batch = --tokens-per-step // length (at least 1, so at
64k one 64k sequence), eager and `torch.compile(model, dynamic=False)`d. Reported: tokens/s = tokens per step / the
median step time, and the step's peak memory (CUDA allocator peak plus the model's weights and AdamW state; not
measured on CPU). The models of one (shape, length, mode) are timed round-robin. Ratios: BST / Llama and BST /
Mistral tokens/s and peak memory, eager, compiled, and each model's faster mode ("best").

Time budget (`--budget-seconds`, wall time from the start): first every eager point (each shape, each length),
then the compiled points of `--compiled-shapes` (default `base`, where the targets are set), lengths in the order
of `--compiled-lengths` (the target lengths first), models in the order BST-SH, Llama, Mistral, bst-residual, BST-MH,
BST-MF.
Each member is admitted just before its warm-up: when its estimate (its step time at the previous length scaled
up by tokens and length, or its eager step at this length; for compiled points plus the longest compile seen so
far, `--compile-estimate-seconds` before the first) does not fit in what is left, it is skipped with the estimate
as the reason. Compilation time is measured apart (first warm-up step less the median
step) and never enters tokens/s. Memory: a member whose first warm-up step runs out of memory is retried once with
gradient checkpointing, recorded on the point and on every ratio it enters; a second failure is recorded as
skipped. The JSON is rewritten after every group of points, and on SIGTERM, so a run stopped by `timeout` keeps what
it measured.

GPU run (part of scripts/benchmarks/gpu_checks.sh, stage `train`):

    python scripts/benchmarks/train_benchmark.py --device cuda --output OUT/benchmark_train_gpu.json --figures-dir OUT/figures

Quick run (CPU, tiny shapes, seconds; used by tests/test_benchmark_train.py):

    python scripts/benchmarks/train_benchmark.py --quick --output /tmp/train.json --figures-dir /tmp/figures
"""

import argparse
import json
import signal
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bst_benchmark.baselines import import_bst
from bst_benchmark.plots import make_training_plots
from bst_benchmark.report import report_header
from bst_benchmark.settings import REPO_ROOT, check_device, parse_length
from bst_benchmark.training import (
    MODEL_ORDER,
    SHAPES,
    TrainingRunner,
    allow_recompiles,
    build_training_models,
    format_training_table,
    free_device_memory,
    training_ratios,
    training_targets,
)


QUICK_DEFAULTS = dict(
    lengths=[64, 128],
    compiled_lengths=[128],
    tokens_per_step=256,
    compile_backend="eager",
    warmup=1,
    repeats=2,
    seconds_per_point=2.0,
    budget_seconds=600.0,
    compile_estimate_seconds=0.0,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny stand-ins of the shapes, on CPU in seconds")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES), help="model shapes, in order")
    parser.add_argument("--models", nargs="+", choices=MODEL_ORDER, default=list(MODEL_ORDER), help="models compared")
    parser.add_argument("--lengths", nargs="+", type=parse_length, default=[2048, 4096, 16384, 65536],
                        help="sequence lengths (e.g. 2k 4k 16k 64k)")
    parser.add_argument("--tokens-per-step", type=int, default=32768,
                        help="batch = this // length (at least 1): the tokens of one step")
    parser.add_argument("--compiled-lengths", nargs="*", type=parse_length, default=[16384, 4096, 2048, 65536],
                        help="lengths of the compiled points, in the order they are tried (none: eager only)")
    parser.add_argument("--compiled-shapes", nargs="*", choices=SHAPES, default=["base"],
                        help="shapes of the compiled points (the targets are set on `base`)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('eager' traces only)")
    parser.add_argument("--budget-seconds", type=float, default=230.0,
                        help="wall time of the whole run; points that would not fit are skipped and recorded")
    parser.add_argument("--compile-estimate-seconds", type=float, default=60.0,
                        help="the compile time assumed for the budget before the first compile was measured")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per point (the first one compiles)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per point (at most); the median counts")
    parser.add_argument("--seconds-per-point", type=float, default=3.0,
                        help="time of one point's timed steps: fewer repeats (at least 1) when a step is slow")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and tokens")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "benchmark_train.json", help="JSON report")
    parser.add_argument("--figures-dir", type=Path, default=REPO_ROOT / "docs" / "figures",
                        help="where benchmark_train_<shape>.png go")
    parser.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    parser.add_argument("--baseline-attention", default="sdpa", choices=["sdpa", "flex_attention", "eager"],
                        help="Llama's and Mistral's attn_implementation (flex_attention: Mistral's window block-sparse)")
    parser.add_argument("--note", default="", help="free text stored in the JSON")
    if parser.parse_args(argv).quick:
        parser.set_defaults(**QUICK_DEFAULTS)  # defaults only: flags given explicitly still win
    args = parser.parse_args(argv)
    args.lengths = sorted(set(args.lengths))
    args.compiled_lengths = [n for n in dict.fromkeys(args.compiled_lengths) if n in args.lengths]
    args.compiled_shapes = [shape for shape in args.shapes if shape in args.compiled_shapes]
    check_args(args)
    return args


def check_args(args):
    """Fail on bad input, naming the problem, before any heavy work starts."""
    check_device(args.device)
    for name in ("tokens_per_step", "warmup", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if args.budget_seconds <= 0 or args.seconds_per_point <= 0:
        raise SystemExit("--budget-seconds and --seconds-per-point must be positive.")


class Stopped(BaseException):
    """SIGTERM (e.g. from `timeout`): stop measuring and write what was measured. Not an `Exception`, so that the
    runner's handling of failed points cannot swallow it."""


def stop_on_sigterm(signum, frame):
    raise Stopped(f"signal {signum}")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import_bst()  # fail now, not after the first models were built
    allow_recompiles()
    device = torch.device(args.device)
    header = report_header("scripts/benchmarks/train_benchmark.py", args, argv)
    hardware = header["hardware"]
    report = {
        **header,
        "precision": "fp32 weights, forward and loss under torch.autocast(bfloat16), as Trainer(bf16=True)",
        "compiled_as": f"torch.compile(model, dynamic=False, backend={args.compile_backend!r}), one graph per length; "
                       "optimizer step eager",
        "complete": False,
        "results": [],
        "ratios": [],
        "targets": [],
        "figures": [],
    }

    def save():
        report["elapsed_seconds"] = time.perf_counter() - runner.started
        report["ratios"] = training_ratios(runner.results, args.shapes, args.lengths)
        report["targets"] = training_targets(runner.results) if "base" in args.shapes else []
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")

    points = len(args.models) * (len(args.shapes) * len(args.lengths)
                                 + len(args.compiled_shapes) * len(args.compiled_lengths))
    previous_handler = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        with tqdm(total=points, unit="point", dynamic_ncols=True) as progress:
            runner = TrainingRunner(args, save, progress)
            report["results"] = runner.results  # the same list: every save() writes what is measured so far
            # Every eager point first (seconds each), then the compiled ones (a compile each) while time is left.
            for mode, shapes, lengths in (("eager", args.shapes, args.lengths),
                                          ("compiled", args.compiled_shapes, args.compiled_lengths)):
                for shape in shapes if lengths else ():
                    if runner.remaining(args.budget_seconds) <= 0:
                        runner.skip_without_building(shape, mode, lengths, [n for n in MODEL_ORDER if n in args.models])
                        continue
                    models = build_training_models(shape, args)
                    for length in lengths:
                        runner.run_group(shape, length, mode, models, args.budget_seconds)
                    del models
                    torch._dynamo.reset()
                    free_device_memory(device)
        report["complete"] = True
    except Stopped as stop:
        report["stopped"] = f"stopped by {stop} after {time.perf_counter() - runner.started:.0f} s"
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if "runner" in locals():
            save()
    print()
    print(format_training_table(runner.results, args.shapes, args.lengths))
    for item in report["targets"]:
        verdict = {True: "MET", False: "NOT MET", None: "not measured"}[item["met"]]
        measured = "-" if item["measured"] is None else f"{item['measured']:.3g}"
        print(f"  [{verdict:>12}] {item['target']}  (measured {measured}, need {item['comparison']} "
              f"{item['threshold']:g})")
    if not args.no_plots:
        report["figures"] = [str(path) for path in make_training_plots(
            runner.results, args.shapes, args.figures_dir, hardware, args.tokens_per_step)]
        save()
    print(f"\nwrote {args.output} ({len(runner.results)} points, {report['elapsed_seconds']:.0f} s on {hardware})")
    return report


if __name__ == "__main__":
    main()
