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
