"""Ratios, targets, machine facts and the text report."""

import datetime
import os
import platform
import sys
from pathlib import Path

import torch

from .settings import BASELINE_LAYERS, LAYER_SPECS, format_length


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
    ratios = {"layer": [], "variants": [], "model": [], "prefill": [], "decode": [], "decode_generate": []}
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
    for name in ("bst-mh-s4", "bst-mf-s4"):
        for length in args.layer_lengths:
            ratio = safe_ratio(
                lookup(results, "layer", name, length, dtype), lookup(results, "layer", "bst-sh-s4", length, dtype)
            )
            if ratio is not None:
                ratios["variants"].append({"variant": name, "baseline": "bst-sh-s4", "length": length,
                                           "time_ratio": ratio})
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
        speedup = safe_ratio(
            lookup(results, "decode_generate", "llama", context, dtype),
            lookup(results, "decode_generate", "bst", context, dtype),
        )
        if speedup is not None:
            ratios["decode_generate"].append({"baseline": "llama", "length": context, "latency_speedup": speedup})
        compiled = compiled_decode_ratios(results, context, dtype)
        if compiled is not None:
            ratios.setdefault("decode_compiled", []).append(compiled)
    return ratios


def compiled_decode_ratios(results, context, dtype):
    """BST's compiled generate() decode against Llama eager (the target) and against Llama compiled the same
    way (the like-for-like ratio), and against BST eager; None when BST's compiled decode was not measured."""
    bst = lookup(results, "decode_compiled", "bst", context, dtype)
    if bst is None:
        return None
    return {
        "length": context,
        "speedup_vs_llama_eager": safe_ratio(lookup(results, "decode_generate", "llama", context, dtype), bst),
        "speedup_vs_llama_compiled": safe_ratio(lookup(results, "decode_compiled", "llama", context, dtype), bst),
        "speedup_vs_bst_eager": safe_ratio(lookup(results, "decode_generate", "bst", context, dtype), bst),
    }


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
    """The speed targets, at the lengths given by --target-length, --scaling-lengths, --model-lengths, ..."""
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
    return targets + variant_and_decoding_targets(args, results, dtype)


def variant_and_decoding_targets(args, results, dtype):
    """The MF and MH layers at SH cost, prefill against Llama, decode through generate() against Llama."""
    first_ctx, last_ctx = args.decode_contexts[0], args.decode_contexts[-1]

    def seconds(section, name, at, field="seconds"):
        return lookup(results, section, name, at, dtype, field)

    def constant_cache(section, what):
        ratio = safe_ratio(
            seconds(section, "bst", last_ctx, "cache_bytes"), seconds(section, "bst", first_ctx, "cache_bytes")
        )
        description = f"{what} constant from {format_length(first_ctx)} to {format_length(last_ctx)}"
        return target(description, ratio, 1.0, "<=", "BST's cache does not grow with the context")

    targets = []
    for length in args.variant_lengths:
        for name, limit in (("bst-mf-s4", 2.0), ("bst-mh-s4", 1.3)):
            targets.append(target(
                f"{name} layer at {format_length(length)}: time <= {limit:g}x bst-sh-s4",
                safe_ratio(seconds("layer", name, length), seconds("layer", "bst-sh-s4", length)),
                limit,
                "<=",
                "ratio of forward+backward times",
            ))
    targets += [
        target(
            f"Prefill of {format_length(args.prefill_length)} tokens at d {args.hidden_size}: >= 2x faster than Llama",
            safe_ratio(
                seconds("prefill", "llama", args.prefill_length), seconds("prefill", "bst", args.prefill_length)
            ),
            2.0,
            ">=",
            "the target is set at 8k tokens and d 256 (--prefill-length 8k --hidden-size 256)",
        ),
        target(
            f"generate() per-token decode at {format_length(first_ctx)} context: >= 1.0x Llama's speed",
            safe_ratio(seconds("decode_generate", "llama", first_ctx), seconds("decode_generate", "bst", first_ctx)),
            1.0,
            ">=",
            "greedy, min_new_tokens = max_new_tokens",
        ),
        target(
            f"generate() per-token decode at {format_length(last_ctx)} context: >= 3x Llama's speed",
            safe_ratio(seconds("decode_generate", "llama", last_ctx), seconds("decode_generate", "bst", last_ctx)),
            3.0,
            ">=",
            "greedy, min_new_tokens = max_new_tokens",
        ),
        constant_cache("decode_generate", "BST cache bytes after generate()"),
    ]
    if args.compile:
        targets += [
            target(
                f"Compiled generate() decode at {format_length(first_ctx)} context: >= 1.5x Llama eager",
                safe_ratio(
                    seconds("decode_generate", "llama", first_ctx), seconds("decode_compiled", "bst", first_ctx)
                ),
                1.5,
                ">=",
                "BST generate() with a static cache and CompileConfig(fullgraph=True, dynamic=False) against Llama's "
                "eager generate(); against Llama compiled the same way: ratios['decode_compiled']",
            ),
            constant_cache("decode_compiled", "BST static cache bytes of compiled generate()"),
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


def report_header(script: str, args, argv=None, **machine_extra) -> dict:
    """What every benchmark report opens with: the command as run (`script` and its arguments), when it started, the
    note, the hardware its figures name (the GPU, else the CPU), the machine's facts and the settings."""
    machine = {**machine_facts(args), **machine_extra}
    return {
        "command": "python " + " ".join([script, *(sys.argv[1:] if argv is None else argv)]),
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "note": args.note,
        "hardware": machine.get("gpu") or machine["cpu"],
        "machine": machine,
        "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
    }


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
    if any(r["section"] in ("prefill", "decode", "decode_generate") for r in results):
        lines.append(f"Generation ({dtype})")
        for name in ("bst", "llama"):
            prefill = lookup(results, "prefill", name, args.prefill_length, dtype)
            if prefill is not None:
                lines.append(f"{name:<8} prefill {format_length(args.prefill_length)}: {prefill:.2f} s")
            for section in ("decode", "decode_generate", "decode_compiled"):
                for context in args.decode_contexts:
                    latency = lookup(results, section, name, context, dtype)
                    nbytes = lookup(results, section, name, context, dtype, "cache_bytes")
                    reason = lookup(results, section, name, context, dtype, "skipped")
                    if reason:
                        lines.append(f"{name:<8} {section:<16} at {format_length(context):>5}: skipped: {reason}")
                    if latency is None:
                        continue
                    line = (f"{name:<8} {section:<16} at {format_length(context):>5}: {latency * 1e3:8.1f} ms/token, "
                            f"cache {nbytes / 2**20:9.2f} MiB")
                    compile_seconds = lookup(results, section, name, context, dtype, "compile_seconds")
                    if compile_seconds is not None:
                        line += f", compile {compile_seconds:.0f} s"
                    lines.append(line)
        for context in args.decode_contexts:
            ratios = compiled_decode_ratios(results, context, dtype)
            if ratios is not None:
                cells = [f"{ratios[key]:.2f}x" if ratios[key] is not None else "-" for key in
                         ("speedup_vs_llama_eager", "speedup_vs_llama_compiled", "speedup_vs_bst_eager")]
                lines.append(f"BST compiled decode speedup at {format_length(context):>5}: {cells[0]} vs Llama eager, "
                             f"{cells[1]} vs Llama compiled, {cells[2]} vs BST eager")
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
