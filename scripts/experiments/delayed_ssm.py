#!/usr/bin/env python
"""Lab: can an upcycled SSM carry text from beyond the attention window when it is kept from seeing what the window
sees?

An upcycled BST trained on the next-token loss gains as much where nothing lies beyond its window as where something
does, and cutting its SSM filters at the attention span changes nothing (docs/upcycling.md): its SSM works as extra
capacity on text the window also sees. This experiment asks whether that is because the window already has the recent
tokens (the SSM's easiest signal) rather than because far text carries nothing an SSM could bring. It trains
scripts/upcycle.py's recipe with every SSM filter delayed by `--delay` tokens: taps 0 .. delay - 1 and the skip term
are zero, so the SSM output at t reads SSM inputs t - delay and older. With delay = 2W and previous-block attention
(span W to 2W - 1), nothing the SSM reads is visible to the attention of the same layer: whatever it brings is from
beyond the window. Then it scores the model, with the same delay, on scripts/evaluate_length.py's held-out text, and
again with its SSM outputs zeroed.

The delay is a forward hook on the kernels of the full forward (training and scoring run no cache). It is not part
of the model: the saved folder, loaded as it is, has the undelayed filters, so it is for this script's evaluation
only (`--evaluate_only` scores an earlier run's folder again). Every upcycle.py option after `--`:

    PYTHONPATH=$PWD python scripts/experiments/delayed_ssm.py --delay 512 --lengths 2048,8192 --total_tokens 16384 \\
        -- --gguf_file WHEEL --training_tokens runs/upcycle_tokens.pt.xz --block_size 256 --attend_previous_block \\
        --num_sink_tokens 4 --train new+o_proj --bst_layers 10,20 ... --output_dir runs/bst-delayed

Writes `delayed_ssm_evaluation.json` into upcycle's output folder.
"""

import argparse
import importlib.util
import json
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import modeling_bst  # noqa: F401  (registers the "bst" model type)
from bst_tools import conversion
from bst_tools.docstrings import stdlib_docstring_documents
from bst_tools.evaluation import ssm_sublayers, ssm_zeroed


SCRIPTS = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def ssm_delayed(model, delay: int):
    """Every SSM filter of `model` delayed by `delay` tokens inside the block: taps 0 .. delay - 1 zeroed by a forward
    hook on each kernel, and the skip term (lag 0) held at zero and frozen. Full forward only (no cache)."""
    if delay < 1:
        raise ValueError(f"--delay must be at least 1, got {delay}.")
    ssm_modules = ssm_sublayers(model)

    def delay_taps(module, inputs, taps):  # taps (H, length)
        taps = taps.clone()
        taps[..., :delay] = 0
        return taps

    handles = [ssm.kernel_generator.register_forward_hook(delay_taps) for ssm in ssm_modules]
    with torch.no_grad():
        for ssm in ssm_modules:
            ssm.skip.zero_()
            ssm.skip.requires_grad_(False)
    try:
        yield len(ssm_modules)
    finally:
        for handle in handles:
            handle.remove()


def evaluate(folder: Path, delay: int, lengths: list[int], total_tokens: int) -> dict:
    """Perplexity and loss by position of the delayed model, and of the same with its SSM outputs zeroed."""
    evaluate_length = load_script("evaluate_length")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    stream = evaluate_length.token_stream(stdlib_docstring_documents(), tokenizer, total_tokens)
    block_size = model.config.block_size

    def rows():
        scored = []
        for length in lengths:
            row = evaluate_length.score(lambda ids: evaluate_length.next_token_losses(model, ids), stream, length,
                                        block_size)
            print(f"  {length:>6,} tokens: perplexity {row['perplexity']:.3f} ({row['seconds']} s)", flush=True)
            scored.append(row)
        return scored

    results = {"folder": str(folder), "delay": delay, "total_tokens": total_tokens, "models": {}}
    with ssm_delayed(model, delay):
        print(f"{folder.name}, SSM delayed by {delay:,} tokens", flush=True)
        results["models"]["delayed SSM"] = rows()
        with ssm_zeroed(model):
            print(f"{folder.name}, SSM outputs zeroed", flush=True)
            results["models"]["delayed SSM, outputs zeroed"] = rows()
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay", type=int, required=True, help="Tokens the SSM filters are delayed by (2W: past the span).")
    parser.add_argument("--lengths", default="2048,8192", help="Evaluation window lengths.")
    parser.add_argument("--total_tokens", type=int, default=16384, help="Held-out tokens scored at every length.")
    parser.add_argument("--evaluate_only", metavar="FOLDER", help="Score an earlier run's folder; no training.")
    args, upcycle_argv = parser.parse_known_args(argv)
    upcycle_argv = [arg for arg in upcycle_argv if arg != "--"]
    lengths = [int(length) for length in args.lengths.split(",")]
    if args.evaluate_only:
        folder = Path(args.evaluate_only)
    else:
        upcycle = load_script("upcycle")
        upcycle_args = upcycle.parse_args(upcycle_argv)
        convert_model = conversion.convert_model
        with ExitStack() as delays:

            def convert_with_delay(*convert_args, **convert_kwargs):  # the model upcycle.py trains, delayed
                model = convert_model(*convert_args, **convert_kwargs)
                if delays.enter_context(ssm_delayed(model, args.delay)) == 0:
                    raise ValueError("The conversion has no SSM layers to delay (--bst_layers).")
                return model

            conversion.convert_model = convert_with_delay
            try:
                upcycle.upcycle(upcycle_args)
            finally:
                conversion.convert_model = convert_model
        folder = Path(upcycle_args.output_dir)
    results = evaluate(folder, args.delay, lengths, args.total_tokens)
    (folder / "delayed_ssm_evaluation.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
