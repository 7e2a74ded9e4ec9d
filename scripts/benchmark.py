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
   BST (`BSTCache`) against Llama (`DynamicCache`).
4. `kernel`: the share of a BST layer's forward time spent generating its SSM convolution kernel.

An optional `profile` section runs `torch.profiler` on a BST layer and groups the time by kind of work.

Timing protocol: warm-up calls, then the median of several repeats; the thread count is fixed and recorded. A
measurement whose extrapolated time per call exceeds `--max-call-seconds`, or whose extrapolated memory exceeds
`--max-memory-gb`, is recorded as skipped with the reason instead of being run. Long measurements get fewer
repeats (`--seconds-per-point`) rather than being skipped.

Example (the full CPU run behind docs/benchmarks.md):

    nice -n 10 python scripts/benchmark.py --output docs/benchmark_cpu.json --figures-dir docs/figures

Quick run (seconds, tiny sizes; used by tests/test_benchmark.py):

    python scripts/benchmark.py --quick --output /tmp/bench.json --figures-dir /tmp/figures
"""

import argparse
import ctypes
import ctypes.util
import datetime
import functools
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm


# The benchmark runs from a source checkout: make `modeling_bst` importable without installing the package.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

try:  # glibc's malloc_trim, to measure peak memory through the resident set (see release_memory)
    LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
    LIBC.malloc_trim
except (OSError, AttributeError, TypeError):
    LIBC = None

SECTIONS = ("layer", "model", "generate", "kernel", "profile")
DEFAULT_SECTIONS = ("layer", "model", "generate", "kernel")

# Layers of the layer-level section: name -> (kind, options). BST layers are 1-layer BST models.
LAYER_SPECS = {
    "bst-sh-s4": ("bst", {"bst_variant": "sh", "ssm_kernel": "s4"}),
    "bst-mh-s4": ("bst", {"bst_variant": "mh", "ssm_kernel": "s4"}),
    "bst-mf-s4": ("bst", {"bst_variant": "mf", "ssm_kernel": "s4"}),
    "bst-sh-unstructured": ("bst", {"bst_variant": "sh", "ssm_kernel": "unstructured"}),
    "full-attention": ("attention", {"window": None}),
    "sliding-window": ("attention", {"window": "block"}),
    "block-recurrent": ("block_recurrent", {}),
}
BASELINE_LAYERS = ("full-attention", "sliding-window", "block-recurrent")

# How time and memory grow with the length, used only to extrapolate from the previous length when deciding
# whether a measurement fits in the limits (and how many repeats it gets). Full attention is quadratic in time;
# every other layer is (close to) linear. Memory is linear everywhere (SDPA's flash kernel), except for the L x L
# boolean sliding-window mask Mistral builds (1 byte per entry: 256 MiB at 16k), hence a slightly larger exponent.
TIME_EXPONENT = {"full-attention": 2.0, "llama": 2.0, "mistral": 2.0}
MEMORY_EXPONENT = {"mistral": 1.2}
DEFAULT_TIME_EXPONENT = 1.2
DEFAULT_MEMORY_EXPONENT = 1.0


QUICK_DEFAULTS = dict(
    hidden_size=64,
    num_heads=2,
    intermediate_size=128,
    block_size=32,
    ssm_state_size=8,
    brt_state_size=16,
    num_layers=2,
    vocab_size=256,
    layer_lengths=[64, 256],
    model_lengths=[64, 256],
    prefill_length=256,
    decode_contexts=[32, 256],
    decode_tokens=4,
    profile_lengths=[256],
    target_length=256,
    scaling_lengths=[64, 256],
    repeats=2,
    seconds_per_point=5.0,
)


def parse_length(text):
    """'4k' -> 4096, '512' -> 512."""
    text = text.strip().lower()
    try:
        value = int(text[:-1]) * 1024 if text.endswith("k") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a length: {text!r} (use an integer or e.g. '4k')") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"lengths must be positive, got {text!r}")
    return value


def format_length(length):
    return f"{length // 1024}k" if length >= 1024 and length % 1024 == 0 else str(length)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(DEFAULT_SECTIONS),
        help="what to measure (see the module docstring); `profile` runs torch.profiler on a BST-SH layer",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and short lengths; runs in seconds")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=("float32", "bfloat16"),
        default=None,
        help="precisions to measure (bfloat16 runs under autocast); default float32 on CPU, both on GPU",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default of mapping and unmapping every large block (see keep_freed_memory_mapped)",
    )
    # Shapes.
    parser.add_argument("--hidden-size", type=int, default=512, help="model width D of every layer and model")
    parser.add_argument("--num-heads", type=int, default=8, help="attention heads (BST: self and cross each)")
    parser.add_argument("--intermediate-size", type=int, default=2048, help="FFN width of every layer")
    parser.add_argument("--block-size", type=int, default=512, help="BST block W = sliding window = BRT block")
    parser.add_argument("--ssm-state-size", type=int, default=64, help="N of the BST 's4' kernels")
    parser.add_argument("--brt-state-size", type=int, default=512, help="Block-Recurrent state vectors S (paper: W)")
    parser.add_argument(
        "--layers", nargs="+", choices=list(LAYER_SPECS), default=list(LAYER_SPECS), help="layers of `layer`"
    )
    parser.add_argument(
        "--layer-lengths",
        nargs="+",
        type=parse_length,
        default=[1024, 4096, 16384, 65536],
        help="sequence lengths of `layer` and `kernel` (e.g. 1k 4k)",
    )
    parser.add_argument("--num-layers", type=int, default=4, help="depth of the models in `model` and `generate`")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the models")
    parser.add_argument("--model-variant", default="sh", choices=("sh", "mh", "mf"), help="BST variant of the LM")
    parser.add_argument("--model-kernel", default="s4", choices=("s4", "unstructured"), help="SSM kernel of the LM")
    parser.add_argument(
        "--model-bst-layers",
        nargs="*",
        type=int,
        default=None,
        help="indices of the BST layers of the model (the rest are block-attention layers); default every other "
        "layer, 1, 3, ..., the layout of configuration/bst-small.json",
    )
    parser.add_argument(
        "--model-lengths", nargs="+", type=parse_length, default=[4096, 16384], help="lengths of `model`"
    )
    parser.add_argument("--prefill-length", type=parse_length, default=16384, help="prompt length of `generate`")
    parser.add_argument(
        "--decode-contexts",
        nargs="+",
        type=parse_length,
        default=[512, 4096, 16384],
        help="context lengths at which `generate` times decoding",
    )
    parser.add_argument("--decode-tokens", type=int, default=24, help="decode steps timed at each context")
    parser.add_argument(
        "--profile-lengths", nargs="+", type=parse_length, default=[4096, 16384], help="lengths of `profile`"
    )
    # Timing protocol.
    parser.add_argument("--warmup", type=int, default=1, help="warm-up calls before timing")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (at most); the median is reported")
    parser.add_argument(
        "--seconds-per-point",
        type=float,
        default=15.0,
        help="time budget of one measurement: fewer repeats (at least 1) when a call is slow",
    )
    parser.add_argument(
        "--max-call-seconds",
        type=float,
        default=120.0,
        help="skip (and record why) a measurement whose extrapolated time per call exceeds this",
    )
    parser.add_argument(
        "--max-memory-gb",
        type=float,
        default=14.0,
        help="skip (and record why) a measurement whose extrapolated extra memory exceeds this",
    )
    # Targets (issue 6) are evaluated at these lengths.
    parser.add_argument("--target-length", type=parse_length, default=16384, help="layer and kernel-share targets")
    parser.add_argument(
        "--scaling-lengths",
        nargs=2,
        type=parse_length,
        default=[4096, 65536],
        help="the BST-SH layer's t(long) / t(short) target is taken between these lengths",
    )
    # Outputs.
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "benchmark_cpu.json", help="JSON report")
    parser.add_argument(
        "--figures-dir", type=Path, default=REPO_ROOT / "docs" / "figures", help="where benchmark_*.png go"
    )
    parser.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. 'shared 2-core machine')")
    if parser.parse_args(argv).quick:
        # Tiny shapes that exercise every code path in seconds (the numbers mean nothing). These are defaults:
        # flags given explicitly still win.
        parser.set_defaults(**QUICK_DEFAULTS)
    args = parser.parse_args(argv)
    args.layer_lengths = sorted(set(args.layer_lengths))
    args.model_lengths = sorted(set(args.model_lengths))
    args.decode_contexts = sorted(set(args.decode_contexts))
    if args.dtypes is None:
        args.dtypes = ["float32"] if args.device == "cpu" else ["float32", "bfloat16"]
    if args.model_bst_layers is None:
        args.model_bst_layers = list(range(1, args.num_layers, 2))
    check_args(args)
    return args


def check_args(args):
    """Fail on bad input, naming the problem, before any heavy work starts."""
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise SystemExit(f"--device {args.device!r} is not a torch device: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device} was asked for, but torch sees no CUDA GPU.")
    if args.hidden_size % args.num_heads:
        raise SystemExit(f"--hidden-size {args.hidden_size} is not divisible by --num-heads {args.num_heads}.")
    if (args.hidden_size // args.num_heads) % 2:
        raise SystemExit("--hidden-size / --num-heads must be even (rotary embeddings).")
    for name in ("threads", "warmup", "repeats", "num_layers", "decode_tokens", "block_size", "brt_state_size"):
        value = getattr(args, name)
        if value < (0 if name == "warmup" else 1):
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {value}.")
    if args.decode_tokens < 3:
        raise SystemExit("--decode-tokens must be at least 3 (the first two steps are warm-up).")
    if args.model_bst_layers is not None:
        bad = [i for i in args.model_bst_layers if not 0 <= i < args.num_layers]
        if bad:
            raise SystemExit(f"--model-bst-layers {bad} outside [0, --num-layers={args.num_layers}).")
    if "bfloat16" in args.dtypes and torch.device(args.device).type == "cpu":
        print("note: bfloat16 on CPU runs under CPU autocast; the issue asks for it on GPU only.", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# Baseline layers, written for this benchmark. All are pre-norm, use RoPE and a GELU FFN like the BST layer, so
# that a ratio compares the sequence-mixing part and not incidental choices.
# ---------------------------------------------------------------------------------------------------------------


def rotary_tables(positions, head_dim, device, theta=10000.0):
    """RoPE rotations exp(i * position * inv_freq), (L, head_dim/2) complex: the same form as the BST model's."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = positions.to(device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x, rotations):
    """x: (..., L, head_dim); channel pairs (2i, 2i+1) are rotated as one complex number, as in modeling_bst."""
    pairs = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotations).flatten(-2).to(x.dtype)


class FeedForward(nn.Module):
    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x)))


def split_heads(x, num_heads):
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x):
    batch, num_heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, num_heads * head_dim)


def sliding_window_attention(query, key, value, window):
    """Causal attention where each token sees itself and the `window - 1` tokens before it.

    Computed block-locally, never with an L x L mask: queries are cut into blocks of `window` tokens and each block
    attends to its own block and the previous one under a banded mask, so time and memory are O(L * window).
    """
    batch, num_heads, length, head_dim = query.shape
    num_blocks = math.ceil(length / window)
    pad = num_blocks * window - length
    if pad:
        query, key, value = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))

    def blocks(t):
        # (batch, heads, blocks * window, head_dim) -> (batch * blocks, heads, window, head_dim): blocks become batch
        # entries, so that SDPA sees plain 4-D inputs and a mask that differs only for the first block.
        t = t.view(batch, num_heads, num_blocks, window, head_dim).transpose(1, 2)
        return t.reshape(batch * num_blocks, num_heads, window, head_dim)

    query, key, value = blocks(query), blocks(key), blocks(value)

    def with_previous_block(t):
        # Keys/values of (previous block, own block): 2 * window of them per query block; zeros before block 0.
        previous = F.pad(t.view(batch, num_blocks, num_heads, window, head_dim), (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1]
        return torch.cat([previous.reshape_as(t), t], dim=2)

    key, value = with_previous_block(key), with_previous_block(value)
    # Query i of a block sits at index window + i of the 2 * window keys; it sees keys j with i < j <= window + i.
    i = torch.arange(window, device=query.device)[:, None]
    j = torch.arange(2 * window, device=query.device)[None, :]
    band = (j > i) & (j <= window + i)
    mask = band.expand(batch, num_blocks, 1, window, 2 * window).clone()
    mask[:, 0, :, :, :window] = False  # the first block has no previous block (those keys are padding)
    mask = mask.view(batch * num_blocks, 1, window, 2 * window)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    out = out.view(batch, num_blocks, num_heads, window, head_dim).transpose(1, 2)
    return out.reshape(batch, num_heads, num_blocks * window, head_dim)[:, :, :length]


class AttentionLayer(nn.Module):
    """Pre-norm Transformer layer: causal self-attention (full, or a sliding window) + FFN.

    Full attention calls SDPA with `is_causal=True` and no mask, which takes PyTorch's memory-efficient (flash)
    kernel on CPU and GPU, so memory stays linear in L and only time is quadratic.
    """

    def __init__(self, hidden_size, num_heads, intermediate_size, window=None):
        super().__init__()
        self.num_heads, self.window = num_heads, window
        self.attn_norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.qkv_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.mlp_norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.mlp = FeedForward(hidden_size, intermediate_size)

    def forward(self, hidden_states):
        length = hidden_states.shape[1]
        query, key, value = (
            split_heads(t, self.num_heads) for t in self.qkv_proj(self.attn_norm(hidden_states)).chunk(3, dim=-1)
        )
        rotations = rotary_tables(torch.arange(length), query.shape[-1], query.device)
        query, key = apply_rotary(query, rotations), apply_rotary(key, rotations)
        if self.window is None:
            attn = F.scaled_dot_product_attention(query, key, value, is_causal=True)
        else:
            attn = sliding_window_attention(query, key, value, self.window)
        hidden_states = hidden_states + self.o_proj(merge_heads(attn))
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class BlockRecurrentLayer(nn.Module):
    """Block-Recurrent Transformer layer (Hutchins et al., 2022, arXiv 2203.07852), written for this benchmark.

    The sequence is cut into blocks of W tokens that are processed one after another, carrying a recurrent state of S
    vectors (the paper uses S = W = 512). For each block:
    - vertical direction (tokens): causal self-attention over the block and cross-attention to the state, heads
      concatenated, one output projection, residual; FFN, residual;
    - horizontal direction (state): self-attention over the state and cross-attention to the block's tokens, one
      output projection, then the paper's "fixed" gate (a learned per-channel sigmoid, independent of the input)
      instead of a residual; FFN through a second fixed gate.
    Keys and values are shared between the two directions, queries are separate, as in the paper. The loop over
    blocks is the point of the comparison: BST replaces it by a parallel SSM.
    """

    def __init__(self, hidden_size, num_heads, intermediate_size, block_size, state_size):
        super().__init__()
        self.num_heads, self.block_size = num_heads, block_size
        self.token_norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.state_norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.token_qkv_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.state_qkv_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.token_cross_q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.state_cross_q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.token_o_proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.state_o_proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.token_mlp_norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.state_mlp_norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.token_mlp = FeedForward(hidden_size, intermediate_size)
        self.state_mlp = FeedForward(hidden_size, intermediate_size)
        self.initial_state = nn.Parameter(torch.randn(state_size, hidden_size) * 0.02)
        self.state_ids = nn.Parameter(torch.randn(state_size, hidden_size) * 0.02)
        self.attn_gate_bias = nn.Parameter(torch.full((hidden_size,), 2.0))
        self.mlp_gate_bias = nn.Parameter(torch.full((hidden_size,), 2.0))

    def cell(self, tokens, state, rotations):
        heads = self.num_heads
        normed_tokens = self.token_norm(tokens)
        normed_state = self.state_norm(state + self.state_ids)
        token_q, token_k, token_v = (split_heads(t, heads) for t in self.token_qkv_proj(normed_tokens).chunk(3, -1))
        state_q, state_k, state_v = (split_heads(t, heads) for t in self.state_qkv_proj(normed_state).chunk(3, -1))
        token_cross_q = split_heads(self.token_cross_q_proj(normed_tokens), heads)
        state_cross_q = split_heads(self.state_cross_q_proj(normed_state), heads)
        token_q, token_k = apply_rotary(token_q, rotations), apply_rotary(token_k, rotations)

        token_self = F.scaled_dot_product_attention(token_q, token_k, token_v, is_causal=True)
        token_cross = F.scaled_dot_product_attention(token_cross_q, state_k, state_v)
        tokens = tokens + self.token_o_proj(torch.cat([merge_heads(token_self), merge_heads(token_cross)], -1))
        tokens = tokens + self.token_mlp(self.token_mlp_norm(tokens))

        state_self = F.scaled_dot_product_attention(state_q, state_k, state_v)
        state_cross = F.scaled_dot_product_attention(state_cross_q, token_k, token_v)
        update = self.state_o_proj(torch.cat([merge_heads(state_self), merge_heads(state_cross)], -1))
        attn_gate = torch.sigmoid(self.attn_gate_bias)
        state = attn_gate * state + (1 - attn_gate) * update
        mlp_gate = torch.sigmoid(self.mlp_gate_bias)
        state = mlp_gate * state + (1 - mlp_gate) * self.state_mlp(self.state_mlp_norm(state))
        return tokens, state

    def forward(self, hidden_states):
        batch = hidden_states.shape[0]
        head_dim = hidden_states.shape[-1] // self.num_heads
        state = self.initial_state.to(hidden_states.dtype).expand(batch, -1, -1)
        outputs = []
        for block in hidden_states.split(self.block_size, dim=1):
            rotations = rotary_tables(torch.arange(block.shape[1]), head_dim, block.device)
            block_out, state = self.cell(block, state, rotations)
            outputs.append(block_out)
        return torch.cat(outputs, dim=1)


# ---------------------------------------------------------------------------------------------------------------
# BST and Transformers models
# ---------------------------------------------------------------------------------------------------------------


def import_bst():
    try:
        import modeling_bst
    except ImportError as error:
        raise SystemExit(f"cannot import modeling_bst ({error}); run from the repository or `pip install -e .`")
    return modeling_bst


def bst_config(args, num_layers, bst_variant, ssm_kernel, bst_layers=None, vocab_size=None):
    modeling_bst = import_bst()
    return modeling_bst.BSTConfig(
        vocab_size=vocab_size or args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=args.num_heads,
        block_size=args.block_size,
        bst_variant=bst_variant,
        ssm_kernel=ssm_kernel,
        ssm_state_size=args.ssm_state_size,
        bst_layers=bst_layers,
        max_position_embeddings=max(args.model_lengths + [args.prefill_length]),
        use_cache=False,
    )


class BSTLayerUnderTest(nn.Module):
    """One BST layer, measured as a 1-layer BSTModel called with `inputs_embeds` (includes the final norm)."""

    def __init__(self, config):
        super().__init__()
        self.model = import_bst().BSTModel(config)

    def forward(self, hidden_states):
        return self.model(inputs_embeds=hidden_states, use_cache=False).last_hidden_state


def build_layer(name, args):
    kind, options = LAYER_SPECS[name]
    if kind == "bst":
        config = bst_config(args, num_layers=1, bst_layers=[0], vocab_size=16, **options)
        return BSTLayerUnderTest(config)
    if kind == "attention":
        window = args.block_size if options["window"] == "block" else None
        return AttentionLayer(args.hidden_size, args.num_heads, args.intermediate_size, window=window)
    return BlockRecurrentLayer(
        args.hidden_size, args.num_heads, args.intermediate_size, args.block_size, args.brt_state_size
    )


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def build_causal_lms(args, names=("bst", "llama", "mistral")):
    """The BST LM and same-size Llama / Mistral LMs. Llama/Mistral get the FFN width that matches BST's parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    modeling_bst = import_bst()
    config = bst_config(args, args.num_layers, args.model_variant, args.model_kernel, args.model_bst_layers)
    models = {"bst": modeling_bst.BSTForCausalLM(config)}
    bst_params = count_parameters(models["bst"])

    # Llama layer: 4 D^2 attention + 3 D F (SwiGLU) + 2 D (norms); embeddings tied, as in BST.
    width, depth = args.hidden_size, args.num_layers
    fixed = args.vocab_size * width + width + depth * (4 * width * width + 2 * width)
    ffn_width = max(8, round((bst_params - fixed) / (3 * width * depth) / 8) * 8)
    common = dict(
        vocab_size=args.vocab_size,
        hidden_size=width,
        intermediate_size=ffn_width,
        num_hidden_layers=depth,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_heads,
        max_position_embeddings=max(args.model_lengths + [args.prefill_length]) + args.decode_tokens + 8,
        tie_word_embeddings=True,
        use_cache=False,
    )
    if "llama" in names:
        models["llama"] = LlamaForCausalLM(LlamaConfig(**common, attn_implementation="sdpa"))
    if "mistral" in names:
        mistral_config = MistralConfig(**common, sliding_window=args.block_size, attn_implementation="sdpa")
        models["mistral"] = MistralForCausalLM(mistral_config)
    return {name: models[name] for name in names}


# ---------------------------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------------------------


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory():
    """Hand freed memory back to the OS, so that the resident set measures the next call's peak and not what the
    allocator kept from earlier calls. (Tensors are freed by reference counting; no gc.collect() needed.)"""
    if LIBC is not None:
        LIBC.malloc_trim(0)


def keep_freed_memory_mapped():
    """Serve every allocation from glibc's heap and never shrink it automatically.

    By default glibc maps each block above its mmap threshold (at most 32 MiB) fresh from the OS and unmaps it on
    free, so every activation of a long sequence is page-faulted in again at each call: about 15% of a BST-SH or
    sliding-window layer step at 16k on the 2-core machine, and more at 64k. `M_MMAP_MAX = 0` and a high
    `M_TRIM_THRESHOLD` remove that for every model in the run alike (PyTorch's CPU performance guide gets the same
    effect from jemalloc or tcmalloc). `release_memory()` still hands freed memory back between measurements.
    Returns whether glibc accepted the settings.
    """
    if LIBC is None or not hasattr(LIBC, "mallopt"):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(LIBC.mallopt(m_mmap_max, 0)) and bool(LIBC.mallopt(m_trim_threshold, 2**31 - 1))


def resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_bytes():
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


class PeakMemory:
    """Peak extra memory of the code inside the `with`: CUDA allocator peak on GPU, sampled resident set on CPU."""

    def __init__(self, device, interval=0.01):
        self.device, self.interval = device, interval
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        self.start = self.peak = resident_bytes()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while not self.stop.wait(self.interval):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.start
            return False
        self.stop.set()
        self.thread.join()
        self.peak_bytes = max(0, max(self.peak, resident_bytes()) - self.start)
        return False


def is_out_of_memory(error):
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


class Runner:
    """Runs measurements under the timing protocol, extrapolates cost from shorter lengths, and records results.

    The things compared in a ratio are measured as one group, round-robin: one timed call of each in turn, repeated.
    On a shared machine the load changes from minute to minute; interleaving spreads that change over all members of
    a group instead of charging it to whichever was measured last.
    """

    def __init__(self, args, progress):
        self.args = args
        self.device = torch.device(args.device)
        self.progress = progress
        self.results = []
        self.history = {}  # (section, name, dtype) -> [(length, seconds per call, peak bytes)]
        self.started = time.perf_counter()

    def estimate(self, section, name, length, dtype):
        """Seconds per call and extra bytes at `length`, extrapolated from the longest shorter measurement."""
        previous = [point for point in self.history.get((section, name, dtype), []) if point[0] < length]
        if not previous:
            return None, None
        known_length, seconds, peak = previous[-1]
        kind = name.split("/")[0]
        scale = length / known_length
        return (
            seconds * scale ** TIME_EXPONENT.get(kind, DEFAULT_TIME_EXPONENT),
            peak * scale ** MEMORY_EXPONENT.get(kind, DEFAULT_MEMORY_EXPONENT),
        )

    def skip_reason(self, section, name, length, dtype, skip_slow=True):
        args = self.args
        est_seconds, est_bytes = self.estimate(section, name, length, dtype)
        memory_limit = args.max_memory_gb * 2**30
        available = available_bytes() if self.device.type == "cpu" else None
        if available is not None:
            memory_limit = min(memory_limit, 0.8 * available)
        if skip_slow and est_seconds is not None and est_seconds > args.max_call_seconds:
            return (
                f"estimated {est_seconds:.0f} s per call (extrapolated from the previous length) exceeds "
                f"--max-call-seconds {args.max_call_seconds:.0f}"
            )
        if est_bytes is not None and est_bytes > memory_limit:
            return (
                f"estimated {est_bytes / 2**30:.1f} GiB of extra memory exceeds the limit of "
                f"{memory_limit / 2**30:.1f} GiB (--max-memory-gb, or 80% of the memory available now)"
            )
        return None

    def measure_group(self, section, length, dtype, calls, extras=None, unit_tokens=None, skip_slow=True, skipped=None):
        """Time each `calls[name]()` (one call = the thing measured), round-robin; returns {name: record}.

        A member whose extrapolated memory (or time, with `skip_slow`) is over the limits is recorded as skipped, as is
        a member named in `skipped` ({name: reason}). Each member gets
        `--warmup` untimed calls (none when one call is expected to take longer than `--seconds-per-point`: the same
        code already ran at the shorter lengths), then at most `--repeats` timed calls, fewer when they would exceed
        `--seconds-per-point` (at least one). The median is reported. With `unit_tokens`, tokens/s = unit_tokens /
        median.
        """
        args = self.args
        records, active = {}, {}
        for name, fn in calls.items():
            records[name] = {"section": section, "name": name, "length": length, "dtype": dtype,
                             **((extras or {}).get(name, {}))}
            reason = (skipped or {}).get(name) or self.skip_reason(section, name, length, dtype, skip_slow)
            if reason:
                records[name]["skipped"] = reason
                self.finish(records[name])
            else:
                active[name] = fn
        times = {name: [] for name in active}
        peaks = {name: 0 for name in active}
        warmups = {}
        for name, fn in list(active.items()):
            est_seconds, _ = self.estimate(section, name, length, dtype)
            warmups[name] = args.warmup if est_seconds is None or est_seconds < args.seconds_per_point else 0
            self.progress.set_description(f"{section} {name} {format_length(length)} warm-up")
            try:
                for index in range(warmups[name]):
                    if index == 0:
                        release_memory()
                    with PeakMemory(self.device) as memory:
                        fn()
                        synchronize(self.device)
                    peaks[name] = max(peaks[name], memory.peak_bytes)
            except RuntimeError as error:
                if not is_out_of_memory(error):
                    raise
                records[name]["skipped"] = f"out of memory: {str(error).splitlines()[0]}"
                self.finish(records[name])
                del active[name]
        while active:
            for name, fn in list(active.items()):
                self.progress.set_description(f"{section} {name} {format_length(length)} run {len(times[name]) + 1}")
                try:
                    # The first call of a member starts from trimmed memory, so that its peak is seen; later calls
                    # reuse what the allocator kept (trimming before every call would add page faults to the time).
                    if not times[name] and not warmups[name]:
                        release_memory()
                    with PeakMemory(self.device) as memory:
                        synchronize(self.device)
                        start = time.perf_counter()
                        fn()
                        synchronize(self.device)
                        times[name].append(time.perf_counter() - start)
                except RuntimeError as error:
                    if not is_out_of_memory(error):
                        raise
                    records[name]["skipped"] = f"out of memory: {str(error).splitlines()[0]}"
                    self.finish(records[name])
                    del active[name]
                    continue
                peaks[name] = max(peaks[name], memory.peak_bytes)
                spent = sum(times[name])
                if len(times[name]) >= args.repeats or spent + spent / len(times[name]) > args.seconds_per_point:
                    del active[name]
                    record = records[name]
                    median = statistics.median(times[name])
                    record.update(seconds=median, min_seconds=min(times[name]), times=times[name],
                                  warmup=warmups[name], repeats=len(times[name]), peak_memory_bytes=peaks[name])
                    if unit_tokens is not None:
                        record["tokens_per_second"] = unit_tokens / median
                    self.history.setdefault((section, name, dtype), []).append((length, median, peaks[name]))
                    self.finish(record)
        return records

    def finish(self, record):
        # The machine may be shared: keep the load next to each number so that noisy points can be recognised.
        record["load_average_1min"] = round(os.getloadavg()[0], 2)
        self.results.append(record)
        self.progress.update(1)
        if "skipped" in record:
            message = f"skipped: {record['skipped']}"
        else:
            message = f"{record['seconds'] * 1e3:10.1f} ms  (median of {record['repeats']})"
        self.progress.write(
            f"[{time.perf_counter() - self.started:6.0f}s] {record['section']:<8} {record['name']:<26} "
            f"{format_length(record['length']):>5} {record['dtype']:<8} {message}"
        )


def autocast_context(device, dtype):
    if dtype == "float32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------


def run_layer_section(runner, dtype):
    """Layer level, forward + backward (parameters and input), batch 1. All layers are one group per length."""
    args, device = runner.args, runner.device
    layers = {}
    for name in args.layers:
        torch.manual_seed(args.seed)
        layers[name] = build_layer(name, args).to(device).train()
    extras = {name: {"parameters": count_parameters(layer)} for name, layer in layers.items()}
    for length in args.layer_lengths:
        inputs = torch.randn(1, length, args.hidden_size, device=device, requires_grad=True)
        grad_output = torch.randn(1, length, args.hidden_size, device=device)

        def forward_backward(layer):
            layer.zero_grad(set_to_none=True)
            inputs.grad = None
            with autocast_context(device, dtype):
                output = layer(inputs)
            output.float().backward(grad_output)

        calls = {name: functools.partial(forward_backward, layer) for name, layer in layers.items()}
        runner.measure_group("layer", length, dtype, calls, extras)
        for layer in layers.values():
            layer.zero_grad(set_to_none=True)
        del inputs, grad_output, calls
    del layers


def run_model_section(runner, dtype):
    """Training throughput: forward + loss + backward + AdamW step, batch 1. The models are one group per length."""
    args, device = runner.args, runner.device
    torch.manual_seed(args.seed)
    models = build_causal_lms(args)
    optimizers, extras = {}, {}
    for name, model in models.items():
        model.to(device).train()
        optimizers[name] = torch.optim.AdamW(model.parameters(), lr=1e-4)
        extras[name] = {
            "parameters": count_parameters(model),
            "intermediate_size": model.config.intermediate_size,
            "num_layers": model.config.num_hidden_layers,
        }
    extras["bst"]["bst_layers"] = list(models["bst"].config.bst_layers)
    for length in args.model_lengths:
        input_ids = torch.randint(args.vocab_size, (1, length), device=device)

        def train_step(model, optimizer):
            optimizer.zero_grad(set_to_none=True)
            with autocast_context(device, dtype):
                loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
            loss.backward()
            optimizer.step()

        calls = {name: functools.partial(train_step, model, optimizers[name]) for name, model in models.items()}
        # Never skipped for time: these are the targets (only the memory limit applies).
        runner.measure_group("model", length, dtype, calls, extras, unit_tokens=length, skip_slow=False)
    del models, optimizers


def cache_nbytes(cache):
    """Bytes held by a generation cache: BSTCache.nbytes(), or the key/value tensors of a Transformers cache."""
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def decode_step(model, cache, token, device, dtype):
    """One greedy decoding step on `cache`: returns the next token (1, 1) and the seconds the forward call took."""
    with torch.no_grad(), autocast_context(device, dtype):
        synchronize(device)
        start = time.perf_counter()
        output = model(input_ids=token, past_key_values=cache, use_cache=True)
        next_token = output.logits[:, -1:].argmax(-1)
        synchronize(device)
    return next_token, time.perf_counter() - start


def run_generate_section(runner, dtype):
    """Prefill of a long prompt; per-token decode latency and cache bytes at several contexts, BST vs Llama.

    Decoding is interleaved too: one step of each model in turn. The first two steps at each context are warm-up.
    """
    args, device = runner.args, runner.device
    torch.manual_seed(args.seed)
    models = build_causal_lms(args, names=("bst", "llama"))
    prompt = torch.randint(args.vocab_size, (1, max(args.decode_contexts + [args.prefill_length])), device=device)
    extras = {}
    for name, model in models.items():
        model.to(device).eval()
        extras[name] = {"parameters": count_parameters(model)}
        # One throwaway prefill + decode: the first calls of a model pay one-time costs that are not latency.
        with torch.no_grad(), autocast_context(device, dtype):
            cache = model(input_ids=prompt[:, :8], use_cache=True, logits_to_keep=1).past_key_values
        token = prompt[:, 8:9]
        for _ in range(3):
            token, _ = decode_step(model, cache, token, device, dtype)

    caches = {}  # (name, length) -> cache after a prefill of `length` tokens

    def prefill(name, length):
        with torch.no_grad(), autocast_context(device, dtype):
            output = models[name](input_ids=prompt[:, :length], use_cache=True, logits_to_keep=1)
        caches[name, length] = output.past_key_values

    calls = {name: functools.partial(prefill, name, args.prefill_length) for name in models}
    records = runner.measure_group(
        "prefill", args.prefill_length, dtype, calls, extras, args.prefill_length, skip_slow=False
    )
    for name, record in records.items():
        if "skipped" not in record:
            record["cache_bytes"] = cache_nbytes(caches[name, args.prefill_length])

    for context in args.decode_contexts:
        active = {}
        for name in models:
            record = {"section": "decode", "name": name, "length": context, "dtype": dtype,
                      "decode_tokens": args.decode_tokens, **extras[name]}
            if (name, context) not in caches:
                reason = runner.skip_reason("prefill", name, context, dtype, skip_slow=False)
                if reason:
                    runner.finish({**record, "skipped": f"the prefill of the context would be skipped: {reason}"})
                    continue
                runner.progress.set_description(f"decode {name} {format_length(context)} prefill")
                prefill(name, context)
            cache = caches.pop((name, context))
            record["cache_bytes_after_prefill"] = cache_nbytes(cache)
            active[name] = (record, cache, prompt[:, context - 1 : context], [])
        runner.progress.set_description(f"decode {format_length(context)}")
        for _ in range(args.decode_tokens):
            for name, (record, cache, token, times) in active.items():
                token, seconds = decode_step(models[name], cache, token, device, dtype)
                active[name] = (record, cache, token, times + [seconds])
        for name, (record, cache, _, times) in active.items():
            timed = times[2:]
            median = statistics.median(timed)
            record.update(seconds=median, times=timed, warmup=2, repeats=len(timed),
                          tokens_per_second=1.0 / median, cache_bytes=cache_nbytes(cache))
            runner.finish(record)
        del active
    caches.clear()
    del models


def find_kernel_generators(model):
    """The SSM kernel generators of a BST model: `BSTStateSpace.kernel_generator`, a module called with a length that
    returns the (D * C, length) filter taps. It is called directly, bypassing `BSTStateSpace.kernel`, whose memo would
    hide the cost outside autograd."""
    return [module.kernel_generator for module in model.modules() if hasattr(module, "kernel_generator")]


def run_kernel_section(runner, dtype):
    """Share of a BST layer's forward time spent generating the SSM kernel, at each length.

    Both are timed as in training: autograd on (the graph is built, no backward), train mode. In eval/no-grad the
    model memoises the kernel, so its cost then disappears after the first call.
    """
    args, device = runner.args, runner.device
    layers = {}
    for name in [n for n in args.layers if LAYER_SPECS[n][0] == "bst"]:
        torch.manual_seed(args.seed)
        layers[name] = build_layer(name, args).to(device).train()
        generators = find_kernel_generators(layers[name])
        if len(generators) != 1:
            raise SystemExit(
                f"kernel section: expected one SSM kernel generator in {name}, found {len(generators)}; "
                "update find_kernel_generators() to the model's kernel API"
            )
    for length in args.layer_lengths:
        inputs = torch.randn(1, length, args.hidden_size, device=device)

        def layer_forward(layer):
            with autocast_context(device, dtype):
                layer(inputs)

        def kernel_only(generate_kernel):
            with autocast_context(device, dtype):
                generate_kernel(length)

        calls, skipped = {}, {}
        for name, layer in layers.items():
            calls[f"{name}/forward"] = functools.partial(layer_forward, layer)
            calls[f"{name}/kernel"] = functools.partial(kernel_only, find_kernel_generators(layer)[0])
            # A layer the layer section could not run at this length is not run here either (same limits).
            reason = lookup(runner.results, "layer", name, length, dtype, "skipped")
            if reason:
                skipped[f"{name}/forward"] = skipped[f"{name}/kernel"] = f"skipped in the layer section: {reason}"
        records = runner.measure_group("kernel", length, dtype, calls, skipped=skipped)
        for name in layers:
            forward, kernel = records[f"{name}/forward"], records[f"{name}/kernel"]
            if "skipped" not in forward and "skipped" not in kernel:
                kernel["share_of_forward"] = kernel["seconds"] / forward["seconds"]
        del inputs, calls
    del layers


# Profiler op names -> kind of work, for the profile summary (self CPU time, forward + backward). First match wins.
PROFILE_OP_GROUPS = (
    ("FFT", ("fft",)),
    ("attention kernels (SDPA)", ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax")),
    ("matmul (projections, FFN, Vandermonde)", ("mm", "matmul", "linear", "einsum")),
    ("layout copies / padding / zero fill", ("copy_", "contiguous", "clone", "cat", "pad", "index", "gather",
                                             "scatter", "stack", "_to_copy", "fill_", "zero_", "repeat", "unfold")),
    ("complex exp (kernel powers)", ("exp",)),
    ("elementwise / reductions / norms", ("mul", "add", "sub", "div", "pow", "gelu", "rsqrt", "mean", "sigmoid",
                                          "neg", "cos", "sin", "where", "complex", "real", "sum", "expm1", "masked")),
)


def forward_part_ranges(layer):
    """Profiler ranges `part::<name>` around the forward of the parts of a 1-layer BST model, through hooks (the
    model is not modified). Returns the hook handles."""
    decoder = layer.model.layers[0]
    parts = {
        "SSM kernel generation": decoder.ssm.kernel_generator,
        "SSM sublayer (kernel + FFT convolution + skip)": decoder.ssm,
        "attention sublayer (projections, self + cross attention)": decoder.attention,
        "FFN": decoder.mlp,
    }
    handles = []
    for label, module in parts.items():
        def enter(module, inputs, label=label):
            module._benchmark_range = torch.profiler.record_function(f"part::{label}")
            module._benchmark_range.__enter__()

        def leave(module, inputs, output):
            module._benchmark_range.__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def run_profile_section(runner, dtype):
    """torch.profiler on a BST-SH layer, forward + backward: time by part of the layer (forward) and by kind of
    operation (forward + backward, self CPU time)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    args, device = runner.args, runner.device
    name = "bst-sh-s4"
    torch.manual_seed(args.seed)
    layer = build_layer(name, args).to(device).train()
    profiles = []
    for length in args.profile_lengths:
        runner.progress.set_description(f"profile {name} {format_length(length)}")
        inputs = torch.randn(1, length, args.hidden_size, device=device, requires_grad=True)
        grad_output = torch.randn_like(inputs)

        def step():
            layer.zero_grad(set_to_none=True)
            with record_function("step::forward"), autocast_context(device, dtype):
                output = layer(inputs)
            with record_function("step::backward"):
                output.float().backward(grad_output)

        if length == args.profile_lengths[0]:
            step()  # warm-up; longer lengths run the same code
        handles = forward_part_ranges(layer)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            step()
        wall = time.perf_counter() - start
        for handle in handles:
            handle.remove()
        events = prof.key_averages()
        ranges = {e.key: e.cpu_time_total / 1e6 for e in events if e.key.startswith(("part::", "step::"))}
        ops = [e for e in events if not e.key.startswith(("part::", "step::"))]
        total = sum(e.self_cpu_time_total for e in ops) / 1e6
        groups = {}
        for event in ops:
            group = next((g for g, patterns in PROFILE_OP_GROUPS if any(p in event.key for p in patterns)), "other")
            groups[group] = groups.get(group, 0.0) + event.self_cpu_time_total / 1e6
        top_ops = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
        record = {
            "name": name,
            "length": length,
            "dtype": dtype,
            "wall_seconds": wall,
            "forward_seconds": ranges.get("step::forward"),
            "backward_seconds": ranges.get("step::backward"),
            "forward_parts_seconds": {k[len("part::"):]: v for k, v in ranges.items() if k.startswith("part::")},
            "total_self_cpu_seconds": total,
            "op_groups_seconds": dict(sorted(groups.items(), key=lambda item: -item[1])),
            "top_ops": [
                {"op": e.key, "self_cpu_seconds": e.self_cpu_time_total / 1e6, "calls": e.count} for e in top_ops
            ],
        }
        profiles.append(record)
        runner.progress.update(1)
        runner.progress.write(format_profile(record))
        del inputs, grad_output
    return profiles


def format_profile(record):
    lines = [
        f"Profile of {record['name']} at {format_length(record['length'])} ({record['dtype']}), forward + backward: "
        f"{record['wall_seconds']:.2f} s wall, forward {record['forward_seconds']:.2f} s, "
        f"backward {record['backward_seconds']:.2f} s",
        "  forward, by part of the layer:",
    ]
    forward = record["forward_seconds"] or float("nan")
    for part, seconds in record["forward_parts_seconds"].items():
        lines.append(f"    {part:<58} {seconds:7.3f} s  {seconds / forward:6.1%}")
    lines.append("  forward + backward, by kind of operation (self CPU time):")
    total = record["total_self_cpu_seconds"]
    for group, seconds in record["op_groups_seconds"].items():
        lines.append(f"    {group:<58} {seconds:7.3f} s  {seconds / total:6.1%}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Ratios, targets, report
# ---------------------------------------------------------------------------------------------------------------


def lookup(results, section, name, length, dtype, field="seconds"):
    for record in results:
        if (record["section"], record["name"], record["length"], record["dtype"]) == (section, name, length, dtype):
            return record.get(field)
    return None


def safe_ratio(numerator, denominator):
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def compute_ratios(args, results, dtype):
    """BST time / baseline time per layer and length; BST throughput / baseline throughput per model and length."""
    ratios = {"layer": [], "model": [], "prefill": [], "decode": []}
    for name in [n for n in args.layers if LAYER_SPECS[n][0] == "bst"]:
        for baseline in [b for b in BASELINE_LAYERS if b in args.layers]:
            for length in args.layer_lengths:
                ratio = safe_ratio(
                    lookup(results, "layer", name, length, dtype), lookup(results, "layer", baseline, length, dtype)
                )
                if ratio is not None:
                    ratios["layer"].append(
                        {"bst": name, "baseline": baseline, "length": length, "time_ratio": ratio, "speedup": 1 / ratio}
                    )
    for baseline in ("llama", "mistral"):
        for length in args.model_lengths:
            ratio = safe_ratio(
                lookup(results, "model", "bst", length, dtype, "tokens_per_second"),
                lookup(results, "model", baseline, length, dtype, "tokens_per_second"),
            )
            if ratio is not None:
                ratios["model"].append({"baseline": baseline, "length": length, "throughput_ratio": ratio})
    speedup = safe_ratio(
        lookup(results, "prefill", "llama", args.prefill_length, dtype),
        lookup(results, "prefill", "bst", args.prefill_length, dtype),
    )
    if speedup is not None:
        ratios["prefill"].append({"baseline": "llama", "length": args.prefill_length, "speedup": speedup})
    for context in args.decode_contexts:
        latency = safe_ratio(
            lookup(results, "decode", "llama", context, dtype), lookup(results, "decode", "bst", context, dtype)
        )
        memory = safe_ratio(
            lookup(results, "decode", "llama", context, dtype, "cache_bytes"),
            lookup(results, "decode", "bst", context, dtype, "cache_bytes"),
        )
        if latency is not None:
            ratios["decode"].append(
                {"baseline": "llama", "length": context, "latency_speedup": latency, "cache_bytes_ratio": memory}
            )
    return ratios


def target(description, measured, threshold, comparison, detail=""):
    """One target verdict: met is None when the inputs were not measured."""
    if measured is None:
        met = None
    elif comparison == "<=":
        met = measured <= threshold
    else:
        met = measured >= threshold
    return {
        "target": description,
        "measured": measured,
        "threshold": threshold,
        "comparison": comparison,
        "met": met,
        "detail": detail,
    }


def evaluate_targets(args, results, dtype):
    """The issue's targets, at the lengths given by --target-length, --scaling-lengths, --model-lengths, ..."""
    length = args.target_length
    short, long = args.scaling_lengths
    model_short, model_long = args.model_lengths[0], args.model_lengths[-1]
    first_ctx, last_ctx = args.decode_contexts[0], args.decode_contexts[-1]

    def seconds(section, name, at, field="seconds"):
        return lookup(results, section, name, at, dtype, field)

    targets = [
        target(
            f"BST-SH layer at {format_length(length)}: time <= 0.2x full attention",
            safe_ratio(seconds("layer", "bst-sh-s4", length), seconds("layer", "full-attention", length)),
            0.2,
            "<=",
            "ratio of forward+backward times",
        ),
        target(
            f"BST-SH layer: t({format_length(long)}) / t({format_length(short)}) <= 20",
            safe_ratio(seconds("layer", "bst-sh-s4", long), seconds("layer", "bst-sh-s4", short)),
            20.0,
            "<=",
            f"{long // short}x longer sequence",
        ),
        target(
            f"Model training throughput at {format_length(model_short)}: >= 1.0x Llama",
            safe_ratio(
                seconds("model", "bst", model_short, "tokens_per_second"),
                seconds("model", "llama", model_short, "tokens_per_second"),
            ),
            1.0,
            ">=",
        ),
        target(
            f"Model training throughput at {format_length(model_long)}: >= 3x Llama",
            safe_ratio(
                seconds("model", "bst", model_long, "tokens_per_second"),
                seconds("model", "llama", model_long, "tokens_per_second"),
            ),
            3.0,
            ">=",
        ),
        target(
            f"Prefill of {format_length(args.prefill_length)} tokens: >= 3x faster than Llama",
            safe_ratio(seconds("prefill", "llama", args.prefill_length), seconds("prefill", "bst", args.prefill_length)),
            3.0,
            ">=",
        ),
        target(
            f"BST decode latency at {format_length(last_ctx)} context <= 1.2x that at {format_length(first_ctx)}",
            safe_ratio(seconds("decode", "bst", last_ctx), seconds("decode", "bst", first_ctx)),
            1.2,
            "<=",
        ),
        target(
            f"BST cache bytes constant from {format_length(first_ctx)} to {format_length(last_ctx)} context",
            safe_ratio(
                seconds("decode", "bst", last_ctx, "cache_bytes"), seconds("decode", "bst", first_ctx, "cache_bytes")
            ),
            1.0,
            "<=",
            "ratio of cache bytes after the same number of decode steps",
        ),
        target(
            f"Kernel generation < 20% of a BST-SH layer's forward time at {format_length(length)}",
            lookup(results, "kernel", "bst-sh-s4/kernel", length, dtype, "share_of_forward"),
            0.2,
            "<=",
            "forward only, training mode (no kernel cache)",
        ),
    ]
    return targets


def machine_facts(args):
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import transformers

    facts = {
        "cpu": cpu_model,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": args.device,
        "memory_total_gib": None,
        "load_average_at_start": os.getloadavg(),
    }
    try:
        with open("/proc/meminfo") as meminfo:
            facts["memory_total_gib"] = round(int(meminfo.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    if torch.device(args.device).type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(args.device)
    return facts


def format_table(args, results, dtype):
    lines = []
    layer_names = [n for n in args.layers]
    if any(r["section"] == "layer" for r in results):
        lines.append(f"Layer forward + backward, batch 1, ms ({dtype})")
        lines.append(f"{'layer':<22}" + "".join(f"{format_length(n):>11}" for n in args.layer_lengths))
        for name in layer_names:
            cells = []
            for length in args.layer_lengths:
                record = next(
                    (r for r in results if (r["section"], r["name"], r["length"], r["dtype"]) ==
                     ("layer", name, length, dtype)),
                    None,
                )
                cells.append("-" if record is None else "skipped" if "skipped" in record else
                             f"{record['seconds'] * 1e3:.0f}")
            lines.append(f"{name:<22}" + "".join(f"{c:>11}" for c in cells))
        lines.append("")
        lines.append("Speedup of the BST layer (baseline time / BST time)")
        lines.append(f"{'':<44}" + "".join(f"{format_length(n):>9}" for n in args.layer_lengths))
        for name in [n for n in layer_names if LAYER_SPECS[n][0] == "bst"]:
            for baseline in [b for b in BASELINE_LAYERS if b in layer_names]:
                cells = []
                for length in args.layer_lengths:
                    ratio = safe_ratio(lookup(results, "layer", baseline, length, dtype),
                                       lookup(results, "layer", name, length, dtype))
                    cells.append("-" if ratio is None else f"{ratio:.2f}x")
                lines.append(f"{name + ' vs ' + baseline:<44}" + "".join(f"{c:>9}" for c in cells))
        lines.append("")
    if any(r["section"] == "model" for r in results):
        lines.append(f"Model training throughput, tokens/s ({dtype})")
        lines.append(f"{'model':<22}{'params':>11}" + "".join(f"{format_length(n):>11}" for n in args.model_lengths))
        for name in ("bst", "llama", "mistral"):
            rows = [r for r in results if r["section"] == "model" and r["name"] == name and r["dtype"] == dtype]
            if not rows:
                continue
            cells = []
            for length in args.model_lengths:
                record = next((r for r in rows if r["length"] == length), None)
                cells.append("-" if record is None else "skipped" if "skipped" in record else
                             f"{record['tokens_per_second']:.0f}")
            lines.append(f"{name:<22}{rows[0]['parameters'] / 1e6:>10.2f}M" + "".join(f"{c:>11}" for c in cells))
        lines.append("")
    if any(r["section"] in ("prefill", "decode") for r in results):
        lines.append(f"Generation ({dtype})")
        for name in ("bst", "llama"):
            prefill = lookup(results, "prefill", name, args.prefill_length, dtype)
            if prefill is not None:
                lines.append(f"{name:<8} prefill {format_length(args.prefill_length)}: {prefill:.2f} s")
            for context in args.decode_contexts:
                latency = lookup(results, "decode", name, context, dtype)
                nbytes = lookup(results, "decode", name, context, dtype, "cache_bytes")
                if latency is not None:
                    lines.append(
                        f"{name:<8} decode at {format_length(context):>5}: {latency * 1e3:8.1f} ms/token, "
                        f"cache {nbytes / 2**20:9.2f} MiB"
                    )
        lines.append("")
    shares = [r for r in results if r["section"] == "kernel" and "share_of_forward" in r and r["dtype"] == dtype]
    if shares:
        lines.append(f"SSM kernel generation share of the layer forward ({dtype})")
        for record in shares:
            lines.append(
                f"{record['name'].split('/')[0]:<22} {format_length(record['length']):>5}: "
                f"{record['seconds'] * 1e3:8.1f} ms = {record['share_of_forward']:.1%}"
            )
        lines.append("")
    return "\n".join(lines)


def format_targets(targets):
    lines = ["Targets"]
    for item in targets:
        verdict = {True: "MET", False: "NOT MET", None: "not measured"}[item["met"]]
        measured = "-" if item["measured"] is None else f"{item['measured']:.3g}"
        lines.append(f"  [{verdict:>12}] {item['target']}  (measured {measured}, need {item['comparison']} "
                     f"{item['threshold']:g})")
    return "\n".join(lines)


def make_plots(args, results, figures_dir, dtype):
    """Log-log plots of time against length. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if dtype == "float32" else f"_{dtype}"
    written = []

    def series(section, name, field="seconds"):
        points = [(r["length"], r[field]) for r in results
                  if (r["section"], r["name"], r["dtype"]) == (section, name, dtype) and field in r]
        return sorted(points)

    def finish(fig, ax, title, ylabel, filename, xlabel="sequence length (tokens)"):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = figures_dir / filename
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    if any(r["section"] == "layer" for r in results):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in args.layers:
            points = series("layer", name)
            if points:
                style = "-o" if LAYER_SPECS[name][0] == "bst" else "--s"
                ax.plot(*zip(*points), style, label=name)
        finish(fig, ax, f"One layer, forward + backward, batch 1, D={args.hidden_size} ({dtype})",
               "seconds", f"benchmark_layer_time{suffix}.png")

    if any(r["section"] == "model" for r in results):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in ("bst", "llama", "mistral"):
            points = series("model", name)
            if points:
                ax.plot(*zip(*points), "-o", label=name)
        finish(fig, ax, f"{args.num_layers}-layer LM, one training step, batch 1 ({dtype})", "seconds per step",
               f"benchmark_model_step_time{suffix}.png")

    if any(r["section"] == "decode" for r in results):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
        for name in ("bst", "llama"):
            points = series("decode", name)
            if points:
                left.plot(*zip(*points), "-o", label=name)
            points = series("decode", name, "cache_bytes")
            if points:
                right.plot([n for n, _ in points], [b / 2**20 for _, b in points], "-o", label=name)
        for ax, ylabel in ((left, "seconds per decoded token"), (right, "cache MiB")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        left.set_title(f"Decode latency ({dtype})")
        right.set_title("Generation cache size")
        fig.tight_layout()
        path = figures_dir / f"benchmark_decode{suffix}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    if any(r["section"] == "kernel" for r in results):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        bst_names = [n for n in args.layers if LAYER_SPECS[n][0] == "bst"]
        for index, name in enumerate(bst_names):
            for part, style in (("forward", "-o"), ("kernel", "--x")):
                points = series("kernel", f"{name}/{part}")
                if points:
                    ax.plot(*zip(*points), style, color=f"C{index}", label=f"{name} {part}")
        finish(fig, ax, f"SSM kernel generation vs layer forward ({dtype})", "seconds",
               f"benchmark_kernel_share{suffix}.png")
    return written


def count_points(args):
    bst_layers = [n for n in args.layers if LAYER_SPECS[n][0] == "bst"]
    counts = {
        "layer": len(args.layers) * len(args.layer_lengths),
        "model": 3 * len(args.model_lengths),
        "generate": 2 * (1 + len(args.decode_contexts)),
        "kernel": 2 * len(bst_layers) * len(args.layer_lengths),
        "profile": len(args.profile_lengths),
    }
    return sum(counts[s] for s in args.sections) * len(args.dtypes)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    malloc_tuned = False if args.default_malloc else keep_freed_memory_mapped()
    torch.manual_seed(args.seed)
    if any(s != "layer" for s in args.sections) or any(LAYER_SPECS[n][0] == "bst" for n in args.layers):
        import_bst()  # fail now, not after the baselines ran
    started = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "command": "python " + " ".join([Path(sys.argv[0]).name if argv is None else "scripts/benchmark.py"] +
                                        (sys.argv[1:] if argv is None else list(argv))),
        "started_utc": started.isoformat(timespec="seconds"),
        "note": args.note,
        "machine": {**machine_facts(args), "malloc_keeps_freed_memory": malloc_tuned},
        "settings": {
            key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
        },
        "results": [],
        "profile": [],
        "ratios": {},
        "targets": {},
    }
    runners = []
    with tqdm(total=count_points(args), unit="point", dynamic_ncols=True) as progress:
        runner = Runner(args, progress)
        runners.append(runner)
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
