"""Comparing one decoder layer: HF's components against ours, on the same input.

The components of a block, in forward order: ln1 (attention input), q / k / v (projections,
before rotary), q_norm / k_norm (where the family has them), rot_q / rot_k (after rotary;
none on a NoPE layer), attn_out (after W_O), ln2 (MLP input), mlp_out, resid_post; a
post-norm block (OLMo2) in its own order, POST_NORM_COMPONENTS; a sandwich block (Gemma
2/3) with the norms after each sublayer too, SANDWICH_COMPONENTS (attn_out / mlp_out are
then the sublayer's own output, before ln1_post / ln2_post). Both layers are run on
HF's hidden state entering the layer (teacher forcing), so each component's error is that
layer's own, whatever came before; the first component over tolerance, in forward order of
the first such layer, is `first_divergence`.

HF's q / k after rotary are not a tensor its forward exposes: we hook `q_proj` / `k_proj`
(or split a fused `qkv_proj`), run HF's own q / k norm modules on them, and apply HF's own
`apply_rotary_pos_emb`
(from the family's modelling module) with the cos / sin its forward passed the layer. So
rot_q / rot_k compare our rotary against HF's rotary code and frequencies on HF's own
projections.
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
# q_norm / k_norm only where the family has them (Qwen3, OLMo2); router (the router's
# logits) only on a mixture-of-experts layer. Post-norm blocks (OLMo2)
# run ln1 after attention and ln2 after the MLP: POST_NORM_COMPONENTS.
COMPONENTS = (
    "ln1",
    "q",
    "k",
    "v",
    "q_norm",
    "k_norm",
    "rot_q",
    "rot_k",
    "attn_out",
    "ln2",
    "router",
    "mlp_out",
    "resid_post",
)
POST_NORM_COMPONENTS = (*COMPONENTS[1:9], "ln1", "router", "mlp_out", "ln2", "resid_post")
SANDWICH_COMPONENTS = (
    *COMPONENTS[:9],
    "ln1_post",
    "ln2",
    "router",
    "mlp_out",
    "ln2_post",
    "resid_post",
)
ORDERS = {"pre": COMPONENTS, "post": POST_NORM_COMPONENTS, "sandwich": SANDWICH_COMPONENTS}


def component_order(norm_placement: str) -> tuple[str, ...]:
    """The components of a block in forward order, for its norm placement."""
    return ORDERS[norm_placement]


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


def nonfinite_position(x: Tensor) -> int | None:
    """The first position (axis 1 of [batch, pos, ...]) holding a NaN or Inf, if any."""
    bad = ~torch.isfinite(x.reshape(x.shape[0], x.shape[1], -1)).all(-1).any(0)  # [pos]
    return int(bad.nonzero()[0, 0]) if bad.any() else None


def note_nonfinite(
    nonfinite: dict[str, dict[str, Any]],
    name: str,
    seq: int,
    tokens: Tensor,
    ours: Tensor,
    hf: Tensor,
) -> None:
    """Record in `nonfinite` the first NaN / Inf of stream point `name` (the first sequence
    and position where either side holds one, and which side: "ours", "hf" or "both")."""
    if name in nonfinite:
        return
    where = {"ours": nonfinite_position(ours), "hf": nonfinite_position(hf)}
    sides = [side for side, pos in where.items() if pos is not None]
    if sides:
        position = min(where[side] for side in sides)
        side = "both" if len(sides) == 2 else sides[0]
        token = int(tokens[0, position])
        nonfinite[name] = {"sequence": seq, "position": position, "side": side, "token_id": token}


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
    """The HF modules of one decoder layer whose outputs are components.

    Post-norm blocks (OLMo2: `post_feedforward_layernorm`) compare ln1 / attn_out with the
    norm after attention and ln2 / mlp_out with the norm after the MLP, as our ln1 / ln2 are
    those norms. Sandwich blocks (Gemma 2/3: also `pre_feedforward_layernorm`) have all four
    norms. A fused `qkv_proj` (Phi-3) is read whole and split in `_hf_rotated`."""
    attn = layer.self_attn
    post = getattr(layer, "post_feedforward_layernorm", None)
    if hasattr(layer, "pre_feedforward_layernorm"):  # sandwich
        parts = {
            "ln1": layer.input_layernorm,
            "attn_out": attn,
            "ln1_post": layer.post_attention_layernorm,
            "ln2": layer.pre_feedforward_layernorm,
            "mlp_out": layer.mlp,
            "ln2_post": post,
        }
    else:
        parts = {
            "ln1": layer.post_attention_layernorm if post else layer.input_layernorm,
            "attn_out": layer.post_attention_layernorm if post else attn,
            "ln2": post or layer.post_attention_layernorm,
            "mlp_out": post or layer.mlp,
        }
    for name in ("q", "k", "v", "qkv"):
        if hasattr(attn, f"{name}_proj"):
            parts[name] = getattr(attn, f"{name}_proj")
    if hf_router(layer) is not None:
        parts["router"] = hf_router(layer)
    return parts


def hf_router(layer: nn.Module) -> nn.Module | None:
    """An HF MoE layer's router (`mlp.gate`, returning logits, weights, expert indices)."""
    router = getattr(getattr(layer, "mlp", None), "gate", None)
    return router if hasattr(router, "top_k") else None


def our_router(block: nn.Module) -> nn.Module | None:
    """Our MoE block's hook on the chosen experts."""
    return getattr(block.mlp, "hook_expert_indices", None)


@contextmanager
def recording_routes(layer: nn.Module | None, block: nn.Module | None):
    """The experts each side's MoE layer chose, one [tokens, top_k] tensor per call, in
    {"hf": [...], "ours": [...]} (empty lists on a dense layer)."""
    routes: dict[str, list[Tensor]] = {"hf": [], "ours": []}
    hooks = []
    for side, module, pick in (
        ("hf", layer is not None and hf_router(layer), lambda out: out[2]),
        ("ours", block is not None and our_router(block), lambda out: out),
    ):
        if module:
            hooks.append((module, lambda out, side=side, pick=pick: routes[side].append(pick(out))))
    handles = [
        module.register_forward_hook(lambda _m, _i, out, fn=fn: fn(out)) for module, fn in hooks
    ]
    try:
        yield routes
    finally:
        for handle in handles:
            handle.remove()


def same_expert_sets(ours: Tensor, hf: Tensor) -> tuple[int, int]:
    """(tokens whose set of chosen experts is the same on both sides, tokens)."""
    ours, hf = ours.reshape(-1, ours.shape[-1]), hf.reshape(-1, hf.shape[-1]).to(ours.device)
    if ours.shape != hf.shape:
        return 0, hf.shape[0]
    return int((ours.sort(-1).values == hf.sort(-1).values).all(-1).sum()), hf.shape[0]


def _our_points(block: nn.Module) -> dict[str, nn.Module]:
    sandwich = block.cfg.norm_placement == "sandwich"  # attn_out / mlp_out before the norms
    parts = {
        "ln1": block.ln1,
        "q": block.attn.hook_q,
        "k": block.attn.hook_k,
        "v": block.attn.hook_v,
        "q_norm": block.attn.q_norm,
        "k_norm": block.attn.k_norm,
        # None on a layer without rotary (SmolLM3's NoPE): the attention has no rot hooks.
        "rot_q": getattr(block.attn, "hook_rot_q", None),
        "rot_k": getattr(block.attn, "hook_rot_k", None),
        "attn_out": block.attn if sandwich else block.hook_attn_out,
        "ln1_post": getattr(block, "ln1_post", None),
        "ln2": block.ln2,
        "router": getattr(block.mlp, "hook_router_logits", None),
        "mlp_out": block.mlp if sandwich else block.hook_mlp_out,
        "ln2_post": getattr(block, "ln2_post", None),
    }
    return {name: m for name, m in parts.items() if m is not None}


def _hf_rotated(layer: nn.Module, acts: dict[str, Tensor], cos: Tensor, sin: Tensor) -> None:
    """Give HF's q / k / v our shape [batch, pos, head, d_head], add q_norm / k_norm where
    the family has them (HF's own norm modules run on those projections: over d_head, or
    over the whole projection, OLMo2's; layout-free, so Gemma 3's norms after the head
    transpose are the same numbers), and q / k after HF's own rotary (its
    `apply_rotary_pos_emb`, with the cos / sin its forward passed the layer), applied after
    the norms, and not at all on a layer without rotary (SmolLM3's `use_rope = False`)."""
    attn = layer.self_attn
    if "qkv" in acts:  # Phi-3's fused projection: rows q, then k, then v
        n_kv = attn.config.num_key_value_heads * attn.head_dim
        qkv = acts.pop("qkv")
        sizes = [qkv.shape[-1] - 2 * n_kv, n_kv, n_kv]
        acts["q"], acts["k"], acts["v"] = qkv.split(sizes, dim=-1)
    for name in ("q", "k"):
        norm = getattr(attn, f"{name}_norm", None)
        if isinstance(norm, nn.Module):
            flat = acts[name]  # [batch, pos, heads * d_head]
            heads = flat.view(*flat.shape[:2], -1, attn.head_dim)
            acts[f"{name}_norm"] = norm(flat if norm.weight.shape[-1] == flat.shape[-1] else heads)
    for name in ("q", "k", "v"):
        b, p, _ = acts[name].shape
        acts[name] = acts[name].view(b, p, -1, attn.head_dim)
    # HF rotates [batch, head, pos, d_head]; ours is [batch, pos, head, d_head].
    q, k = (acts.get(f"{name}_norm", acts[name]) for name in ("q", "k"))
    q, k = (t.reshape(*t.shape[:2], -1, attn.head_dim) for t in (q, k))  # OLMo2's norms
    if getattr(attn, "use_rope", True):
        apply_rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        q, k = (
            t.transpose(1, 2) for t in apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        )
    acts["rot_q"], acts["rot_k"] = q, k


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
        if "router" in acts:  # [batch * pos, n_experts] -> [batch, pos, n_experts]
            acts["router"] = acts["router"].view(*hidden.shape[:2], -1)
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
        # A component HF's layer lacks counts as diverged.
        return lambda out: errors.__setitem__(
            name, rel_err(out, hf_acts[name]) if name in hf_acts else math.inf
        )

    points = _our_points(block)
    with _hooks((m, measure(n)) for n, m in points.items()):
        out = block(hidden, cos, sin)
    errors["resid_post"] = rel_err(out, hf_acts["resid_post"])
    # A norm HF's layer has and ours lacks (Gemma 2's ln1_post dropped) counts as diverged.
    placement = "sandwich" if "ln1_post" in hf_acts else block.cfg.norm_placement
    order = component_order(placement)
    lacking = {"ln1_post", "ln2_post"} & set(hf_acts)
    return out, {
        name: errors.get(name, math.inf)
        for name in order
        if name in errors or name in points or name in lacking
    }
