#!/usr/bin/env python
"""Checks that a code change left the model's numbers bit-identical: logits, cached decoding and gradients of every
preset (shrunk to a few layers and a small width, every variant, kernel and attention option kept), computed with
the same seeds by this checkout and by another git revision; and that the other revision's saved checkpoints load
here and compute the same numbers.

    python scripts/benchmarks/check_same_outputs.py --base c1cea15     # compare this tree with revision c1cea15
    python scripts/benchmarks/check_same_outputs.py --write out.pt     # only write this tree's numbers

The other revision is exported with `git archive` into a temporary folder and run in its own process, so each side
imports its own `modeling_bst`. Only public API is used (`BSTConfig`, `BSTForCausalLM`, `forward`, `backward`), so any
revision since 0.4 can be compared (the attention-sink cases only since 0.6, which added them). Exits 1 and names
every tensor that differs.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

import torch


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_attention_heads=4, block_size=8, ssm_state_size=8)


def cases() -> dict[str, dict]:
    """Each BST preset of configuration/, shrunk to SMALL (3 layers), and the options the presets leave off."""
    found = {}
    for path in sorted(glob.glob(os.path.join(REPO_ROOT, "configuration", "bst-*.json"))):
        with open(path) as f:
            preset = json.load(f)
        fields = {k: preset[k] for k in ("bst_variant", "ssm_kernel", "gated_mlp", "hidden_act") if k in preset}
        if fields.get("bst_variant") == "mf":
            fields["num_context_states"] = 4
        found[os.path.basename(path)[:-5]] = dict(SMALL, num_hidden_layers=3, bst_layers=[0, 2], **fields)
    for variant in ("sh", "mh", "mf"):
        found[f"{variant}-previous-block-gqa-llama"] = dict(
            SMALL,
            num_hidden_layers=2,
            bst_variant=variant,
            num_context_states=4 if variant == "mf" else None,
            attend_previous_block=True,
            num_key_value_heads=2,
            gated_mlp=True,
            hidden_act="silu",
            rope_pairing="rotate_half",
            qkv_bias=True,
        )
    for previous in (False, True):  # attention sinks (0.6), with and without the previous block
        name = "sh-sinks" + ("-previous-block" if previous else "")
        found[name] = dict(SMALL, num_hidden_layers=2, num_sink_tokens=2, attend_previous_block=previous)
    return found


def numbers(save_dir: str | None = None, load_dir: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of every case. `save_dir`: also save each model there (`save_pretrained`); `load_dir`: compute with
    the models saved there by another revision instead of building them (their checkpoints must load unchanged)."""
    from modeling_bst import BSTConfig, BSTForCausalLM

    results = {}
    for name, fields in cases().items():
        torch.manual_seed(0)
        config = BSTConfig(pad_token_id=0, **{k: v for k, v in fields.items() if v is not None})
        model = BSTForCausalLM(config)
        with torch.no_grad():  # open the context path (the cross-attention half of o_proj starts at zero)
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        if save_dir:
            model.save_pretrained(os.path.join(save_dir, name))
        if load_dir:
            model = BSTForCausalLM.from_pretrained(os.path.join(load_dir, name))
        inputs = torch.randint(1, config.vocab_size, (2, 29))
        mask = torch.ones_like(inputs)
        mask[1, :5] = 0  # a left-padded row
        model.eval()
        with torch.no_grad():
            results[f"{name}/logits"] = model(inputs, attention_mask=mask).logits
            cache = model(inputs[:, :19], attention_mask=mask[:, :19], use_cache=True).past_key_values
            steps = [
                model(inputs[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache).logits
                for t in range(19, 29)
            ]
            results[f"{name}/decoded"] = torch.cat(steps, dim=1)
        model.train()
        # use_cache=False: before 0.5 a training forward with the saved default (use_cache=True) also built a cache,
        # which changed its rounding; the plain training path is the one every version shares.
        loss = model(inputs, attention_mask=mask, labels=inputs, use_cache=False).loss
        loss.backward()
        results[f"{name}/loss"] = loss.detach()
        for parameter_name, parameter in model.named_parameters():
            if parameter.grad is not None:
                results[f"{name}/grad/{parameter_name}"] = parameter.grad
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="git revision to compare this tree with")
    parser.add_argument("--write", help="write this tree's numbers to this .pt file and exit")
    parser.add_argument("--save_models", help="with --write: also save each model into this folder")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same reduction order on every machine size
    if args.write:
        torch.save(numbers(save_dir=args.save_models), args.write)
        return
    if not args.base:
        parser.error("pass --base REVISION or --write FILE")
    with tempfile.TemporaryDirectory() as folder:
        archive = subprocess.run(["git", "archive", args.base], cwd=REPO_ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
        base_file = os.path.join(folder, "base.pt")
        script = os.path.abspath(__file__)
        # The base tree's modeling_bst, with this file's cases (it may predate this script).
        env = dict(os.environ, PYTHONPATH=folder)
        saved = os.path.join(folder, "checkpoints")
        subprocess.run(
            [sys.executable, script, "--write", base_file, "--save_models", saved], env=env, check=True, cwd=folder
        )
        base = torch.load(base_file)
        current = numbers()
        # The base revision's checkpoints, loaded by this tree, compute the same numbers.
        from_checkpoints = numbers(load_dir=saved)
    current.update({f"{name} (loaded from {args.base}'s checkpoint)": value for name, value in from_checkpoints.items()})
    base.update({f"{name} (loaded from {args.base}'s checkpoint)": value for name, value in base.items()})
    different = [name for name in sorted(set(base) | set(current)) if name not in base or name not in current
                 or not torch.equal(base[name], current[name])]
    print(f"{len(current)} tensors from {len(cases())} configurations compared with {args.base}: "
          f"{len(different)} differ")
    for name in different:
        if name in base and name in current and base[name].shape == current[name].shape:
            print(f"  differs: {name} (max abs difference {(base[name] - current[name]).abs().max().item():.3g})")
        else:
            print("  differs:", name, "(missing or reshaped)")
    sys.exit(1 if different else 0)


if __name__ == "__main__":
    main()
