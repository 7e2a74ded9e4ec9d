#!/usr/bin/env python
"""The SSM's FFT convolution in fp32, fp16 and bf16: its error against float64 and its time, per length.

BST's SSM computes its FFTs in fp32 whatever the model's dtype (`ssm_ops.ssm_compute_dtype`). A half-precision FFT
would halve the convolution's memory traffic on a GPU, if it keeps what the SSM is for. This measures that before
anything is chosen:

- kernels: S4D filters (`BSTS4DKernel`, computed in float64) of D channels at two sets of time scales, the model's
  default step sizes and the long ones upcycling uses (`--ssm_dt_min 5e-4 --ssm_dt_max 8e-3`, ~250-4,000 tokens);
  inputs N(0, 1), as RMS-normed hidden states are; batch = --tokens-per-step // length (at least 1).
- reference: the causal convolution in float64; candidate: the same FFT convolution (zero padding to a power of two
  >= 2L, rfft, product, irfft) with operands and FFTs in the dtype; fp32 is what the model computes today.
- errors, relative L2: of the whole output, and of its far part (the output of the taps >= 2W alone, what the
  SSM brings from beyond the attention window), each against float64. The floor to compare with is the bf16
  rounding of the reference output (`output_rounding_error`): under bf16 autocast the context states enter bf16
  matmuls anyway, so an FFT error below it costs nothing there.
- time: the candidate convolution's forward (median of --repeats, after the error measurement's calls), on the
  device.

A dtype torch's FFT does not support on the device (half on CPU; bf16 in many builds; fp16 needs power-of-two sizes,
which these are) is recorded with torch's error. GPU run: part of `scripts/benchmarks/gpu_checks.sh ... train`:

    python scripts/benchmarks/fft_precision.py --device cuda --output OUT/fft_precision_gpu.json \
        --figure OUT/figures/fft_precision.png

Quick run (CPU, seconds; tests/test_benchmark.py): `--quick`.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bst_benchmark.baselines import import_bst
from bst_benchmark.measurement import synchronize
from bst_benchmark.report import report_header
from bst_benchmark.settings import check_device, format_length, parse_length


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# (ssm_dt_min, ssm_dt_max) of each kernel set; None: the config's defaults.
TIME_SCALES = {"default": None, "long": (5e-4, 8e-3)}
QUICK_DEFAULTS = dict(lengths=[256, 1024], channels=16, state_size=8, block_size=32, tokens_per_step=1024, repeats=2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes on CPU, seconds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", nargs="+", type=parse_length, default=[4096, 16384, 65536])
    parser.add_argument("--channels", type=int, default=1024, help="D, the model width")
    parser.add_argument("--state-size", type=int, default=64, help="N of the S4D filters")
    parser.add_argument("--block-size", type=int, default=512, help="W: the far part is the taps >= 2W")
    parser.add_argument("--tokens-per-step", type=int, default=32768, help="batch = this // length (at least 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, required=True, help="JSON report")
    parser.add_argument("--figure", type=Path, default=None, help="PNG: error against length per dtype")
    parser.add_argument("--note", default="")
    if parser.parse_args(argv).quick:
        parser.set_defaults(**QUICK_DEFAULTS)  # defaults only: flags given explicitly still win
    args = parser.parse_args(argv)
    check_device(args.device)
    if min(args.lengths) <= 2 * args.block_size:
        raise SystemExit(f"every length must exceed 2W = {2 * args.block_size} (the far part would be empty)")
    return args


def s4d_kernels(args, time_scales, length, device):
    """(D, length) float64 taps of D S4D filters at the given (dt_min, dt_max), skip term included at tap 0."""
    from modeling_bst.modeling_bst import BSTS4DKernel

    fields = {} if time_scales is None else dict(ssm_dt_min=time_scales[0], ssm_dt_max=time_scales[1])
    config = import_bst().BSTConfig(hidden_size=args.channels, ssm_state_size=args.state_size, **fields)
    generator = BSTS4DKernel(config, args.channels)
    generator.reset_parameters()
    with torch.no_grad():
        return generator.to(device=device, dtype=torch.float64)(length)


def fft_convolution(inputs, kernel, dtype):
    """y[b, d, t] = sum_{s <= t} kernel[d, t - s] inputs[b, d, s], with operands and FFTs in `dtype`.

    The 1/n of the inverse is split as 1/sqrt(n) on each side of the inputs' transform ("ortho"), so that no
    transform's values grow with n (the unnormalised inverse of a 64k convolution would reach ~1e5 and overflow fp16's
    65,504); in fp32 and float64 this is the model's convolution up to rounding."""
    length = inputs.shape[-1]
    fft_size = 1 << (2 * length - 1).bit_length()
    inputs_f = torch.fft.rfft(inputs.to(dtype), n=fft_size, norm="ortho")
    kernel_f = torch.fft.rfft(kernel.to(dtype), n=fft_size)  # sum of the taps: O(1) for a decaying filter
    return torch.fft.irfft(inputs_f * kernel_f, n=fft_size, norm="ortho")[..., :length]


def relative_error(candidate, reference):
    return ((candidate.double() - reference).norm() / reference.norm()).item()


def measure(args, device):
    results = []
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    for length in args.lengths:
        batch = max(1, args.tokens_per_step // length)
        inputs = torch.randn(batch, args.channels, length, generator=generator, dtype=torch.float64).to(device)
        for scales_name, time_scales in TIME_SCALES.items():
            torch.manual_seed(args.seed)
            kernel = s4d_kernels(args, time_scales, length, device)
            far_kernel = kernel.clone()
            far_kernel[:, : 2 * args.block_size] = 0
            reference = fft_convolution(inputs, kernel, torch.float64)
            far_reference = fft_convolution(inputs, far_kernel, torch.float64)
            record = {"length": length, "batch": batch, "kernels": scales_name,
                      "far_share_of_output": (far_reference.norm() / reference.norm()).item(),
                      "output_rounding_error": relative_error(reference.to(torch.bfloat16), reference), "dtypes": {}}
            for name, dtype in DTYPES.items():
                try:
                    output = fft_convolution(inputs, kernel, dtype)
                    far_output = fft_convolution(inputs, far_kernel, dtype)
                except RuntimeError as error:
                    record["dtypes"][name] = {"unsupported": str(error).split("\n")[0]}
                    continue
                times = []  # the calls above made the FFT plans: no warm-up call needed
                for _ in range(args.repeats):
                    synchronize(device)
                    start = time.perf_counter()
                    fft_convolution(inputs, kernel, dtype)
                    synchronize(device)
                    times.append(time.perf_counter() - start)
                record["dtypes"][name] = {
                    "relative_error": relative_error(output, reference),
                    "far_relative_error": relative_error(far_output, far_reference),
                    "finite": bool(torch.isfinite(output).all()),
                    "seconds": statistics.median(times),
                }
            results.append(record)
            print(format_record(record))
            del kernel, far_kernel, reference, far_reference
    return results


def format_record(record):
    line = (f"{format_length(record['length']):>5} {record['kernels']:<8} bf16 output rounding "
            f"{record['output_rounding_error']:.1e}, far share {record['far_share_of_output']:.2f}:")
    for name, cell in record["dtypes"].items():
        if "unsupported" in cell:
            line += f"  {name} unsupported"
        else:
            line += (f"  {name} {cell['relative_error']:.1e} (far {cell['far_relative_error']:.1e}, "
                     f"{cell['seconds'] * 1e3:.2f} ms)")
    return line


def plot(results, path, hardware):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(TIME_SCALES), figsize=(6 * len(TIME_SCALES), 4), squeeze=False)
    for axis, scales_name in zip(axes[0], TIME_SCALES):
        rows = [r for r in results if r["kernels"] == scales_name]
        lengths = [r["length"] for r in rows]
        axis.plot(lengths, [r["output_rounding_error"] for r in rows], "k--", label="bf16 rounding of the output")
        for name in DTYPES:
            cells = [r["dtypes"][name] for r in rows]
            if any("unsupported" in cell for cell in cells):
                continue
            line, = axis.plot(lengths, [c["relative_error"] for c in cells], "-o", label=f"{name} FFT")
            axis.plot(lengths, [c["far_relative_error"] for c in cells], ":", color=line.get_color(),
                      label=f"{name} FFT, far part (taps >= 2W)")
        axis.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="relative L2 error vs float64",
                 title=f"{scales_name} time scales")
        axis.legend(fontsize=7)
    figure.suptitle(f"The SSM's FFT convolution in reduced precision ({hardware})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    header = report_header("scripts/benchmarks/fft_precision.py", args, argv)
    hardware = header["hardware"]
    report = {
        **header,
        "results": measure(args, device),
    }
    if args.figure is not None:
        report["figure"] = str(plot(report["results"], args.figure, hardware))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output} ({hardware})")
    return report


if __name__ == "__main__":
    main()
