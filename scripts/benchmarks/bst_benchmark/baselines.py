"""The layers and models BST is compared with: attention layers and a Block-Recurrent layer written for this
benchmark, Transformers' Llama and Mistral, and the BST layers and models under test."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .settings import LAYER_SPECS


# ---------------------------------------------------------------------------------------------------------------
# Baseline layers, written for this benchmark. All are pre-norm, use RoPE and a GELU FFN like the BST layer, so
# that a ratio compares the sequence-mixing part and not incidental choices.
# ---------------------------------------------------------------------------------------------------------------


def rotary_tables(positions, head_dim, device, theta=10000.0):
    """RoPE rotations exp(i * position * inv_freq), (L, head_dim/2) complex: the same form as the BST model's."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = positions.to(device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x, rotations):
    """x: (..., L, head_dim); channel pairs (2i, 2i+1) are rotated as one complex number, as in modeling_bst."""
    pairs = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotations).flatten(-2).to(x.dtype)


class FeedForward(nn.Module):
    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x)))


def split_heads(x, num_heads):
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x):
    batch, num_heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, num_heads * head_dim)


def sliding_window_attention(query, key, value, window):
    """Causal attention where each token sees itself and the `window - 1` tokens before it.

    Computed block-locally, never with an L x L mask: queries are cut into blocks of `window` tokens and each block
    attends to its own block and the previous one under a banded mask, so time and memory are O(L * window).
    """
    batch, num_heads, length, head_dim = query.shape
    num_blocks = math.ceil(length / window)
    pad = num_blocks * window - length
    if pad:
        query, key, value = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))

    def blocks(t):
        # (batch, heads, blocks * window, head_dim) -> (batch * blocks, heads, window, head_dim): blocks become batch
        # entries, so that SDPA sees plain 4-D inputs and a mask that differs only for the first block.
        t = t.view(batch, num_heads, num_blocks, window, head_dim).transpose(1, 2)
        return t.reshape(batch * num_blocks, num_heads, window, head_dim)

    query, key, value = blocks(query), blocks(key), blocks(value)

    def with_previous_block(t):
        # Keys/values of (previous block, own block): 2 * window of them per query block; zeros before block 0.
        previous = F.pad(t.view(batch, num_blocks, num_heads, window, head_dim), (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1]
        return torch.cat([previous.reshape_as(t), t], dim=2)

    key, value = with_previous_block(key), with_previous_block(value)
    # Query i of a block sits at index window + i of the 2 * window keys; it sees keys j with i < j <= window + i.
    i = torch.arange(window, device=query.device)[:, None]
    j = torch.arange(2 * window, device=query.device)[None, :]
    band = (j > i) & (j <= window + i)
    mask = band.expand(batch, num_blocks, 1, window, 2 * window).clone()
    mask[:, 0, :, :, :window] = False  # the first block has no previous block (those keys are padding)
    mask = mask.view(batch * num_blocks, 1, window, 2 * window)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    out = out.view(batch, num_blocks, num_heads, window, head_dim).transpose(1, 2)
    return out.reshape(batch, num_heads, num_blocks * window, head_dim)[:, :, :length]


class AttentionLayer(nn.Module):
    """Pre-norm Transformer layer: causal self-attention (full, or a sliding window) + FFN.

    Full attention calls SDPA with `is_causal=True` and no mask, which takes PyTorch's memory-efficient (flash)
    kernel on CPU and GPU, so memory stays linear in L and only time is quadratic.
    """

    def __init__(self, hidden_size, num_heads, intermediate_size, window=None):
        super().__init__()
        self.num_heads, self.window = num_heads, window
        self.attn_norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.qkv_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.mlp_norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.mlp = FeedForward(hidden_size, intermediate_size)

    def forward(self, hidden_states):
        length = hidden_states.shape[1]
        query, key, value = (
            split_heads(t, self.num_heads) for t in self.qkv_proj(self.attn_norm(hidden_states)).chunk(3, dim=-1)
        )
        rotations = rotary_tables(torch.arange(length), query.shape[-1], query.device)
        query, key = apply_rotary(query, rotations), apply_rotary(key, rotations)
        if self.window is None:
            attn = F.scaled_dot_product_attention(query, key, value, is_causal=True)
        else:
            attn = sliding_window_attention(query, key, value, self.window)
        hidden_states = hidden_states + self.o_proj(merge_heads(attn))
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


class BlockRecurrentLayer(nn.Module):
    """Block-Recurrent Transformer layer (Hutchins et al., 2022, arXiv 2203.07852), written for this benchmark.

    The sequence is cut into blocks of W tokens that are processed one after another, carrying a recurrent state of S
    vectors (the paper uses S = W = 512). For each block:
    - vertical direction (tokens): causal self-attention over the block and cross-attention to the state, heads
      concatenated, one output projection, residual; FFN, residual;
    - horizontal direction (state): self-attention over the state and cross-attention to the block's tokens, one
      output projection, then the paper's "fixed" gate (a learned per-channel sigmoid, independent of the input)
      instead of a residual; FFN through a second fixed gate.
    Keys and values are shared between the two directions, queries are separate, as in the paper. The loop over
    blocks is the point of the comparison: BST replaces it by a parallel SSM.
    """

    def __init__(self, hidden_size, num_heads, intermediate_size, block_size, state_size):
        super().__init__()
        self.num_heads, self.block_size = num_heads, block_size
        self.token_norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.state_norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.token_qkv_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.state_qkv_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.token_cross_q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.state_cross_q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.token_o_proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.state_o_proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.token_mlp_norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.state_mlp_norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.token_mlp = FeedForward(hidden_size, intermediate_size)
        self.state_mlp = FeedForward(hidden_size, intermediate_size)
        self.initial_state = nn.Parameter(torch.randn(state_size, hidden_size) * 0.02)
        self.state_ids = nn.Parameter(torch.randn(state_size, hidden_size) * 0.02)
        self.attn_gate_bias = nn.Parameter(torch.full((hidden_size,), 2.0))
        self.mlp_gate_bias = nn.Parameter(torch.full((hidden_size,), 2.0))

    def cell(self, tokens, state, rotations):
        heads = self.num_heads
        normed_tokens = self.token_norm(tokens)
        normed_state = self.state_norm(state + self.state_ids)
        token_q, token_k, token_v = (split_heads(t, heads) for t in self.token_qkv_proj(normed_tokens).chunk(3, -1))
        state_q, state_k, state_v = (split_heads(t, heads) for t in self.state_qkv_proj(normed_state).chunk(3, -1))
        token_cross_q = split_heads(self.token_cross_q_proj(normed_tokens), heads)
        state_cross_q = split_heads(self.state_cross_q_proj(normed_state), heads)
        token_q, token_k = apply_rotary(token_q, rotations), apply_rotary(token_k, rotations)

        token_self = F.scaled_dot_product_attention(token_q, token_k, token_v, is_causal=True)
        token_cross = F.scaled_dot_product_attention(token_cross_q, state_k, state_v)
        tokens = tokens + self.token_o_proj(torch.cat([merge_heads(token_self), merge_heads(token_cross)], -1))
        tokens = tokens + self.token_mlp(self.token_mlp_norm(tokens))

        state_self = F.scaled_dot_product_attention(state_q, state_k, state_v)
        state_cross = F.scaled_dot_product_attention(state_cross_q, token_k, token_v)
        update = self.state_o_proj(torch.cat([merge_heads(state_self), merge_heads(state_cross)], -1))
        attn_gate = torch.sigmoid(self.attn_gate_bias)
        state = attn_gate * state + (1 - attn_gate) * update
        mlp_gate = torch.sigmoid(self.mlp_gate_bias)
        state = mlp_gate * state + (1 - mlp_gate) * self.state_mlp(self.state_mlp_norm(state))
        return tokens, state

    def forward(self, hidden_states):
        batch = hidden_states.shape[0]
        head_dim = hidden_states.shape[-1] // self.num_heads
        state = self.initial_state.to(hidden_states.dtype).expand(batch, -1, -1)
        outputs = []
        for block in hidden_states.split(self.block_size, dim=1):
            rotations = rotary_tables(torch.arange(block.shape[1]), head_dim, block.device)
            block_out, state = self.cell(block, state, rotations)
            outputs.append(block_out)
        return torch.cat(outputs, dim=1)


# ---------------------------------------------------------------------------------------------------------------
# BST and Transformers models
# ---------------------------------------------------------------------------------------------------------------


def import_bst():
    try:
        import modeling_bst
    except ImportError as error:
        raise SystemExit(f"cannot import modeling_bst ({error}); run from the repository or `pip install -e .`")
    return modeling_bst


def bst_config(args, num_layers, bst_variant, ssm_kernel, bst_layers=None, vocab_size=None, **options):
    """The config a user's model has: the defaults, `use_cache=True` included, as the baselines', and `options` (other
    BSTConfig fields). Every section calls the models as users do, so a training step that pays for a generation cache
    it never uses shows in the timings."""
    modeling_bst = import_bst()
    return modeling_bst.BSTConfig(
        vocab_size=vocab_size or args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=args.num_heads,
        block_size=args.block_size,
        bst_variant=bst_variant,
        ssm_kernel=ssm_kernel,
        ssm_state_size=args.ssm_state_size,
        bst_layers=bst_layers,
        max_position_embeddings=max(args.model_lengths + [args.prefill_length]),
        **options,
    )


class BSTLayerUnderTest(nn.Module):
    """One BST layer, measured as a 1-layer BSTModel called with `inputs_embeds` (includes the final norm)."""

    def __init__(self, config):
        super().__init__()
        self.model = import_bst().BSTModel(config)

    def forward(self, hidden_states):
        return self.model(inputs_embeds=hidden_states).last_hidden_state


class LlamaLayerUnderTest(nn.Module):
    """One Transformers Llama layer (SDPA, SwiGLU FFN of `--intermediate-size`), measured as BSTLayerUnderTest is: a
    1-layer LlamaModel called with `inputs_embeds` (includes the final norm)."""

    def __init__(self, args):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        config = LlamaConfig(
            vocab_size=16,
            hidden_size=args.hidden_size,
            intermediate_size=args.intermediate_size,
            num_hidden_layers=1,
            num_attention_heads=args.num_heads,
            max_position_embeddings=max(args.profile_lengths),
            attn_implementation="sdpa",
        )
        self.model = LlamaModel(config)

    def forward(self, hidden_states):
        return self.model(inputs_embeds=hidden_states).last_hidden_state


def build_layer(name, args):
    if name == "llama":
        return LlamaLayerUnderTest(args)
    kind, options = LAYER_SPECS[name]
    if kind == "bst":
        config = bst_config(args, num_layers=1, bst_layers=[0], vocab_size=16, **options)
        return BSTLayerUnderTest(config)
    if kind == "attention":
        window = args.block_size if options["window"] == "block" else None
        return AttentionLayer(args.hidden_size, args.num_heads, args.intermediate_size, window=window)
    return BlockRecurrentLayer(
        args.hidden_size, args.num_heads, args.intermediate_size, args.block_size, args.brt_state_size
    )


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def build_causal_lms(args, names=("bst", "llama", "mistral")):
    """The BST LM and same-size Llama / Mistral LMs. Llama/Mistral get the FFN width that matches BST's parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    modeling_bst = import_bst()
    config = bst_config(args, args.num_layers, args.model_variant, args.model_kernel, args.model_bst_layers)
    models = {"bst": modeling_bst.BSTForCausalLM(config)}
    bst_params = count_parameters(models["bst"])

    # Llama layer: 4 D^2 attention + 3 D F (SwiGLU) + 2 D (norms); embeddings tied, as in BST.
    width, depth = args.hidden_size, args.num_layers
    fixed = args.vocab_size * width + width + depth * (4 * width * width + 2 * width)
    ffn_width = max(8, round((bst_params - fixed) / (3 * width * depth) / 8) * 8)
    common = dict(
        vocab_size=args.vocab_size,
        hidden_size=width,
        intermediate_size=ffn_width,
        num_hidden_layers=depth,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_heads,
        max_position_embeddings=max(args.model_lengths + [args.prefill_length]) + args.decode_tokens + 8,
        tie_word_embeddings=True,
    )
    if "llama" in names:
        models["llama"] = LlamaForCausalLM(LlamaConfig(**common, attn_implementation="sdpa"))
    if "mistral" in names:
        mistral_config = MistralConfig(**common, sliding_window=args.block_size, attn_implementation="sdpa")
        models["mistral"] = MistralForCausalLM(mistral_config)
    return {name: models[name] for name in names}
