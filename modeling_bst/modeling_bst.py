"""PyTorch Block-State Transformer (Fathi et al., "Block-State Transformers", NeurIPS 2023, arXiv 2306.09539).

A BST layer = an SSM sublayer + a Block Transformer sublayer:

    u (B, L, D) --norm--> SSM: one causal FFT convolution over the WHOLE sequence, C filters per channel
                            -> context states (B, L, D, C)
                 --norm--> Block Transformer, all blocks of W tokens in parallel:
                            causal self-attention inside the block  (H heads)
                            cross-attention to the block's context states (H more heads)
                            concat heads -> one output projection -> residual -> FFN -> residual

Variants (`config.bst_variant`): "sh" (C = 1; token i of a block reads the context states of the block's own
positions j <= i), "mh" (C = H; head h reads filter h), "mf" (C = S filters read at the last position of the previous
block: S context vectors per block, a learned initial context for block 0, learned context-id embeddings).

Every sublayer is causal, so a row whose padding has been moved behind its real tokens computes exactly what the row
alone computes. The model uses that: it compacts each row's real tokens to the front ("left-aligns" them), runs the
layers, and scatters the outputs back. Generation keeps a bounded state per row (`BSTCache`): the current block's
keys/values, the current block's context states, and the SSM state ("s4") or the SSM input history ("unstructured").
"""


import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import logging

from .cache_bst import BSTCache, BSTLayerCache
from .configuration_bst import BSTConfig
from .ssm_ops import (
    COMPLEX_DTYPES,
    block_end_convolution,
    block_end_scan,
    causal_fft_conv,
    complex_exp,
    real_vandermonde_sum,
    scaled_complex_exp,
    ssm_compute_dtype,
    vandermonde_reduce,
)


logger = logging.get_logger(__name__)


class BSTRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class BSTRotaryEmbedding(nn.Module):
    """RoPE over the slot of a token inside its block (0..W-1): positions never exceed W, so any length works."""

    def __init__(self, config: BSTConfig):
        super().__init__()
        self.config = config
        self.inv_freq = nn.Buffer(self.compute_inv_freq(config), persistent=False)

    @staticmethod
    def compute_inv_freq(config: BSTConfig) -> torch.Tensor:
        exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim
        return 1.0 / (config.rope_theta**exponents)

    @torch.no_grad()
    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        """slots (B, T) -> rotations exp(i * slot * inv_freq) (B, T, head_dim/2), complex64."""
        angles = slots[..., None].float() * self.inv_freq.to(slots.device)
        return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(states: torch.Tensor, rotations: torch.Tensor, pairing: str = "interleaved") -> torch.Tensor:
    """RoPE: channels (2i, 2i+1) of every head ("interleaved"), or (i, i + head_dim/2) ("rotate_half", Llama's
    convention), read as one complex number, are multiplied by rotations[..., i].

    states (B, T, H, head_dim), rotations (B or 1, T, head_dim/2) complex. One complex multiply is faster (forward + backward)
    than the rotate-half form, which needs a split, a negation, a concatenation and three more
    elementwise passes; "rotate_half" pairs are gathered into complex numbers by a transpose and multiplied the same
    way: (x1 + i x2) e^(i theta) = (x1 cos - x2 sin) + i (x2 cos + x1 sin), Llama's q * cos + rotate_half(q) * sin.
    Computed in fp32: there is no bfloat16 complex type.
    """
    if pairing == "rotate_half":
        halves = states.float().unflatten(-1, (2, -1)).transpose(-1, -2)  # (B, T, H, head_dim/2, 2)
        pairs = torch.view_as_complex(halves.contiguous())
        return torch.view_as_real(pairs * rotations.unsqueeze(2)).transpose(-1, -2).flatten(-2).to(states.dtype)
    pairs = torch.view_as_complex(states.float().contiguous().unflatten(-1, (-1, 2)))  # (B, T, H, head_dim/2)
    return torch.view_as_real(pairs * rotations.unsqueeze(2)).flatten(-2).to(states.dtype)


def fan_in_std(fan_in: int, num_layers: int, writes_residual: bool) -> float:
    """Griffin's initialisation (`initializer_scheme="fan_in"`): a projection that reads the residual stream
    N(0, 1/fan_in), one that writes to it N(0, 2/(num_layers fan_in)), so the stream keeps its scale with depth."""
    return ((2.0 / num_layers if writes_residual else 1.0) / fan_in) ** 0.5


class BSTDownProjection(nn.Linear):
    """`down_proj` of the MLP: a plain linear map; its own class only so that `initializer_scheme="fan_in"` can give
    it the scale of a projection that writes to the residual stream."""

    def __init__(self, intermediate_size: int, hidden_size: int):
        super().__init__(intermediate_size, hidden_size, bias=False)


class BSTMLP(nn.Module):
    """down(act(up(x))), or with `config.gated_mlp` Llama's gated form down(act(gate(x)) * up(x))."""

    def __init__(self, config: BSTConfig):
        super().__init__()
        self.gated = config.gated_mlp
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = BSTDownProjection(config.intermediate_size, config.hidden_size)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))
        return self.down_proj(self.act_fn(self.up_proj(hidden_states)))


def step_reads_all_slots(device: torch.device) -> bool:
    """Whether a decoding step attends to all W slots of its block (with a mask) instead of stopping at the furthest
    row's slot: when compiling (shapes must not change) and on accelerators. There a key length that changes every
    step costs a new attention plan per length (cuDNN's SDPA backend; docs/design.md) and reading the furthest slot
    syncs with the host; the W - span extra keys cost nothing next to that."""
    return torch.compiler.is_compiling() or device.type != "cpu"


@dataclass
class BlockLayout:
    """Places a chunk of T tokens (real tokens first in each row) into blocks of `block_size` tokens.

    Row r has already seen `seen_tokens[r]` real tokens (from the cache), so its first new token sits at slot
    `offsets[r] = seen_tokens[r] % W` of the current block, and the block's earlier slots come from the cache. When
    every offset is 0 the layout is the chunk itself, padded at the end to whole blocks (`virtual_index` is None);
    otherwise token t of row r goes to virtual position offsets[r] + t.
    """

    block_size: int
    lengths: torch.Tensor  # (B,) real tokens of each row in this chunk
    token_mask: torch.Tensor  # (B, T) True for real tokens (a prefix of each row)
    seen_tokens: torch.Tensor  # (B,) real tokens seen before this chunk
    offsets: torch.Tensor  # (B,) slot of the first new token in its block
    virtual_index: torch.Tensor | None  # (B, T) offsets + t, or None when all offsets are 0
    num_blocks: int
    has_padding: bool  # some token_mask entry is False
    is_single_step: bool  # one new token per row on top of a cache: queries stay out of the block layout
    # RoPE rotation by -W (1, 1, head_dim/2): a previous-block key at slot j sits W - j + i before a query at slot i.
    previous_block_rotation: torch.Tensor | None = None
    # RoPE rotation that moves the attention sinks (at slots 0..k-1 of the first block) to just before a block's
    # attention window: by -k, or by -(W + k) with previous-block attention (`num_sink_tokens`).
    sink_rotation: torch.Tensor | None = None
    # A decoding step attends to the first `step_span` slots of its block, with `step_mask` (B, 1, 1, step_span), or
    # with no mask when every row sees all of them (rows at the same slot). Eager steps on CPU stop at the furthest
    # row's slot, so the early slots of a block cost less and a mask-free attention call takes the fast kernel; other
    # steps read all W slots (`step_reads_all_slots`).
    step_span: int = 0
    step_mask: torch.Tensor | None = None
    # `step_key_mask`'s masks, made once per forward for all layers.
    step_key_masks: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls, token_mask: torch.Tensor, seen_tokens: torch.Tensor, block_size: int, has_cache: bool, has_padding: bool
    ):
        batch, length = token_mask.shape
        offsets = seen_tokens % block_size
        is_single_step = has_cache and length == 1
        step_span, step_mask = block_size, None
        if is_single_step:
            # One token per row, at its own slot of one block: no data-dependent branch.
            virtual_index, span = offsets[:, None], 1
            lowest, highest = 0, -1
            if not step_reads_all_slots(token_mask.device):
                lowest, highest = offsets.aminmax()
                lowest, highest = int(lowest), int(highest)
                step_span = highest + 1
            if lowest != highest:
                slots = torch.arange(step_span, device=token_mask.device)
                step_mask = (slots <= offsets[:, None]).view(-1, 1, 1, step_span)
        elif not has_cache or bool((offsets == 0).all()):  # without a cache every row starts a block: no read
            virtual_index, span = None, length
        else:
            virtual_index = offsets[:, None] + torch.arange(length, device=token_mask.device)
            span = int(offsets.max()) + length
        return cls(
            block_size=block_size,
            lengths=token_mask.sum(1),
            token_mask=token_mask,
            seen_tokens=seen_tokens,
            offsets=offsets,
            virtual_index=virtual_index,
            num_blocks=-(-span // block_size),
            has_padding=has_padding,
            is_single_step=is_single_step,
            step_span=step_span,
            step_mask=step_mask,
        )

    def to_blocks(self, states: torch.Tensor, cached_block: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, ...) -> (B, num_blocks, W, ...); the first block's earlier slots come from `cached_block` (B, W, ...)."""
        batch, length = states.shape[:2]
        span = self.num_blocks * self.block_size
        if self.virtual_index is None:
            padded = states if span == length else F.pad(states, (0, 0) * (states.dim() - 2) + (0, span - length))
        else:
            padded = states.new_zeros(batch, span, *states.shape[2:])
            if cached_block is not None:
                padded[:, : self.block_size] = cached_block
            index = self.virtual_index.view(batch, length, *([1] * (states.dim() - 2))).expand_as(states)
            padded = padded.scatter(1, index, states)
        return padded.unflatten(1, (self.num_blocks, self.block_size))

    def from_blocks(self, blocks: torch.Tensor, length: int) -> torch.Tensor:
        """Inverse of `to_blocks` for the chunk's tokens: (B, num_blocks, W, ...) -> (B, T, ...)."""
        flat = blocks.flatten(1, 2)
        if self.virtual_index is None:
            return flat[:, :length]
        index = self.virtual_index.view(*self.virtual_index.shape, *([1] * (flat.dim() - 2)))
        return flat.gather(1, index.expand(-1, -1, *flat.shape[2:]))

    def current_block_index(self) -> torch.Tensor:
        """(B,) index, among this chunk's blocks, of the block that holds each row's next token (may be num_blocks)."""
        return (self.offsets + self.lengths) // self.block_size

    def last_block(self, blocks: torch.Tensor) -> torch.Tensor:
        """The block each row's next token falls in, to carry to the next call: (B, num_blocks, W, ...) -> (B, W, ...).
        When that block starts fresh, any block will do: its slots are masked until overwritten."""
        index = self.current_block_index().clamp(max=self.num_blocks - 1)
        index = index.view(-1, 1, *([1] * (blocks.dim() - 2))).expand(-1, 1, *blocks.shape[2:])
        return blocks.gather(1, index).squeeze(1)

    def write_step(self, cached_block: torch.Tensor, states: torch.Tensor) -> None:
        """Writes a decoding step's (B, 1, ...) states into each row's slot of the cached block (B, W, ...), in place.
        Eagerly a scatter is cheapest; a compiled step indexes rows and slots, which inductor keeps in place (it turns
        a scatter into a copy of the whole block)."""
        if torch.compiler.is_compiling():
            rows = torch.arange(states.shape[0], device=states.device)
            cached_block[rows, self.offsets] = states[:, 0]
        else:
            cached_block.scatter_(1, self.offsets.view(-1, *([1] * (states.dim() - 1))).expand_as(states), states)

    def single_step_mask(self) -> torch.Tensor:
        """(B, 1, 1, W) keys a lone new token at slot `offsets` may see: the slots of its block up to itself."""
        slots = torch.arange(self.block_size, device=self.offsets.device)
        return (slots <= self.offsets[:, None]).view(-1, 1, 1, self.block_size)

    def previous_of_last_block(self, blocks_with_previous: torch.Tensor) -> torch.Tensor:
        """The block before the one holding each row's next token. `blocks_with_previous` (B, 1 + num_blocks, W, ...)
        has the block before the chunk's first block in front: (B, W, ...)."""
        index = self.current_block_index().view(-1, 1, *([1] * (blocks_with_previous.dim() - 2)))
        return blocks_with_previous.gather(1, index.expand(-1, 1, *blocks_with_previous.shape[2:])).squeeze(1)

    def previous_block_mask(self, sliding_window: bool) -> torch.Tensor:
        """(B * num_blocks, 1, W, 2W) keys each query may see when the previous block joins its own: the W slots of the
        previous block (when the sequence has one; with `sliding_window` only the slots j > i of a query at slot i,
        so that it sees exactly the last W tokens), then the slots of its own block up to itself."""
        block_size, device = self.block_size, self.offsets.device
        first_block = self.seen_tokens // block_size  # absolute index of the chunk's first block
        has_previous = (first_block[:, None] + torch.arange(self.num_blocks, device=device)) >= 1  # (B, N)
        own = torch.ones(block_size, block_size, dtype=torch.bool, device=device).tril()
        previous = has_previous[:, :, None, None].expand(-1, -1, block_size, block_size)
        if sliding_window:
            previous = previous & ~own  # query slot i, previous-block slot j: (N + i) - j < W  <=>  j > i
        mask = torch.cat([previous, own.expand(*has_previous.shape, -1, -1)], dim=-1)  # (B, N, W, 2W)
        return mask.flatten(0, 1).unsqueeze(1)

    def sinks_visible(self, first_visible_block: int) -> torch.Tensor:
        """Whether the attention sinks join the keys of each block: (B, num_blocks), or (B,) for a single step. They
        do from the first block whose window no longer holds them (absolute block index `first_visible_block`)."""
        first_block = self.seen_tokens // self.block_size  # absolute index of the chunk's first block
        if self.is_single_step:
            return first_block >= first_visible_block
        return (first_block[:, None] + torch.arange(self.num_blocks, device=first_block.device)) >= first_visible_block

    def step_key_mask(
        self, num_sinks: int, with_previous_block: bool, sliding_window: bool = False
    ) -> torch.Tensor | None:
        """(B, 1, 1, K) keys a decoding step on a cache may see, laid out as `BSTAttention` joins them: the `num_sinks`
        attention sinks (once the row's window no longer holds them), the W slots of the previous block (when the row
        has one; with `sliding_window` only the slots after the step's own), then the first `step_span` slots of its
        own block up to itself. None when every row sees every key. Every layer asks for the same mask: it is made
        once per forward."""
        key = (num_sinks, with_previous_block, sliding_window)
        if key not in self.step_key_masks:
            batch = self.seen_tokens.shape[0]
            current_block = self.seen_tokens // self.block_size
            parts = []
            if num_sinks:
                sinks_visible = current_block >= (2 if with_previous_block else 1)
                parts.append(sinks_visible[:, None].expand(-1, num_sinks))
            if with_previous_block:
                previous = (current_block >= 1)[:, None].expand(-1, self.block_size)
                if sliding_window:
                    slots = torch.arange(self.block_size, device=self.seen_tokens.device)
                    previous = previous & (slots[None, :] > self.offsets[:, None])
                parts.append(previous)
            mask = self.step_mask
            if parts:
                if self.step_mask is None:  # every row sees all `step_span` slots of its block
                    own = torch.ones(batch, self.step_span, dtype=torch.bool, device=self.seen_tokens.device)
                else:
                    own = self.step_mask.view(batch, -1)
                mask = torch.cat([*parts, own], dim=-1).view(batch, 1, 1, -1)
            self.step_key_masks[key] = mask
        return self.step_key_masks[key]


def block_end_index(layout: BlockLayout, length: int) -> torch.Tensor:
    """(B, N) chunk positions of the last token of each of the layout's blocks, clamped to the chunk: where "mf" reads
    its context states."""
    block_ends = torch.arange(1, layout.num_blocks + 1, device=layout.offsets.device) * layout.block_size - 1
    return (block_ends[None, :] - layout.offsets[:, None]).clamp(0, length - 1)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    is_causal: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """query (N, H, Q, d), key/value (N, H, K, d); `attention_mask` is boolean (True = may attend)."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if is_causal:
        causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
        attention_mask = causal if attention_mask is None else attention_mask & causal
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    probabilities = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probabilities = F.dropout(probabilities, p=dropout, training=module.training)
    return torch.matmul(probabilities, value).transpose(1, 2).contiguous(), probabilities


def repeat_key_value_heads(key, value, num_heads):
    """(..., H_kv, d) -> (..., H, d): grouped key/value heads each serve H / H_kv query heads. Repeated at attention
    time, after the cache, which keeps H_kv heads."""
    if key.shape[-2] == num_heads:
        return key, value
    groups = num_heads // key.shape[-2]
    return key.repeat_interleave(groups, dim=-2), value.repeat_interleave(groups, dim=-2)


def runs_as_written(module: nn.Module, module_class: type) -> bool:
    """Whether `module` is exactly `module_class` with no forward hooks, so that its weights may be used directly
    (a LoRA-wrapped, quantised or hooked module must run as a module)."""
    return type(module) is module_class and not (module._forward_hooks or module._forward_pre_hooks)


def rms_normed_projection(
    states: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor
) -> torch.Tensor:
    r"""RMSNorm over D, then a projection per filter: states (B, C, T, D), weight (C, E, D) -> (B, C, T, E),
    W_c RMSNorm(y) with RMSNorm(y) = g * y * r and r = rsqrt(mean_D y^2 + eps), one number per (filter, position), so

        W RMSNorm(y) = r * ((W diag g) y)

    The norm weight g folds into the (small) projection weight, one batched matmul reads the states in place, any
    strides (the SSM's (D, T) planes as transposed matrices), and r scales the E projected numbers of each row: no
    normalised copy of the C * D numbers per position, and no passes over them in the backward beyond the matmul's and
    the norm's own.
    """
    mean_square = torch.linalg.vector_norm(states, dim=-1, keepdim=True).square() / states.shape[-1]
    projected = states @ (weight * norm_weight).transpose(1, 2)  # (B, C, T, E)
    return (projected * torch.rsqrt(mean_square + eps)).to(projected.dtype)


class BSTOutputProjection(nn.Linear):
    """`o_proj`: the self-attention heads (then, in a BST layer, the cross-attention heads) mixed into the model width.
    A plain linear map; its own class only so that initialisation can start the cross-attention half at zero and
    give it the scale of a projection that writes to the residual stream (`initializer_scheme="fan_in"`)."""

    def __init__(self, inner_size: int, hidden_size: int, cross_attention: bool):
        super().__init__((2 if cross_attention else 1) * inner_size, hidden_size, bias=False)
        self.cross_attention = cross_attention

    @property
    def self_attention_size(self) -> int:
        """The input columns of the self-attention heads (the first half when there are cross-attention heads)."""
        return self.in_features // 2 if self.cross_attention else self.in_features


class BSTAttention(nn.Module):
    """Causal self-attention inside each block and, in BST layers (unless `ssm_cross_attention=False`),
    cross-attention to the block's context states.

    The self- and cross-attention heads are concatenated and mixed by one output projection (the Block-Recurrent
    Transformer's "vertical" cell without recurrence and without gates).
    """

    def __init__(self, config: BSTConfig, layer_idx: int, cross_attention: bool):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.cross_attention = cross_attention
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        # What Transformers' attention functions would repeat key/value heads by. `_attend` repeats them itself (the
        # cross-attention's context keys have all heads), so the functions must not.
        self.num_key_value_groups = 1
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.rope_pairing = config.rope_pairing
        inner_size = self.num_heads * self.head_dim
        key_value_size = self.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, key_value_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, key_value_size, bias=config.qkv_bias)
        if cross_attention:
            self.context_norm = BSTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.cross_q_proj = nn.Linear(config.hidden_size, inner_size, bias=False)
            self.context_k_proj = nn.Linear(config.hidden_size, inner_size, bias=False)
            self.context_v_proj = nn.Linear(config.hidden_size, inner_size, bias=False)
            if config.bst_variant == "mf":
                self.initial_context = nn.Parameter(torch.empty(config.num_context_states, config.hidden_size))
                self.context_ids = nn.Parameter(torch.empty(config.num_context_states, config.hidden_size))
        self.o_proj = BSTOutputProjection(inner_size, config.hidden_size, cross_attention=cross_attention)

    def _attend(self, query, key, value, attention_mask=None, is_causal=False) -> torch.Tensor:
        """query (B, N, Q, H, d), key/value (B, N, K, H or H_kv, d) -> (B, N, Q, H*d): one attention call over all
        blocks."""
        batch, num_blocks = query.shape[:2]
        key, value = repeat_key_value_heads(key, value, query.shape[-2])
        flat = [states.flatten(0, 1).transpose(1, 2) for states in (query, key, value)]  # (B*N, H, len, d)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, _ = attention_interface(
            self,
            *flat,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=is_causal,
        )
        return output.reshape(batch, num_blocks, query.shape[2], -1)

    def _attend_step(self, query, key, value, attention_mask) -> torch.Tensor:
        """One decoding step: query (B, 1, H, d), key/value (B, K, H, d) -> (B, 1, H*d). With SDPA it calls the kernel
        directly: for one query, `_attend`'s block reshaping and Transformers' SDPA wrapper cost more than the attention
        itself."""
        if self.config._attn_implementation != "sdpa" or self.training:
            return self._attend(query[:, None], key[:, None], value[:, None], attention_mask)[:, 0]
        # SDPA serves grouped key/value heads itself (query head h reads key/value head h // groups, as
        # `repeat_key_value_heads` would): no per-step copy of every key and value for each query head.
        output = F.scaled_dot_product_attention(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            attention_mask,
            scale=self.scaling,
            enable_gqa=key.shape[2] != query.shape[2],
        )  # (B, H, 1, d)
        return output.transpose(1, 2).reshape(query.shape[0], 1, -1)

    def _attention_sinks(self, key, value, layout, layer_cache):
        """The keys/values of the sequence's first `num_sink_tokens` tokens, (B, k, H_kv, d) each, which every later
        block's self-attention also sees (StreamingLLM's attention sinks: pretrained models park attention on the first
        tokens, and a window without them loses that). This chunk's tokens at sequence positions < k are written into
        their sink slots first, their keys rotated to sit just before a block's attention window; the cache keeps the
        slots, so memory stays constant."""
        count = self.config.num_sink_tokens
        batch, length = key.shape[:2]
        if layer_cache is None or layer_cache.sink_keys is None:
            sink_keys = key.new_zeros(batch, count, *key.shape[2:])
            sink_values = value.new_zeros(batch, count, *value.shape[2:])
        else:
            sink_keys, sink_values = layer_cache.sink_keys, layer_cache.sink_values
            # A decoding step of rows all past their sinks writes none; on an eager CPU step the check costs no sync.
            reads_host = layout.is_single_step and not step_reads_all_slots(key.device)
            if reads_host and bool((layout.seen_tokens >= count).all()):
                return sink_keys, sink_values
        new = min(length, count)  # only a chunk's first k tokens can be among the sequence's first k
        positions = layout.seen_tokens[:, None] + torch.arange(new, device=key.device)  # (B, new)
        # Tokens past the sinks (or padding) go to slot k, a discard slot cut off after the scatter.
        slots = torch.where((positions < count) & layout.token_mask[:, :new], positions, count)
        index = slots.view(batch, new, 1, 1).expand(-1, -1, *key.shape[2:])
        new_keys = apply_rotary(key[:, :new], layout.sink_rotation, self.rope_pairing)
        sink_keys = torch.cat([sink_keys, sink_keys[:, :1]], dim=1).scatter(1, index, new_keys)[:, :count]
        sink_values = torch.cat([sink_values, sink_values[:, :1]], dim=1).scatter(1, index, value[:, :new])[:, :count]
        if layer_cache is not None:
            layer_cache.store_sinks(sink_keys, sink_values)
        return sink_keys, sink_values

    def _with_sinks(self, sinks, layout, key_parts, value_parts, mask):
        """Joins the attention sinks (`_attention_sinks`) and the blocks' keys/values (`key_parts`/`value_parts`, each
        (B, N, K_i, H_kv, d)) along the key axis in one copy, and puts the sinks in front of `mask` ((B*N, 1, Q, K), or
        None for plain causal attention within the block)."""
        num_blocks = key_parts[0].shape[1]
        sink_keys, sink_values = (states[:, None].expand(-1, num_blocks, -1, -1, -1) for states in sinks)
        visible = layout.sinks_visible(2 if self.config.attend_previous_block else 1)  # (B, N), or (B,) when N = 1
        if mask is None:  # causal inside the block: W queries, W keys
            own = torch.ones(key_parts[0].shape[2], key_parts[0].shape[2], dtype=torch.bool, device=sink_keys.device)
            mask = own.tril().expand(visible.numel(), 1, -1, -1)
        sink_mask = visible.reshape(-1, 1, 1, 1).expand(-1, 1, mask.shape[2], sink_keys.shape[2])
        return (
            torch.cat([sink_keys, *key_parts], dim=2),
            torch.cat([sink_values, *value_parts], dim=2),
            torch.cat([sink_mask, mask], dim=-1),
        )

    def _block_attention(self, query, key, value, layout, cached_keys, cached_values, store, sinks=None):
        """Causal attention inside blocks; keys/values (B, T, H, d) of this chunk join the cached ones of the block
        (`cached_keys`/`cached_values` (B, W, H, d), None without a cache or before its first use), and the attention
        sinks when given; `store` (a `BSTLayerCache` method, None without a cache) keeps the block of each row's next
        token."""
        if layout.is_single_step and cached_keys is not None:
            # Decoding: write the new key/value into its slot of the cached block in place, attend to slots <= it.
            layout.write_step(cached_keys, key)
            layout.write_step(cached_values, value)
            keys, values = cached_keys[:, : layout.step_span], cached_values[:, : layout.step_span]
            if sinks is not None:
                keys, values = (torch.cat([sink, own], dim=1) for sink, own in zip(sinks, (keys, values)))
            # The cross-attention comes through here too, without sinks.
            mask = layout.step_key_mask(self.config.num_sink_tokens if sinks is not None else 0, False)
            return self._attend_step(query, keys, values, mask)
        key_blocks = layout.to_blocks(key, cached_keys)  # (B, N, W, H, d)
        value_blocks = layout.to_blocks(value, cached_values)
        if store is not None:
            store(layout.last_block(key_blocks), layout.last_block(value_blocks))
        if layout.is_single_step:  # a single token on an empty cache
            mask = layout.single_step_mask()
            if sinks is not None:
                key_blocks, value_blocks, mask = self._with_sinks(sinks, layout, [key_blocks], [value_blocks], mask)
            output = self._attend(query[:, None], key_blocks, value_blocks, mask)
            return output[:, 0]  # (B, 1, H*d)
        if sinks is None:
            output = self._attend(layout.to_blocks(query), key_blocks, value_blocks, is_causal=True)
        else:
            key_blocks, value_blocks, mask = self._with_sinks(sinks, layout, [key_blocks], [value_blocks], None)
            output = self._attend(layout.to_blocks(query), key_blocks, value_blocks, mask)
        return layout.from_blocks(output, query.shape[1])

    def _previous_block_attention(self, query, key, value, layout, layer_cache, sinks=None):
        """Causal self-attention over the token's own block and the whole previous block (`attend_previous_block`):
        (B, T, H, d) -> (B, T, H*d). The cache holds both blocks' keys/values (2W slots)."""
        # The cache holds, per row, the block of the row's next token (`keys`/`values`) and the block before it
        # (`previous_keys`, rotated by -W, and `previous_values`), whichever path wrote them.
        rotation = layout.previous_block_rotation
        if layout.is_single_step and layer_cache is not None and layer_cache.keys is not None:
            layout.write_step(layer_cache.keys, key)
            layout.write_step(layer_cache.values, value)
            span = layout.step_span
            key_parts = [layer_cache.previous_keys, layer_cache.keys[:, :span]]
            value_parts = [layer_cache.previous_values, layer_cache.values[:, :span]]
            if sinks is not None:
                key_parts, value_parts = [sinks[0], *key_parts], [sinks[1], *value_parts]
            keys = torch.cat(key_parts, dim=1)  # (B, k + W + span, H_kv, d)
            values = torch.cat(value_parts, dim=1)
            # Self-attention: the sinks are in `keys`.
            mask = layout.step_key_mask(self.config.num_sink_tokens, True, self.config.sliding_window_attention)
            # A real token at slot W - 1 completes its block, which becomes the previous block of the row's next token
            # (in place; a compiled step or one on an accelerator always copies, which needs no host sync; an eager CPU
            # step only when some row completes a block).
            closes_block = (layout.offsets == self.config.block_size - 1) & layout.token_mask[:, 0]
            if step_reads_all_slots(query.device) or bool(closes_block.any()):
                flag = closes_block.view(-1, *([1] * (layer_cache.keys.dim() - 1)))
                closed_keys = apply_rotary(layer_cache.keys, rotation, self.rope_pairing)
                layer_cache.store_previous_block(
                    torch.where(flag, closed_keys, layer_cache.previous_keys),
                    torch.where(flag, layer_cache.values, layer_cache.previous_values),
                )
            return self._attend_step(query, keys, values, mask)

        cached_blocks = [None] * 4 if layer_cache is None else [
            layer_cache.keys, layer_cache.values, layer_cache.previous_keys, layer_cache.previous_values
        ]
        key_blocks = layout.to_blocks(key, cached_blocks[0])  # (B, N, W, H_kv, d)
        value_blocks = layout.to_blocks(value, cached_blocks[1])
        # Each block as the next block's queries see it, after the block before the chunk's first one: from the cache,
        # or zeros (masked) at the sequence start.
        shifted_key_blocks = apply_rotary(key_blocks.flatten(1, 2), rotation, self.rope_pairing).view_as(key_blocks)
        previous_key_blocks, previous_value_blocks = (
            torch.cat([(torch.zeros_like(blocks[:, 0]) if previous is None else previous)[:, None], blocks], dim=1)
            for blocks, previous in zip((shifted_key_blocks, value_blocks), cached_blocks[2:])
        )  # (B, 1 + N, W, H_kv, d)
        if layer_cache is not None:
            layer_cache.store_block(layout.last_block(key_blocks), layout.last_block(value_blocks))
            layer_cache.store_previous_block(
                layout.previous_of_last_block(previous_key_blocks), layout.previous_of_last_block(previous_value_blocks)
            )
        key_parts = [previous_key_blocks[:, :-1], key_blocks]
        value_parts = [previous_value_blocks[:, :-1], value_blocks]
        mask = layout.previous_block_mask(self.config.sliding_window_attention)
        if sinks is not None:
            keys, values, mask = self._with_sinks(sinks, layout, key_parts, value_parts, mask)
        else:
            keys, values = torch.cat(key_parts, dim=2), torch.cat(value_parts, dim=2)  # (B, N, 2W, H_kv, d)
        output = self._attend(layout.to_blocks(query), keys, values, mask)
        return layout.from_blocks(output, query.shape[1])

    def _project_context(self, projection: nn.Linear, context_states: torch.Tensor) -> torch.Tensor:
        """(B, C, T, D) -> (B, T, H, d). With one filter per head ("mh"), head h projects filter h's states."""
        if context_states.shape[1] == 1:
            return projection(context_states[:, 0]).unflatten(-1, (self.num_heads, self.head_dim))
        if runs_as_written(projection, nn.Linear):
            # Head h needs only its own d rows of the weight applied to filter h: one batched matmul over heads, which
            # reads the (B, C, T, D) states in place.
            weight = projection.weight.view(self.num_heads, self.head_dim, -1)  # (H, d, D)
            return (context_states @ weight.transpose(1, 2)).transpose(1, 2)  # (B, H, T, d) -> (B, T, H, d)
        # A wrapped or hooked projection (LoRA, quantised, FSDP-managed) must run as a module: every head projects
        # every filter and head h keeps filter h - H times the FLOPs, the same result.
        projected = projection(context_states).unflatten(-1, (self.num_heads, self.head_dim))  # (B, C, T, H, d)
        return projected.diagonal(dim1=1, dim2=3).permute(0, 1, 3, 2)  # (B, T, d, C=H) -> (B, T, H, d)

    def _context_keys_values(self, context_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Context states (B, T, D, C) -> keys and values (B, T, H, d) before RoPE, W_k RMSNorm(y) and W_v RMSNorm(y),
        head h reading filter h ("mh", C = H) or the one filter ("sh").

        Plain modules and float32 states take `rms_normed_projection`: keys and values in one matmul that reads the
        SSM output in place, the norm folded into it ("mh" normalises H * D numbers per position; normalising them as
        such, after a copy into the norm's layout, cost more than its SSM). Hooked or wrapped modules, and other
        dtypes (whose rounding the norm's own order fixes), run the modules.
        """
        states = context_states.permute(0, 3, 1, 2)  # (B, C, T, D), a view
        projections = (self.context_k_proj, self.context_v_proj)
        plain = runs_as_written(self.context_norm, BSTRMSNorm)
        plain = plain and all(runs_as_written(projection, nn.Linear) for projection in projections)
        if not plain or states.dtype != torch.float32:
            # One copy to (B, C, T, D): the norm reduces over D and head h projects filter h, both on contiguous rows.
            normed = self.context_norm(states.contiguous())
            keys = self._project_context(self.context_k_proj, normed)
            return keys, self._project_context(self.context_v_proj, normed)
        batch, filters, length, width = states.shape
        # Filter c's rows: [c, c + 1) * H / C * d of each projection, keys then values: (C, 2 H / C * d, D).
        weight = torch.cat([projection.weight.view(filters, -1, width) for projection in projections], dim=1)
        projected = rms_normed_projection(states, self.context_norm.weight, self.context_norm.variance_epsilon, weight)
        keys, values = projected.transpose(1, 2).chunk(2, dim=-1)  # (B, T, C, H / C * d) each
        shape = (batch, length, self.num_heads, self.head_dim)
        return keys.reshape(shape), values.reshape(shape)  # views

    def _multi_filter_context(self, end_states, layout, layer_cache):
        """Context states of every block of the layout (B, N, S, D): the S filter outputs at the last position of the
        previous block (`end_states` (B, N, D, S), from `BSTStateSpace._block_end_outputs`); the first block reads the
        cache, or the learned initial context at the sequence start."""
        batch = end_states.shape[0]
        end_states = end_states.transpose(2, 3).to(self.initial_context.dtype)  # (B, N, S, D)
        first = self.initial_context.expand(batch, -1, -1)
        if layer_cache is not None and layer_cache.context_states is not None:
            started = layout.seen_tokens > 0
            first = torch.where(started[:, None, None], layer_cache.context_states, first)
        every_block = torch.cat([first[:, None], end_states], dim=1)  # (B, N + 1, S, D)
        if layer_cache is not None:
            index = layout.current_block_index().view(-1, 1, 1, 1).expand(-1, 1, *every_block.shape[2:])
            layer_cache.store_context_states(every_block.gather(1, index).squeeze(1))
        return every_block[:, :-1]

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotations: torch.Tensor,
        layout: BlockLayout,
        context_states: torch.Tensor | None = None,
        layer_cache: BSTLayerCache | None = None,
    ) -> torch.Tensor:
        hidden_shape = (*hidden_states.shape[:-1], self.num_heads, self.head_dim)
        key_value_shape = (*hidden_states.shape[:-1], self.num_key_value_heads, self.head_dim)
        query = apply_rotary(self.q_proj(hidden_states).view(hidden_shape), rotations, self.rope_pairing)  # (B,T,H,d)
        key = apply_rotary(self.k_proj(hidden_states).view(key_value_shape), rotations, self.rope_pairing)  # H_kv heads
        value = self.v_proj(hidden_states).view(key_value_shape)
        sinks = self._attention_sinks(key, value, layout, layer_cache) if self.config.num_sink_tokens else None
        if self.config.attend_previous_block:
            output = self._previous_block_attention(query, key, value, layout, layer_cache, sinks)
        else:
            cached = (None, None, None)
            if layer_cache is not None:
                cached = (layer_cache.keys, layer_cache.values, layer_cache.store_block)
            output = self._block_attention(query, key, value, layout, *cached, sinks)
        if not self.cross_attention:
            return self.o_proj(output)

        cross_query = self.cross_q_proj(hidden_states).view(hidden_shape)
        context_states = context_states.to(hidden_states.dtype)  # (B, T, D, C); "mf": (B, N, D, S) at block ends
        if self.config.bst_variant == "mf":
            contexts = self._multi_filter_context(context_states, layout, layer_cache)  # (B, N, S, D)
            contexts = self.context_norm(contexts) + self.context_ids
            context_keys = self.context_k_proj(contexts).unflatten(-1, (self.num_heads, self.head_dim))
            context_values = self.context_v_proj(contexts).unflatten(-1, (self.num_heads, self.head_dim))
            if layout.is_single_step:
                cross_output = self._attend_step(cross_query, context_keys[:, 0], context_values[:, 0], None)
            else:
                cross_output = self._attend(layout.to_blocks(cross_query), context_keys, context_values)
                cross_output = layout.from_blocks(cross_output, hidden_states.shape[1])
        else:
            # Token i of a block reads the context states of positions j <= i of its block, like its own keys.
            context_keys, context_values = self._context_keys_values(context_states)
            context_keys = apply_rotary(context_keys, rotations, self.rope_pairing)
            cross_query = apply_rotary(cross_query, rotations, self.rope_pairing)
            cached = (None, None, None)
            if layer_cache is not None:
                cached = (layer_cache.context_keys, layer_cache.context_values, layer_cache.store_context_block)
            cross_output = self._block_attention(cross_query, context_keys, context_values, layout, *cached)
        return self.o_proj(torch.cat([output, cross_output], dim=-1))


class BSTS4DKernel(nn.Module):
    r"""S4D diagonal state space, one per (channel, filter) pair ("s4" kernels).

        continuous:   x'(t) = A x(t) + B u(t),   y(t) = 2 Re(C x(t))      A diagonal complex, N/2 conjugate modes
        zero-order hold with step dt:   dA = exp(dt A),   dB = (dA - 1) / A * B          (B = 1, folded into C)
        recurrence:   s_k = dA s_{k-1} + (C dB) u_k,   y_k = 2 Re(sum_n s_k)           (s = C-weighted state)
        convolution:  K[l] = 2 Re(sum_n C_n dB_n dA_n^l),   y = K * u
    """

    def __init__(self, config: BSTConfig, channels: int):
        super().__init__()
        self.config = config
        modes = config.ssm_state_size // 2
        self.log_dt = nn.Parameter(torch.empty(channels))
        self.log_neg_a_real = nn.Parameter(torch.empty(channels, modes))
        self.a_imag = nn.Parameter(torch.empty(channels, modes))
        self.c = nn.Parameter(torch.empty(channels, modes, 2))  # real view of complex C

    def reset_parameters(self):
        """S4D-Lin initialisation: A_n = -1/2 + i pi n, dt log-uniform in [dt_min, dt_max], C ~ CN(0, 1)."""
        channels, modes = self.a_imag.shape
        log_dt = torch.rand(channels) * (math.log(self.config.ssm_dt_max) - math.log(self.config.ssm_dt_min))
        init.copy_(self.log_dt, log_dt + math.log(self.config.ssm_dt_min))
        init.constant_(self.log_neg_a_real, math.log(0.5))
        init.copy_(self.a_imag, math.pi * torch.arange(modes, dtype=torch.float32).expand(channels, modes))
        init.normal_(self.c, std=0.5**0.5)

    def discretize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns log(dA) = dt A, (H, N/2) complex128, and C dB, (H, N/2) complex64 (complex128 in a float64 model).

        log(dA) stays in float64: powers dA^l up to the sequence length multiply its rounding error by l. It is
        (H, N/2) numbers, so this costs nothing next to the kernel itself.
        """
        real_dtype = ssm_compute_dtype(self.log_dt.dtype)
        a = torch.complex(-torch.exp(self.log_neg_a_real.double()), self.a_imag.double())
        dt_a = torch.exp(self.log_dt.double()).unsqueeze(-1) * a
        c_db = torch.view_as_complex(self.c.double().contiguous()) * torch.expm1(dt_a) / a
        return dt_a, c_db.to(COMPLEX_DTYPES[real_dtype])

    def forward(self, length: int) -> torch.Tensor:
        log_da, c_db = self.discretize()
        return real_vandermonde_sum(2 * c_db, log_da, length)  # (H, length)


class BSTImplicitKernel(nn.Module):
    r"""Implicit long filter ("unstructured" kernels), Hyena-style:

        h(t) = exp(-alpha * t) * W_out sin(W_2 sin(W_1 [sin(w_k t), cos(w_k t)]_k))

    Positions are absolute (not divided by the length), so the filter for a long sequence starts with the filter for a
    short one: the convolution stays causal and generation can extend it. There is no finite recurrent state.
    """

    def __init__(self, config: BSTConfig, channels: int):
        super().__init__()
        self.config = config
        features = config.implicit_filter_features
        hidden = config.implicit_filter_hidden_size
        self.filter_in = nn.Linear(2 * features, hidden)
        self.filter_hidden = nn.Linear(hidden, hidden)
        self.filter_out = nn.Linear(hidden, channels)
        self.log_decay = nn.Parameter(torch.empty(channels))

    def reset_parameters(self):
        # Spread the decay rates over three decades so the filters start with short and long memories.
        channels = self.log_decay.shape[0]
        init.copy_(self.log_decay, torch.linspace(math.log(0.3), math.log(3e-4), channels))
        init.normal_(self.filter_in.weight, std=1.0)
        init.normal_(self.filter_hidden.weight, std=self.filter_hidden.in_features**-0.5)
        init.normal_(self.filter_out.weight, std=self.filter_out.in_features**-0.5)
        for layer in (self.filter_in, self.filter_hidden, self.filter_out):
            init.zeros_(layer.bias)

    def forward(self, length: int) -> torch.Tensor:
        features = self.config.implicit_filter_features
        device = self.log_decay.device
        dtype = ssm_compute_dtype(self.log_decay.dtype)
        positions = torch.arange(length, device=device, dtype=dtype)
        frequencies = torch.exp(-math.log(1e4) * torch.arange(features, device=device) / features)
        angles = positions[:, None] * frequencies  # (L, F)
        features = torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.filter_in.weight.dtype)
        hidden = torch.sin(self.filter_in(features))
        hidden = torch.sin(self.filter_hidden(hidden))
        response = self.filter_out(hidden).to(dtype).transpose(0, 1)  # (H, L)
        return response * torch.exp(-torch.exp(self.log_decay.to(dtype))[:, None] * positions)


class BSTStateSpace(nn.Module):
    r"""SSM sublayer: C long filters per channel over the whole sequence, y[b, t, d, c] = (K_dc * u_d)[t] + skip_dc u_d[t].

    Runs as one FFT convolution. With a cache it continues from the cached state: for "s4" the state term
    2 Re(sum_n dA^(t+1) s0) is added and the final state returned; for "unstructured" the new inputs are appended to
    the cached input history and the convolution is taken over all of it.

    Nothing is kept on the module: a forward without a cache computes its kernel from the current parameters (a few
    percent of the layer's time), so in-place or `.data` edits, inference mode and autograd can never meet a stale or
    foreign tensor. What decoding reuses (the discretisation, the "unstructured" taps) lives in the layer's cache
    (`BSTLayerCache.discretization`, `.taps`), computed on its first use and kept for the life of that cache.
    """

    def __init__(self, config: BSTConfig):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.num_filters = config.num_context_states
        channels = self.hidden_size * self.num_filters
        kernel_class = BSTS4DKernel if config.ssm_kernel == "s4" else BSTImplicitKernel
        self.kernel_generator = kernel_class(config, channels)
        self.skip = nn.Parameter(torch.empty(self.hidden_size, self.num_filters))
        # The short causal convolution on the SSM input (`ssm_conv_size` taps, the last on the current input).
        self.conv_weight = None
        if config.ssm_conv_size:
            self.conv_weight = nn.Parameter(torch.empty(self.hidden_size, config.ssm_conv_size))  # (D, K)

    def kernel(self, length: int) -> torch.Tensor:
        """(D, C, length) filter taps from the current parameters."""
        return self.kernel_generator(length).view(self.hidden_size, self.num_filters, length)

    def forward(
        self,
        inputs: torch.Tensor,
        layout: "BlockLayout",
        layer_cache: BSTLayerCache | None,
        block_ends: bool = False,
        mean_of_filters: bool = False,
    ) -> torch.Tensor:
        """inputs (B, T, D), real tokens first in each row -> context states (B, T, D, C) in fp32 (fp64 in a float64
        model). `layer_cache` holds this layer's per-row state and the kernel values decoding reuses. With
        `block_ends` ("mf"), only the states at the block ends, (B, N, D, C) (`_block_end_outputs`): through here,
        so that forward hooks on the module (the SSM ablation of scripts/evaluate.py) see them. With
        `mean_of_filters` (the caller reads only the mean over the C filters) and no cache, the result is that mean,
        (B, T, D, 1); with a cache it is the C outputs, whose state decoding advances.

        Autocast is off in here: under bf16 autocast the kernel's power tables and block sums would go through bf16
        matmuls (kernel taps off by ~3e-3 of the largest tap, the long-range ones lost; "mf" failed outright on CUDA).
        """
        with torch.autocast(device_type=inputs.device.type, enabled=False):
            inputs = inputs.to(ssm_compute_dtype(self.skip.dtype))
            if self.conv_weight is not None:
                inputs = self._short_convolution(inputs, layout, layer_cache)
            if layout.has_padding:
                # Padding must not enter the state (left-padded generation would otherwise leak it into later tokens).
                inputs = inputs * layout.token_mask.unsqueeze(-1)
            if block_ends:
                return self._block_end_outputs(inputs, layout, layer_cache)
            return self._all_outputs(inputs, layout, layer_cache, mean_of_filters)

    def _all_outputs(
        self,
        inputs: torch.Tensor,
        layout: "BlockLayout",
        layer_cache: BSTLayerCache | None,
        mean_of_filters: bool = False,
    ) -> torch.Tensor:
        """The SSM outputs at every position: SSM inputs (B, T, D), in the compute dtype with padding zeroed ->
        (B, T, D, C), or (B, T, D, 1) with `mean_of_filters` and no cache."""
        if layer_cache is None:
            # No state to continue: one FFT convolution over the sequence, the skip term on the kernel's tap 0.
            kernel, skip = self.kernel(inputs.shape[1]), self.skip  # (D, C, T), (D, C)
            if mean_of_filters and self.num_filters > 1:
                # The convolution is linear in the kernel: mean_c (K_c * u) = (mean_c K_c) * u, one filter, not C.
                kernel, skip = kernel.mean(1, keepdim=True), skip.mean(1, keepdim=True)
            convolved = causal_fft_conv(inputs.transpose(1, 2), kernel, skip)
            return convolved.permute(0, 3, 1, 2)  # (B, T, D, C), a view: filters outermost in memory
        if self.config.ssm_kernel == "unstructured":
            convolved = self._forward_with_history(inputs, layout, layer_cache)
        else:
            convolved = self._forward_with_state(inputs, layout, layer_cache)
        return torch.addcmul(convolved, inputs.unsqueeze(-1), self.skip.to(inputs.dtype))  # + skip u, (B,T,D,C)

    def _short_convolution(self, inputs: torch.Tensor, layout: "BlockLayout", layer_cache: BSTLayerCache | None):
        """The short causal depthwise convolution on the SSM input, (B, T, D) -> (B, T, D):
        x'[t] = sum_k w[k] x[t - K + 1 + k] with K = `ssm_conv_size` taps, zeros before the sequence start. It continues
        from each row's last K - 1 real inputs held by the cache and stores the new ones: padding trails each row's
        real tokens, so it reaches neither a real token's output nor the cache."""
        batch, _, width = inputs.shape
        taps = self.conv_weight.shape[1]
        history = None if layer_cache is None else layer_cache.short_conv_inputs
        if history is None:
            history = inputs.new_zeros(batch, width, taps - 1)
        combined = torch.cat([history, inputs.transpose(1, 2)], dim=-1)  # (B, D, K - 1 + T)
        convolved = F.conv1d(combined, self.conv_weight.to(inputs.dtype).unsqueeze(1), groups=width)  # (B, D, T)
        if layer_cache is not None:
            # A row's last K - 1 real inputs sit at positions lengths .. lengths + K - 2 of `combined`.
            index = layout.lengths[:, None] + torch.arange(taps - 1, device=inputs.device)  # (B, K - 1)
            layer_cache.store_short_conv_inputs(combined.gather(-1, index[:, None, :].expand(-1, width, -1)))
        return convolved.transpose(1, 2).contiguous()

    def _discretized(self, layer_cache: BSTLayerCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The "s4" (log dA, C dB, dA) of this cache: computed on its first use, then reused by every decoding step."""
        if layer_cache.discretization is None:
            log_da, c_db = self.kernel_generator.discretize()
            # dA in complex128: one step's rounding would otherwise add up per token.
            layer_cache.discretization = (log_da, c_db, complex_exp(log_da))
        return layer_cache.discretization

    def _forward_with_state(self, inputs, layout, layer_cache):
        """With "s4" kernels: the convolution, continued from and into the cached SSM state."""
        batch, length, _ = inputs.shape

        log_da, c_db, da = self._discretized(layer_cache)
        state = layer_cache.ssm_state()
        if state is not None and length == 1:
            # One decoding step is the recurrence itself: s = dA s + (C dB) u,  y = 2 Re(sum_n s).
            channel_inputs = inputs[:, 0, :, None].expand(-1, -1, self.num_filters).reshape(batch, -1, 1)  # (B, H, 1)
            # complex128, as the cached state: no rounding per token. Updated in place, so its address stays.
            if layout.has_padding:
                new_state = torch.where(layout.token_mask[:, :1, None], da * state + c_db * channel_inputs, state)
                layer_cache.update_recurrent_state(new_state)
            else:
                new_state = state.mul_(da).add_(c_db * channel_inputs)
            outputs = (2 * new_state.sum(-1).real).to(inputs.dtype)
            return outputs.view(batch, 1, self.hidden_size, self.num_filters)

        taps = real_vandermonde_sum(2 * c_db, log_da, length)  # the cache's kernel, (H, T)
        convolved = causal_fft_conv(inputs.transpose(1, 2), taps.view(self.hidden_size, self.num_filters, length))
        outputs = convolved.permute(0, 3, 1, 2)  # (B, T, D, C)
        if state is not None:
            # y_t += 2 Re(sum_n dA_n^(t+1) s0_n): the cached state's contribution to every new position.
            carried = real_vandermonde_sum(2 * (da * state).to(c_db.dtype), log_da, length)  # (B, H, T)
            outputs = outputs + carried.view(batch, self.hidden_size, self.num_filters, length).permute(0, 3, 1, 2)
        else:
            state = torch.zeros(batch, *c_db.shape, dtype=torch.complex128, device=inputs.device)
        # Final state after each row's last real token: s = dA^len s0 + C dB sum_j dA^(len-1-j) u_j.
        lengths = layout.lengths
        reverse_index = (lengths[:, None] - 1 - torch.arange(length, device=inputs.device)).clamp(min=0)
        reversed_inputs = inputs.gather(1, reverse_index[..., None].expand_as(inputs)) * layout.token_mask[..., None]
        channel_inputs = reversed_inputs.transpose(1, 2).repeat_interleave(self.num_filters, dim=1)  # (B, H, T)
        decayed = scaled_complex_exp(log_da, lengths.view(-1, 1, 1).double(), inputs.dtype)
        layer_cache.update_recurrent_state(decayed * state + c_db * vandermonde_reduce(channel_inputs, log_da))
        return outputs

    def _cached_taps(self, layer_cache: BSTLayerCache, length: int) -> torch.Tensor:
        """The "unstructured" taps of this cache, at least `length` long. A longer kernel starts with the shorter one,
        so they are regenerated only when the history outgrows them, at twice the length: decoding n tokens
        regenerates them O(log n) times, not once per token."""
        taps = layer_cache.taps
        if taps is None or taps.shape[-1] < length:
            capacity = length if taps is None else max(length, 2 * taps.shape[-1])
            taps = layer_cache.taps = self.kernel(capacity)
        return taps[..., :length]

    def _forward_with_history(self, inputs, layout, layer_cache):
        """With "unstructured" kernels: the convolution over the cached SSM inputs and this chunk's. The history holds
        each row's past real inputs right-aligned, (B, D, K) with the newest last, so a row's real tokens in this chunk
        (first in the row) follow its history directly.

        A static cache's history and taps have `max_cache_len` positions whatever the prompt length, so a compiled
        decoding step meets the same shapes for every prompt. It holds at most that many inputs (`BSTCache.check_room`),
        so the first T of the history's K + T positions joined with this chunk's are zeros and the convolution reads
        the last K."""
        batch, length = inputs.shape[:2]
        history = layer_cache.input_history()
        if history is None:  # a static cache keeps the last `max_cache_len` inputs, a dynamic one all of them
            capacity = layer_cache.max_cache_len if layer_cache.static else 0
            history = inputs.new_zeros(batch, self.hidden_size, capacity)
        past = history.shape[-1]
        combined = torch.cat([history, inputs.transpose(1, 2)], dim=-1)  # (B, D, past + T)
        window = combined[..., length:] if layer_cache.static else combined  # (B, D, K) or (B, D, past + T)
        taps = self._cached_taps(layer_cache, window.shape[-1])  # (D, C, K) or (D, C, past + T)
        if length == 1:
            # One decoding step: y = sum_j taps[j] u[t - j], a dot product with the reversed history (no FFT).
            convolved = torch.einsum("bdk,dck->bdc", window.flip(-1), taps).unsqueeze(1)  # (B, 1, D, C)
        else:
            convolved = causal_fft_conv(window, taps)[..., -length:].permute(0, 3, 1, 2)  # (B, T, D, C)
        # Right-align each row again: position j of the new history is position j - kept + past + len of `combined`.
        kept = past if layer_cache.static else past + length
        if length == 1 and not layout.has_padding:
            aligned = combined[..., -kept:] if kept else combined[..., :0]
        else:
            source = torch.arange(kept, device=inputs.device) + (past - kept) + layout.lengths[:, None]  # (B, kept)
            aligned = combined.gather(-1, source.clamp(min=0)[:, None, :].expand(-1, self.hidden_size, -1))
            aligned = aligned * (source >= 0)[:, None, :]
        layer_cache.store_input_history(aligned)
        return convolved

    def _block_end_outputs(
        self, inputs: torch.Tensor, layout: "BlockLayout", layer_cache: BSTLayerCache | None
    ) -> torch.Tensor:
        """The SSM outputs "mf" reads: SSM inputs (B, T, D) as `_all_outputs` takes them -> (B, N, D, C), the outputs
        at the chunk positions
        `block_end_index(layout, T)` (the last position of each of the layout's N blocks, clamped to the chunk), equal
        to the full forward's outputs gathered there.

        Without a cache (training, evaluation) no full-length output is formed: "s4" scans the blocks with the SSM
        state, "unstructured" convolves block against block. That is S times less inverse-FFT and output traffic, and
        "s4" never forms its (D, S, L) kernel. With a cache (decoding, chunked prefill) the full path runs: it also
        advances the cached state, and a decoding step is one position anyway.
        """
        length = inputs.shape[1]
        end_index = block_end_index(layout, length)  # (B, N)
        if layer_cache is not None:
            states = self._all_outputs(inputs, layout, layer_cache)  # (B, T, D, C)
            return states.gather(1, end_index[..., None, None].expand(-1, -1, *states.shape[2:]))
        if self.config.ssm_kernel == "s4":
            convolved = block_end_scan(inputs, *self.kernel_generator.discretize(), self.num_filters, layout.block_size)
        else:
            convolved = block_end_convolution(inputs, self.kernel(length), layout.block_size)
        end_inputs = inputs.gather(1, end_index[..., None].expand(-1, -1, self.hidden_size))  # (B, N, D)
        return torch.addcmul(convolved, end_inputs.unsqueeze(-1), self.skip.to(inputs.dtype))  # + skip * u


class BSTSSMResidualProjection(nn.Linear):
    """`residual_out_proj`: the residual SSM branch's output projection (`ssm_residual`). A plain linear map; its
    own class only so that initialisation can start it at zero."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, hidden_size, bias=False)


class BSTDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm layer: [SSM ->] block attention -> residual -> FFN -> residual. BST layers (`config.bst_layers`) have
    the SSM and the cross-attention (or, with `ssm_cross_attention=False`, the residual SSM branch only); the others
    are plain block-attention layers."""

    def __init__(self, config: BSTConfig, layer_idx: int):
        super().__init__()
        self.is_bst_layer = layer_idx in config.bst_layers
        self.input_layernorm = BSTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ssm = BSTStateSpace(config) if self.is_bst_layer else None
        # The options of the SSM branch live here, not in `ssm`, whose parameters stay fp32: these are plain
        # projections of the layer input and run in the model's dtype (no "ssm" in their names, see
        # `_keep_in_fp32_modules_strict`). `ssm_gate`: context_gate_proj; `ssm_residual`: residual_*_proj.
        width, gated, residual = config.hidden_size, config.ssm_gate, config.ssm_residual
        self.context_gate_proj = nn.Linear(width, width, bias=False) if self.is_bst_layer and gated else None
        self.residual_gate_proj = nn.Linear(width, width, bias=False) if self.is_bst_layer and residual else None
        self.residual_out_proj = BSTSSMResidualProjection(width) if self.is_bst_layer and residual else None
        self.act_fn = ACT2FN[config.hidden_act] if self.is_bst_layer and (gated or residual) else None
        self.attention = BSTAttention(config, layer_idx, self.is_bst_layer and config.ssm_cross_attention)
        self.post_attention_layernorm = BSTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = BSTMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotations: torch.Tensor,
        layout: BlockLayout,
        layer_cache: BSTLayerCache | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        context_states = ssm_residual = None
        if self.is_bst_layer:
            # "mf" reads the SSM at block ends only: (B, N, D, S) instead of (B, T, D, S).
            block_ends = self.ssm.config.bst_variant == "mf"
            # Without cross-attention only the residual branch's mean over filters is read ("mh": H filters, one FFT).
            context_states = self.ssm(
                hidden_states, layout, layer_cache, block_ends=block_ends,
                mean_of_filters=not self.attention.cross_attention,
            )
            if self.residual_out_proj is not None:
                # Griffin's recurrent block: W_o (mean_c y_c * act(W_r x)), the mean over filters, (B, T, D).
                ssm_outputs = context_states.mean(-1).to(hidden_states.dtype)
                gate = self.act_fn(self.residual_gate_proj(hidden_states))
                ssm_residual = self.residual_out_proj(ssm_outputs * gate)
            if self.context_gate_proj is not None:
                # y * act(W_g x), x at the positions whose SSM outputs become context states ("mf": the block ends).
                gate_inputs = hidden_states
                if block_ends:
                    end_index = block_end_index(layout, hidden_states.shape[1])[..., None]  # (B, N, 1)
                    gate_inputs = hidden_states.gather(1, end_index.expand(-1, -1, hidden_states.shape[-1]))
                context_states = context_states * self.act_fn(self.context_gate_proj(gate_inputs)).unsqueeze(-1)
        if not self.attention.cross_attention:
            context_states = None  # the SSM reaches this layer through the residual branch only
        hidden_states = self.attention(hidden_states, rotations, layout, context_states, layer_cache)
        hidden_states = residual + hidden_states
        if ssm_residual is not None:
            hidden_states = hidden_states + ssm_residual
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


# Parameters that exist only for a given SSM/context configuration: a checkpoint that lacks them, or has others, was
# saved for another `ssm_kernel`, `bst_variant`, `bst_layers`, `num_context_states`, `ssm_gate`, `ssm_conv_size`,
# `ssm_residual` or `ssm_cross_attention`.
SSM_AND_CONTEXT_KEYS = re.compile(
    r"(^|\.)(ssm|context_gate_proj|residual_gate_proj|residual_out_proj"
    r"|attention\.(context_norm|cross_q_proj|context_k_proj|context_v_proj|initial_context|context_ids))\."
    r"|\.attention\.(initial_context|context_ids)$"
)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Shape, dtype and range of token ids. An id outside the vocabulary would index past the embedding (on a GPU, a
    device-side assert that names nothing). The range is read where that costs no device sync: on the CPU directly;
    on an accelerator as an asynchronous assert, raised at the next synchronisation; a compiled step skips it."""
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must have shape (batch, length), got {tuple(input_ids.shape)}.")
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}.")
    if torch.compiler.is_compiling():
        return
    if input_ids.device.type == "cpu":
        lowest, highest = (int(extreme) for extreme in input_ids.aminmax())
        if lowest < 0 or highest >= vocab_size:
            raise ValueError(
                f"`input_ids` holds ids outside [0, {vocab_size}) (`vocab_size`): min {lowest}, max {highest}."
            )
    else:
        in_range = ((input_ids >= 0) & (input_ids < vocab_size)).all()
        torch._assert_async(in_range, f"`input_ids` holds ids outside [0, {vocab_size}) (`vocab_size`).")


def check_embeddings(inputs_embeds: torch.Tensor, hidden_size: int, model_dtype: torch.dtype) -> None:
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size:
        raise ValueError(
            f"`inputs_embeds` must have shape (batch, length, {hidden_size}), got {tuple(inputs_embeds.shape)}."
        )
    if not inputs_embeds.is_floating_point():
        raise TypeError(f"`inputs_embeds` must be floating point, got dtype {inputs_embeds.dtype}.")
    if inputs_embeds.dtype != model_dtype and not torch.is_autocast_enabled(inputs_embeds.device.type):
        raise TypeError(
            f"`inputs_embeds` has dtype {inputs_embeds.dtype} but the model's weights are {model_dtype}: "
            f"pass `inputs_embeds.to({model_dtype})` (or run under `torch.autocast`)."
        )


def check_attention_mask_shape(attention_mask: torch.Tensor, inputs: torch.Tensor, cache: Cache | None) -> None:
    """The mask covers this chunk's (batch, length) or the whole sequence so far (batch, past + length)."""
    batch, length = inputs.shape[:2]
    past = 0 if cache is None else cache.get_seq_length()
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] not in (
        length,
        past + length,
    ):
        raise ValueError(
            f"`attention_mask` must be 2D with shape (batch, length) = ({batch}, {length}) or "
            f"(batch, past + length) = ({batch}, {past + length}); got {tuple(attention_mask.shape)}."
        )


class BSTPreTrainedModel(PreTrainedModel):
    config: BSTConfig
    config_class = BSTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BSTDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = True
    # A decoding step on a static cache compiles as one graph (tests/test_compile.py checks with torch._dynamo.explain).
    _can_compile_fullgraph = True
    _is_stateful = True
    # The SSM parameters (step sizes, A, C, the implicit filter, the skip) stay fp32 when from_pretrained/from_config
    # get dtype=bfloat16/float16: bf16 rounds log_dt and A by up to 0.4%, and the kernel's phase dt*Im(A)*l
    # multiplies that by the position. (A plain `model.to(torch.bfloat16)` casts them all the same.) Transformers
    # searches each entry in the parameter names, so no other module's name may contain "ssm".
    _keep_in_fp32_modules_strict = ["ssm"]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, plus an error when the checkpoint's SSM or context weights do not fit the
        configuration: freshly initialised SSM layers would load with a warning only and give other outputs."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        try:
            model, loading_info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except RuntimeError as error:
            if "ignore_mismatched_sizes" not in str(error):
                raise
            # Transformers' own message only points at its report; say which fields decide these shapes.
            raise ValueError(
                "The checkpoint's weights do not have the shapes its configuration gives them (the loading report "
                "above names them). Besides the sizes, the fields that shape a BST's weights are ssm_kernel, "
                "bst_variant, bst_layers, num_context_states, ssm_gate, ssm_conv_size, ssm_residual and "
                "ssm_cross_attention (which doubles the width of o_proj's input). Was config.json edited after the "
                "weights were saved?"
            ) from error
        missing = sorted(k for k in loading_info["missing_keys"] if SSM_AND_CONTEXT_KEYS.search(k))
        unexpected = sorted(k for k in loading_info["unexpected_keys"] if SSM_AND_CONTEXT_KEYS.search(k))
        # A checkpoint with no weights at all for this model (an empty state dict) is a deliberate fresh start.
        loaded_any = any(name not in loading_info["missing_keys"] for name, _ in model.named_parameters())
        if unexpected or (missing and loaded_any):
            config = model.config
            raise ValueError(
                f"The checkpoint's SSM/context weights do not fit its configuration (ssm_kernel={config.ssm_kernel!r}, "
                f"bst_variant={config.bst_variant!r}, bst_layers={config.bst_layers}, "
                f"num_context_states={config.num_context_states}, ssm_gate={config.ssm_gate}, "
                f"ssm_conv_size={config.ssm_conv_size}, ssm_residual={config.ssm_residual}, "
                f"ssm_cross_attention={config.ssm_cross_attention}): "
                f"missing {len(missing)} {missing[:6]}, "
                f"unexpected {len(unexpected)} {unexpected[:6]}. Was config.json edited after the weights were saved?"
            )
        return (model, loading_info) if output_loading_info else model

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if self.config.initializer_scheme == "fan_in":
            layers = self.config.num_hidden_layers
            if isinstance(module, BSTOutputProjection):  # its fan-in: the self-attention heads (the cross half is 0)
                init.normal_(module.weight, std=fan_in_std(module.self_attention_size, layers, writes_residual=True))
            elif isinstance(module, BSTDownProjection):
                init.normal_(module.weight, std=fan_in_std(module.in_features, layers, writes_residual=True))
            elif isinstance(module, nn.Linear):
                init.normal_(module.weight, std=fan_in_std(module.in_features, layers, writes_residual=False))
        if isinstance(module, (BSTS4DKernel, BSTImplicitKernel)):
            module.reset_parameters()
        elif isinstance(module, BSTStateSpace):
            # No skip term at the start: the context states are the SSM's history alone (docs/quality.md, "Recipe").
            init.zeros_(module.skip)
            if module.conv_weight is not None:  # Mamba's short convolution: uniform in +-1/sqrt(taps)
                bound = module.conv_weight.shape[1] ** -0.5
                init.uniform_(module.conv_weight, -bound, bound)
        elif isinstance(module, BSTAttention) and getattr(module, "initial_context", None) is not None:
            init.normal_(module.initial_context, std=std)
            init.normal_(module.context_ids, std=std)
        elif isinstance(module, BSTRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(module.config))
        if isinstance(module, BSTOutputProjection) and module.cross_attention:  # after the plain-Linear init above
            # The cross-attention half starts at zero: a BST layer starts as the same layer without its SSM, and the
            # context path grows only as far as it helps (docs/quality.md, "Recipe").
            cross_columns = torch.arange(module.in_features, device=module.weight.device) >= module.self_attention_size
            init.copy_(module.weight, module.weight.masked_fill(cross_columns, 0.0))
        if isinstance(module, BSTSSMResidualProjection):
            # The residual SSM branch starts at zero: a new layer, or a converted model's layer, computes what it
            # computes without it, and the branch grows only as far as training finds it useful.
            init.zeros_(module.weight)


class BSTModel(BSTPreTrainedModel):
    def __init__(self, config: BSTConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([BSTDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = BSTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = BSTRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, past_key_values):
        """Clear errors for inputs the layers would fail on, or silently misread. Nothing here waits for a device."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        inputs, name = (input_ids, "input_ids") if input_ids is not None else (inputs_embeds, "inputs_embeds")
        if inputs.dim() >= 2 and (inputs.shape[0] == 0 or inputs.shape[1] == 0):
            raise ValueError(
                f"`{name}` is empty: shape {tuple(inputs.shape)}; need at least one row and one token per row."
            )
        if input_ids is not None:
            check_token_ids(input_ids, self.embed_tokens.num_embeddings)
        else:
            check_embeddings(inputs_embeds, self.config.hidden_size, self.embed_tokens.weight.dtype)
        if past_key_values is not None and not isinstance(past_key_values, BSTCache):
            raise TypeError(
                f"BST models keep their decoding state in a `BSTCache`, got {type(past_key_values).__name__}. "
                "Pass `past_key_values=None` (with `use_cache=True`) and the model creates one."
            )
        if past_key_values is not None and not torch.compiler.is_compiling():  # the eager prefill checked
            past_key_values.check_fits(self.config, self.embed_tokens.weight.dtype)
        if attention_mask is not None and not torch.compiler.is_compiling():  # reads the cache's position count
            inputs = input_ids if input_ids is not None else inputs_embeds
            check_attention_mask_shape(attention_mask, inputs, past_key_values)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: BSTCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        r"""
        attention_mask (`torch.Tensor` of shape `(batch, length)` or `(batch, past + length)`, *optional*):
            1 for real tokens, 0 for padding. Padding may sit anywhere; real tokens get exactly the outputs they get
            without it. Padded positions return zeros.
        position_ids:
            Accepted for API compatibility and not used: a token's position inside its block follows from the
            attention mask and the cache.
        past_key_values (`BSTCache`, *optional*):
            Decoding state from a previous call; the new tokens continue that sequence.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        # In training the config's default does not apply (as in Mamba2): a cache and the final SSM state would cost
        # 2x-8x a step for a state nobody reads. A call that asks for one gets it.
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if kwargs.get("output_attentions"):
            logger.warning_once("BST does not return attention weights; `output_attentions` is ignored.")
        self._check_inputs(input_ids, inputs_embeds, attention_mask, past_key_values)
        if self.gradient_checkpointing and self.training:
            if past_key_values is not None:
                # The recomputation in the backward pass would advance the cache a second time.
                raise ValueError("A passed `past_key_values` cannot be continued under gradient checkpointing.")
            if use_cache:
                logger.warning_once("`use_cache=True` is incompatible with gradient checkpointing; not caching.")
                use_cache = False
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if self.config.embedding_multiplier != 1.0:
            inputs_embeds = inputs_embeds * self.config.embedding_multiplier
        if use_cache and past_key_values is None:
            past_key_values = BSTCache(self.config)
        # A cache that is passed in is continued and advanced whatever `use_cache` says (as in Llama): dropping it would
        # silently restart the sequence, and configs saved after gradient-checkpointed training carry use_cache=False.
        cache = past_key_values

        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        token_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
        if attention_mask is not None:
            token_mask = attention_mask[:, -length:].to(device=device, dtype=torch.bool)
        # Move each row's real tokens to the front (stable order): padding then trails the real tokens and, every
        # sublayer being causal, cannot change them. A single token has nothing to move: a decoding step then takes no
        # data-dependent branch (none to break a compiled graph, no device sync) and treats any mask as padding. A
        # compiled forward treats any mask as padding too: reading the mask would break its graph, and an all-ones
        # mask compacts in the identity order, which gives the same numbers.
        compact_order = None
        if length == 1 or torch.compiler.is_compiling():
            has_padding = attention_mask is not None
        else:
            has_padding = not bool(token_mask.all())
        if has_padding and length > 1:
            compact_order = torch.argsort((~token_mask).to(torch.int8), dim=1, stable=True)  # (B, T)
            inputs_embeds = inputs_embeds.gather(1, compact_order[..., None].expand_as(inputs_embeds))
            token_mask = token_mask.gather(1, compact_order)

        if cache is not None and not torch.compiler.is_compiling():
            cache.check_room(length)  # a compiled step runs within the length generate() sized the cache for
        if cache is not None and cache.seen_tokens is None:
            cache.start(batch, device, self.embed_tokens.weight.dtype)
        if cache is not None and cache.seen_tokens.shape[0] != batch:
            raise ValueError(f"The cache holds {cache.seen_tokens.shape[0]} rows but the inputs have {batch}.")
        seen_tokens = cache.seen_tokens if cache is not None else torch.zeros(batch, dtype=torch.long, device=device)
        layout = BlockLayout.build(
            token_mask, seen_tokens, self.config.block_size, has_cache=cache is not None, has_padding=has_padding
        )
        if layout.is_single_step:
            slots = layout.offsets[:, None]
        else:
            slots = (layout.offsets[:, None] + torch.arange(length, device=device)) % self.config.block_size
        rotations = self.rotary_emb(slots)
        if self.config.attend_previous_block:
            layout.previous_block_rotation = self.rotary_emb(torch.full((1, 1), -self.config.block_size, device=device))
        if self.config.num_sink_tokens:
            window_start = self.config.block_size if self.config.attend_previous_block else 0
            sink_shift = -(window_start + self.config.num_sink_tokens)
            layout.sink_rotation = self.rotary_emb(torch.full((1, 1), sink_shift, device=device))

        def restore_order(states: torch.Tensor) -> torch.Tensor:
            if compact_order is None:
                return states * token_mask[..., None].to(states.dtype) if has_padding else states
            restored = torch.zeros_like(states).scatter(1, compact_order[..., None].expand_as(states), states)
            return restored * attention_mask[:, -length:, None].to(states.dtype)

        def record(states: torch.Tensor) -> torch.Tensor:
            """Keeps the returned hidden states on the autograd path: the next layer reads the restored tensor."""
            restored = restore_order(states)
            all_hidden_states.append(restored)
            if compact_order is None:
                return restored
            return restored.gather(1, compact_order[..., None].expand_as(restored))

        hidden_states = inputs_embeds
        all_hidden_states = [] if output_hidden_states else None
        if output_hidden_states:
            hidden_states = record(hidden_states)
        for layer_idx, decoder_layer in enumerate(self.layers):
            layer_cache = cache.layers[layer_idx] if cache is not None else None
            hidden_states = decoder_layer(hidden_states, rotations, layout, layer_cache)
            if output_hidden_states:
                hidden_states = record(hidden_states)
        hidden_states = restore_order(self.norm(hidden_states))

        if cache is not None:
            cache.advance(layout.lengths, length)
        all_hidden_states = tuple(all_hidden_states) if output_hidden_states else None
        if not return_dict:
            return tuple(v for v in (hidden_states, cache, all_hidden_states) if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, past_key_values=cache, hidden_states=all_hidden_states
        )


class BSTForCausalLM(BSTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BSTConfig):
        super().__init__(config)
        self.model = BSTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: BSTCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch, length)`, *optional*):
            Targets for the causal-LM loss (shifted inside the loss); -100 marks ignored positions.
        logits_to_keep (`int` or `torch.Tensor`, defaults to 0):
            An int keeps the logits of the last `logits_to_keep` positions (0 keeps all); a 1D tensor keeps those
            positions.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states
        )
        return output if return_dict else output.to_tuple()

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        """generate() drops an all-ones attention mask before the first forward, so its shape is checked here, the last
        point where generate() holds both."""
        attention_mask = model_kwargs.get("attention_mask")
        if attention_mask is not None:
            check_attention_mask_shape(attention_mask, inputs_tensor, model_kwargs.get("past_key_values"))
        return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode=None, batch_size=None, max_cache_length=None
    ) -> None:
        """generate() would build a DynamicCache or a StaticCache from `config.layer_types`, whose standard layers
        cannot hold a BST layer's state (block slots written at each row's own slot next to an SSM state); BST needs
        its own bounded state, static (fixed shapes and addresses, what a compiled decoding step needs) with
        `cache_implementation="static"`."""
        cache = model_kwargs.get("past_key_values")
        if cache is not None:
            if not isinstance(cache, BSTCache):
                raise TypeError(f"BST models generate with a `BSTCache`, got {type(cache).__name__}.")
            cache._is_user_defined = True
            cache.check_room(max_cache_length - cache.get_seq_length())  # max_length - 1: the last token is not fed
            return
        if generation_config.use_cache is False:
            return
        # A static cache holds `max_cache_len` SSM inputs of "unstructured" kernels: the whole generation. Its tensors
        # have that many positions, and a compiled decoding step compiles once per size: rounding up to a power of two
        # lets prompts of many lengths share one graph (at most twice the positions each step reads), and
        # `generation_config.max_cache_len` fixes the size across calls.
        max_cache_length = max(max_cache_length or 0, generation_config.max_cache_len or 0)
        max_cache_length = max_cache_length or generation_config.max_length
        static = generation_config.cache_implementation == "static"
        if static:
            max_cache_length = 1 << (max_cache_length - 1).bit_length()
        model_kwargs["past_key_values"] = BSTCache(self.config, static=static, max_cache_len=max_cache_length)

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, *args, **kwargs):
        """generate() builds a 4D attention mask for a compileable cache; BST reads the 2D mask itself, and only its
        columns for the new tokens: passing just those keeps a compiled decoding step's input shapes fixed (the full
        mask grows by a column per token, and each new shape would compile the step again)."""
        if attention_mask is None:
            return None
        return attention_mask[:, -inputs_embeds.shape[1] :]


__all__ = ["BSTCache", "BSTForCausalLM", "BSTModel", "BSTPreTrainedModel"]
