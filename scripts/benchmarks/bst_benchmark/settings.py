"""What the benchmark measures and at which sizes: sections, layers, command-line flags and their checks."""

import argparse
import os
import sys
from pathlib import Path

import torch


# The benchmark runs from a source checkout; reports and figures go to the repository's docs/ by default.
REPO_ROOT = Path(__file__).resolve().parents[3]  # scripts/benchmarks/bst_benchmark/settings.py
DESCRIPTION = "Speed and memory benchmark of the Block-State Transformer against attention baselines."

SECTIONS = ("layer", "model", "generate", "kernel", "profile")
DEFAULT_SECTIONS = ("layer", "model", "generate", "kernel")

# Layers of the layer-level section: name -> (kind, options). BST layers are 1-layer BST models.
LAYER_SPECS = {
    "bst-sh-s4": ("bst", {"bst_variant": "sh", "ssm_kernel": "s4"}),
    "bst-mh-s4": ("bst", {"bst_variant": "mh", "ssm_kernel": "s4"}),
    "bst-mf-s4": ("bst", {"bst_variant": "mf", "ssm_kernel": "s4"}),
    "bst-sh-unstructured": ("bst", {"bst_variant": "sh", "ssm_kernel": "unstructured"}),
    # The SSM through the residual branch only, attention over the last W tokens (docs/quality.md's best from
    # scratch): measured when named, not by default, so that the CPU benchmark's runs keep their shapes and time.
    "bst-sh-s4-residual-swa": ("bst", {"bst_variant": "sh", "ssm_kernel": "s4", "ssm_residual": True,
                                       "ssm_cross_attention": False, "attend_previous_block": True,
                                       "sliding_window_attention": True}),
    "full-attention": ("attention", {"window": None}),
    "sliding-window": ("attention", {"window": "block"}),
    "block-recurrent": ("block_recurrent", {}),
}
BASELINE_LAYERS = ("full-attention", "sliding-window", "block-recurrent")
DEFAULT_LAYERS = tuple(name for name in LAYER_SPECS if name != "bst-sh-s4-residual-swa")
# `profile` also takes a Transformers Llama layer (SDPA), the layer BST's training speed is compared with.
PROFILE_LAYERS = (*LAYER_SPECS, "llama")

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
    variant_lengths=[64, 256],
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
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(DEFAULT_SECTIONS),
        help="what to measure (see the module docstring); `profile` runs torch.profiler on --profile-layers",
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
        "--layers", nargs="+", choices=list(LAYER_SPECS), default=list(DEFAULT_LAYERS), help="layers of `layer`"
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
    parser.add_argument(
        "--decode-tokens",
        type=int,
        default=24,
        help="decode steps timed at each context; also the new tokens of each timed generate() call",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="`generate` also times compiled decoding, BST and Llama alike, as Transformers users do it: generate() "
        "on a static cache with CompileConfig(fullgraph=True, dynamic=False) (CPU: inductor's C++ wrapper; CUDA: "
        "reduce-overhead); per token, the compiled steps only, compile time recorded apart",
    )
    parser.add_argument(
        "--profile-lengths", nargs="+", type=parse_length, default=[4096, 16384], help="lengths of `profile`"
    )
    parser.add_argument(
        "--profile-layers", nargs="+", choices=PROFILE_LAYERS, default=["bst-sh-s4"], help="layers of `profile`"
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
    # The speed targets are evaluated at these lengths.
    parser.add_argument("--target-length", type=parse_length, default=16384, help="layer and kernel-share targets")
    parser.add_argument(
        "--variant-lengths",
        nargs="+",
        type=parse_length,
        default=[4096, 16384],
        help="lengths at which the MF and MH layers are held to their cost targets against SH",
    )
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


def check_device(name: str) -> torch.device:
    """--device as a torch device that exists here, or an error naming the problem."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise SystemExit(f"--device {name!r} is not a torch device: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} was asked for, but torch sees no CUDA GPU.")
    return device


def check_args(args):
    """Fail on bad input, naming the problem, before any heavy work starts."""
    check_device(args.device)
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
        print("note: bfloat16 on CPU runs under CPU autocast; its targets are set on GPU only.", file=sys.stderr)
