"""Our exports in the interpretability tools, one module a client:

- `tl3`: TransformerLens 3.9's `HookedTransformer` (`to_hooked_transformer`; extra `tl`),
  which SAELens 6 drives;
- `bridge`: TransformerLens 4.3's `TransformerBridge` (`to_transformer_bridge`; extra `tl4`,
  in a venv of its own: it replaces 3.9).

nnsight needs no adapter: `nnsight.NNsight(GQATransformer.from_pretrained(out))`.
Importing this package imports neither version of transformer-lens.
"""

from gqa_convert.interop.bridge import (
    INSTALL_HINT_TL4,
    BridgeRoute,
    bridge_route,
    native_obstacles,
    to_transformer_bridge,
)
from gqa_convert.interop.tl3 import (
    INSTALL_HINT,
    hooked_transformer_config,
    tl_tensor,
    to_hooked_transformer,
)

__all__ = [
    "INSTALL_HINT",
    "INSTALL_HINT_TL4",
    "BridgeRoute",
    "bridge_route",
    "hooked_transformer_config",
    "native_obstacles",
    "tl_tensor",
    "to_hooked_transformer",
    "to_transformer_bridge",
]
