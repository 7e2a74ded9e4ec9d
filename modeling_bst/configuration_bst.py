"""Configuration of the Block-State Transformer (Fathi et al., 2023, arXiv 2306.09539)."""

import math

from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig


BST_VARIANTS = ("sh", "mh", "mf")
# How RoPE pairs the channels of a head into the 2D planes it rotates: "interleaved" pairs (2i, 2i+1), as BST always
# has; "rotate_half" pairs (i, i + head_dim/2), as Llama, Mistral and Qwen2 do. The two are a permutation of the
# q/k rows of each other; the second lets converted Llama-family weights load unchanged (scripts/convert_to_bst.py).
ROPE_PAIRINGS = ("interleaved", "rotate_half")
# What `max_position_embeddings` says for a model without a maximum length. Tools read that field as the longest input
# the model accepts (generate() warns past it and caps its default `max_length` with it, lm-evaluation-harness cuts
# log-likelihoods into windows of it); BST has no absolute positions, so it gets a bound no input comes near.
NO_MAXIMUM_LENGTH = 2**20
SSM_KERNELS = ("s4", "unstructured")
INITIALIZER_SCHEMES = ("normal", "fan_in")


@strict
class BSTConfig(PreTrainedConfig):
    r"""
    Configuration of a Block-State Transformer language model.

    A BST layer runs a state-space model (SSM) over the whole sequence as one causal FFT convolution and feeds its
    outputs ("context states") to a Block Transformer sublayer: causal self-attention inside blocks of `block_size`
    tokens plus cross-attention to the context states. Layers not listed in `bst_layers` are plain block-attention
    layers (self-attention inside the block + FFN).

    Args:
        vocab_size (`int`, defaults to 32000): number of token ids.
        hidden_size (`int`, defaults to 1024): model width D.
        intermediate_size (`int`, defaults to 4096): width of the feed-forward network.
        num_hidden_layers (`int`, defaults to 12): number of layers.
        num_attention_heads (`int`, defaults to 8): heads of the self-attention and, separately, of the
            cross-attention to the context states.
        num_key_value_heads (`int`, *optional*): key/value heads of the self-attention (grouped-query attention, as
            in Llama: query head h reads key/value head h // (num_attention_heads / num_key_value_heads)); must divide
            `num_attention_heads`. `num_attention_heads` when unset (multi-head attention). The generation cache holds
            this many key/value heads. The cross-attention to the context states always has `num_attention_heads`.
        head_dim (`int`, *optional*): width of one head; `hidden_size // num_attention_heads` when unset.
        hidden_act (`str`, defaults to `"gelu"`): activation of the feed-forward network.
        gated_mlp (`bool`, defaults to `False`): a gated feed-forward network, down(act(gate(x)) * up(x)) (SwiGLU
            with `hidden_act="silu"`, as in Llama), instead of down(act(up(x))).
        qkv_bias (`bool`, defaults to `False`): biases on the self-attention's query, key and value projections (as in
            Qwen2). The output projection and the cross-attention projections never have one.
        block_size (`int`, defaults to 512): W, the number of tokens in one attention block. Self-attention never
            looks further back than the previous block, so the model runs at any sequence length.
        attend_previous_block (`bool`, defaults to `False`): whether self-attention also sees the whole previous
            block (the Block-Recurrent Transformer's sliding window: a token at slot i sees W + i + 1 tokens, and the
            generation cache holds 2W key/value slots) instead of only the earlier tokens of its own block (the
            paper's pseudocode, block-local). Cross-attention to the context states stays inside the block.
        sliding_window_attention (`bool`, defaults to `False`): with `attend_previous_block`, a token sees exactly the
            last W tokens (itself included), as Mistral's `sliding_window=W`: the previous block's slots up to the
            token's own slot are masked. The cache is unchanged (2W slots).
        num_sink_tokens (`int`, defaults to 0): attention sinks (StreamingLLM, Xiao et al. 2023): self-attention in
            every block past the first window also sees the keys/values of the sequence's first `num_sink_tokens`
            tokens, placed just before the window (RoPE). Pretrained Transformers put much of their attention on the
            first tokens; a model converted from one (scripts/convert_to_bst.py) keeps its quality in windows only
            with them (docs/upcycling.md). At most `block_size`; the generation cache holds them (constant memory).
        bst_variant (`str`, defaults to `"sh"`): how the SSM outputs become context states.
            `"sh"` single-head (one filter, the SSM outputs at the block's own positions, causal mask),
            `"mh"` multi-head (one filter per cross-attention head), `"mf"` multi-filter (`num_context_states`
            filters read at the last position of the previous block, a learned initial context for block 0 and
            learned context-id embeddings).
        ssm_kernel (`str`, defaults to `"s4"`): the long-convolution kernel family. `"s4"`: S4D-style diagonal
            state space with an exact recurrent form (constant-memory generation). `"unstructured"`: an implicit,
            Hyena-style long filter (generation keeps the SSM input history).
        ssm_state_size (`int`, defaults to 64): N, the state size of one "s4" filter (N/2 complex-conjugate modes).
        num_context_states (`int`, *optional*): number of SSM filters per channel. Derived when unset:
            1 for "sh", `num_attention_heads` for "mh", 32 for "mf". "sh" requires 1 and "mh" requires
            `num_attention_heads`.
        bst_layers (`list[int]`, *optional*): indices of the layers that are BST layers; all layers when unset.
        ssm_dt_min (`float`, defaults to 0.01), ssm_dt_max (`float`, defaults to 1.0): range of the initial step
            sizes of the "s4" kernel; they set the range of time scales the SSM starts with (about 1/dt tokens: from
            one token to about one block of 128). Measured in docs/quality.md: [0.01, 1] carries the tokens just
            before a block boundary into the block far better than the S4D default [0.001, 0.1].
        ssm_gate (`bool`, defaults to `False`): a data-dependent gate on the SSM branch (H3/Hyena style): the SSM
            outputs are multiplied, channel by channel, by act(W_g x) with x the layer's normalised input and act
            `hidden_act`, before they become context states. Pointwise in time: no generation state.
        ssm_conv_size (`int`, defaults to 0): taps of a short causal depthwise convolution on the SSM input, before the
            SSM (as Mamba and H3 run one); 0 turns it off, otherwise at least 2. Generation keeps each row's last
            `ssm_conv_size - 1` SSM inputs in the cache.
        ssm_residual (`bool`, defaults to `False`): the SSM output also joins the residual stream beside the
            attention, through a gated projection as Griffin's recurrent block: W_o (mean_c y_c * act(W_r x)), the
            mean over the layer's filters of the SSM outputs (before `ssm_gate`). W_o starts at zero, so a new or
            converted model computes what it computed without the option. Not with `bst_variant="mf"`, whose SSM is
            read at block ends only.
        ssm_cross_attention (`bool`, defaults to `True`): whether attention reads the SSM outputs as context states
            through cross-attention, as the paper's BST does. `False` needs `ssm_residual`: the SSM then reaches the
            model through the residual branch only (Griffin's recurrent block beside block attention), and a BST
            layer's attention has no cross-attention heads, parameters or cached context keys; the 4 D x D matrices
            they took are free for the MLP.
        implicit_filter_features (`int`, defaults to 16): number of sine/cosine frequency pairs that describe a
            position to the "unstructured" kernel's filter network.
        implicit_filter_hidden_size (`int`, defaults to 64): width of the "unstructured" kernel's filter network.
        rope_theta (`float`, defaults to 10000.0): base of the rotary position embedding used inside a block.
        rope_pairing (`str`, defaults to `"interleaved"`): which channels of a head RoPE rotates together.
            `"interleaved"`: channels (2i, 2i+1); `"rotate_half"`: channels (i, i + head_dim/2), Llama's convention.
            Either gives the same model up to a permutation of the query/key weights' rows.
        rms_norm_eps (`float`, defaults to 1e-6): epsilon of the RMS norms.
        attention_dropout (`float`, defaults to 0.0): dropout on attention probabilities in training.
        training_length (`int`, *optional*): the sequence length the model was trained at (scripts/train.py records
            `--sequence_length`). Informational: evaluation by length (scripts/evaluate.py) and the model card read
            it; nothing in the model depends on it.
        max_position_embeddings (`int`, defaults to 2**20): the longest input the model accepts, as the ecosystem
            reads it. BST has no absolute positions and no maximum length, so this is a bound no input comes near.
            Configs written before `training_length` existed used this field for the training length: when
            `training_length` is missing, a `max_position_embeddings` other than 2**20 is read as the training length
            and `max_position_embeddings` becomes 2**20.
        initializer_range (`float`, defaults to 0.02): standard deviation of the normal weight initialisation (with
            `initializer_scheme="fan_in"`, of the embeddings only).
        initializer_scheme (`str`, defaults to `"normal"`): `"normal"` draws every matrix from N(0,
            `initializer_range`^2), as Llama does; `"fan_in"` scales each by its width, as Griffin (RecurrentGemma)
            does: N(0, 1/fan_in) for the projections that read the residual stream and N(0, 2/(num_hidden_layers *
            fan_in)) for those that write to it (attention `o_proj`, MLP `down_proj`), so the residual stream keeps
            its scale with depth and width. Zero-initialised parts (the cross-attention half of `o_proj`, the
            residual SSM branch's output) start at zero in both.
        embedding_multiplier (`float`, defaults to 1.0): the token embeddings are multiplied by this before the first
            layer (the tied LM head is not). Gemma and RecurrentGemma use sqrt(`hidden_size`): with small embedding
            weights, the token's identity then weighs as much in the residual stream as the layers' outputs.
        use_cache (`bool`, defaults to `True`): whether forward returns a `BSTCache` for generation.
        tie_word_embeddings (`bool`, defaults to `True`): share the input embedding and the LM head; `False` gives the
            LM head weights of its own (as most Llama checkpoints have).

    ```python
    >>> from modeling_bst import BSTConfig, BSTForCausalLM
    >>> config = BSTConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, block_size=128)
    >>> model = BSTForCausalLM(config)
    ```"""

    model_type = "bst"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "gelu"
    gated_mlp: bool = False
    qkv_bias: bool = False
    block_size: int = 512
    attend_previous_block: bool = False
    sliding_window_attention: bool = False
    num_sink_tokens: int = 0
    bst_variant: str = "sh"
    ssm_kernel: str = "s4"
    ssm_state_size: int = 64
    num_context_states: int | None = None
    bst_layers: list[int] | None = None
    ssm_dt_min: float = 0.01
    ssm_dt_max: float = 1.0
    ssm_gate: bool = False
    ssm_conv_size: int = 0
    ssm_residual: bool = False
    ssm_cross_attention: bool = True
    implicit_filter_features: int = 16
    implicit_filter_hidden_size: int = 64
    rope_theta: float = 10000.0
    rope_pairing: str = "interleaved"
    rms_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    training_length: int | None = None
    max_position_embeddings: int = NO_MAXIMUM_LENGTH
    initializer_range: float = 0.02
    initializer_scheme: str = "normal"
    embedding_multiplier: float = 1.0
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_context_states is None:
            self.num_context_states = {"sh": 1, "mh": self.num_attention_heads, "mf": 32}.get(self.bst_variant, 1)
        if self.bst_layers is None:
            self.bst_layers = list(range(self.num_hidden_layers))
        if self.training_length is None and self.max_position_embeddings != NO_MAXIMUM_LENGTH:
            # An older config (or caller) that used max_position_embeddings for the training length: keep the
            # information where it belongs, and stop telling generate() and lm-eval that inputs are capped there.
            self.training_length = self.max_position_embeddings
            self.max_position_embeddings = NO_MAXIMUM_LENGTH
        for name in ("layer_types", "attention_chunk_size"):
            if name in kwargs and kwargs.pop(name) != getattr(self, name):
                raise ValueError(
                    f"`{name}` follows from `block_size` and `bst_layers` (here {getattr(self, name)}); set those "
                    "instead."
                )
        super().__post_init__(**kwargs)

    @property
    def layer_types(self) -> list[str]:
        """Each layer's kind in Transformers' names (derived from `bst_layers`, never set): a BST layer is `"hybrid"`
        (attention plus a linear-attention-shaped SSM state), another layer `"chunked_attention"` (attention inside
        blocks of `block_size`, as Llama 4's chunked attention; with `attend_previous_block` the previous block too).
        Not `"hybrid_sliding"`/`"sliding_attention"`: their `sliding_window` is a settable field that tools read as the
        attention window, and BST's window is `block_size`."""
        return ["hybrid" if i in self.bst_layers else "chunked_attention" for i in range(self.num_hidden_layers)]

    @property
    def attention_chunk_size(self) -> int:
        """The chunk of `"chunked_attention"` layers: one block (what `DynamicCache(config=...)` reads)."""
        return self.block_size

    def validate_architecture(self):
        """Part of `@strict` validation: every check names the field and the value that broke it."""
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "block_size",
            "ssm_state_size",
            "num_context_states",
            "implicit_filter_features",
            "implicit_filter_hidden_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if value is None or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value}.")
        finite_positive = ("ssm_dt_min", "ssm_dt_max", "rope_theta", "rms_norm_eps")
        for name in finite_positive + ("initializer_range", "embedding_multiplier"):
            # inf or a negative value is accepted by the arithmetic and turns into NaN outputs later.
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a finite positive number, got {value}.")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"`hidden_act` must be one of {sorted(ACT2FN)}, got {self.hidden_act!r}.")
        if self.training_length is not None and self.training_length <= 0:
            raise ValueError(f"`training_length` must be a positive integer, got {self.training_length}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_key_value_heads` ({self.num_key_value_heads}) must divide `num_attention_heads` "
                f"({self.num_attention_heads}): each key/value head serves a whole group of query heads."
            )
        if self.rope_pairing not in ROPE_PAIRINGS:
            raise ValueError(f"`rope_pairing` must be one of {ROPE_PAIRINGS}, got {self.rope_pairing!r}.")
        if self.head_dim % 2 != 0:
            raise ValueError(f"`head_dim` must be even for rotary embeddings, got {self.head_dim}.")
        if self.bst_variant not in BST_VARIANTS:
            raise ValueError(f"`bst_variant` must be one of {BST_VARIANTS}, got {self.bst_variant!r}.")
        if self.initializer_scheme not in INITIALIZER_SCHEMES:
            raise ValueError(
                f"`initializer_scheme` must be one of {INITIALIZER_SCHEMES}, got {self.initializer_scheme!r}."
            )
        if self.ssm_kernel not in SSM_KERNELS:
            raise ValueError(f"`ssm_kernel` must be one of {SSM_KERNELS}, got {self.ssm_kernel!r}.")
        if self.ssm_state_size % 2 != 0:
            raise ValueError(
                f"`ssm_state_size` must be even (N/2 complex-conjugate modes), got {self.ssm_state_size}."
            )
        if self.bst_variant == "sh" and self.num_context_states != 1:
            raise ValueError(f"`bst_variant='sh'` uses one filter; `num_context_states` is {self.num_context_states}.")
        if self.bst_variant == "mh" and self.num_context_states != self.num_attention_heads:
            raise ValueError(
                f"`bst_variant='mh'` uses one filter per head: `num_context_states` ({self.num_context_states}) must "
                f"equal `num_attention_heads` ({self.num_attention_heads})."
            )
        bad_layers = [i for i in self.bst_layers if not 0 <= i < self.num_hidden_layers]
        if bad_layers:
            raise ValueError(
                f"`bst_layers` entries must lie in [0, {self.num_hidden_layers}) (`num_hidden_layers`), "
                f"got {bad_layers}."
            )
        if len(set(self.bst_layers)) != len(self.bst_layers):
            raise ValueError(f"`bst_layers` lists a layer twice: {self.bst_layers}.")
        if not 0.0 < self.ssm_dt_min <= self.ssm_dt_max:
            raise ValueError(
                f"Need 0 < `ssm_dt_min` <= `ssm_dt_max`, got {self.ssm_dt_min} and {self.ssm_dt_max}."
            )
        if self.ssm_conv_size < 0 or self.ssm_conv_size == 1:
            raise ValueError(
                f"`ssm_conv_size` is the number of taps of the short convolution on the SSM input: 0 (off) or at "
                f"least 2, got {self.ssm_conv_size}."
            )
        options_on = [name for name in ("ssm_gate", "ssm_conv_size", "ssm_residual") if getattr(self, name)]
        if options_on and not self.bst_layers:
            raise ValueError(f"{options_on} change the SSM of BST layers, and `bst_layers` is empty.")
        if self.ssm_residual and self.bst_variant == "mf":
            raise ValueError(
                '`ssm_residual` adds the SSM output at every token to the residual stream; `bst_variant="mf"` reads '
                "its SSM at block ends only (its training path never forms per-token outputs). Use \"sh\" or \"mh\"."
            )
        if not self.ssm_cross_attention and not self.ssm_residual:
            raise ValueError(
                "`ssm_cross_attention=False` needs `ssm_residual=True`: without cross-attention the residual branch is "
                "the SSM's only way into the model."
            )
        if not self.ssm_cross_attention and self.ssm_gate:
            raise ValueError(
                "`ssm_gate` gates the context states that cross-attention reads; with `ssm_cross_attention=False` "
                "there are none (the residual branch has its own gate)."
            )
        if not 0 <= self.num_sink_tokens <= self.block_size:
            raise ValueError(
                f"`num_sink_tokens` must lie in [0, block_size = {self.block_size}] (the sinks are the first block's "
                f"first tokens), got {self.num_sink_tokens}."
            )
        if self.sliding_window_attention and not self.attend_previous_block:
            raise ValueError(
                "`sliding_window_attention` masks part of the previous block, which self-attention sees only with "
                "`attend_previous_block=True`."
            )
        if self.sliding_window_attention and self.num_sink_tokens:
            raise ValueError(
                "`sliding_window_attention` and `num_sink_tokens` cannot be combined: the sinks sit just before a "
                "whole-block window, and a sliding window starts at every token."
            )
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"`attention_dropout` must lie in [0, 1), got {self.attention_dropout}.")


__all__ = ["BSTConfig", "NO_MAXIMUM_LENGTH"]
