"""The PNG plots of the report."""

from .settings import LAYER_SPECS
from .training import MODEL_ORDER


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
        for index, name in enumerate(("bst", "llama")):
            for section, style, label in (("decode", "-o", name), ("decode_generate", "--s", f"{name}, generate()"),
                                          ("decode_compiled", ":^", f"{name}, compiled generate(), static cache")):
                points = series(section, name)
                if points:
                    left.plot(*zip(*points), style, color=f"C{index}", label=label)
            for section, style, label in (("decode", "-o", name), ("decode_compiled", ":^", f"{name}, static")):
                points = series(section, name, "cache_bytes")
                if points:
                    right.plot([n for n, _ in points], [b / 2**20 for _, b in points], style, color=f"C{index}",
                               label=label)
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


def make_training_plots(results, shapes, figures_dir, hardware, tokens_per_step):
    """Per shape: training tokens/s and peak memory against the length, eager solid, compiled dashed; the title names
    the hardware. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for shape in shapes:
        rows = [r for r in results if r["shape"] == shape and "skipped" not in r]
        if not rows:
            continue
        fig, (speed, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
        names = [n for n in MODEL_ORDER if any(r["name"] == n for r in rows)]
        for index, name in enumerate(names):
            for mode, style in (("eager", "-o"), ("compiled", "--s")):
                points = sorted((r["length"], r["tokens_per_second"], r["peak_memory_bytes"]) for r in rows
                                if (r["name"], r["mode"]) == (name, mode))
                if not points:
                    continue
                lengths = [p[0] for p in points]
                speed.plot(lengths, [p[1] for p in points], style, color=f"C{index}", label=f"{name} {mode}")
                if all(p[2] is not None for p in points):
                    memory.plot(lengths, [p[2] / 2**30 for p in points], style, color=f"C{index}",
                                label=f"{name} {mode}")
        for ax, ylabel in ((speed, "training tokens/s (fwd + bwd + AdamW)"), (memory, "peak memory (GiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length (tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not measured on this device", ha="center", transform=ax.transAxes)
        speed.set_title(f"{shape}: bf16 autocast, >= {tokens_per_step} tokens/step")
        memory.set_title(f"on {hardware}")
        fig.tight_layout()
        path = figures_dir / f"benchmark_train_{shape}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
