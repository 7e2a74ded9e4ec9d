#!/usr/bin/env python
"""Paired comparison of two upcycling runs by their training losses, step by step.

Two runs of scripts/upcycle.py with the same `--seed`, `--max_steps`, `--batch_size`, `--sequence_length` and
training text see the same sequences in the same order, and each sequence is scored before the step that trains on
it: a step's loss is a loss on text that run has not trained on yet. The difference of the two runs' losses at the
same step is therefore a paired held-out comparison, free of the sequences' own difficulty; its mean over a range
of steps, with the standard error of that mean, says whether one run is ahead and by how much.

    python scripts/experiments/compare_training_logs.py runs/upcycled runs/control --first_step 51

Each argument is a folder that upcycle.py wrote (training_log.json, data_manifest.json) or a training_log.json.
"""

import argparse
import json
import math
from pathlib import Path


def read_log(path: Path) -> tuple[dict[int, float], dict | None]:
    """{step: loss} of a run, and its data manifest when `path` is a run folder."""
    if path.is_dir():
        log = json.loads((path / "training_log.json").read_text())
        manifest_path = path / "data_manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    else:
        log, manifest = json.loads(path.read_text()), None
    return {entry["step"]: entry["loss"] for entry in log}, manifest


def paired_difference(losses_a: dict[int, float], losses_b: dict[int, float], first_step: int = 1,
                      last_step: int | None = None) -> dict:
    """Mean over the steps both runs took in [first_step, last_step] of loss_a - loss_b (nats), its standard error,
    and how many of those steps run a had the lower loss."""
    steps = sorted(step for step in losses_a.keys() & losses_b.keys()
                   if step >= first_step and (last_step is None or step <= last_step))
    if len(steps) < 2:
        raise ValueError(f"The two runs share {len(steps)} step(s) in the range asked for; a comparison needs two.")
    differences = [losses_a[step] - losses_b[step] for step in steps]
    mean = sum(differences) / len(differences)
    variance = sum((difference - mean) ** 2 for difference in differences) / (len(differences) - 1)
    return {
        "steps": [steps[0], steps[-1]],
        "count": len(steps),
        "mean_loss_a": sum(losses_a[step] for step in steps) / len(steps),
        "mean_loss_b": sum(losses_b[step] for step in steps) / len(steps),
        "mean_difference": mean,
        "standard_error": math.sqrt(variance / len(differences)),
        "steps_a_lower": sum(difference < 0 for difference in differences),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--first_step", type=int, default=1)
    parser.add_argument("--last_step", type=int, default=None)
    args = parser.parse_args(argv)
    (losses_a, manifest_a), (losses_b, manifest_b) = read_log(args.run_a), read_log(args.run_b)
    if manifest_a and manifest_b:
        fields = ("seed", "sequence_length", "max_steps", "corpus_tokens")
        differing = [field for field in fields if manifest_a.get(field) != manifest_b.get(field)]
        if differing:
            raise SystemExit(f"The runs did not see the same sequences: their {', '.join(differing)} differ.")
    result = paired_difference(losses_a, losses_b, args.first_step, args.last_step)
    result.update(run_a=str(args.run_a), run_b=str(args.run_b))
    print(
        f"steps {result['steps'][0]}-{result['steps'][1]} ({result['count']} shared): {args.run_a.name} "
        f"{result['mean_loss_a']:.4f}, {args.run_b.name} {result['mean_loss_b']:.4f} nats; difference "
        f"{result['mean_difference']:+.4f} +- {result['standard_error']:.4f} (standard error); "
        f"{args.run_a.name} lower at {result['steps_a_lower']} of {result['count']} steps"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
