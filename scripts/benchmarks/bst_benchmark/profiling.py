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
    """Profiler ranges `part::<name>` around the forward of the parts of a 1-layer BST (or Llama) model, through hooks
    (the model is not modified). Returns the hook handles."""
    decoder = layer.model.layers[0]
    if hasattr(decoder, "ssm"):
        # A layer without cross-attention (the SSM through the residual branch only) runs self-attention alone.
        attention = "self + cross attention" if decoder.attention.cross_attention else "self-attention"
        parts = {
            "SSM kernel generation": decoder.ssm.kernel_generator,
            "SSM sublayer (kernel + FFT convolution + skip)": decoder.ssm,
            f"attention sublayer (projections, {attention})": decoder.attention,
            "FFN": decoder.mlp,
        }
    else:
        parts = {"attention sublayer": decoder.self_attn, "FFN": decoder.mlp}
    handles = []
    for label, module in parts.items():
        def enter(module, inputs, label=label):
            module._benchmark_range = torch.profiler.record_function(f"part::{label}")
            module._benchmark_range.__enter__()

        def leave(module, inputs, output):
            module._benchmark_range.__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


# Innermost operators that launch no kernel: views, metadata, allocation, no-op casts.
NO_KERNEL_OPERATORS = {
    f"aten::{name}" for name in (
        "as_strided", "as_strided_", "view", "_reshape_alias", "alias", "_unsafe_view", "view_as_real",
        "view_as_complex", "detach", "detach_", "empty", "empty_strided", "empty_like", "resolve_conj", "resolve_neg",
        "result_type", "resize_", "lift_fresh", "to", "expand", "permute", "transpose", "t", "slice", "select",
        "unsqueeze", "squeeze", "reshape", "contiguous", "unflatten", "flatten", "split", "chunk", "narrow",
        "_conj", "conj", "real", "imag", "set_", "_local_scalar_dense", "is_nonzero", "item", "new_empty",
        "new_empty_strided", "mT", "mH", "adjoint", "promote_types", "movedim", "view_as", "expand_as", "unbind",
        "diagonal",
    )
}


def count_operators(events, device):
    """Operator calls of a profiled step, forward and backward apart (by the `step::` range each starts in): every
    aten operator call; the innermost ones (no aten operator below them); the lowest ones that compute or write
    memory (not in NO_KERNEL_OPERATORS, and no such operator below them: on a GPU each is one kernel launch or more,
    so this is the CPU's count of launches), also by name; and on CUDA the kernels launched over the whole step."""
    from torch.autograd import DeviceType

    ranges = {e.name[len("step::"):]: e.time_range for e in events if e.name.startswith("step::")}

    def phase(event):
        return next((name for name, span in ranges.items() if span.start <= event.time_range.start <= span.end), None)

    aten = [e for e in events if e.name.startswith("aten::") and e.device_type == DeviceType.CPU]
    innermost = [e for e in aten if not any(child.name.startswith("aten::") for child in e.cpu_children)]

    def works_below(event):  # an operator below this one computes or writes memory
        return any(child.name.startswith("aten::") and (child.name not in NO_KERNEL_OPERATORS or works_below(child))
                   for child in event.cpu_children)

    # The lowest operators that do work (aten::mm calls aten::resolve_conj, which does none: mm is the one counted).
    working = [e for e in aten if e.name not in NO_KERNEL_OPERATORS and not works_below(e)]
    counts = {"operator_calls": {}, "innermost_operator_calls": {}, "working_operator_calls": {}}
    for key, selected in (("operator_calls", aten), ("innermost_operator_calls", innermost),
                          ("working_operator_calls", working)):
        for part in ("forward", "backward"):
            counts[key][part] = sum(1 for e in selected if phase(e) == part)
    by_name = {}
    for event in working:
        key = (phase(event), event.name)
        by_name[key] = by_name.get(key, 0) + 1
    parts = {e.name[len("part::"):]: e.time_range for e in events if e.name.startswith("part::")}
    counts["working_operator_calls_by_forward_part"] = {
        part: sum(1 for e in working if span.start <= e.time_range.start <= span.end) for part, span in parts.items()
    }
    counts["working_operators_by_calls"] = {
        part: dict(sorted(((name, n) for (p, name), n in by_name.items() if p == part), key=lambda item: -item[1]))
        for part in ("forward", "backward")
    }
    counts["cuda_kernels"] = None
    if device.type == "cuda":
        kernels = sum(1 for e in events if e.device_type == DeviceType.CUDA)
        counts["cuda_kernels"] = kernels or sum(len(e.kernels) for e in aten)
    return counts


def run_profile_section(runner, dtype):
    """torch.profiler on each of --profile-layers, forward + backward: time by part of the layer (forward), by kind of
    operation (forward + backward, self CPU time), and the number of operator calls (`count_operators`)."""
    args = runner.args
    profiles = []
    for name in args.profile_layers:
        profiles += profile_layer(runner, dtype, name)
    return profiles


def profile_layer(runner, dtype, name):
    from torch.profiler import ProfilerActivity, profile, record_function

    args, device = runner.args, runner.device
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
        operators = count_operators(prof.events(), device)
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
            **operators,
        }
        if device.type == "cuda":
            top_device = sorted(ops, key=lambda e: e.self_device_time_total, reverse=True)[:15]
            record["top_ops_by_device_time"] = [
                {"op": e.key, "self_device_seconds": e.self_device_time_total / 1e6, "calls": e.count}
                for e in top_device
            ]
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
    calls, working = record["operator_calls"], record["working_operator_calls"]
    lines.append(f"  operator calls forward / backward: {calls['forward']} / {calls['backward']} "
                 f"(computing or writing memory: {working['forward']} / {working['backward']})"
                 + (f", CUDA kernels {record['cuda_kernels']}" if record["cuda_kernels"] is not None else ""))
    forward = record["forward_seconds"] or float("nan")
    for part, seconds in record["forward_parts_seconds"].items():
        lines.append(f"    {part:<58} {seconds:7.3f} s  {seconds / forward:6.1%}")
    lines.append("  forward + backward, by kind of operation (self CPU time):")
    total = record["total_self_cpu_seconds"]
    for group, seconds in record["op_groups_seconds"].items():
        lines.append(f"    {group:<58} {seconds:7.3f} s  {seconds / total:6.1%}")
    return "\n".join(lines)
