"""gqa-convert: HF GQA decoder checkpoints -> TransformerLens-layout GQA decoder.

The pipeline, one module a stage: `hub` (resolve a repo id) -> `checkpoint` (safetensors
I/O) -> `config` + `architectures` (config.json and the per-family tables in configs/) ->
`mapping` (plan and stream) -> `model` (GroupedQueryAttention, GQATransformer) -> `verify`
(HF vs ours) -> `export` (write, manifest, `card`) -> `hub` (push). Beside it: `inspection`,
`to_hf` (the round trip), `interop` (TransformerLens 3.9 and 4.3), `api` (what the CLI calls).

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
    "load_export": "gqa_convert.export",
    "convert": "gqa_convert.api",
    "convert_in_memory": "gqa_convert.api",
    "verify": "gqa_convert.verify",
    "export_to_hf": "gqa_convert.to_hf",
    "inspect_checkpoint": "gqa_convert.inspection",
    "push_export": "gqa_convert.hub",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gqa_convert' has no attribute {name!r}")
