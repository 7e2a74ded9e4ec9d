#!/usr/bin/env python
"""Lab: the results of one run of scripts/benchmarks/upcycle_stage.sh, small enough for docs/results/.

The stage's upcycle_summary.json is ~1.7 MB, almost all of it per-slot arrays (1,024 slots x lengths x models) and
per-step logs, and the device tool carries this repository in at most 64 MiB beside the 93 MB model's halves. This
keeps every number the docs cite: per-slot arrays become their slot groups and context gain (what
evaluate_length.markdown_tables reads), training logs keep every 10th step and the last, floats keep 5 decimals.
An evaluation process that ran out of time wrote no JSON; the perplexities it printed before that (`N tokens:
perplexity P` under `Evaluating NAME` in its log, from the stage's logs archive) are kept apart, marked `partial`.

    PYTHONPATH=$PWD python scripts/experiments/upcycle_report.py runs/gpu_results/upcycle_summary.json \\
        --logs runs/gpu_results/logs2/upcycle/logs --output docs/results/smollm2_w1024_gpu_upcycle.json

Prints the stage's tables (evaluate_length.markdown_tables) and the far-context swap. `--length_evaluations` merges
evaluate_length.py results of the same tokens run as separate processes (checked by `token_ids_sha256`) into
`--merged_output`, trimmed alike.
"""

import argparse
import importlib.util
import json
import re
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bst_scripts_far_context_swap", SCRIPTS / "experiments/far_context_swap.py")
far_context_swap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(far_context_swap)
evaluate_length = far_context_swap.evaluate_length  # loaded once, by far_context_swap


def rounded(value, digits: int = 5):
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, list):
        return [rounded(item, digits) for item in value]
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    return value


def without_slot_arrays(evaluation: dict) -> dict:
    """Each model's rows with `loss_by_slot` reduced to its block size, groups and context gain."""
    kept = ("block_size", "groups", "context_gain")
    return {
        name: {**results, "perplexity": [
            {**row, "loss_by_slot": {key: row["loss_by_slot"][key] for key in kept}} if "loss_by_slot" in row else row
            for row in results["perplexity"]
        ]}
        for name, results in evaluation.items()
    }


def printed_perplexities(log: str) -> dict[str, dict[int, float]]:
    """{model: {length: perplexity}} from an evaluate_length.py log ("Evaluating NAME", then "N tokens: perplexity P")."""
    found, model = {}, None
    for line in log.splitlines():
        if line.startswith("Evaluating "):
            model = line[len("Evaluating "):].strip()
            found[model] = {}
        elif model and (match := re.match(r"\s*([\d,]+) tokens: perplexity ([\d.]+)", line)):
            found[model][int(match.group(1).replace(",", ""))] = float(match.group(2))
    return {name: values for name, values in found.items() if values}


def merged_evaluations(paths: list[Path]) -> dict:
    """Several length_evaluation.json files of the same tokens (equal `token_ids_sha256`) as one: the union of their
    lengths and models, for evaluations run as separate processes (e.g. StreamingLLM apart from the BSTs)."""
    evaluations = [json.loads(path.read_text()) for path in paths]
    fingerprints = {evaluation.get("token_ids_sha256") for evaluation in evaluations}
    if len(fingerprints) != 1 or None in fingerprints:
        raise ValueError(f"{[str(path) for path in paths]} did not score the same tokens (token_ids_sha256 "
                         f"{sorted(map(str, fingerprints))}).")
    merged = {**evaluations[0], "models": {}}
    merged["lengths"] = sorted({length for evaluation in evaluations for length in evaluation["lengths"]})
    for path, evaluation in zip(paths, evaluations):
        for name, results in evaluation["models"].items():
            if not results["perplexity"] and not results["passkey"]:
                continue  # a model that file skipped (e.g. the source under --source_max_length 0)
            if name in merged["models"]:
                raise ValueError(f"{path} has {name!r}, which an earlier file already has.")
            merged["models"][name] = results
    return merged


def report(summary: dict, logs: Path | None) -> dict:
    timed_out = [part["part"] for part in summary["parts"] if part["timed_out"]]
    partial = {}
    for part in timed_out:
        log = logs / f"{part}.log" if logs else None
        if part.startswith("eval-") and log and log.is_file():
            partial.update({model: {str(length): value for length, value in values.items()}  # as JSON keys
                            for model, values in printed_perplexities(log.read_text(errors="replace")).items()})
    training = {
        run: {**{key: value for key, value in run_training.items() if key != "log"},
              "log_every_10th_step": run_training["log"][9::10] + run_training["log"][-1:]}
        for run, run_training in summary["training"].items()
    }
    swap = summary.get("far_context_swap") or {}
    swap_models = {  # the per-window losses dropped, their means and paired effects kept
        model: {variant: {key: value for key, value in effects.items() if key != "per_window"}
                for variant, effects in result.items()}
        for model, result in swap.get("models", {}).items()
    }
    return rounded({
        "settings": summary["settings"], "parts": summary["parts"], "same_steps": summary["same_steps"],
        "data": summary.get("data"), "training": training,
        "evaluation_text": summary.get("evaluation_text"), "evaluation": without_slot_arrays(summary["evaluation"]),
        "timed_out_evaluations_printed": {"note": "printed before the process ran out of time (partial)",
                                          "perplexity": partial} if partial else None,
        "far_context_swap": {**swap, "models": swap_models},
    })


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summary", type=Path, help="The stage's upcycle_summary.json.")
    parser.add_argument("--logs", type=Path, default=None, help="The stage's logs/ folder (for timed-out parts).")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--length_evaluations", type=Path, nargs="*", default=[],
                        help="length_evaluation.json files of one text (other machines' runs: e.g. the CPU's "
                        "StreamingLLM beside the rebuilt models), merged into --merged_output.")
    parser.add_argument("--merged_output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.length_evaluations:
        if args.merged_output is None:
            parser.error("--length_evaluations needs --merged_output.")
        merged = merged_evaluations(args.length_evaluations)
        args.merged_output.parent.mkdir(parents=True, exist_ok=True)
        args.merged_output.write_text(json.dumps(rounded({**merged, "models": without_slot_arrays(merged["models"])}),
                                                 indent=1) + "\n")
        print(evaluate_length.markdown_tables(merged))
    result = report(json.loads(args.summary.read_text()), args.logs)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    if result["evaluation_text"]:
        print(evaluate_length.markdown_tables({**result["evaluation_text"], "models": result["evaluation"]}))
    if result["timed_out_evaluations_printed"]:
        print("Printed before a timeout:", json.dumps(result["timed_out_evaluations_printed"]["perplexity"]))
    for model, variants in result["far_context_swap"].get("models", {}).items():
        for variant, effects in variants.items():
            print(f"far-context swap, {model}, {variant}: "
                  + far_context_swap.effect_cells(effects.get("swap_minus_original", effects)))
    return result


if __name__ == "__main__":
    main()
