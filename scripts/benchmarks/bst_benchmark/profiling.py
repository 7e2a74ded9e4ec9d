"""The `profile` section: torch.profiler on a BST layer, time by part of the layer and by kind of operation."""

import time

import torch

from .baselines import build_layer
from .measurement import autocast_context
from .settings import format_length


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
