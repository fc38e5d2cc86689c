"""Comparing one decoder layer: HF's components against ours, on the same input.

The components of a block, in forward order: ln1 (attention input), q / k / v (projections,
before rotary), rot_q / rot_k (after rotary), attn_out (after W_O), ln2 (MLP input),
mlp_out, resid_post. Both layers are run on HF's hidden state entering the layer (teacher
forcing), so each component's error is that layer's own, whatever came before; the first
component over tolerance, in forward order of the first such layer, is `first_divergence`.

HF's q / k after rotary are not a tensor its forward exposes: we hook `q_proj` / `k_proj`
and apply HF's own `apply_rotary_pos_emb` (from the family's modelling module) with the
cos / sin its forward passed the layer. So rot_q / rot_k compare our rotary against HF's
rotary code and frequencies on HF's own projections.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

# Inside one block, in forward order.
COMPONENTS = ("ln1", "q", "k", "v", "rot_q", "rot_k", "attn_out", "ln2", "mlp_out", "resid_post")


def rel_err(ours: Tensor, ref: Tensor) -> float:
    """max over (batch, pos) of ||ours - ref|| / ||ref||, norms over the remaining axes."""
    if ours.shape != ref.shape:
        return math.inf
    b, p = ref.shape[:2]
    ours = ours.float().reshape(b, p, -1).to(ref.device)
    ref = ref.float().reshape(b, p, -1)
    diff = (ours - ref).norm(dim=-1)
    scale = ref.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    err = (diff / scale).max().item()
    return math.inf if math.isnan(err) else err


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _hooks(pairs: Iterable[tuple[nn.Module, Callable[[Tensor], None]]]):
    """Forward hooks that read (never replace) each module's output, removed on exit."""
    handles = [
        module.register_forward_hook(lambda _m, _i, out, fn=fn: fn(_first(out)))
        for module, fn in pairs
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hf_points(layer: nn.Module) -> dict[str, nn.Module]:
    """The HF modules of one decoder layer whose outputs are components."""
    return {
        "ln1": layer.input_layernorm,
        "q": layer.self_attn.q_proj,
        "k": layer.self_attn.k_proj,
        "v": layer.self_attn.v_proj,
        "attn_out": layer.self_attn,
        "ln2": layer.post_attention_layernorm,
        "mlp_out": layer.mlp,
    }


def _our_points(block: nn.Module) -> dict[str, nn.Module]:
    return {
        "ln1": block.ln1,
        "q": block.attn.hook_q,
        "k": block.attn.hook_k,
        "v": block.attn.hook_v,
        "rot_q": block.attn.hook_rot_q,
        "rot_k": block.attn.hook_rot_k,
        "attn_out": block.hook_attn_out,
        "ln2": block.ln2,
        "mlp_out": block.hook_mlp_out,
    }


def _hf_rotated(layer: nn.Module, acts: dict[str, Tensor], cos: Tensor, sin: Tensor) -> None:
    """Give HF's q / k / v our shape [batch, pos, head, d_head] and add q / k after HF's own
    rotary (its `apply_rotary_pos_emb`, with the cos / sin its forward passed the layer)."""
    attn = layer.self_attn
    for name in ("q", "k", "v"):
        b, p, _ = acts[name].shape
        acts[name] = acts[name].view(b, p, -1, attn.head_dim)
    apply_rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    # HF rotates [batch, head, pos, d_head]; ours is [batch, pos, head, d_head].
    q, k = (acts[name].transpose(1, 2) for name in ("q", "k"))
    rot_q, rot_k = apply_rotary(q, k, cos, sin)
    acts["rot_q"], acts["rot_k"] = rot_q.transpose(1, 2), rot_k.transpose(1, 2)


def run_hf_layer(
    layer: nn.Module, hidden: Tensor, call: tuple[tuple, dict], components: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """HF's layer on `hidden` with the arguments its model's forward gives it; with
    `components`, also its components (q / k / v as [batch, pos, head, d_head])."""
    args, kwargs = call
    acts: dict[str, Tensor] = {}
    points = _hf_points(layer).items() if components else ()
    with _hooks((m, lambda out, n=n: acts.__setitem__(n, out)) for n, m in points):
        out = _first(layer(hidden, *args, **kwargs))
    if components:
        _hf_rotated(layer, acts, *kwargs["position_embeddings"])
        acts["resid_post"] = out
    return out, acts


def run_our_block(
    block: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, hf_acts: dict[str, Tensor] | None
) -> tuple[Tensor, dict[str, float]]:
    """Our block on `hidden`; with `hf_acts` (HF's components on the same input), the
    relative error of each of ours, in forward order."""
    errors: dict[str, float] = {}
    if hf_acts is None:
        return block(hidden, cos, sin), errors

    def measure(name: str) -> Callable[[Tensor], None]:
        return lambda out: errors.__setitem__(name, rel_err(out, hf_acts[name]))

    with _hooks((m, measure(n)) for n, m in _our_points(block).items()):
        out = block(hidden, cos, sin)
    errors["resid_post"] = rel_err(out, hf_acts["resid_post"])
    return out, {name: errors.get(name, math.inf) for name in COMPONENTS}
