#!/usr/bin/env python
"""Old against new BST layers in one process: the SH, MH and MF layers of this checkout and of another one (say a
worktree of main), forward + backward, interleaved round by round, so that both versions meet the same machine load.

    python scripts/compare_layer_versions.py --baseline /path/to/main/checkout --length 4k --rounds 3

Prints each round's seconds and, per version, the MH / SH and MF / SH time ratios (median of the per-round ratios,
and the ratio of the fastest calls). Layers listed in --skip are not built (the baseline MF needs ~23 GiB at 16k).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))
sys.path.insert(0, str(REPO_ROOT))

from bst_benchmark.settings import parse_length  # noqa: E402


def import_baseline(checkout: Path):
    """The other checkout's `modeling_bst`, imported under another name (both register "bst" with exist_ok)."""
    folder = Path(tempfile.mkdtemp(prefix="bst_baseline_"))
    shutil.copytree(checkout / "modeling_bst", folder / "modeling_bst_baseline")
    sys.path.insert(0, str(folder))
    import modeling_bst_baseline

    return modeling_bst_baseline


def build_layer(package, variant, args):
    """A 1-layer BSTModel with the benchmark's default shapes, called with `inputs_embeds`."""
    torch.manual_seed(0)
    config = package.BSTConfig(
        vocab_size=16, hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size, num_hidden_layers=1,
        num_attention_heads=8, block_size=512, ssm_state_size=64, bst_variant=variant, ssm_kernel="s4",
        bst_layers=[0], use_cache=False,
    )  # fmt: skip
    return package.BSTModel(config).train()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="checkout whose modeling_bst is 'before'")
    parser.add_argument("--length", type=parse_length, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], help="e.g. baseline-mf")
    parser.add_argument("--output", type=Path, default=None, help="JSON with every time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import modeling_bst

    versions = {"baseline": import_baseline(args.baseline), "new": modeling_bst}
    layers = {
        f"{version}-{variant}": build_layer(package, variant, args)
        for version, package in versions.items()
        for variant in ("sh", "mh", "mf")
        if f"{version}-{variant}" not in args.skip
    }
    inputs = torch.randn(1, args.length, args.hidden_size, requires_grad=True)
    grad_output = torch.randn(1, args.length, args.hidden_size)

    def step(layer):
        layer.zero_grad(set_to_none=True)
        inputs.grad = None
        layer(inputs_embeds=inputs, use_cache=False).last_hidden_state.backward(grad_output)

    for layer in layers.values():
        step(layer)  # warm-up
    times = {name: [] for name in layers}
    for round_index in range(args.rounds):
        for name, layer in layers.items():
            start = time.perf_counter()
            step(layer)
            times[name].append(time.perf_counter() - start)
        seconds = {name: round(values[-1], 2) for name, values in times.items()}
        print(f"round {round_index} (load {os.getloadavg()[0]:.1f}): {seconds}", flush=True)

    ratios = {}
    for version in versions:
        for variant in ("mh", "mf"):
            name, reference = f"{version}-{variant}", f"{version}-sh"
            if name in times and reference in times:
                per_round = [a / b for a, b in zip(times[name], times[reference])]
                ratios[f"{name} / sh"] = {
                    "median_of_round_ratios": statistics.median(per_round),
                    "ratio_of_fastest": min(times[name]) / min(times[reference]),
                }
                print(f"{name} / sh at {args.length}: median of per-round ratios {statistics.median(per_round):.2f}, "
                      f"ratio of the fastest calls {min(times[name]) / min(times[reference]):.2f}")
    if args.output:
        args.output.write_text(json.dumps({"length": args.length, "times": times, "ratios": ratios}, indent=1) + "\n")


if __name__ == "__main__":
    main()
