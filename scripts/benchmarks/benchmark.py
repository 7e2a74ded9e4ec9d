#!/usr/bin/env python
"""Speed and memory benchmark of the Block-State Transformer against attention baselines.

Everything is measured in one process and one run, so that the ratios compare models under the same machine
conditions. Four sections:

1. `layer`: one layer, forward + backward, batch 1, at each length: the BST variants (sh / mh / mf with the "s4"
   kernel, sh with the "unstructured" kernel) against a full causal attention layer, a sliding-window attention
   layer and a Block-Recurrent layer (Hutchins et al., 2022) that walks the blocks one after another.
2. `model`: training throughput (tokens/s, forward + backward + AdamW step) of a BST language model against
   Transformers' own LlamaForCausalLM and MistralForCausalLM (sliding window) of the same width, depth and vocabulary,
   with the Llama/Mistral FFN width chosen so that the parameter counts match.
3. `generate`: prefill time of a long prompt, per-token decode latency and cache bytes at several context lengths,
   BST (`BSTCache`) against Llama (`DynamicCache`), timed two ways: one forward call per step, and through
   `model.generate()` (greedy, a fixed number of new tokens), which is what users see. `--compile` adds compiled
   decoding through generate(), BST and Llama alike, the way Transformers compiles it: a static cache of context +
   new tokens and `CompileConfig(fullgraph=True, dynamic=False)` (CPU: inductor with its C++ wrapper; CUDA: CUDA
   graphs), timing the compiled decoding steps only, with the compile time recorded apart and a compile failure
   recorded as skipped. The report gives BST compiled against Llama eager (the target) and against Llama
   compiled.
4. `kernel`: the share of a BST layer's forward time spent generating its SSM convolution kernel.

An optional `profile` section runs `torch.profiler` on a BST layer (or a Llama layer, `--profile-layers`), groups the
time by kind of work and counts the operators (and CUDA kernels) of its forward and backward.

Timing protocol: warm-up calls, then the median of several repeats; the thread count is fixed and recorded. A
measurement whose extrapolated time per call exceeds `--max-call-seconds`, or whose extrapolated memory exceeds
`--max-memory-gb`, is recorded as skipped with the reason instead of being run. Long measurements get fewer
repeats (`--seconds-per-point`) rather than being skipped.

The code lives in the `bst_benchmark` package next to this script: `settings` (flags), `baselines` (the layers and
models compared), `measurement` (the timing protocol), `sections`, `profiling`, `report` (ratios, targets) and
`plots`.

Example (the full CPU run behind docs/benchmark_cpu.json):

    nice -n 10 python scripts/benchmarks/benchmark.py --output docs/benchmark_cpu.json --figures-dir docs/figures

Quick run (seconds, tiny sizes; used by tests/test_benchmark.py):

    python scripts/benchmarks/benchmark.py --quick --output /tmp/bench.json --figures-dir /tmp/figures
"""

import json
import os
import time

import torch
from tqdm.auto import tqdm

from bst_benchmark.baselines import import_bst
from bst_benchmark.measurement import Runner, keep_freed_memory_mapped
from bst_benchmark.plots import make_plots
from bst_benchmark.profiling import run_profile_section
from bst_benchmark.report import (
    compute_ratios,
    evaluate_targets,
    format_table,
    format_targets,
    report_header,
)
from bst_benchmark.sections import (
    run_generate_section,
    run_kernel_section,
    run_layer_section,
    run_model_section,
)
from bst_benchmark.settings import LAYER_SPECS, parse_args


def count_points(args):
    bst_layers = [n for n in args.layers if LAYER_SPECS[n][0] == "bst"]
    counts = {
        "layer": len(args.layers) * len(args.layer_lengths),
        "model": 3 * len(args.model_lengths),
        "generate": 2 * (1 + len(args.decode_contexts) * (3 if args.compile else 2)),
        "kernel": 2 * len(bst_layers) * len(args.layer_lengths),
        "profile": len(args.profile_lengths) * len(args.profile_layers),
    }
    return sum(counts[s] for s in args.sections) * len(args.dtypes)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    malloc_tuned = False if args.default_malloc else keep_freed_memory_mapped()
    torch.manual_seed(args.seed)
    if any(s != "layer" for s in args.sections) or any(LAYER_SPECS[n][0] == "bst" for n in args.layers):
        import_bst()  # fail now, not after the baselines ran
    report = {
        **report_header("scripts/benchmarks/benchmark.py", args, argv, malloc_keeps_freed_memory=malloc_tuned),
        "results": [],
        "profile": [],
        "ratios": {},
        "targets": {},
    }
    with tqdm(total=count_points(args), unit="point", dynamic_ncols=True) as progress:
        runner = Runner(args, progress)
        for dtype in args.dtypes:
            if "layer" in args.sections:
                run_layer_section(runner, dtype)
            if "model" in args.sections:
                run_model_section(runner, dtype)
            if "generate" in args.sections:
                run_generate_section(runner, dtype)
            if "kernel" in args.sections:
                run_kernel_section(runner, dtype)
            if "profile" in args.sections:
                report["profile"].extend(run_profile_section(runner, dtype))
    results = runner.results
    report["results"] = results
    report["elapsed_seconds"] = time.perf_counter() - runner.started
    report["machine"]["load_average_at_end"] = os.getloadavg()
    for dtype in args.dtypes:
        report["ratios"][dtype] = compute_ratios(args, results, dtype)
        report["targets"][dtype] = evaluate_targets(args, results, dtype)

    for dtype in args.dtypes:
        print()
        print(format_table(args, results, dtype))
        print(format_targets(report["targets"][dtype]))
    figures = []
    if not args.no_plots:
        for dtype in args.dtypes:
            figures += make_plots(args, results, args.figures_dir, dtype)
    report["figures"] = [str(path) for path in figures]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {args.output}" + (f" and {len(figures)} figures in {args.figures_dir}" if figures else ""))
    print(f"elapsed {report['elapsed_seconds'] / 60:.1f} min with {torch.get_num_threads()} threads")
    return report


if __name__ == "__main__":
    main()
