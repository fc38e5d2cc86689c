"""Our decoder. Knows nothing of files, HF names or the Hub: it receives tensors in our layout."""

from gqa_convert.model.activation_cache import ActivationCache
from gqa_convert.model.attention import GroupedQueryAttention
from gqa_convert.model.decoder import GQATransformer
from gqa_convert.model.kv_cache import KeyValueCacheEntry, KVCache

__all__ = [
    "ActivationCache",
    "GQATransformer",
    "GroupedQueryAttention",
    "KVCache",
    "KeyValueCacheEntry",
]
