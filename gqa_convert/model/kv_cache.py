"""One layer's KV cache entry, with the interface of TransformerLens's
`TransformerLensKeyValueCacheEntry` (either may be passed to `GroupedQueryAttention.forward`).

Keys and values are held at n_kv heads, as `calculate_qkv_matrices` returns them (n_heads
only under `ungroup_grouped_query_attention`), and keys before rotary, as TL does: each step
rotates the whole key sequence at positions 0..k_len - 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from gqa_convert.model.attention_config import attention_config


@dataclass
class KeyValueCacheEntry:
    past_keys: Float[Tensor, "batch pos_so_far kv_head_index d_head"]
    past_values: Float[Tensor, "batch pos_so_far kv_head_index d_head"]
    frozen: bool = False  # True: append returns the concatenation but stores nothing

    @classmethod
    def init_cache_entry(
        cls, cfg: Any, device: torch.device | str | None = None, batch_size: int = 1
    ) -> KeyValueCacheEntry:
        """An empty entry for `cfg` (anything `GroupedQueryAttention` accepts)."""
        acfg = attention_config(cfg, "global")
        heads = acfg.n_heads if acfg.ungroup_grouped_query_attention else acfg.n_key_value_heads
        shape = (batch_size, 0, heads, acfg.d_head)
        dtype = acfg.dtype or torch.get_default_dtype()
        return cls(
            torch.empty(shape, device=device, dtype=dtype),
            torch.empty(shape, device=device, dtype=dtype),
        )

    def append(
        self,
        new_keys: Float[Tensor, "batch new_tokens kv_head_index d_head"],
        new_values: Float[Tensor, "batch new_tokens kv_head_index d_head"],
    ) -> tuple[Tensor, Tensor]:
        """All keys and values so far, the new ones last; stored unless `frozen`."""
        keys = torch.cat([self.past_keys, new_keys], dim=1)
        values = torch.cat([self.past_values, new_values], dim=1)
        if not self.frozen:
            self.past_keys, self.past_values = keys, values
        return keys, values


class LayerCache:
    """One layer's KV cache for generation (`GQATransformer.forward(cache=...)`): keys after
    rotary, as HF's cache holds them, at n_kv heads ([batch, pos, kv_head_index, d_head]).

    Why rotated keys, unlike `KeyValueCacheEntry` (TL's unrotated keys, re-rotated every
    step): a step rotates only its new keys, O(1) per step instead of O(tokens so far)
    (`scripts/bench_generate.py` measures what re-rotating would cost), and dynamic rope then
    behaves as HF's `generate`, whose cached keys keep the frequencies of the step that wrote
    them (re-rotating would give the frequencies of a fresh forward at the current length).

    A global layer writes into one buffer that grows in blocks (the first `BLOCK` tokens,
    then doubling: amortised O(1) copy per token; never past `capacity`, the most tokens
    the caller said it would feed, unless it feeds more): `generate(max_new_tokens=10**9)`
    that stops after a few tokens allocates for a few hundred. A sliding-window layer keeps
    only its last `window - 1` tokens (HF's `DynamicSlidingWindowLayer`): a new query sees
    those and itself, exactly its window. Llama 4's chunked layers are window layers of the
    chunk size, as in HF's cache (their queries' chunks are among those tokens; the chunk
    mask counts `seen - length` positions dropped before them).
    """

    keys_rotated = True  # GroupedQueryAttention appends after rotary
    BLOCK = 256  # tokens of a global layer's first buffer

    def __init__(self, window: int | None = None, capacity: int = 0):
        self.window, self.capacity = window, capacity
        self.keys: Tensor | None = None  # global: the buffer; local: the kept tokens
        self.values: Tensor | None = None
        self.length = 0  # tokens held (global: filled part of the buffer)
        self.seen = 0  # tokens appended so far

    def append(
        self,
        new_keys: Float[Tensor, "batch new_tokens kv_head_index d_head"],
        new_values: Float[Tensor, "batch new_tokens kv_head_index d_head"],
    ) -> tuple[Tensor, Tensor]:
        """The keys and values the new queries attend: those held, then the new ones."""
        n = new_keys.shape[1]
        self.seen += n
        if self.window is not None:
            keys, values = new_keys, new_values
            if self.keys is not None:
                keys = torch.cat([self.keys, new_keys], dim=1)
                values = torch.cat([self.values, new_values], dim=1)
            start = max(keys.shape[1] - (self.window - 1), 0)  # copies: dropped tokens freed
            self.keys, self.values = keys[:, start:].clone(), values[:, start:].clone()
            self.length = self.keys.shape[1]
            return keys, values
        end = self.length + n
        if end > self.allocated:
            self._grow(new_keys, self._next_size(end))
        self.keys[:, self.length : end] = new_keys
        self.values[:, self.length : end] = new_values
        self.length = end
        return self.keys[:, :end], self.values[:, :end]

    @property
    def allocated(self) -> int:
        """Tokens the buffers have room for (a window layer: those it holds)."""
        return 0 if self.keys is None else self.keys.shape[1]

    def _next_size(self, end: int) -> int:
        """The buffer size that holds `end` tokens: BLOCK, then doubling, capped at
        `capacity` when that is enough."""
        size = max(end, self.BLOCK, 2 * self.allocated)
        return min(size, self.capacity) if self.capacity >= end else size

    def _grow(self, like: Tensor, size: int) -> None:
        shape = (like.shape[0], size, *like.shape[2:])
        keys, values = like.new_empty(shape), like.new_empty(shape)
        if self.keys is not None:
            keys[:, : self.length] = self.keys[:, : self.length]
            values[:, : self.length] = self.values[:, : self.length]
        self.keys, self.values = keys, values

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values held (the tokens in it, not the room for more)."""
        if self.keys is None:
            return 0
        return 2 * self.keys[:, : self.length].nelement() * self.keys.element_size()

    @property
    def allocated_nbytes(self) -> int:
        """Bytes allocated: those held and the room for more in a global layer's buffer."""
        held = (t for t in (self.keys, self.values) if t is not None)
        return sum(t.untyped_storage().nbytes() for t in held)


class KVCache:
    """The generation cache of a whole model: one `LayerCache` per layer."""

    def __init__(self, windows: list[int | None], capacity: int = 0):
        self.layers = [LayerCache(window, capacity) for window in windows]

    @property
    def length(self) -> int:
        """Tokens fed so far (the position of the next one)."""
        return self.layers[0].seen if self.layers else 0

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values held, every layer."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def allocated_nbytes(self) -> int:
        """Bytes allocated, every layer (held + room to grow: at most twice the held, or
        BLOCK tokens a global layer)."""
        return sum(layer.allocated_nbytes for layer in self.layers)
