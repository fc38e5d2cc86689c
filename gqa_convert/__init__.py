"""gqa-convert: HF Llama-family checkpoints -> TransformerLens-layout GQA decoder.

The pipeline, one module a stage: `checkpoint` (safetensors I/O) -> `config` +
`architectures` (config.json and the per-family tables in configs/) -> `convert` (plan and
stream) -> `model` (GroupedQueryAttention, GQATransformer) -> `export` (write, load).

Heavy imports (torch) happen on first use, so the byte-moving conversion path stays light.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "GQATransformer": "gqa_convert.model.decoder",
    "GroupedQueryAttention": "gqa_convert.model.attention",
    "ModelConfig": "gqa_convert.config",
    "plan_conversion": "gqa_convert.mapping",
    "write_export": "gqa_convert.export",
    "load_export": "gqa_convert.export",
    "convert": "gqa_convert.api",
    "convert_in_memory": "gqa_convert.api",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gqa_convert' has no attribute {name!r}")
