"""The training benchmark of scripts/benchmarks/train_benchmark.py: model shapes, the models compared, the timed
training step (eager and compiled), the time budget, ratios and targets."""

import functools
import json
import statistics
import time

import torch

from .baselines import count_parameters, import_bst
from .measurement import is_out_of_memory, synchronize
from .settings import REPO_ROOT, format_length


# "bst-residual": the SSM through the residual branch only, no cross-attention (`ssm_cross_attention=False`), the
# configuration docs/quality.md found best from scratch; on `base` it is configuration/
# bst-sh-s4-modern-scaled-residual-swa.json (gated MLP, Mistral's window of W tokens).
BST_MODELS = ("bst-sh", "bst-mh", "bst-mf", "bst-residual")
BASELINE_MODELS = ("llama", "mistral")
# Within a group the members run in this order, so that a budget running out drops the least needed ones.
MODEL_ORDER = ("bst-sh", "llama", "mistral", "bst-residual", "bst-mh", "bst-mf")
RESIDUAL_PRESET = REPO_ROOT / "configuration" / "bst-sh-s4-modern-scaled-residual-swa.json"

# The upcycled SmolLM2-135M (scripts/convert_to_bst.py with --block_size 1024, previous block and 4 attention sinks),
# with an SSM in layers 10 and 20 as in docs/upcycling.md's recipe.
SMOLLM2_BST = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    block_size=1024,
    gated_mlp=True,
    hidden_act="silu",
    rope_pairing="rotate_half",
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    attend_previous_block=True,
    num_sink_tokens=4,
    tie_word_embeddings=True,
    ssm_kernel="s4",
    ssm_state_size=64,
    bst_layers=[10, 20],
)

# Tiny stand-ins of the two shapes for --quick (CPU, seconds): every code path, numbers that mean nothing.
QUICK_SHAPES = {
    "base": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 block_size=16, ssm_state_size=8, bst_layers=[1], mf_context_states=4),
    "smollm2": dict(SMOLLM2_BST, vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=3, num_key_value_heads=1, head_dim=16, block_size=32, ssm_state_size=8,
                    bst_layers=[1], mf_context_states=4),
}
SHAPES = ("base", "smollm2")


SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "block_size", "ssm_state_size", "ssm_kernel", "bst_layers")


def read_preset(path):
    return {key: value for key, value in json.loads(path.read_text()).items()
            if key not in ("model_type", "architectures")}


def shape_fields(shape, quick):
    """The BST fields shared by the three variants of `shape`: the configuration/bst-*-s4-base.json presets (they
    differ only in the variant), or the upcycled SmolLM2."""
    if quick:
        return dict(QUICK_SHAPES[shape])
    if shape == "base":
        preset = read_preset(REPO_ROOT / "configuration" / "bst-sh-s4-base.json")
        return {key: preset[key] for key in SHAPE_KEYS}
    return dict(SMOLLM2_BST)


def residual_fields(shape, quick):
    """What "bst-residual" changes in `shape`'s BST-SH: on `base` the residual-only preset's fields (the same shape,
    its own FFN width; in --quick its options on the tiny shape), on `smollm2` the upcycled recipe with the SSM
    through the residual branch and a 4-tap convolution instead of cross-attention (docs/upcycling.md)."""
    if shape == "smollm2":
        return dict(bst_variant="sh", ssm_residual=True, ssm_cross_attention=False, ssm_conv_size=4)
    preset = read_preset(RESIDUAL_PRESET)
    if quick:
        return {key: value for key, value in preset.items() if key not in SHAPE_KEYS}
    return preset


def bst_training_config(shape, name, quick, max_length):
    """BSTConfig of model `name` (one of BST_MODELS) at `shape` ("bst-mf": the preset's 32 filters, 4 in --quick)."""
    fields = shape_fields(shape, quick)
    context_states = fields.pop("mf_context_states", 32)
    if name == "bst-mf":
        fields["num_context_states"] = context_states
    if name == "bst-residual":
        fields.update(residual_fields(shape, quick))
    fields.setdefault("bst_variant", name.split("-")[1])
    return import_bst().BSTConfig(max_position_embeddings=max(max_length, 2**20), **fields)


def baseline_configs(shape, bst_config, quick, max_length, attention="sdpa"):
    """Llama and Mistral (sliding window = W) of the BST model's width, depth, heads, vocabulary, activation and RoPE
    base, with `attention` (Transformers' attn_implementation); their SwiGLU FFN width is solved (to a multiple of
    64, 8 in --quick) so that their parameter count matches the BST-SH model's. Returns ({name: config}, the BST-SH
    parameter count)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig

    with torch.device("meta"):
        bst_parameters = count_parameters(import_bst().BSTForCausalLM(bst_config))
    common = dict(
        vocab_size=bst_config.vocab_size,
        hidden_size=bst_config.hidden_size,
        num_hidden_layers=bst_config.num_hidden_layers,
        num_attention_heads=bst_config.num_attention_heads,
        num_key_value_heads=bst_config.num_key_value_heads or bst_config.num_attention_heads,
        head_dim=bst_config.hidden_size // bst_config.num_attention_heads,
        rope_parameters={"rope_type": "default", "rope_theta": getattr(bst_config, "rope_theta", 10000.0)},
        rms_norm_eps=bst_config.rms_norm_eps,
        max_position_embeddings=max_length,
        tie_word_embeddings=bst_config.tie_word_embeddings,
        attn_implementation=attention,
    )

    def parameters(ffn_width):
        with torch.device("meta"):
            return count_parameters(LlamaForCausalLM(LlamaConfig(**common, intermediate_size=ffn_width)))

    step = 8 if quick else 64
    per_unit = parameters(2 * step) - parameters(step)  # parameters are linear in the FFN width
    width = max(step, round((bst_parameters - parameters(step)) / per_unit) * step + step)
    configs = {
        "llama": LlamaConfig(**common, intermediate_size=width),
        "mistral": MistralConfig(**common, intermediate_size=width, sliding_window=bst_config.block_size),
    }
    return configs, bst_parameters


def build_training_models(shape, args):
    """{name: (model, optimizer)} of `shape`, on the device, in training mode, fp32 weights (bf16 comes from autocast,
    as `Trainer(bf16=True)` runs it), each with AdamW as the Trainer's default optimizer (fused on CUDA)."""
    from transformers import LlamaForCausalLM, MistralForCausalLM

    max_length = max(args.lengths)
    configs = {name: bst_training_config(shape, name, args.quick, max_length) for name in BST_MODELS}
    baselines, _ = baseline_configs(shape, configs["bst-sh"], args.quick, max_length, args.baseline_attention)
    configs.update(baselines)
    classes = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM}
    models = {}
    for name in [n for n in MODEL_ORDER if n in args.models]:
        torch.manual_seed(args.seed)
        # Initialised on the device (much faster than on the host for 100M+ parameters); `.to` moves anything a
        # constructor placed elsewhere explicitly.
        with torch.device(args.device):
            model = classes.get(name, import_bst().BSTForCausalLM)(configs[name])
        model = model.to(args.device).train()
        fused = torch.device(args.device).type == "cuda"
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused))
    return models


def describe_model(model):
    config = model.config
    facts = {
        "parameters": count_parameters(model),
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "intermediate_size": config.intermediate_size,
        "num_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
    }
    if config.model_type == "bst":
        facts.update(bst_layers=list(config.bst_layers), block_size=config.block_size,
                     num_context_states=config.num_context_states)
    if getattr(config, "sliding_window", None):
        facts["sliding_window"] = config.sliding_window
    return facts


def persistent_bytes(model, optimizer):
    """Bytes a training process holds between steps for this model: weights and the optimizer's state."""
    tensors = list(model.parameters())
    tensors += [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    return sum(t.numel() * t.element_size() for t in tensors)


def train_step(model, optimizer, input_ids, device):
    """One step as `Trainer(bf16=True)` takes it: forward and loss under bf16 autocast, backward, AdamW."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()


def compile_counters():
    """(graphs compiled, graph breaks) so far in this process, from torch._dynamo's counters."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def allow_recompiles():
    """Each (model, length) is its own compiled graph (dynamic=False), and the BST variants share forward code
    objects: raise torch._dynamo's per-code-object limit so that none of them falls back to eager silently."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 256))


class StepMemory:
    """Peak memory of one training step of one model, as a process holding only that model would see it: the CUDA
    allocator's peak during the step above what was allocated before it, plus the model's weights and optimizer state.
    On CPU: not measured (None); the resident set there mixes the allocator's caching with the step."""

    def __init__(self, device, model, optimizer):
        self.device, self.model, self.optimizer = device, model, optimizer
        self.peak_bytes = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            extra = torch.cuda.max_memory_allocated(self.device) - self.start
            self.peak_bytes = extra + persistent_bytes(self.model, self.optimizer)
        return False


def free_device_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


class TrainingRunner:
    """Times training steps of a group of models at one (shape, length, mode), round-robin, within a time budget.

    Each member gets `--warmup` untimed steps (with `compiled`, the first one compiles the forward and backward: its
    wall time less the median step is `compile_seconds`), then up to `--repeats` timed steps, fewer when they would
    exceed `--seconds-per-point`. A member whose first warm-up step runs out of memory is retried once with gradient
    checkpointing (recorded); a second failure, or a compilation error, is recorded as skipped. A member that would
    not finish before its deadline (estimated from its step time at the previous length, and the compile time seen
    so far) is skipped with the estimate as the reason. `save()` is called after every group, so that the JSON is
    on disk whenever the process is stopped.
    """

    def __init__(self, args, save, progress):
        self.args, self.save, self.progress = args, save, progress
        self.device = torch.device(args.device)
        self.results = []
        self.started = time.perf_counter()
        self.step_seconds = {}  # (shape, name, mode) -> [(length, tokens per step, median seconds)]
        self.compile_seconds = []

    def remaining(self, deadline):
        return deadline - (time.perf_counter() - self.started)

    def estimate_seconds(self, shape, name, mode, length, tokens):
        """The wall time of a member's warm-up and timed steps at `length`, from its step time at the previous
        length: linear in the tokens and, for the attention-bound part, in the length (an overestimate for BST and
        windowed attention), or for a compiled member's first point its eager step at the same length; plus, when
        compiled, the longest compile seen so far (`--compile-estimate-seconds` before the first). None for an eager
        member's first length."""
        compile_seconds = max(self.compile_seconds, default=self.args.compile_estimate_seconds)
        # A compiled member's first point: its eager step at this length stands in for the compiled one.
        previous = self.step_seconds.get((shape, name, mode)) or [
            point for point in self.step_seconds.get((shape, name, "eager"), []) if point[0] == length]
        if not previous:
            return None if mode == "eager" else compile_seconds
        known_length, known_tokens, seconds = previous[-1]
        step = seconds * (tokens / known_tokens) * max(1.0, length / known_length)
        steps = self.args.warmup + min(self.args.repeats, max(1, int(self.args.seconds_per_point / step)))
        return steps * step + (compile_seconds if mode == "compiled" else 0.0)

    def run_group(self, shape, length, mode, models, deadline):
        args, device = self.args, self.device
        batch = max(1, args.tokens_per_step // length)
        tokens = batch * length
        torch.manual_seed(args.seed)
        input_ids = torch.randint(models[next(iter(models))][0].config.vocab_size, (batch, length), device=device)
        members, records = {}, {}
        timed_seconds = 0.0  # the estimated timed steps of the members warmed up so far, still to run
        for name, (model, optimizer) in models.items():
            record = {"shape": shape, "name": name, "mode": mode, "length": length, "batch_size": batch,
                      "tokens_per_step": tokens, "gradient_checkpointing": False, **describe_model(model)}
            records[name] = record
            # Decided just before the member's warm-up (its compile): what the members before it took is known.
            estimate = self.estimate_seconds(shape, name, mode, length, tokens)
            left = self.remaining(deadline) - timed_seconds
            if left <= 0 or (estimate is not None and estimate > left):
                record["skipped"] = (f"time budget: {max(left, 0):.0f} s left, estimated {estimate:.0f} s"
                                     if estimate is not None else "time budget: none left")
                continue
            runnable = torch.compile(model, dynamic=False, backend=args.compile_backend) if mode == "compiled" else model
            members[name] = {"call": functools.partial(train_step, runnable, optimizer, input_ids, device),
                             "model": model, "optimizer": optimizer, "times": [], "peaks": []}
            self.warm_up(name, members, record, length)
            if name in members:
                timed_seconds += min(args.seconds_per_point, args.repeats * members[name]["last_warmup_seconds"])
        while members:
            for name in list(members):
                self.timed_step(name, members, records[name], tokens)
        for name, (model, _) in models.items():
            if records[name]["gradient_checkpointing"]:
                model.gradient_checkpointing_disable()
        for name in models:
            self.finish(records[name])
        del input_ids
        free_device_memory(device)
        self.save()

    def skip_without_building(self, shape, mode, lengths, names):
        """Records the points of a shape and mode as skipped when no time is left to build its models."""
        for length in lengths:
            for name in names:
                self.finish({"shape": shape, "name": name, "mode": mode, "length": length,
                             "gradient_checkpointing": False, "skipped": "time budget: none left"})
        self.save()

    def warm_up(self, name, members, record, length):
        member, device = members[name], self.device
        self.progress.set_description(f"{record['shape']} {name} {format_length(length)} {record['mode']} warm-up")
        graphs_before, breaks_before = compile_counters()
        for attempt in ("plain", "checkpointed"):
            if attempt == "checkpointed":
                free_device_memory(device)  # what the failed attempt held (its traceback is gone by now)
            try:
                for index in range(self.args.warmup):
                    start = time.perf_counter()
                    member["call"]()
                    synchronize(device)
                    member["last_warmup_seconds"] = time.perf_counter() - start
                    if index == 0:
                        first_step = member["last_warmup_seconds"]
                break
            except Exception as error:  # out of memory gets one retry; compile errors are results to record
                member["model"].zero_grad(set_to_none=True)
                text = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                if attempt == "plain" and is_out_of_memory(error) and member["model"].supports_gradient_checkpointing:
                    member["model"].gradient_checkpointing_enable()
                    record.update(gradient_checkpointing=True, without_checkpointing=text)
                    continue
                record["skipped"] = text
                del members[name]
                break
        if name not in members:
            free_device_memory(device)
            return
        if record["mode"] == "compiled":
            graphs_after, breaks_after = compile_counters()
            record.update(first_step_seconds=first_step, graphs_compiled=graphs_after - graphs_before,
                          graph_breaks=breaks_after - breaks_before, compile_backend=self.args.compile_backend)

    def timed_step(self, name, members, record, tokens):
        member, device = members[name], self.device
        self.progress.set_description(f"{record['shape']} {name} {format_length(record['length'])} {record['mode']} "
                                      f"step {len(member['times']) + 1}")
        # Last step's gradients go before the step starts, so that the allocator's peak is the step's own.
        member["optimizer"].zero_grad(set_to_none=True)
        try:
            with StepMemory(device, member["model"], member["optimizer"]) as memory:
                synchronize(device)
                start = time.perf_counter()
                member["call"]()
                synchronize(device)
                member["times"].append(time.perf_counter() - start)
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            member["model"].zero_grad(set_to_none=True)
            free_device_memory(device)
            record["skipped"] = f"out of memory: {str(error).splitlines()[0]}"
            del members[name]
            return
        member["peaks"].append(memory.peak_bytes)
        times = member["times"]
        spent = sum(times)
        if len(times) < self.args.repeats and spent + spent / len(times) <= self.args.seconds_per_point:
            return
        median = statistics.median(times)
        record.update(seconds=median, min_seconds=min(times), times=times, repeats=len(times),
                      warmup=self.args.warmup, tokens_per_second=tokens / median,
                      peak_memory_bytes=None if None in member["peaks"] else max(member["peaks"]))
        if device.type != "cuda":
            record["peak_memory_note"] = "not measured on CPU"
        if record["mode"] == "compiled":
            record["compile_seconds"] = max(0.0, record["first_step_seconds"] - median)
            self.compile_seconds.append(record["compile_seconds"])
        self.step_seconds.setdefault((record["shape"], name, record["mode"]), []).append(
            (record["length"], tokens, median))
        del members[name]

    def finish(self, record):
        self.results.append(record)
        self.progress.update(1)
        if "skipped" in record:
            message = f"skipped: {record['skipped']}"
        else:
            memory = record["peak_memory_bytes"]
            message = (f"{record['tokens_per_second']:10.0f} tokens/s  {record['seconds'] * 1e3:8.1f} ms/step  "
                       + (f"peak {memory / 2**30:6.2f} GiB" if memory is not None else "peak -"))
            if "compile_seconds" in record:
                message += f"  compile {record['compile_seconds']:.0f} s"
        self.progress.write(f"[{time.perf_counter() - self.started:5.0f}s] {record['shape']:<8} {record['name']:<8} "
                            f"{record['mode']:<8} {format_length(record['length']):>4}  {message}")


def find(results, shape, name, mode, length):
    return next((r for r in results if (r["shape"], r["name"], r["mode"], r["length"]) == (shape, name, mode, length)
                 and "skipped" not in r), None)


def best_record(results, shape, name, length):
    """The faster of a model's eager and compiled records at `length` (None when neither was measured)."""
    records = [r for r in (find(results, shape, name, mode, length) for mode in ("eager", "compiled")) if r]
    return max(records, key=lambda r: r["tokens_per_second"], default=None)


def training_ratios(results, shapes, lengths):
    """BST tokens/s / baseline tokens/s and BST peak memory / baseline peak memory, per shape, length and mode
    ("eager", "compiled", and "best": each model eager or compiled, whichever is faster for it)."""
    rows = []
    for shape in shapes:
        for length in lengths:
            for mode in ("eager", "compiled", "best"):
                for bst in BST_MODELS:
                    for baseline in BASELINE_MODELS:
                        if mode == "best":
                            ours, theirs = best_record(results, shape, bst, length), best_record(
                                results, shape, baseline, length)
                        else:
                            ours, theirs = find(results, shape, bst, mode, length), find(
                                results, shape, baseline, mode, length)
                        if ours is None or theirs is None:
                            continue
                        row = {"shape": shape, "length": length, "mode": mode, "bst": bst, "baseline": baseline,
                               "throughput_ratio": ours["tokens_per_second"] / theirs["tokens_per_second"],
                               "peak_memory_ratio": None}
                        if ours["peak_memory_bytes"] and theirs["peak_memory_bytes"]:
                            row["peak_memory_ratio"] = ours["peak_memory_bytes"] / theirs["peak_memory_bytes"]
                        if mode == "best":
                            row["modes"] = {bst: ours["mode"], baseline: theirs["mode"]}
                        if ours["gradient_checkpointing"] or theirs["gradient_checkpointing"]:
                            row["gradient_checkpointing"] = [r["name"] for r in (ours, theirs)
                                                             if r["gradient_checkpointing"]]
                        rows.append(row)
    return rows


def training_targets(results, shape="base"):
    """The training targets on `shape`, each model eager or compiled, whichever is faster for it."""
    def best(name, length, field="tokens_per_second"):
        record = best_record(results, shape, name, length)
        return None if record is None else record.get(field)

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    def verdict(description, measured, threshold, comparison):
        met = None if measured is None else (measured >= threshold if comparison == ">=" else measured <= threshold)
        return {"target": description, "measured": measured, "threshold": threshold, "comparison": comparison,
                "met": met}

    k4, k16 = 4096, 16384
    targets = [
        verdict("BST-SH training tokens/s at 4k >= 1.0x Llama", ratio(best("bst-sh", k4), best("llama", k4)), 1.0,
                ">="),
        verdict("BST-SH training tokens/s at 16k >= 2x Llama", ratio(best("bst-sh", k16), best("llama", k16)), 2.0,
                ">="),
        verdict("BST-SH training tokens/s at 16k >= 1.0x Mistral (window W)",
                ratio(best("bst-sh", k16), best("mistral", k16)), 1.0, ">="),
    ]
    for name in ("bst-mf", "bst-mh"):
        targets.append(verdict(f"{name} training step time at 16k <= 1.3x BST-SH's",
                               ratio(best("bst-sh", k16), best(name, k16)), 1.3, "<="))
    targets.append(verdict(
        "BST-SH peak training memory at 16k <= Llama's",
        ratio(best("bst-sh", k16, "peak_memory_bytes"), best("llama", k16, "peak_memory_bytes")), 1.0, "<="))
    return [dict(item, shape=shape, models="each eager or compiled, whichever is faster") for item in targets]


def format_training_table(results, shapes, lengths):
    lines = []
    for shape in shapes:
        rows = [r for r in results if r["shape"] == shape]
        if not rows:
            continue
        lines.append(f"Training tokens/s (peak GiB), shape {shape}, bf16 autocast")
        lines.append(f"{'model':<18}" + "".join(f"{format_length(n):>20}" for n in lengths))
        for mode in ("eager", "compiled"):
            for name in MODEL_ORDER:
                cells = []
                for length in lengths:
                    record = next((r for r in rows if (r["name"], r["mode"], r["length"]) == (name, mode, length)),
                                  None)
                    if record is None:
                        cells.append("-")
                    elif "skipped" in record:
                        cells.append("skipped")
                    else:
                        memory = record["peak_memory_bytes"]
                        cells.append(f"{record['tokens_per_second']:.0f}"
                                     + (f" ({memory / 2**30:.1f})" if memory is not None else ""))
                if any(c != "-" for c in cells):
                    lines.append(f"{name + ' ' + mode:<18}" + "".join(f"{c:>20}" for c in cells))
        lines.append("")
    return "\n".join(lines)
