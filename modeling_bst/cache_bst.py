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
    "num_sink_tokens",
    "rope_pairing",
    "bst_variant",
    "ssm_kernel",
    "ssm_state_size",
    "num_context_states",
    "bst_layers",
)


def cache_signature(config: BSTConfig) -> dict:
    return {name: copy.deepcopy(getattr(config, name)) for name in CACHE_SIGNATURE_FIELDS}


# The layer-cache names under which the model reads and writes its state; the rest live in `BSTLayerCache.slots`.
RECURRENT_STATE, INPUT_HISTORY = "ssm_state", "ssm_history"


class BatchRowsMixin:
    """Beam search and batch edits of a cache: each applies one function to every per-row tensor (`_map_rows`)."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_rows(lambda tensor: tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda tensor: tensor[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda tensor: tensor.repeat_interleave(repeats, dim=0))


class BSTLayerCache(BatchRowsMixin, LinearAttentionLayer, CacheLayerMixin):
    """One layer's decoding state, on Transformers' cache-layer API. Every tensor has the batch first and, once stored,
    is updated in place while its shape stays the same, so its address is fixed across decoding steps (torch.compile,
    CUDA graphs):

    - `keys`/`values` (B, W, H_kv, d): the current block's self-attention keys/values in W fixed slots (slot = position
      modulo W; H_kv = `num_key_value_heads`); only the slots up to a row's current position are read, a new block
      overwrites them;
    - `recurrent_states[0]` (B, D*C, N/2) complex128 ("s4"): the diagonal SSM state (double precision, so that its
      rounding does not add up over thousands of decoding steps; 16 bytes per mode);
    - `conv_states[0]` (B, D, K) ("unstructured", which has no finite state): the SSM inputs so far, right-aligned (the
      newest last, zeros before the first). K grows with the sequence in a dynamic cache and is `max_cache_len` in a
      static one;
    - `slots`, the other fixed-size tensors: `previous_keys`/`previous_values` (B, W, H_kv, d) (`attend_previous_block`),
      `context_keys`/`context_values` (B, W, H, d) ("sh"/"mh"), `context_states` (B, S, D) ("mf");
    - `kernels`: what decoding reuses and no row owns, the "s4" discretisation (`log_da`, `c_db`, `da`) or the
      "unstructured" `taps`, computed from the parameters on the cache's first use and kept until `reset`.

    No standard layer fits: the block slots are written at each row's own slot (rows of a left-padded batch sit at
    different slots), and a layer holds a recurrent state and block keys/values together. The model reads and writes
    the tensors by name: `layer_cache.get("keys")`, `layer_cache["ssm_state"] = new_state`.
    """

    _layer_type = "bst_block_state"
    is_compileable = True
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, max_cache_len: int | None = None, static: bool = False, **kwargs):
        CacheLayerMixin.__init__(self)
        LinearAttentionLayer.__init__(self, number_of_states=1)
        self.max_cache_len = max_cache_len
        self.static = static
        self.slots: dict[str, torch.Tensor] = {}
        self.kernels: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor | None:
        if name in ("keys", "values"):
            return getattr(self, name)
        if name in (RECURRENT_STATE, INPUT_HISTORY):
            states = self.recurrent_states if name == RECURRENT_STATE else self.conv_states
            return states[0] if self.has_previous_state[0] else None
        return self.slots.get(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self.get(name)
        if tensor is None:
            raise KeyError(name)
        return tensor

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        """Copies `value` into the tensor held under `name` when the shapes match (its address stays), else holds a
        copy of it; the "unstructured" history of a dynamic cache grows that way."""
        held = self.get(name)
        if held is not None and held.shape == value.shape and held.dtype == value.dtype:
            held.copy_(value)
            return
        held = value.clone(memory_format=torch.contiguous_format)
        if self.static and not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(held)
        if name in ("keys", "values"):
            setattr(self, name, held)
        elif name in (RECURRENT_STATE, INPUT_HISTORY):
            states = self.recurrent_states if name == RECURRENT_STATE else self.conv_states
            states[0] = held
            if name == RECURRENT_STATE:
                self.is_recurrent_states_initialized[0] = True
            else:
                self.is_conv_states_initialized[0] = True
            # Set here, not by `update_conv_state` only: a layer whose state was never flagged would restart from zero.
            self.has_previous_state[0] = True
        else:
            self.slots[name] = held
        self.dtype, self.device, self.is_initialized = value.dtype, value.device, True

    def items(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of every per-row tensor held."""
        named = {"keys": self.keys, "values": self.values, RECURRENT_STATE: self.get(RECURRENT_STATE)}
        named[INPUT_HISTORY] = self.get(INPUT_HISTORY)
        return [(name, tensor) for name, tensor in {**named, **self.slots}.items() if tensor is not None]

    def nbytes(self) -> int:
        tensors = [tensor for _, tensor in self.items()] + list(self.kernels.values())
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)

    def _map_rows(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name, tensor in self.items():
            self[name] = function(tensor)

    def reset(self) -> None:
        """Drops every tensor, the kernels included: the next use starts from the model's current parameters."""
        self.__init__(max_cache_len=self.max_cache_len, static=self.static)

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("BST layers write their keys and values into their block slots by name.")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("BSTCache holds a recurrent state and cannot be cropped back to an earlier length.")

    def get_seq_length(self) -> int:
        return 0  # the cache counts positions, for all layers alike

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_max_length(self) -> int:
        return -1 if self.max_cache_len is None else self.max_cache_len


class BSTCache(BatchRowsMixin, Cache):
    """Decoding state of a BST model: one `BSTLayerCache` per layer in `layers` (also `layer_states`), plus per row
    `seen_tokens` (real tokens so far). Its size does not depend on the context length for "s4" kernels.

    A static cache (`static=True`; `generate(..., cache_implementation="static")` makes one) can run a compiled
    decoding step: every tensor keeps its shape and address, and `is_compileable` tells generate() so. With
    "unstructured" kernels it holds `max_cache_len` SSM inputs and refuses to go further (`check_room`; a dynamic cache
    keeps them all). "s4" caches have the same fixed-size tensors either way.

    `layer_kernels` lists each layer's `kernels` (see `BSTLayerCache`): a cache continues the model as it was when the
    cache started. `model_signature` records the configuration fields the cache was made for; a model with others
    refuses it.
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
        self.seen_tokens: torch.Tensor | None = None  # (B,)
        self.model_dtype: torch.dtype | None = None  # the weights' dtype of the model that fills it (`check_fits`)
        # Positions consumed, padding included (what generate() slices inputs by); a tensor, so that a compiled step
        # advances it in place instead of specialising on its value.
        self.consumed = torch.zeros((), dtype=torch.long)

    @property
    def layer_states(self) -> list[BSTLayerCache]:
        return self.layers

    @property
    def layer_kernels(self) -> list[dict[str, torch.Tensor]]:
        return [layer.kernels for layer in self.layers]

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
        self.seen_tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.consumed = self.consumed.to(device)
        if self.static:
            torch._dynamo.mark_static_address(self.seen_tokens)
            torch._dynamo.mark_static_address(self.consumed)

    def advance(self, lengths: torch.Tensor, positions: int) -> None:
        """After a forward: `lengths` (B,) real tokens and `positions` positions were consumed, in place."""
        self.seen_tokens.add_(lengths)
        self.consumed.add_(positions)

    def nbytes(self) -> int:
        """Total bytes of all tensors held."""
        held = sum(layer.nbytes() for layer in self.layers)
        return held + (0 if self.seen_tokens is None else self.seen_tokens.numel() * self.seen_tokens.element_size())

    def _map_rows(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.seen_tokens is None:
            return
        self.seen_tokens = function(self.seen_tokens)
        for layer in self.layers:
            layer._map_rows(function)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.seen_tokens = None
        self.model_dtype = None
        self.consumed = torch.zeros((), dtype=torch.long)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("BSTCache holds a recurrent state and cannot be cropped back to an earlier length.")

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.sequence_length + query_length, 0
