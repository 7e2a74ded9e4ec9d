#!/usr/bin/env python
"""Milliseconds per decoding step of a converted BST checkpoint, this checkout's `modeling_bst` against another git
revision's, in one process and taking turns step by step (a shared machine's load then reaches both alike); also the
largest difference between the two sides' logits over the steps.

    PYTHONPATH=$PWD python scripts/benchmarks/decode_step_vs_base.py --base 54400ed \
        --model /work/cache/smollm2-bst-w1024-prev-sinks --context 1024 --steps 20

Each side prefills the same L - 1 seeded random token ids, then decodes greedily from its own cache; the first 2
steps are warm-up, the median of the next `--steps` is reported.
"""

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def import_base(revision: str, folder: str):
    """The other revision's `modeling_bst`, exported with `git archive` and imported as `modeling_bst_base`."""
    archive = subprocess.run(["git", "archive", revision, "modeling_bst"], cwd=REPO_ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
    os.rename(os.path.join(folder, "modeling_bst"), os.path.join(folder, "modeling_bst_base"))
    sys.path.insert(0, folder)
    return importlib.import_module("modeling_bst_base")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare with")
    parser.add_argument("--model", required=True, help="folder of a saved BST checkpoint")
    parser.add_argument("--context", type=int, default=1024, help="tokens in the cache before the timed steps, + 1")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import modeling_bst

    with tempfile.TemporaryDirectory() as folder:
        packages = {"base": import_base(args.base, folder), "this": modeling_bst}
        torch.manual_seed(0)
        prompt = torch.randint(0, 1000, (1, args.context - 1))
        runs = {}
        for name, package in packages.items():
            model = package.BSTForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
            with torch.no_grad():
                output = model(prompt, use_cache=True)
            runs[name] = dict(
                model=model, cache=output.past_key_values, token=output.logits[:, -1:].argmax(-1), times=[], logits=[]
            )
        for step in range(args.steps + 2):
            for name in ("base", "this") if step % 2 == 0 else ("this", "base"):
                run = runs[name]
                with torch.no_grad():
                    start = time.perf_counter()
                    output = run["model"](run["token"], past_key_values=run["cache"], use_cache=True)
                    elapsed = time.perf_counter() - start
                if step >= 2:
                    run["times"].append(elapsed * 1000)
                run["logits"].append(output.logits[:, -1])
                run["token"] = output.logits[:, -1:].argmax(-1)
    for name, run in runs.items():
        print(f"{name}: median {statistics.median(run['times']):.1f} ms/step, min {min(run['times']):.1f}")
    difference = max((a - b).abs().max().item() for a, b in zip(runs["base"]["logits"], runs["this"]["logits"]))
    print(f"largest |logit difference| over {len(runs['this']['logits'])} steps: {difference}")


if __name__ == "__main__":
    main()
