#!/usr/bin/env python
"""Lab: does a BST's SSM carry particular text from beyond the attention window, or only what kind of text it is?

Each window of scripts/evaluate_length.py's held-out docstrings is scored twice at its scored positions (the second
block after `--swap_end`, whose own attention, with previous-block attention, reaches back no further than
`--swap_end`): as it is, and with its tokens from `--sinks` to `--swap_end` (the far text) replaced by other text,
the attention sinks kept. The change of loss there says how much the model depended on that particular far text:

- `same kind`: the far text of the next window (other docstrings: the same register, other content);
- `other kind`: consecutive stretches of `--foreign_tokens` (scripts/upcycle.py --save_training_tokens; its first
  source comes first: Shakespeare's plays for the registry recipe).

Every model is also scored with its SSM outputs zeroed: the swap's effect on the model minus its effect on the same
model without its SSM path is what the SSM path carries of the far text (deeper layers' attention chains reach it
too, in both). With `--delay D` (scripts/experiments/delayed_ssm.py), each BST's filters are delayed by D tokens as
that script trained them. If the SSM carries only a summary of the kind of text, its part is ~0 for `same kind` and
positive for `other kind`.

    PYTHONPATH=$PWD python scripts/experiments/far_context_swap.py --bst runs/bst-long runs/control \\
        --foreign_tokens runs/upcycle_tokens.pt.xz --window 2048 --swap_end 1536 --total_tokens 32768 \\
        --output runs/far_context_swap.json
"""

import argparse
import importlib.util
import json
import math
from contextlib import ExitStack
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import modeling_bst  # noqa: F401  (registers the "bst" model type)
from bst_tools.docstrings import stdlib_docstring_documents
from bst_tools.evaluation import ssm_sublayers, ssm_zeroed


SCRIPTS = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"bst_scripts_{Path(name).name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluate_length = load_script("evaluate_length")
delayed_ssm = load_script("experiments/delayed_ssm")


def scored_span(swap_end: int, block_size: int, window: int) -> tuple[int, int]:
    """Positions whose next-token losses are compared: the block that starts one block after `swap_end` (its
    previous block starts at `swap_end`, so the first layer's attention never sees swapped text)."""
    if swap_end % block_size:
        raise ValueError(f"--swap_end ({swap_end}) must be a multiple of the block size ({block_size}).")
    start, end = swap_end + block_size, swap_end + 2 * block_size
    if end > window:
        raise ValueError(f"--window ({window}) must hold --swap_end + 2 blocks ({end}).")
    return start, end - 1 if end == window else end  # the last position of a window predicts nothing


def swapped(windows: torch.Tensor, far_text: torch.Tensor, sinks: int, swap_end: int) -> torch.Tensor:
    """`windows` (N, L) with tokens sinks .. swap_end - 1 of row i replaced by row i of `far_text` (N, >= swap_end)."""
    result = windows.clone()
    result[:, sinks:swap_end] = far_text[:, sinks:swap_end]
    return result


def paired(difference: torch.Tensor) -> dict:
    """Mean of per-window differences and its standard error."""
    count = len(difference)
    error = difference.std().item() / math.sqrt(count) if count > 1 else float("nan")
    return {"mean": difference.mean().item(), "standard_error": error, "windows": count}


def swap_effects(model, texts: dict[str, torch.Tensor], span: tuple[int, int]) -> dict:
    """Loss at `span` for each variant of the windows ({"original": (N, L), "same kind": ..., ...}), and the paired
    change of each swap against the original (evaluate_length.next_token_losses, one window per forward)."""
    start, end = span
    per_window = {
        name: torch.stack([evaluate_length.next_token_losses(model, window[None].to(model.device))[0][start:end]
                           .mean().cpu() for window in windows])
        for name, windows in texts.items()
    }
    return {
        "loss": {name: values.mean().item() for name, values in per_window.items()},
        "swap_minus_original": {
            name: paired(values - per_window["original"]) for name, values in per_window.items() if name != "original"
        },
        "per_window": {name: values.tolist() for name, values in per_window.items()},
    }


def effect_cells(effects: dict) -> str:
    """"name +mean ± standard error, ..." of a {name: paired(...)} dict."""
    return ", ".join(f"{name} {e['mean']:+.4f} ± {e['standard_error']:.4f}" for name, e in effects.items())


def evaluate_model(model, texts, span, delay: int | None) -> dict:
    """The swap effects with the SSM path as trained and zeroed, and their difference: the SSM path's part."""
    has_ssm = bool(ssm_sublayers(model))
    with ExitStack() as stack:
        if delay and has_ssm:
            stack.enter_context(delayed_ssm.ssm_delayed(model, delay))
        result = {"as trained": swap_effects(model, texts, span)}
        if has_ssm:
            with ssm_zeroed(model):
                result["SSM outputs zeroed"] = swap_effects(model, texts, span)
            result["SSM part of the swap effect"] = {
                name: paired(
                    torch.tensor(result["as trained"]["per_window"][name])
                    - torch.tensor(result["as trained"]["per_window"]["original"])
                    - torch.tensor(result["SSM outputs zeroed"]["per_window"][name])
                    + torch.tensor(result["SSM outputs zeroed"]["per_window"]["original"])
                )
                for name in texts if name != "original"
            }
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bst", nargs="+", required=True, help="BST folders (made from the same source).")
    parser.add_argument("--foreign_tokens", help="A scripts/upcycle.py --save_training_tokens file ('other kind').")
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--swap_end", type=int, default=1536, help="Far text: tokens --sinks .. swap_end - 1.")
    parser.add_argument("--sinks", type=int, default=4, help="Leading tokens kept (the attention sinks).")
    parser.add_argument("--total_tokens", type=int, default=32768, help="Held-out tokens (a multiple of --window).")
    parser.add_argument("--delay", type=int, default=None, help="Score each BST's SSM delayed by this many tokens.")
    parser.add_argument("--device", default="cpu", help="Where the models run (fp32), e.g. cuda.")
    parser.add_argument("--output", required=True, help="JSON file to write.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    upcycle = load_script("upcycle")
    models = {folder: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(args.device).eval()
              for folder in args.bst}
    block_sizes = {model.config.block_size for model in models.values()}
    if len(block_sizes) != 1:
        raise ValueError(f"The BSTs have different block sizes {sorted(block_sizes)}: compare one W at a time.")
    span = scored_span(args.swap_end, block_sizes.pop(), args.window)
    tokenizer = AutoTokenizer.from_pretrained(args.bst[0])
    stream = evaluate_length.token_stream(stdlib_docstring_documents(), tokenizer, args.total_tokens)
    original = evaluate_length.windows(stream, args.window)  # (N, L)
    texts = {"original": original, "same kind": swapped(original, original.roll(-1, dims=0), args.sinks, args.swap_end)}
    if args.foreign_tokens:
        foreign, _ = upcycle.load_training_tokens(Path(args.foreign_tokens), tokenizer)
        needed = len(original) * args.swap_end
        if len(foreign) < needed:
            raise ValueError(f"{args.foreign_tokens} has {len(foreign)} tokens, fewer than the {needed} needed.")
        texts["other kind"] = swapped(original, foreign[:needed].view(len(original), args.swap_end), args.sinks,
                                      args.swap_end)
    results = {"window": args.window, "swap_end": args.swap_end, "sinks": args.sinks, "scored_positions": list(span),
               "total_tokens": args.total_tokens, "delay": args.delay, "models": {}}
    for folder, model in models.items():
        results["models"][Path(folder).name] = result = evaluate_model(model, texts, span, args.delay)
        for variant, effects in result.items():
            if variant == "SSM part of the swap effect":
                line = effect_cells(effects)
            else:
                line = ", ".join(f"{name} {effects['loss'][name]:.4f}" for name in texts) + "; swap - original: " + \
                    effect_cells(effects["swap_minus_original"])
            print(f"{Path(folder).name}, {variant}: {line}", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
