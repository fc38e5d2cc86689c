"""Q/K/V weights in HF's fused layout for the length of one `generate` call.

TL's layout `W_Q [n_heads, d_model, d_head]` is read in place by the plain forward as a
batched matmul over heads (`GroupedQueryAttention._project`). With more than one torch
thread, torch runs that as a parallel `bmm` per projection, whose parallel regions cost
milliseconds on a loaded machine (BENCHMARKS.md, "Generation (issue 14)"); HF's `q_proj` is
one `F.linear` over a `[n_heads * d_head, d_model]` weight. During `generate` the weights
cannot change between steps (hooks aside, below), so `fused_projections(model)` has each
attention make that copy once, on first use, and project with `F.linear`, as HF does:

    W_Q [n, m, h] --permute--> [n, h, m] --reshape--> [n*h, m]   (likewise K/V at n_kv)
    q = F.linear(x, W, b)  [batch, pos, n*h] --view--> [batch, pos, n, d_head]

Hook points see the same shapes as in the plain forward; values are those of HF's op (the
bmm may round differently in the last bits). W_O is not copied: `z.flatten(2) @
W_O.flatten(0, 1)` is already one matmul over a contiguous view.

Memory: while the call runs, every layer holds a copy of its Q, K and V weights (K/V at
n_kv heads) and non-zero biases: + (n_heads + 2 * n_kv_heads) * d_head * d_model elements a
layer, the attention weights without W_O (50 MB fp32 on the benchmark model, 8% of it).
The copies are dropped when `generate` returns or raises.

Weights edited during the call (a hook patching `W_Q`): a copy is remade when its source
parameter is replaced or edited in place by a tracked op (`W_Q[0] = 0`, `load_state_dict`;
the tensor's `_version` changes). Edits through `.data` bypass that counter and are not
seen: not supported inside `generate`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

if TYPE_CHECKING:
    from torch import nn


@dataclass
class _Fused:
    W: Tensor  # the source, [heads, d_model, d_head]
    b: Tensor  # [heads, d_head]
    versions: tuple[int, int]  # of W and b when copied
    weight: Tensor  # [heads * d_head, d_model], contiguous
    bias: Tensor | None  # [heads * d_head]; None when the source bias is zero

    def fresh(self, W: Tensor, b: Tensor) -> bool:
        return W is self.W and b is self.b and (W._version, b._version) == self.versions


class FusedProjections:
    """One attention's fused copies, made on first use, at most one per projection."""

    def __init__(self) -> None:
        self._copies: dict[str, _Fused] = {}

    def project(
        self,
        name: str,
        x: Float[Tensor, "batch pos d_model"],
        W: Float[Tensor, "heads d_model d_head"],
        b: Float[Tensor, "heads d_head"],
    ) -> Float[Tensor, "batch pos heads d_head"]:
        """`x @ W + b` per head, as one `F.linear` over the copy of `W` named `name`."""
        fused = self._copies.get(name)
        if fused is None or not fused.fresh(W, b):
            weight = W.detach().permute(0, 2, 1).reshape(-1, W.shape[1]).contiguous()
            bias = b.detach().flatten() if bool(b.any()) else None
            fused = _Fused(W, b, (W._version, b._version), weight, bias)
            self._copies[name] = fused
        out = F.linear(x, fused.weight, fused.bias)  # [batch, pos, heads * d_head]
        return out.unflatten(-1, (W.shape[0], W.shape[2]))


@contextmanager
def fused_projections(model: nn.Module) -> Iterator[None]:
    """Within the block, every module of `model` that can fuse its projections
    (`GroupedQueryAttention.can_fuse`: not under TL's `ungroup_grouped_query_attention`,
    never ours) projects Q/K/V with fused copies of its weights (module docstring); they are
    dropped on exit. Nested use keeps the outer block's copies. (Read by that attribute:
    attention.py imports this module, not the reverse.)"""
    attns = [m for m in model.modules() if getattr(m, "can_fuse", False) and m.fused is None]
    for attn in attns:
        attn.fused = FusedProjections()
    try:
        yield
    finally:
        for attn in attns:
            attn.fused = None
