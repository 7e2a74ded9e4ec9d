"""The measured sections: layer, model, generate (prefill, per-step decode, decode through generate()), kernel."""

import copy
import functools
import importlib
import statistics
import time
import warnings

import torch

from .baselines import build_causal_lms, build_layer, count_parameters, import_bst
from .measurement import autocast_context, synchronize
from .report import lookup
from .settings import LAYER_SPECS, format_length


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
                loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()

        calls = {name: functools.partial(train_step, model, optimizers[name]) for name, model in models.items()}
        # Never skipped for time: these are the speed targets (only the memory limit applies).
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
    Then decoding through generate() at each context, eager and with `--compile` compiled too
    (`measure_generate_decode`).
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
    # Compiled decoding runs as it is deployed: bf16 weights, not autocast (Transformers' StaticCache allocates the
    # model's dtype and refuses autocast's bf16 keys). One copy for all contexts, so that each step compiles once.
    compiled_models = models
    if args.compile and dtype != "float32":
        compiled_models = {name: bfloat16_copy(model) for name, model in models.items()}
    for context in args.decode_contexts:
        measure_generate_decode(runner, models, compiled_models, extras, prompt, context, dtype)
    del models, compiled_models


def prefill_prefix(model, prompt, context, device, dtype, cache=None):
    """The cache after an eager forward of the context's first `context - 1` tokens (into `cache` when given)."""
    with torch.no_grad(), autocast_context(device, dtype):
        output = model(input_ids=prompt[:, : context - 1], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return output.past_key_values


def timed_generate(model, inputs, cache, new_tokens, device, dtype, **settings):
    """Greedy `model.generate()` of exactly `new_tokens` tokens continuing `cache`; returns (output, seconds)."""
    with torch.no_grad(), autocast_context(device, dtype):
        synchronize(device)
        start = time.perf_counter()
        output = model.generate(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            past_key_values=cache,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **settings,
        )
        synchronize(device)
    return output, time.perf_counter() - start


def check_generated(name, output, cache, context, new_tokens):
    """Exactly the new tokens, each fed once on the cache (a model that re-feeds the sequence would not advance the
    cache this way)."""
    cached = int(cache.get_seq_length())
    if output.shape[1] != context + new_tokens or cached != context + new_tokens - 1:
        raise RuntimeError(
            f"{name}: generate() wrote {output.shape[1] - context} tokens (asked {new_tokens}) and left {cached} "
            f"positions in the cache (expected {context + new_tokens - 1})"
        )


def error_text(error):
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def measure_generate_decode(runner, models, compiled_models, extras, prompt, context, dtype):
    """Per-token decode time through `model.generate()`, greedy, exactly `--decode-tokens` new tokens, at `context`:
    eager ("decode_generate") and, with `--compile`, compiled ("decode_compiled"), all in the same rounds.

    Eager: each model prefills `context - 1` tokens once into its default cache; every timed call continues a fresh
    copy of it with the whole context as input, so generate() runs `--decode-tokens` one-token forward calls (the
    first one feeds the context's last token) plus its own per-step work (logits processing, stopping checks): what a
    user waits for. Time per token = call time / new tokens.

    Compiled, BST and Llama alike, the recipe of Transformers' compiled generation: a static cache of `context +
    --decode-tokens` positions (what `cache_implementation="static"` allocates) and the `CompileConfig` of
    `generate_compile_config`. The prefill goes into that cache once; every call first copies that state back into
    the same cache tensors (see `restore_cache`). generate() feeds the context's last token through the eager forward
    (its prefill step) and the other new tokens through the compiled one, so the time per token is
    (t(n new tokens) - t(1 new token)) / (n - 1), n = --decode-tokens, from two calls back to back: the compiled
    steps alone, with generate()'s own per-step work. The first warm-up round compiles (Llama's cache shape changes
    with the context, so it compiles again at each context); the second absorbs any recompilation the first call's
    state could cause. The warm-up wall time less two timed calls is recorded as `compile_seconds` (inductor's
    on-disk cache makes it shorter on a machine that compiled the same graphs before), and
    `graphs_compiled_while_timed` counts compilations during the timed rounds (should be 0). In bfloat16 the compiled
    mode runs `compiled_models`, bf16 copies of the models (`bfloat16_copy`, autocast off), as compiled decoding is
    deployed; the eager modes run under autocast.

    Every member (model x mode) takes one call per round, so that eager and compiled, BST and Llama are timed under
    the same machine load; one warm-up round (two with `--compile`). A member that fails (compilation, a cache it
    cannot take) is recorded as skipped with the error.
    """
    from torch._dynamo.utils import counters

    args, device = runner.args, runner.device
    new_tokens = args.decode_tokens
    modes = ["generate"] + (["compiled"] if args.compile else [])
    warmup = 2 if args.compile else 1
    compile_config = generate_compile_config(device) if args.compile else None
    inputs = prompt[:, :context]
    members = {}  # (mode, name) -> the record, the call and its times
    for mode in modes:
        for name, model in models.items():
            section = "decode_" + mode
            record = {"section": section, "name": name, "length": context, "dtype": dtype,
                      "decode_tokens": new_tokens, **extras[name]}
            if mode == "compiled":
                record.update(cache="static", max_cache_len=context + new_tokens,
                              compile_config=compile_config.to_dict())
            reason = runner.skip_reason("prefill", name, context, dtype, skip_slow=False)
            if reason:
                runner.finish({**record, "skipped": f"the prefill of the context would be skipped: {reason}"})
                continue
            runner.progress.set_description(f"{section} {name} {format_length(context)} prefill")
            try:
                if mode == "generate":
                    prefix = prefill_prefix(model, prompt, context, device, dtype)
                    call = eager_generate_call(model, name, prefix, inputs, new_tokens, device, dtype)
                else:
                    record["weights"] = "float32" if dtype == "float32" else "bfloat16 weights, autocast off"
                    model = compiled_models[name]
                    step_dtype = "float32"  # no autocast
                    cache = static_cache(model, context + new_tokens)
                    prefill_prefix(model, prompt, context, device, step_dtype, cache)
                    call = compiled_generate_call(model, name, cache, inputs, new_tokens, device, step_dtype,
                                                  compile_config)
            except Exception as error:  # a model without a static cache is a result to record, not a crash
                runner.finish({**record, "skipped": error_text(error)})
                continue
            members[mode, name] = {"record": record, "call": call, "times": [], "warmup": [], "calls": []}
    graphs_before = counters["stats"]["unique_graphs"]
    for round_index in range(warmup + args.repeats):
        if round_index == warmup:
            graphs_before = counters["stats"]["unique_graphs"]
        for key in list(members):
            member = members[key]
            runner.progress.set_description(f"decode_{key[0]} {key[1]} {format_length(context)} run {round_index}")
            try:
                per_token, seconds, cache = member["call"]()
            except Exception as error:  # a compile or cache failure is a result to record, not a crash
                runner.finish({**member["record"], "skipped": error_text(error)})
                del members[key]
                continue
            member["record"]["cache_bytes"] = cache_nbytes(cache)
            if round_index < warmup:
                member["warmup"].append(seconds)
            else:
                member["times"].append(per_token)
                member["calls"].append(seconds)
    # Counted over all members of the timed rounds: a recompilation would show that they were not steady.
    recompiled = counters["stats"]["unique_graphs"] - graphs_before
    for (mode, _), member in members.items():
        record, times = member["record"], member["times"]
        median = statistics.median(times)
        record.update(seconds=median, times=times, warmup=warmup, repeats=len(times), tokens_per_second=1.0 / median)
        if mode == "compiled":
            record.update(
                warmup_seconds=member["warmup"],
                # Noise can make it slightly negative when nothing compiled (a graph compiled at an earlier context).
                compile_seconds=max(0.0, sum(member["warmup"]) - warmup * statistics.median(member["calls"])),
                graphs_compiled_while_timed=recompiled,
            )
        runner.finish(record)


def eager_generate_call(model, name, prefix, inputs, new_tokens, device, dtype):
    """A call of eager generate() on a fresh copy of `prefix`: returns (seconds per token, call seconds, cache)."""

    def call():
        cache = copy.deepcopy(prefix)
        output, seconds = timed_generate(model, inputs, cache, new_tokens, device, dtype)
        check_generated(name, output, cache, inputs.shape[1], new_tokens)
        return seconds / new_tokens, seconds, cache

    return call


def compiled_generate_call(model, name, cache, inputs, new_tokens, device, dtype, compile_config):
    """Two calls of compiled generate() (n and 1 new tokens), each on the static `cache` restored to its state now:
    returns (seconds per compiled decoding step, seconds of both calls, cache)."""
    prefix = copy.deepcopy(cache)

    def call():
        seconds = {}
        for tokens in (new_tokens, 1):
            restore_cache(cache, prefix)
            output, seconds[tokens] = timed_generate(
                model, inputs, cache, tokens, device, dtype, compile_config=compile_config
            )
            check_generated(name, output, cache, inputs.shape[1], tokens)
        if not hasattr(model, "_compiled_call"):  # generate() falls back to eager with a warning
            raise RuntimeError("generate() did not compile the decoding step (its auto-compile criteria)")
        return (seconds[new_tokens] - seconds[1]) / (new_tokens - 1), seconds[new_tokens] + seconds[1], cache

    return call


def bfloat16_copy(model):
    """A bf16 copy of `model` as `from_pretrained(..., dtype=torch.bfloat16)` loads it: the modules the model keeps
    in fp32 (BST's SSM, `_keep_in_fp32_modules_strict`) stay fp32."""
    copied = copy.deepcopy(model).to(torch.bfloat16)
    kept = set(getattr(copied, "_keep_in_fp32_modules_strict", None) or []) | set(
        getattr(copied, "_keep_in_fp32_modules", None) or []
    )
    for module_name, module in copied.named_modules():
        if kept & set(module_name.split(".")):
            module.float()
    return copied


def generate_compile_config(device):
    """What a Transformers user passes for compiled decoding: one graph (`fullgraph`), static shapes. On CUDA the
    default mode, "reduce-overhead" (CUDA graphs); on CPU, where generate() compiles only when told to
    (`_compile_all_devices`), inductor's C++ wrapper, which removes most of the Python overhead of a small step
    (torch.compile takes a mode or options, not both)."""
    from transformers import CompileConfig

    # Inductor imports torch.utils.mkldnn, whose classes still use the deprecated `torch.jit.script_method` (torch
    # 2.13): the warning is about torch's code, and nothing of ours can replace it; imported once here, quietly.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script_method", category=DeprecationWarning)
        importlib.import_module("torch.utils.mkldnn")

    if device.type == "cpu":
        config = CompileConfig(fullgraph=True, dynamic=False, mode=None, options={"cpp_wrapper": True})
        config._compile_all_devices = True
    else:
        config = CompileConfig(fullgraph=True, dynamic=False)
    return config


def static_cache(model, max_cache_len):
    """The static cache generate(cache_implementation="static") would make for this model and length."""
    from transformers import StaticCache

    modeling_bst = import_bst()
    if isinstance(model, modeling_bst.BSTForCausalLM):
        return modeling_bst.BSTCache(model.config, static=True, max_cache_len=max_cache_len)
    return StaticCache(config=model.config, max_cache_len=max_cache_len)


def cache_tensors(cache):
    """Every tensor a cache holds (its own and its layers'), in a fixed order."""
    found = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for key in sorted(value):
                walk(value[key])

    for holder in [cache, *cache.layers]:
        for name, value in sorted(vars(holder).items()):
            if name != "layers":
                walk(value)
    return found


def restore_cache(cache, prefix):
    """Copies `prefix` (a deep copy of `cache` taken after the prefill) back into `cache` in place: the tensors keep
    their addresses, as a compiled step on a static cache (and CUDA graphs) expects, and no call recompiles."""
    targets, sources = cache_tensors(cache), cache_tensors(prefix)
    if [t.shape for t in targets] != [s.shape for s in sources]:
        raise RuntimeError("the static cache changed its tensors during generate(); cannot restore it in place")
    with torch.no_grad():
        for target, source in zip(targets, sources):
            target.copy_(source)


def find_kernel_generators(model):
    """The SSM kernel generators of a BST model: `BSTStateSpace.kernel_generator`, a module called with a length that
    returns the (D * C, length) filter taps. It is called directly, bypassing `BSTStateSpace.kernel`, whose memo would
    hide the cost outside autograd."""
    return [module.kernel_generator for module in model.modules() if hasattr(module, "kernel_generator")]


def run_kernel_section(runner, dtype):
    """Share of a BST layer's forward time spent generating the SSM kernel, at each length.

    Both are timed as in training: autograd on (the graph is built, no backward), train mode. In eval/no-grad the
    model memoises the kernel, so its cost then disappears after the first call. An "mf" layer with "s4" kernels forms
    no kernel in training (it scans the blocks): its row says what the kernel would cost, not a share of its forward.
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
