"""The generation cache of BST models: per layer, the current block's keys/values, the context keys/values or states,
and the SSM state ("s4") or the SSM input history ("unstructured"). Its size does not depend on the context length for
"s4" kernels."""

import copy
from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, LinearAttentionLayer

from .configuration_bst import BSTConfig


# The configuration fields that decide the shapes and meaning of a cache's tensors.
CACHE_SIGNATURE_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "block_size",
    "attend_previous_block",
    "sliding_window_attention",
    "num_sink_tokens",
    "rope_pairing",
    "bst_variant",
    "ssm_kernel",
    "ssm_state_size",
    "num_context_states",
    "bst_layers",
    "ssm_gate",
    "ssm_conv_size",
    "ssm_cross_attention",
)


def cache_signature(config: BSTConfig) -> dict:
    return {name: copy.deepcopy(getattr(config, name)) for name in CACHE_SIGNATURE_FIELDS}


class BSTLayerCache(LinearAttentionLayer, CacheLayerMixin):
    """One layer's decoding state, on Transformers' cache-layer protocol. Every per-row tensor has the batch first and,
    once stored, is updated in place while its shape stays the same, so its address is fixed across decoding steps
    (torch.compile, CUDA graphs). The model reads the attributes and writes them through the named methods:

    - `keys`/`values` (B, W, H_kv, d), `store_block`: the current block's self-attention keys/values in W fixed slots
      (slot = position modulo W; H_kv = `num_key_value_heads`); only the slots up to a row's current position are read,
      a new block overwrites them;
    - `previous_keys`/`previous_values` (B, W, H_kv, d), `store_previous_block` (`attend_previous_block`): the block
      before the one that holds the row's next token, its keys already rotated by -W (RoPE), where they sit for the
      queries of the row's current block: a decoding step reads them as they are;
    - `context_keys`/`context_values` (B, W, H, d), `store_context_block` ("sh"/"mh"), or `context_states` (B, S, D),
      `store_context_states` ("mf"): the current block's context;
    - `ssm_state()` / `update_recurrent_state` ("s4"): the diagonal SSM state `recurrent_states[0]` (B, D*C, N/2)
      complex128 (double precision, so that its rounding does not add up over thousands of decoding steps);
    - `input_history()` / `store_input_history` ("unstructured", which has no finite state): `conv_states[0]` (B, D,
      K), the SSM inputs so far right-aligned (the newest last, zeros before the first): the filter is as long as the
      sequence, so its convolution window is the whole history. K grows in a dynamic cache and is `max_cache_len` in a
      static one;
    - `short_conv_inputs` (B, D, K - 1), `store_short_conv_inputs` (`ssm_conv_size` K): each row's last K - 1 real
      inputs of the short convolution before the SSM (zeros before the first);
    - `sink_keys`/`sink_values` (B, k, H_kv, d), `store_sinks` (`num_sink_tokens`): the keys/values of the sequence's
      first k tokens, which every later block also attends to, the keys already rotated to sit just before a block's
      attention window;
    - `seen_tokens` (B,), `advance`: real tokens so far, per row (rows of a left-padded batch sit at different slots);
    - `discretization` ("s4": log dA, C dB, dA) or `taps` ("unstructured"): what decoding reuses and no row owns,
      computed from the parameters on the cache's first use and kept until `reset`.

    Beam search and batch edits (`reorder_cache`, `batch_repeat_interleave`, `batch_select_indices`) apply to every
    per-row tensor, the counters included, so `Cache`'s own versions of them suffice. No standard layer fits: the
    block slots are written at each row's own slot, and a layer holds a recurrent state and block keys/values together.
    """

    is_compileable = True
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, max_cache_len: int | None = None, static: bool = False, **kwargs):
        CacheLayerMixin.__init__(self)
        LinearAttentionLayer.__init__(self, number_of_states=1)
        self.max_cache_len = max_cache_len
        self.static = static
        self.previous_keys: torch.Tensor | None = None
        self.previous_values: torch.Tensor | None = None
        self.context_keys: torch.Tensor | None = None
        self.context_values: torch.Tensor | None = None
        self.context_states: torch.Tensor | None = None
        self.sink_keys: torch.Tensor | None = None
        self.sink_values: torch.Tensor | None = None
        self.short_conv_inputs: torch.Tensor | None = None
        self.seen_tokens: torch.Tensor | None = None
        self.discretization: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.taps: torch.Tensor | None = None

    def _hold(self, held: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
        """The tensor to keep for `value`: `held` with `value` copied in when the shapes match (its address stays),
        else a copy of `value` (the "unstructured" history of a dynamic cache grows that way)."""
        if held is not None and held.shape == value.shape and held.dtype == value.dtype:
            return held.copy_(value)
        held = value.clone(memory_format=torch.contiguous_format)
        if self.static and not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(held)
        self.dtype, self.device, self.is_initialized = value.dtype, value.device, True
        return held

    def store_block(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = self._hold(self.keys, keys), self._hold(self.values, values)

    def store_previous_block(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.previous_keys = self._hold(self.previous_keys, keys)
        self.previous_values = self._hold(self.previous_values, values)

    def store_context_block(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.context_keys = self._hold(self.context_keys, keys)
        self.context_values = self._hold(self.context_values, values)

    def store_context_states(self, states: torch.Tensor) -> None:
        self.context_states = self._hold(self.context_states, states)

    def store_sinks(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.sink_keys, self.sink_values = self._hold(self.sink_keys, keys), self._hold(self.sink_values, values)

    def store_short_conv_inputs(self, inputs: torch.Tensor) -> None:
        self.short_conv_inputs = self._hold(self.short_conv_inputs, inputs)

    def ssm_state(self) -> torch.Tensor | None:
        return self.recurrent_states[0] if self.has_previous_state[0] else None

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        """Stores the SSM state (in place when the shape matches) and flags it: Transformers' own version leaves
        `has_previous_state` to `update_conv_state`, and a state never flagged would restart from zero."""
        self.recurrent_states[state_idx] = self._hold(self.recurrent_states[state_idx], recurrent_states)
        self.is_recurrent_states_initialized[state_idx] = self.has_previous_state[state_idx] = True
        return self.recurrent_states[state_idx]

    def input_history(self) -> torch.Tensor | None:
        return self.conv_states[0] if self.has_previous_state[0] else None

    def store_input_history(self, history: torch.Tensor) -> None:
        """Stores the whole new history (B, D, K); Transformers' `update_conv_state` appends new inputs instead."""
        self.conv_states[0] = self._hold(self.conv_states[0], history)
        self.is_conv_states_initialized[0] = self.has_previous_state[0] = True

    def start(self, batch: int, device: torch.device) -> None:
        """Creates the per-row counter on the first forward."""
        self.seen_tokens = torch.zeros(batch, dtype=torch.long, device=device)
        if self.static:
            torch._dynamo.mark_static_address(self.seen_tokens)

    def advance(self, lengths: torch.Tensor) -> None:
        """After a forward: `lengths` (B,) real tokens were consumed, in place."""
        self.seen_tokens.add_(lengths)

    def _row_tensors(self) -> dict[str, torch.Tensor]:
        """Every per-row tensor held, by attribute name."""
        named = {
            name: getattr(self, name)
            for name in (
                "keys", "values", "previous_keys", "previous_values", "context_keys", "context_values", "sink_keys",
                "sink_values", "short_conv_inputs",
            )
        }
        named.update(context_states=self.context_states, seen_tokens=self.seen_tokens)
        return {name: tensor for name, tensor in named.items() if tensor is not None}

    def _map_rows(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Applies `function` to every per-row tensor, keeping each address where the shape stays."""
        for name, tensor in self._row_tensors().items():
            setattr(self, name, self._hold(tensor, function(tensor)))
        for states, initialized in (
            (self.recurrent_states, self.is_recurrent_states_initialized),
            (self.conv_states, self.is_conv_states_initialized),
        ):
            if initialized[0]:
                states[0] = self._hold(states[0], function(states[0]))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_rows(lambda tensor: tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda tensor: tensor[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def offload(self) -> None:
        """Moves all of the layer's state, per-row tensors and kernels, to the CPU."""
        self._move_all("cpu")

    def prefetch(self) -> None:
        """Moves all of the layer's state back to the layer's device."""
        if self.device is not None:
            self._move_all(self.device)

    def _move_all(self, device) -> None:
        for name, tensor in self._row_tensors().items():
            setattr(self, name, tensor.to(device, non_blocking=True))
        for states, initialized in (
            (self.recurrent_states, self.is_recurrent_states_initialized),
            (self.conv_states, self.is_conv_states_initialized),
        ):
            if initialized[0]:
                states[0] = states[0].to(device, non_blocking=True)
        if self.discretization is not None:
            self.discretization = tuple(tensor.to(device, non_blocking=True) for tensor in self.discretization)
        if self.taps is not None:
            self.taps = self.taps.to(device, non_blocking=True)

    def nbytes(self) -> int:
        tensors = list(self._row_tensors().values()) + [self.taps] + list(self.discretization or ())
        tensors += [self.recurrent_states[0], self.conv_states[0]]
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors if tensor is not None)

    def reset(self) -> None:
        """Zeroes every per-row tensor in place (their addresses stay, for CUDA graphs) and forgets the SSM state and
        the kernels: the next forward starts a new sequence from the model's current parameters."""
        for tensor in self._row_tensors().values():
            tensor.zero_()
        LinearAttentionLayer.reset(self)
        self.discretization, self.taps = None, None

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            "BST layers write their keys/values into their block slots: `store_block`, `store_previous_block`, "
            "`store_context_block`."
        )

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("BSTCache holds a recurrent state and cannot be cropped back to an earlier length.")

    def get_seq_length(self) -> int:
        return 0  # the cache counts positions, for all layers alike

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_max_length(self) -> int:
        return -1 if self.max_cache_len is None else self.max_cache_len


class BSTCache(Cache):
    """Decoding state of a BST model: one `BSTLayerCache` per layer in `layers`, each with the per-row counters
    (`seen_tokens`, real tokens so far), so that `Cache`'s beam search and batch edits, which go layer by layer, cover
    everything; plus `consumed`, the positions consumed (padding included). Its size does not depend on the context
    length for "s4" kernels.

    A static cache (`static=True`; `generate(..., cache_implementation="static")` makes one) can run a compiled
    decoding step: every tensor keeps its shape and address, and `is_compileable` tells generate() so. With
    "unstructured" kernels it holds `max_cache_len` SSM inputs and refuses to go further (`check_room`; a dynamic cache
    keeps them all). "s4" caches have the same fixed-size tensors either way.

    Each layer keeps the kernel values decoding reuses (see `BSTLayerCache`): a cache continues the model as it was
    when the cache started. `model_signature` records the configuration fields the cache was made for, and
    `model_dtype` the dtype of the model that filled it; a model with others refuses it (`check_fits`).
    """

    def __init__(self, config: BSTConfig, static: bool = False, max_cache_len: int | None = None):
        if static and config.ssm_kernel == "unstructured" and config.bst_layers and max_cache_len is None:
            raise ValueError(
                'A static BSTCache with "unstructured" kernels keeps a fixed number of SSM inputs: pass '
                "`max_cache_len`."
            )
        layers = [BSTLayerCache(max_cache_len, static) for _ in range(config.num_hidden_layers)]
        super().__init__(layers=layers)
        self.config = config
        self.static = static
        self.max_cache_len = max_cache_len
        self.model_signature = cache_signature(config)
        self.model_dtype: torch.dtype | None = None  # the weights' dtype of the model that fills it (`check_fits`)
        # Positions consumed, padding included (what generate() slices inputs by); a tensor, so that a compiled step
        # advances it in place instead of specialising on its value.
        self.consumed = torch.zeros((), dtype=torch.long)

    @property
    def seen_tokens(self) -> torch.Tensor | None:
        """(B,) real tokens so far per row (every layer holds the same counts), or None before the first forward."""
        return self.layers[0].seen_tokens
    @property
    def sequence_length(self) -> int:
        return int(self.consumed)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.consumed)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return self.static

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens is not None

    @property
    def batch_size(self) -> int:
        return -1 if self.seen_tokens is None else self.seen_tokens.shape[0]

    def check_room(self, new_positions: int) -> None:
        """Raises when a static cache with "unstructured" kernels cannot take `new_positions` more positions: it holds
        the last `max_cache_len` SSM inputs, and continuing past them would silently drop the oldest. Its tensors keep
        their shapes (what compiled decoding relies on), so it cannot grow."""
        if self.static and self.config.ssm_kernel == "unstructured" and self.config.bst_layers:
            total_positions = int(self.consumed) + new_positions
            if total_positions > self.max_cache_len:
                raise ValueError(
                    f"This static BSTCache holds the last max_cache_len={self.max_cache_len} SSM inputs of its "
                    f'"unstructured" kernels, and {total_positions} positions do not fit. Make the cache with '
                    f"`max_cache_len` >= {total_positions} (`BSTCache(config, static=True, max_cache_len=...)`, or "
                    '`generate(..., cache_implementation="static", max_cache_len=...)` in the call that makes it), or '
                    "use a dynamic cache, which grows."
                )

    def check_fits(self, config: BSTConfig, dtype: torch.dtype) -> None:
        """Raises unless this cache can continue a model with `config` and weights of `dtype`: the configuration
        fields that decide its tensors' shapes and meaning, and the dtype of the model that filled it, must match. A
        cache made with this very configuration object skips the field comparison (reading a dozen config fields costs
        microseconds each decoding step)."""
        if config is not self.config:
            differences = [
                f"{field}={self.model_signature.get(field)!r} (this model: {getattr(config, field)!r})"
                for field in CACHE_SIGNATURE_FIELDS
                if self.model_signature.get(field) != getattr(config, field)
            ]
            if differences:
                raise ValueError(
                    "`past_key_values` is a BSTCache made for another model configuration: "
                    + ", ".join(differences)
                    + ". A cache continues only a model with the configuration that made it; pass "
                    "`past_key_values=None` to start a new one."
                )
        if self.model_dtype is not None and self.model_dtype != dtype:
            raise ValueError(
                f"`past_key_values` is a BSTCache filled by a model with {self.model_dtype} weights, and this model's "
                f"weights are {dtype}. A cache continues only a model of the dtype that filled it; pass "
                "`past_key_values=None` to start a new one (or continue with the model that made it)."
            )

    def start(self, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        """Creates the per-row counters on the first forward, and records the dtype of the model's weights."""
        self.model_dtype = dtype
        for layer in self.layers:
            layer.start(batch, device)
        self.consumed = self.consumed.to(device)
        if self.static:
            torch._dynamo.mark_static_address(self.consumed)

    def advance(self, lengths: torch.Tensor, positions: int) -> None:
        """After a forward: `lengths` (B,) real tokens and `positions` positions were consumed, in place."""
        for layer in self.layers:
            layer.advance(lengths)
        self.consumed.add_(positions)

    def nbytes(self) -> int:
        """Total bytes of all tensors held."""
        return sum(layer.nbytes() for layer in self.layers)

    def reset(self) -> None:
        """Zeroes every tensor in place (addresses stay, for CUDA graphs); the rows stay, and the next forward starts
        new sequences."""
        super().reset()
        self.consumed.zero_()

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("BSTCache holds a recurrent state and cannot be cropped back to an earlier length.")

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.sequence_length + query_length, 0
