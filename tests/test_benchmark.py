"""Smoke test of scripts/benchmarks/benchmark.py (--quick, tiny sizes) and checks of its baseline layers.

No timing assertions: only the JSON structure, finiteness of the ratios, and the baselines' correctness.
"""

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers


pytestmark = pytest.mark.lab

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "scripts" / "benchmarks"


def load_by_path(name, path):
    """The module (or package, for an `__init__.py`) at `path`, imported as `name`: what running the script finds next
    to it, without putting scripts/benchmarks on sys.path."""
    search = [str(path.parent)] if path.name == "__init__.py" else None
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=search)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_script():
    """scripts/benchmarks/benchmark.py (its `main`), after the `bst_benchmark` package it imports."""
    if "bst_benchmark" not in sys.modules:
        load_by_path("bst_benchmark", BENCHMARKS_DIR / "bst_benchmark" / "__init__.py")
    return load_by_path("benchmark_script", BENCHMARKS_DIR / "benchmark.py")


@pytest.fixture(scope="module")
def settings(bench_script):
    from bst_benchmark import settings

    return settings


@pytest.fixture(scope="module")
def baselines(bench_script):
    from bst_benchmark import baselines

    return baselines


@pytest.fixture(scope="module")
def quick_report(bench_script, tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    argv = [
        "--quick",
        "--sections", "layer", "model", "generate", "kernel", "profile",
        "--layer-lengths", "32", "128",
        "--model-lengths", "32", "128",
        "--prefill-length", "128",
        "--decode-contexts", "32", "128",
        "--profile-lengths", "64",
        "--profile-layers", "bst-sh-s4", "llama",
        "--target-length", "128",
        "--scaling-lengths", "32", "128",
        "--variant-lengths", "32", "128",
        "--threads", "1",
        "--default-malloc",  # main() runs inside the pytest process: leave its allocator alone
        "--output", str(out / "bench.json"),
        "--figures-dir", str(out / "figures"),
    ]  # fmt: skip
    report = bench_script.main(argv)
    return report, out


def test_malloc_setting_is_accepted_by_glibc():
    """The benchmark's allocator setting (no per-call mmap/munmap of large blocks) works here; in a subprocess, since
    it changes the allocator of the whole process."""
    code = "from bst_benchmark.measurement import keep_freed_memory_mapped; assert keep_freed_memory_mapped()"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=BENCHMARKS_DIR)


def test_parse_length(settings):
    assert settings.parse_length("4k") == 4096
    assert settings.parse_length("512") == 512
    with pytest.raises(Exception, match="not a length"):
        settings.parse_length("four")
    with pytest.raises(Exception, match="positive"):
        settings.parse_length("0")


def test_default_outputs_are_the_docs_files(settings):
    """Without --output / --figures-dir the report replaces the repository's docs/benchmark_cpu.json and figures."""
    args = settings.parse_args(["--quick"])
    docs = BENCHMARKS_DIR.parent.parent / "docs"
    assert (args.output, args.figures_dir) == (docs / "benchmark_cpu.json", docs / "figures")


def test_bad_arguments_fail_before_work(settings):
    with pytest.raises(SystemExit, match="not divisible"):
        settings.parse_args(["--quick", "--hidden-size", "65", "--num-heads", "2"])
    with pytest.raises(SystemExit, match="model-bst-layers"):
        settings.parse_args(["--quick", "--num-layers", "2", "--model-bst-layers", "5"])


def test_sliding_window_attention_equals_banded_full_attention(baselines):
    torch.manual_seed(0)
    for length, window in [(100, 16), (64, 16), (7, 16), (33, 8)]:
        query, key, value = (torch.randn(2, 3, length, 8) for _ in range(3))
        positions = torch.arange(length)
        band = (positions[None, :] <= positions[:, None]) & (positions[None, :] > positions[:, None] - window)
        expected = F.scaled_dot_product_attention(query, key, value, attn_mask=band)
        actual = baselines.sliding_window_attention(query, key, value, window)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["full-attention", "sliding-window", "block-recurrent"])
def test_baseline_layers_are_causal(settings, baselines, name):
    args = settings.parse_args(["--quick", "--block-size", "8", "--brt-state-size", "4"])
    torch.manual_seed(0)
    layer = baselines.build_layer(name, args).eval()
    inputs = torch.randn(1, 40, args.hidden_size)
    changed = inputs.clone()
    changed[:, 21] += 1.0
    with torch.no_grad():
        before, after = layer(inputs), layer(changed)
    torch.testing.assert_close(before[:, :21], after[:, :21], atol=0, rtol=0)
    assert (before[:, 21:] - after[:, 21:]).abs().amax() > 1e-4  # the change does reach later tokens


def test_residual_only_layer_is_measured_only_when_named(settings, baselines):
    """`bst-sh-s4-residual-swa` is a BST layer with the SSM through the residual branch, no cross-attention and
    Mistral's window; the `layer` section's default list leaves it out (the CPU benchmark keeps its runs)."""
    args = settings.parse_args(["--quick"])
    assert "bst-sh-s4-residual-swa" not in args.layers and "bst-sh-s4" in args.layers
    assert "bst-sh-s4-residual-swa" in settings.parse_args(["--quick", "--layers", "bst-sh-s4-residual-swa"]).layers
    layer = baselines.build_layer("bst-sh-s4-residual-swa", args)
    config = layer.model.config
    assert (config.ssm_residual, config.ssm_cross_attention, config.sliding_window_attention) == (True, False, True)
    assert not layer.model.layers[0].attention.cross_attention and layer.model.layers[0].residual_out_proj is not None
    # The profile names its attention part for what it runs: self-attention alone.
    from bst_benchmark.profiling import forward_part_ranges

    handles = forward_part_ranges(layer)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        layer(torch.randn(1, 32, config.hidden_size))
    for handle in handles:
        handle.remove()
    parts = {event.name for event in profiler.events() if event.name.startswith("part::")}
    assert parts == {"part::SSM kernel generation", "part::SSM sublayer (kernel + FFT convolution + skip)",
                     "part::attention sublayer (projections, self-attention)", "part::FFN"}


def test_baseline_models_match_bst_parameter_count(settings, baselines):
    args = settings.parse_args(["--quick"])
    models = baselines.build_causal_lms(args)
    counts = {name: baselines.count_parameters(model) for name, model in models.items()}
    for name in ("llama", "mistral"):
        assert abs(counts[name] / counts["bst"] - 1) < 0.05, counts
    assert models["mistral"].config.sliding_window == args.block_size


def test_quick_run_json_structure(quick_report):
    report, out = quick_report
    assert report["machine"]["malloc_keeps_freed_memory"] is False
    saved = json.loads((out / "bench.json").read_text())
    assert set(saved) >= {"command", "machine", "settings", "results", "ratios", "targets", "profile", "figures"}
    machine = saved["machine"]
    assert machine["torch_threads"] == 1 and machine["torch"] == torch.__version__
    assert machine["cpu"] and machine["logical_cores"] >= 1

    sections = {record["section"] for record in saved["results"]}
    assert sections == {"layer", "model", "prefill", "decode", "decode_generate", "kernel"}
    layer_names = {r["name"] for r in saved["results"] if r["section"] == "layer"}
    assert layer_names == set(saved["settings"]["layers"])
    for record in saved["results"]:
        assert "skipped" not in record, record  # nothing is long enough to be skipped at these sizes
        assert record["seconds"] > 0 and math.isfinite(record["seconds"])
        assert record["repeats"] == len(record["times"]) >= 1
    model_rows = [r for r in saved["results"] if r["section"] == "model"]
    assert all(r["tokens_per_second"] > 0 for r in model_rows)

    decode = {(r["name"], r["length"]): r for r in saved["results"] if r["section"] == "decode"}
    assert set(decode) == {(name, length) for name in ("bst", "llama") for length in (32, 128)}
    # BST's cache has the same size at every context ("s4"); Llama's grows with the context.
    assert decode["bst", 32]["cache_bytes"] == decode["bst", 128]["cache_bytes"] > 0
    assert decode["llama", 128]["cache_bytes"] > decode["llama", 32]["cache_bytes"]
    # The same through generate(): every call wrote exactly --decode-tokens tokens (checked in the section).
    generated = {(r["name"], r["length"]): r for r in saved["results"] if r["section"] == "decode_generate"}
    assert set(generated) == set(decode)
    assert generated["bst", 32]["cache_bytes"] == generated["bst", 128]["cache_bytes"] > 0
    assert generated["llama", 128]["cache_bytes"] > generated["llama", 32]["cache_bytes"]
    assert all(r["decode_tokens"] == 4 and r["repeats"] == 2 for r in generated.values())


def test_quick_run_ratios_and_targets(quick_report):
    report, _ = quick_report
    ratios = report["ratios"]["float32"]
    # 4 BST layers x 3 baselines x 2 lengths; MH and MF against SH x 2 lengths; 2 baselines x 2 lengths; 1 prefill;
    # 2 decode contexts, per step and through generate().
    assert len(ratios["layer"]) == 24 and len(ratios["variants"]) == 4 and len(ratios["model"]) == 4
    assert len(ratios["prefill"]) == 1 and len(ratios["decode"]) == 2 and len(ratios["decode_generate"]) == 2
    for rows in ratios.values():
        for row in rows:
            for key, value in row.items():
                if isinstance(value, float):
                    assert math.isfinite(value) and value > 0, (key, row)

    targets = report["targets"]["float32"]
    # 8 (layer, scaling, training, prefill, decode, cache, kernel); MF and MH against SH at 2 lengths, prefill,
    # generate() decode at 2 contexts, its cache.
    assert len(targets) == 16
    variant_targets = [item for item in targets if "x bst-sh-s4" in item["target"]]
    assert len(variant_targets) == 4 and {item["threshold"] for item in variant_targets} == {2.0, 1.3}
    mf_at_32 = next(item for item in variant_targets if item["target"].startswith("bst-mf-s4 layer at 32:"))
    layer = {r["name"]: r["seconds"] for r in report["results"] if r["section"] == "layer" and r["length"] == 32}
    assert math.isclose(mf_at_32["measured"], layer["bst-mf-s4"] / layer["bst-sh-s4"])
    assert mf_at_32["met"] == (mf_at_32["measured"] <= 2.0)
    for item in targets:
        assert item["met"] in (True, False), item  # every target was measured at these lengths
        assert math.isfinite(item["measured"]) and item["measured"] > 0

    kernel_shares = [r["share_of_forward"] for r in report["results"] if "share_of_forward" in r]
    assert len(kernel_shares) == 8 and all(0 < share < 10 for share in kernel_shares)


def test_quick_run_profile_sees_the_training_forward(quick_report):
    """The profile runs the layer as users train it (the default config): its forward generates the SSM kernel inside
    the SSM sublayer, inside the forward."""
    report, _ = quick_report
    profile, _ = report["profile"]
    assert profile["name"] == "bst-sh-s4" and profile["length"] == 64 and profile["total_self_cpu_seconds"] > 0
    assert math.isclose(sum(profile["op_groups_seconds"].values()), profile["total_self_cpu_seconds"], rel_tol=1e-6)
    parts = profile["forward_parts_seconds"]
    assert len(parts) == 4 and all(seconds > 0 for seconds in parts.values())
    # The kernel generation runs inside the SSM sublayer, which runs inside the forward.
    assert parts["SSM kernel generation"] <= parts["SSM sublayer (kernel + FFT convolution + skip)"]
    assert parts["SSM sublayer (kernel + FFT convolution + skip)"] <= profile["forward_seconds"]


def test_quick_run_profile_counts_operators(quick_report):
    """Operator calls of a layer's forward and backward, nested within each other: every aten call, the innermost,
    the ones that do work (each one GPU launch or more); by part of the forward; BST's layer against Llama's."""
    report, _ = quick_report
    bst, llama = report["profile"]
    assert llama["name"] == "llama" and set(llama["forward_parts_seconds"]) == {"attention sublayer", "FFN"}
    for record in (bst, llama):
        assert record["cuda_kernels"] is None  # CPU
        for phase in ("forward", "backward"):
            working = record["working_operator_calls"][phase]
            assert 0 < working <= record["operator_calls"][phase]
            assert sum(record["working_operators_by_calls"][phase].values()) == working
            assert not set(record["working_operators_by_calls"][phase]) & {"aten::view", "aten::as_strided"}
        parts = record["working_operator_calls_by_forward_part"]
        assert parts["FFN"] >= 3  # up, activation, down
    bst_parts = bst["working_operator_calls_by_forward_part"]
    assert 0 < bst_parts["SSM kernel generation"] < bst_parts["SSM sublayer (kernel + FFT convolution + skip)"]
    assert "aten::_fft_r2c" in bst["working_operators_by_calls"]["forward"]
    # The SSM and the cross-attention: more launches than a Llama layer, forward and backward.
    for phase in ("forward", "backward"):
        assert bst["working_operator_calls"][phase] > llama["working_operator_calls"][phase]


def test_quick_run_writes_plots(quick_report):
    pytest.importorskip("matplotlib")
    report, out = quick_report
    names = sorted(Path(path).name for path in report["figures"])
    assert names == [
        "benchmark_decode.png",
        "benchmark_kernel_share.png",
        "benchmark_layer_time.png",
        "benchmark_model_step_time.png",
    ]
    for name in names:  # a real picture with something drawn on it, not an empty canvas
        pixels = matplotlib.image.imread(out / "figures" / name)
        colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and len(colours) > 10


def test_quick_compiled_decode(bench_script, tmp_path):
    """`--compile`: BST and Llama decode through compiled generate() on a static cache (one context, so that each
    model compiles once: ~30 s on 2 cores), or record why not; the report holds the compiled-decoding target."""
    argv = [
        "--quick", "--sections", "generate", "--compile",
        "--decode-contexts", "32", "--prefill-length", "32",
        "--threads", "1", "--default-malloc", "--no-plots",
        "--output", str(tmp_path / "bench.json"),
    ]  # fmt: skip
    torch._dynamo.reset()
    try:
        report = bench_script.main(argv)
    finally:
        torch._dynamo.reset()
    compiled = {r["name"]: r for r in report["results"] if r["section"] == "decode_compiled"}
    assert set(compiled) == {"bst", "llama"}
    for record in compiled.values():
        if "skipped" in record:  # e.g. no C++ compiler for inductor: recorded, not a crash
            assert record["skipped"]
            continue
        assert record["cache"] == "static" and record["compile_config"]["fullgraph"] is True
        assert record["graphs_compiled_while_timed"] == 0
        assert record["repeats"] == len(record["times"]) == 2 and record["warmup"] == 2
        assert record["seconds"] > 0 and record["compile_seconds"] > 0 and record["cache_bytes"] > 0
    (target,) = [t for t in report["targets"]["float32"] if t["target"].startswith("Compiled generate() decode at 32")]
    assert target["threshold"] == 1.5
    if "skipped" not in compiled["bst"]:
        (ratios,) = report["ratios"]["float32"]["decode_compiled"]
        assert math.isclose(target["measured"], ratios["speedup_vs_llama_eager"])
        if "skipped" not in compiled["llama"]:
            assert ratios["speedup_vs_llama_compiled"] > 0


# ---------------------------------------------------------------------------------------------------------------
# scripts/benchmarks/train_benchmark.py
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_script(bench_script):
    """scripts/benchmarks/train_benchmark.py (its `main`), after the `bst_benchmark` package it imports."""
    return load_by_path("train_benchmark_script", BENCHMARKS_DIR / "train_benchmark.py")


@pytest.fixture(scope="module")
def training(train_script):
    from bst_benchmark import training

    return training


@pytest.fixture(scope="module")
def quick_training_report(train_script, tmp_path_factory):
    """Both shapes (tiny stand-ins), BST-SH against Llama, eager at 32 and 64 tokens, and on `base` compiled (tracing
    only) at 64, batches of 64 tokens."""
    out = tmp_path_factory.mktemp("train")
    argv = [
        "--quick", "--models", "bst-sh", "llama", "--lengths", "32", "64", "--compiled-lengths", "64",
        "--tokens-per-step", "64", "--repeats", "1", "--threads", "1",
        "--output", str(out / "train.json"), "--figures-dir", str(out / "figures"),
    ]  # fmt: skip
    torch._dynamo.reset()
    try:
        train_script.main(argv)
    finally:
        torch._dynamo.reset()
    return json.loads((out / "train.json").read_text()), out


def test_training_baselines_match_the_bst_shapes(training):
    """At the real shapes (built on the meta device): Llama and Mistral have BST-SH's width, depth, heads and
    vocabulary, within 1% of its parameters, and Mistral's window is the BST block."""
    for shape, (width, depth, heads, kv_heads, window) in {"base": (1024, 12, 8, 8, 512),
                                                            "smollm2": (576, 30, 9, 3, 1024)}.items():
        bst = training.bst_training_config(shape, "bst-sh", quick=False, max_length=65536)
        assert (bst.hidden_size, bst.num_hidden_layers, bst.block_size) == (width, depth, window)
        configs, bst_parameters = training.baseline_configs(shape, bst, quick=False, max_length=65536)
        for name, config in configs.items():
            assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                    config.num_key_value_heads, config.vocab_size) == (width, depth, heads, kv_heads, bst.vocab_size)
            assert config._attn_implementation == "sdpa" and config.intermediate_size % 64 == 0
            with torch.device("meta"):
                model = (transformers.LlamaForCausalLM if name == "llama" else transformers.MistralForCausalLM)(config)
            assert abs(sum(p.numel() for p in model.parameters()) / bst_parameters - 1) < 0.01, (shape, name)
        assert configs["mistral"].sliding_window == window
    flex, _ = training.baseline_configs(shape, bst, quick=False, max_length=4096, attention="flex_attention")
    assert flex["mistral"]._attn_implementation == "flex_attention"  # gpu_checks.sh's fallback after an SDPA crash
    assert training.bst_training_config("base", "bst-mf", quick=False, max_length=4096).num_context_states == 32
    assert training.bst_training_config("smollm2", "bst-mh", quick=False, max_length=4096).num_context_states == 9


def test_training_residual_model_is_the_preset(training):
    """"bst-residual" on `base` is the residual-only preset as a user loads it (its own FFN width, within 7% of
    BST-SH's parameters); on `smollm2` the upcycled shape with the residual branch instead of cross-attention; in
    --quick the preset's options on the tiny shape."""
    preset = json.loads(training.RESIDUAL_PRESET.read_text())
    config = training.bst_training_config("base", "bst-residual", quick=False, max_length=4096)
    for key, value in preset.items():
        if key not in ("model_type", "architectures"):
            assert getattr(config, key) == value, key
    sh = training.bst_training_config("base", "bst-sh", quick=False, max_length=4096)
    with torch.device("meta"):
        sizes = [sum(p.numel() for p in training.import_bst().BSTForCausalLM(c).parameters()) for c in (config, sh)]
    assert 1.0 < sizes[0] / sizes[1] < 1.07
    smollm2 = training.bst_training_config("smollm2", "bst-residual", quick=False, max_length=4096)
    smollm2_sh = training.bst_training_config("smollm2", "bst-sh", quick=False, max_length=4096)
    assert (smollm2.ssm_cross_attention, smollm2.ssm_residual, smollm2.ssm_conv_size) == (False, True, 4)
    assert smollm2.to_diff_dict() | {"ssm_cross_attention": True, "ssm_residual": False, "ssm_conv_size": 0} == (
        smollm2_sh.to_diff_dict() | {"ssm_cross_attention": True, "ssm_residual": False, "ssm_conv_size": 0})
    quick = training.bst_training_config("base", "bst-residual", quick=True, max_length=64)
    assert (quick.hidden_size, quick.ssm_cross_attention, quick.sliding_window_attention) == (64, False, True)


def test_quick_training_run(quick_training_report):
    report, _ = quick_training_report
    assert report["complete"] and report["hardware"] == report["machine"]["cpu"]
    results = report["results"]
    points = {(r["shape"], r["name"], r["mode"], r["length"]) for r in results}
    expected_points = {(shape, name, mode, length) for shape in ("base", "smollm2") for name in ("bst-sh", "llama")
                       for mode, length in (("eager", 32), ("eager", 64), ("compiled", 64))
                       if shape == "base" or mode == "eager"}
    assert points == expected_points and len(results) == len(points)
    for record in results:
        assert "skipped" not in record, record
        assert record["batch_size"] * record["length"] == record["tokens_per_step"] >= 64
        assert math.isclose(record["tokens_per_second"], record["tokens_per_step"] / record["seconds"])
        assert record["repeats"] == len(record["times"]) == 1 and record["seconds"] > 0
        assert record["peak_memory_bytes"] is None and record["peak_memory_note"] == "not measured on CPU"
        assert not record["gradient_checkpointing"]
        if record["mode"] == "compiled":
            assert record["compile_backend"] == "eager" and record["graphs_compiled"] >= 1
            assert record["compile_seconds"] >= 0 and record["first_step_seconds"] > 0
    tokens = {(r["shape"], r["name"], r["mode"], r["length"]): r["tokens_per_second"] for r in results}

    # BST-SH against Llama, per shape: eager at both lengths, compiled at 64 (base), and "best" at both.
    ratios = report["ratios"]
    assert {(r["shape"], r["mode"], r["length"]) for r in ratios} == {
        (shape, mode, length) for shape in ("base", "smollm2")
        for mode, length in (("eager", 32), ("eager", 64), ("compiled", 64), ("best", 32), ("best", 64))
        if shape == "base" or mode != "compiled"}
    for row in ratios:
        assert (row["bst"], row["baseline"]) == ("bst-sh", "llama") and row["peak_memory_ratio"] is None
        assert math.isfinite(row["throughput_ratio"]) and row["throughput_ratio"] > 0
        if row["mode"] == "best":
            modes = row["modes"]
            expected = max(tokens[row["shape"], "bst-sh", m, row["length"]] for m in ("eager", "compiled")
                           if (row["shape"], "bst-sh", m, row["length"]) in tokens)
            assert math.isclose(tokens[row["shape"], "bst-sh", modes["bst-sh"], row["length"]], expected)
        else:
            expected = tokens[row["shape"], "bst-sh", row["mode"], row["length"]] / tokens[
                row["shape"], "llama", row["mode"], row["length"]]
            assert math.isclose(row["throughput_ratio"], expected)
    # The targets are set at 4k and 16k: none measured at these lengths, all listed.
    assert len(report["targets"]) == 6 and all(t["met"] is None for t in report["targets"])
    assert sorted(Path(p).name for p in report["figures"]) == ["benchmark_train_base.png",
                                                              "benchmark_train_smollm2.png"]
    for path in report["figures"]:
        assert matplotlib.image.imread(path).shape[0] > 100


def test_quick_training_run_of_the_residual_model(train_script, tmp_path):
    """"bst-residual" trains at both shapes and enters the ratios against the baselines like the BST variants."""
    argv = ["--quick", "--models", "bst-residual", "llama", "--lengths", "32", "--compiled-lengths", "--repeats", "1",
            "--threads", "1", "--no-plots", "--output", str(tmp_path / "train.json")]
    train_script.main(argv)
    report = json.loads((tmp_path / "train.json").read_text())
    assert {(r["shape"], r["name"]) for r in report["results"] if r["tokens_per_second"] > 0} == {
        (shape, name) for shape in ("base", "smollm2") for name in ("bst-residual", "llama")}
    assert {(r["shape"], r["mode"], r["bst"], r["baseline"]) for r in report["ratios"]} == {
        (shape, mode, "bst-residual", "llama") for shape in ("base", "smollm2") for mode in ("eager", "best")}


def test_training_run_out_of_time_records_every_point(train_script, tmp_path):
    """Points that do not fit in the budget are recorded as skipped with the reason, none is lost, the JSON is
    written: a budget already spent (no model is even built), and compiles estimated longer than the budget."""
    common = ["--quick", "--models", "bst-sh", "mistral", "--shapes", "base", "--lengths", "32", "--compiled-lengths",
              "32", "--repeats", "1", "--threads", "1", "--no-plots", "--output", str(tmp_path / "train.json")]
    train_script.main([*common, "--budget-seconds", "1e-9"])
    report = json.loads((tmp_path / "train.json").read_text())
    assert report["complete"] and report["ratios"] == []
    assert [(r["name"], r["mode"]) for r in report["results"]] == [("bst-sh", "eager"), ("mistral", "eager"),
                                                                   ("bst-sh", "compiled"), ("mistral", "compiled")]
    assert all(r["skipped"] == "time budget: none left" for r in report["results"])

    train_script.main([*common, "--budget-seconds", "600", "--compile-estimate-seconds", "1e6"])
    report = json.loads((tmp_path / "train.json").read_text())
    eager = [r for r in report["results"] if r["mode"] == "eager"]
    compiled = [r for r in report["results"] if r["mode"] == "compiled"]
    assert len(eager) == 2 and all(r["tokens_per_second"] > 0 for r in eager)
    assert len(compiled) == 2
    for record in compiled:  # the assumed compile time plus the eager steps
        estimate = re.fullmatch(r"time budget: \d+ s left, estimated (\d+) s", record["skipped"])
        assert estimate and 1e6 <= int(estimate.group(1)) < 1e6 + 60
    assert {r["mode"] for r in report["ratios"]} == {"eager", "best"}


def test_training_out_of_memory_is_retried_with_gradient_checkpointing(train_script, training, monkeypatch, tmp_path):
    """A step that runs out of memory is retried once with gradient checkpointing, recorded on the point and on its
    ratio; a model that runs out of memory with checkpointing too is recorded as skipped."""
    real_step = training.train_step

    def step_needing_checkpointing(model, optimizer, input_ids, device):
        checkpointed = any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
        if not checkpointed or model.config.model_type == "mistral":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB (simulated)")
        return real_step(model, optimizer, input_ids, device)

    monkeypatch.setattr(training, "train_step", step_needing_checkpointing)
    argv = ["--quick", "--models", "bst-sh", "mistral", "--shapes", "base", "--lengths", "32", "--compiled-lengths",
            "--repeats", "1", "--threads", "1", "--no-plots", "--output", str(tmp_path / "train.json")]
    train_script.main(argv)
    report = json.loads((tmp_path / "train.json").read_text())
    bst, mistral = report["results"]
    assert bst["gradient_checkpointing"] and "simulated" in bst["without_checkpointing"]
    assert bst["tokens_per_second"] > 0 and "skipped" not in bst
    assert mistral["gradient_checkpointing"] and mistral["skipped"].startswith("OutOfMemoryError: CUDA out of memory")
    assert report["ratios"] == []  # nothing to compare BST with


# ---------------------------------------------------------------------------------------------------------------
# scripts/benchmarks/fft_precision.py
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fft_script(bench_script):
    return load_by_path("fft_precision_script", BENCHMARKS_DIR / "fft_precision.py")


def test_fft_precision_quick_run(fft_script, tmp_path):
    """fp32 is within float32 rounding of the float64 reference, whole and far part; the floor is bf16's rounding;
    a dtype torch's FFT cannot run here is recorded with the reason, not dropped."""
    report = fft_script.main(["--quick", "--output", str(tmp_path / "fft.json"), "--figure", str(tmp_path / "f.png")])
    assert json.loads((tmp_path / "fft.json").read_text())["results"] == report["results"]
    assert {(r["length"], r["kernels"]) for r in report["results"]} == {
        (length, kernels) for length in (256, 1024) for kernels in ("default", "long")}
    for record in report["results"]:
        assert 2**-10 < record["output_rounding_error"] < 2**-8
        assert 0 < record["far_share_of_output"] < 1
        fp32 = record["dtypes"]["float32"]
        assert fp32["finite"] and fp32["relative_error"] < 1e-6 and fp32["far_relative_error"] < 1e-6
        assert fp32["seconds"] > 0
        for name in ("float16", "bfloat16"):
            cell = record["dtypes"][name]
            assert cell.get("unsupported") or cell["relative_error"] > fp32["relative_error"], (name, cell)
    far = {r["kernels"]: r["far_share_of_output"] for r in report["results"] if r["length"] == 1024}
    assert far["long"] > far["default"]  # the long time scales put more of the output past 2W
    assert matplotlib.image.imread(report["figure"]).shape[0] > 100


def test_fft_precision_convolution_is_the_models(fft_script):
    """The probe's convolution is the model's: fp32 equals `causal_fft_conv` (skip left out) to fp32 rounding, and
    float64 equals the direct sum."""
    from modeling_bst.ssm_ops import causal_fft_conv

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(2, 3, 50, generator=generator, dtype=torch.float64)
    kernel = torch.randn(3, 50, generator=generator, dtype=torch.float64) * torch.exp(-torch.arange(50.0) / 10)
    direct = torch.stack([torch.einsum("bds,ds->bd", inputs[..., : t + 1], kernel[:, : t + 1].flip(-1))
                          for t in range(50)], dim=-1)
    exact = fft_script.fft_convolution(inputs, kernel, torch.float64)
    torch.testing.assert_close(exact, direct, rtol=1e-12, atol=1e-12)
    model = causal_fft_conv(inputs.float(), kernel.float().unsqueeze(1))[:, :, 0]
    torch.testing.assert_close(fft_script.fft_convolution(inputs, kernel, torch.float32), model, rtol=1e-5, atol=1e-5)
