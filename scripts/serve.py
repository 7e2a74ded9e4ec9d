#!/usr/bin/env python
"""Serve a BST model with `transformers serve`: OpenAI-compatible `/v1/completions` and `/v1/chat/completions`.

`transformers serve` (5.23) instantiates a model as `getattr(transformers, config.architectures[0])`, so a class that
lives outside Transformers fails there ("module 'transformers' has no attribute 'BSTForCausalLM'"), even with
`--trust-remote-code`. This launcher imports `modeling_bst` (which registers BST with the Auto classes), makes its
classes attributes of the `transformers` module in this process only, and then runs the unchanged `transformers
serve` command with the arguments it was given:

    python scripts/serve.py runs/quickstart --host 127.0.0.1 --port 8000
    python scripts/serve.py --help          # every option of `transformers serve`

The model argument is a folder (or Hub id) saved by scripts/train.py or `save_pretrained`; requests name it as their
`model`. Needs `pip install -e ".[serve]"` (FastAPI and Uvicorn through `transformers[serving]`, and the `openai`
client for docs/serving.md's examples).
"""

import os
import sys

import transformers

try:
    import modeling_bst
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import modeling_bst


def attach_bst_to_transformers():
    """Make the BST classes attributes of the `transformers` module the server looks them up in. Importing the
    command line replaces `sys.modules["transformers"]` with a fresh module object, so this runs after that import
    and sets them on every module object the server may hold."""
    import transformers.cli.serving.model_manager as model_manager

    for module in {id(m): m for m in (sys.modules["transformers"], model_manager.transformers, transformers)}.values():
        for name in ("BSTConfig", "BSTModel", "BSTForCausalLM"):
            if name not in vars(module):
                setattr(module, name, getattr(modeling_bst, name))


def main(argv=None):
    # The `transformers` command line itself, minus its update check (a network call), with `serve` as the command.
    from transformers.cli.transformers import app

    attach_bst_to_transformers()
    app(args=["serve", *(sys.argv[1:] if argv is None else argv)], prog_name="transformers")


if __name__ == "__main__":
    main()
