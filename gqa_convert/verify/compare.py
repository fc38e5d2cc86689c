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

HF's q / k after rotary are not a tensor its forward exposes: while HF's layer runs, the
family's own `apply_rotary_pos_emb` (a global of its modelling module) is wrapped to record
what it returns. So rot_q / rot_k are HF's rotary code and frequencies on HF's own
projections, and a layer where HF rotates nothing (a NoPE layer: SmolLM3's, EXAONE 4's and
Cohere 2's global layers, Granite SWA's theta 0) has none. q / k come from hooks on
`q_proj` / `k_proj` (or a split fused `qkv_proj`), q_norm / k_norm from HF's own norm
modules run on them (after rotary, on HF's rotated q / k, where the family normalises there:
Hunyuan). Which HF module each norm is comes from the family's weight map (the row of
`ln1.w` names `input_layernorm`, Apertus's `attention_layernorm`, ...); the block's layout
(pre, post, sandwich, parallel) from the family's table.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from functools import cache
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
NORMS_AFTER_ROTARY = ("rot_q", "rot_k", "q_norm", "k_norm")  # Hunyuan's order
# HF's rotary functions, by the modelling module's name for them: heads first or not.
ROTARY_FUNCTIONS = {"apply_rotary_pos_emb": True, "apply_rotary_emb": False}


def component_order(
    norm_placement: str, *, parallel: bool = False, qk_norm_after_rotary: bool = False
) -> tuple[str, ...]:
    """The components of a block in forward order, for its norm placement; a parallel block
    (Cohere) has no ln2, and q / k norms after rotary (Hunyuan) come after rot_q / rot_k."""
    order = ORDERS[norm_placement]
    if parallel:
        order = tuple(c for c in order if c != "ln2")
    if qk_norm_after_rotary:
        at = order.index("q_norm")
        order = (*order[:at], *NORMS_AFTER_ROTARY, *order[at + 4 :])
    return order


def block_order(cfg: Any, norm_placement: str | None = None) -> tuple[str, ...]:
    """`component_order` for our config (its placement, or `norm_placement`)."""
    return component_order(
        norm_placement or cfg.norm_placement,
        parallel=cfg.parallel_attn_mlp,
        qk_norm_after_rotary=cfg.qk_norm_after_rotary,
    )


@cache
def _hf_layout(architecture: str | None, model_type: str | None) -> dict[str, Any]:
    """How the family's HF layer is laid out: its placement, whether the block is
    parallel and the q / k norms follow rotary (the family's table), its MLP module (`mlp`,
    Llama 4's `feed_forward`: the module of the `mlp.W_out` row) and the HF module of
    each of our norms (ln1, ln2, ln1_post, ln2_post, q_norm, k_norm), read off the weight
    map: the row `blocks.{l}.ln1.w` <- `model.layers.{l}.input_layernorm.weight` gives
    ln1 -> input_layernorm."""
    from gqa_convert.architectures import family_for

    family = family_for([architecture] if architecture else None, model_type)
    modules, mlp = {}, "mlp"
    for row in family.rows_for():
        target, source = row.target or "", row.source
        if target.startswith("blocks.{l}.") and target.endswith(".w"):
            ours = target.removeprefix("blocks.{l}.").removesuffix(".w").rsplit(".", 1)[-1]
            modules[ours] = source.removeprefix("model.layers.{l}.").removesuffix(".weight")
        if target == "blocks.{l}.mlp.W_out":  # the MLP module (Llama 4's feed_forward)
            mlp = source.removeprefix("model.layers.{l}.").split(".", 1)[0]
    return {
        "mlp": mlp,
        "placement": family.fixed.get("norm_placement", "pre"),
        "parallel": family.fixed.get("parallel_attn_mlp", False),
        "qk_norm_after_rotary": family.fixed.get("qk_norm_after_rotary", False),
        # a weightless q / k norm has no weight row: its module is named in the table
        "modules": {
            **dict.fromkeys(("q_norm", "k_norm"), family.fixed.get("qk_norm_module")),
            **modules,
        },
    }


def _submodule(layer: nn.Module, path: str | None) -> nn.Module | None:
    """The layer's module at `path`, None where it has none."""
    try:
        return layer.get_submodule(path) if path else None
    except AttributeError:
        return None


def hf_layout(layer: nn.Module) -> dict[str, Any]:
    """`_hf_layout` of an HF decoder layer, by its model's config."""
    config = layer.self_attn.config
    architectures = getattr(config, "architectures", None) or [None]
    return _hf_layout(architectures[0], getattr(config, "model_type", None))


def rel_err(ours: Tensor, ref: Tensor) -> float:
    """max over (batch, pos) of ||ours - ref|| / ||ref||, norms over the remaining axes
    (flattened: [batch, pos, 1, d_head] and [batch, pos, d_head] are the same numbers)."""
    if ours.shape[:2] != ref.shape[:2] or ours.numel() != ref.numel():
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


def _output(module: nn.Module, output: Any) -> Tensor:
    """A module's output as a component: a router's logits, else the first of a tuple."""
    is_router = router_top_k(module) and not hasattr(module, "experts")  # not the MoE
    if is_router and isinstance(output, tuple):
        return router_picks(output, router_top_k(module))[0]
    return _first(output)


def router_picks(output: tuple[Tensor, ...], top_k: int) -> tuple[Tensor, Tensor]:
    """An HF router's (logits, chosen experts) from its output: (logits, weights, indices),
    or Llama 4's (scores, logits), whose experts are torch.topk of the logits as its own."""
    if len(output) == 2:
        return output[1], output[1].topk(top_k, dim=-1).indices
    return output[0], output[2]


# Points a KV-head group of attention gives part of (sub-layer streaming runs attention one
# group at a time): their outputs are joined along the heads, HF's q / k / v along their
# last axis (heads * d_head), the rest along axis 2 ([batch, pos, head, d_head]).
PER_HEAD = ("q", "k", "v", "qkv", "q_norm", "k_norm", "rot_q", "rot_k")


def _keep(acts: dict[str, Tensor], name: str, out: Tensor, dim: int) -> None:
    """acts[name] = out, or joined to what an earlier group gave (a PER_HEAD point)."""
    if name in acts and name in PER_HEAD:
        out = torch.cat([acts[name], out], dim=dim)
    acts[name] = out


@contextmanager
def _hooks(pairs: Iterable[tuple[nn.Module, Callable[[Tensor], None]]]):
    """Forward hooks that read (never replace) each module's output, removed on exit."""
    handles = [
        module.register_forward_hook(lambda m, _i, out, fn=fn: fn(_output(m, out)))
        for module, fn in pairs
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hf_points(layer: nn.Module) -> dict[str, nn.Module]:
    """The HF modules of one decoder layer whose outputs are components (`hf_layout`).

    Post-norm blocks (OLMo2) compare ln1 / attn_out with the norm after attention and ln2 /
    mlp_out with the norm after the MLP, as our ln1 / ln2 are those norms. Sandwich blocks
    (Gemma 2/3, GLM-4) have all four norms; a parallel block (Cohere) no ln2. A fused
    `qkv_proj` (Phi-3) is read whole and split in `_hf_rotated`."""
    attn = layer.self_attn
    layout = hf_layout(layer)
    norms = {name: _submodule(layer, path) for name, path in layout["modules"].items()}
    placement = layout["placement"]
    parts = {"ln1": norms["ln1"], "attn_out": attn, "mlp_out": layer.get_submodule(layout["mlp"])}
    if placement == "post":
        parts.update(attn_out=norms["ln1"], ln2=norms["ln2"], mlp_out=norms["ln2"])
    elif not layout["parallel"]:
        parts["ln2"] = norms["ln2"]
    if placement == "sandwich":
        parts.update(ln1_post=norms["ln1_post"], ln2_post=norms["ln2_post"])
    for name in ("q", "k", "v", "qkv"):  # Gemma 4: none for shared K/V, no v under k = v
        if getattr(attn, f"{name}_proj", None) is not None:
            parts[name] = getattr(attn, f"{name}_proj")
    if hf_router(layer) is not None:  # Gemma 4's returns probabilities: its logits, proj's
        parts["router"] = getattr(hf_router(layer), "proj", hf_router(layer))
    return parts


def hf_router(layer: nn.Module) -> nn.Module | None:
    """An HF MoE layer's router (`mlp.gate`, gpt-oss's `mlp.router`, Llama 4's
    `feed_forward.router`, Gemma 4's `router` of the layer itself; its output read by
    `router_picks`)."""
    mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)  # Llama 4's
    routers = (getattr(mlp, "gate", None), getattr(mlp, "router", None))
    routers += (getattr(layer, "router", None),)  # Gemma 4's, beside its dense `mlp`
    return next((router for router in routers if router_top_k(router)), None)


def router_top_k(router: nn.Module | None) -> int | None:
    """How many experts an HF router picks per token: its `top_k`, or Gemma 4's (marked by
    its per_expert_scale) its config's `top_k_experts`; None for a module that is no router."""
    if hasattr(router, "per_expert_scale"):
        return router.config.top_k_experts
    return getattr(router, "top_k", None)


def hf_experts(layer: nn.Module) -> nn.Module | None:
    """An HF MoE layer's routed experts module (`experts`, stacked [n_experts, ...])."""
    mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)  # Llama 4's
    return getattr(mlp, "experts", None)


def expert_errors(layer: nn.Module, block: nn.Module, x: Tensor, picks: Tensor) -> dict:
    """Each routed expert's own error, by expert index: HF's experts module and our
    `experts.{e}` run on the same tokens `x` [tokens, d_model] (HF's MLP input), those HF's
    router sent to e (`picks` [tokens, top_k]), their outputs before the routing weight.
    HF's module runs its own forward with every token routed to e at weight 1 (Llama 4's,
    which runs every expert on every token: e's rows x, the others zero)."""
    import inspect

    experts = hf_experts(layer)
    errors = {}
    for e in picks.unique().tolist():
        tokens = (picks == e).any(-1).nonzero()[:, 0]
        rows = x[tokens]
        if len(inspect.signature(type(experts).forward).parameters) == 2:  # Llama 4's
            n = experts.gate_up_proj.shape[0]
            stacked = rows.new_zeros((n, *rows.shape))
            stacked[e] = rows
            theirs = experts(stacked.flatten(0, 1)).view(n, *rows.shape)[e]
        else:
            index = torch.full((len(rows), 1), e, dtype=picks.dtype, device=rows.device)
            theirs = experts(rows, index, torch.ones((len(rows), 1), dtype=rows.dtype))
        mine = block.mlp.experts[e](rows.to(_device(block)))
        errors[e] = rel_err(mine[None], theirs[None])  # per token: [1, tokens, d_model]
    return errors


def _device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters() if p.device.type != "meta"), "cpu")


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
        (
            "hf",
            layer is not None and hf_router(layer),
            lambda out: router_picks(out, router_top_k(hf_router(layer)))[1],
        ),
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
        "ln2": getattr(block, "ln2", None),
        "router": getattr(block.mlp, "hook_router_logits", None),
        # Gemma 4's MoE layers: HF's `mlp` is the dense MLP beside the experts, ours `dense`
        "mlp_out": getattr(block.mlp, "dense", block.mlp) if sandwich else block.hook_mlp_out,
        "ln2_post": getattr(block, "ln2_post", None),
    }
    if getattr(block.attn.cfg, "kv_source", None) is not None:  # Gemma 4: another layer's
        for name in ("k", "v", "k_norm", "rot_k"):
            parts.pop(name)
    return {name: m for name, m in parts.items() if m is not None}


@contextmanager
def _recording_rotary(attn: nn.Module, acts: dict[str, Tensor]):
    """While HF's layer runs, its family's `apply_rotary_pos_emb` records the rotated q / k
    it returns (as [batch, pos, head, d_head]) into `acts`."""
    module = sys.modules[type(attn).__module__]
    # the function's name -> whether it takes q / k heads first (Llama 4's apply_rotary_emb
    # takes [batch, pos, head, d_head])
    name = next((n for n in ROTARY_FUNCTIONS if hasattr(module, n)), None)
    if name is None:
        yield
        return
    original, heads_first = getattr(module, name), ROTARY_FUNCTIONS[name]

    def recording(*args: Any, **kwargs: Any) -> Any:
        """q and k rotated together (a pair back), or one per call (Gemma 4's: q, then k)."""
        out = original(*args, **kwargs)
        if isinstance(out, tuple):
            q, k = out
            if heads_first:
                q, k = q.transpose(1, 2), k.transpose(1, 2)
            _keep(acts, "rot_q", q, 2)
            _keep(acts, "rot_k", k, 2)
        else:  # [batch, pos, head, d_head] already
            acts["rot_k" if "rot_q" in acts else "rot_q"] = out
        return out

    setattr(module, name, recording)
    try:
        yield
    finally:
        setattr(module, name, original)


def _hf_rotated(layer: nn.Module, acts: dict[str, Tensor]) -> None:
    """Give HF's q / k / v our shape [batch, pos, head, d_head] and add q_norm / k_norm
    where the family has them: HF's own norm modules on its projections (over d_head, per
    head or over the whole projection, OLMo2's; layout-free, so norms after the head
    transpose are the same numbers), or on its rotated q / k (recorded by
    `_recording_rotary`) where the family normalises after rotary (Hunyuan)."""
    attn = layer.self_attn
    layout = hf_layout(layer)
    if "qkv" in acts:  # Phi-3's fused projection: rows q, then k, then v
        n_kv = attn.config.num_key_value_heads * attn.head_dim
        qkv = acts.pop("qkv")
        sizes = [qkv.shape[-1] - 2 * n_kv, n_kv, n_kv]
        acts["q"], acts["k"], acts["v"] = qkv.split(sizes, dim=-1)
    if "v" not in acts and "k" in acts and getattr(attn, "v_proj", 0) is None:
        acts["v"] = acts["k"]  # Gemma 4's k = v layers: v is k's projection
    for name in ("q", "k"):
        if name not in acts:  # Gemma 4's shared K/V: no k of the layer's own
            continue
        norm = _submodule(layer, layout["modules"].get(f"{name}_norm"))
        if norm is None:  # none in the family, or off in this model (Cohere's use_qk_norm)
            continue
        if layout["qk_norm_after_rotary"]:
            if f"rot_{name}" in acts:
                acts[f"{name}_norm"] = norm(acts[f"rot_{name}"])
            continue
        flat = acts[name]  # [batch, pos, heads * d_head]
        heads = flat.view(*flat.shape[:2], -1, attn.head_dim)
        acts[f"{name}_norm"] = norm(flat if norm.weight.shape[-1] == flat.shape[-1] else heads)
    for name in ("q", "k", "v"):
        if name in acts:
            b, p, _ = acts[name].shape
            acts[name] = acts[name].view(b, p, -1, attn.head_dim)


def run_hf_layer(
    layer: nn.Module, hidden: Tensor, call: tuple[tuple, dict], components: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """HF's layer on `hidden` with the arguments its model's forward gives it; with
    `components`, also its components (q / k / v as [batch, pos, head, d_head])."""
    args, kwargs = call
    acts: dict[str, Tensor] = {}
    if not components:
        return _first(layer(hidden, *args, **kwargs)), acts
    points = _hf_points(layer).items()
    with (
        _hooks((m, lambda out, n=n: _keep(acts, n, out, -1)) for n, m in points),
        _recording_rotary(layer.self_attn, acts),
    ):
        out = _first(layer(hidden, *args, **kwargs))
    _hf_rotated(layer, acts)
    # [batch * pos, ...] -> [batch, pos, ...]: routers' logits, Llama 4's MoE output
    for name in ("router", "mlp_out"):
        if name in acts and acts[name].ndim == 2:
            acts[name] = acts[name].view(*hidden.shape[:2], -1)
    acts["resid_post"] = out
    return out, acts


def run_our_block(
    block: nn.Module,
    hidden: Tensor,
    cos: Tensor,
    sin: Tensor,
    hf_acts: dict[str, Tensor] | None,
    **kwargs: Any,
) -> tuple[Tensor, dict[str, float]]:
    """Our block on `hidden` (`kwargs`: Gemma 4's per-layer input and shared K/V); with
    `hf_acts` (HF's components on the same input), the relative error of each of ours, in
    forward order."""
    errors: dict[str, float] = {}
    if hf_acts is None:
        return block(hidden, cos, sin, **kwargs), errors

    outs: dict[str, Tensor] = {}
    points = _our_points(block)
    with _hooks((m, lambda out, n=n: _keep(outs, n, out, 2)) for n, m in points.items()):
        out = block(hidden, cos, sin, **kwargs)
    for name, got in outs.items():  # a component HF's layer lacks counts as diverged
        errors[name] = rel_err(got, hf_acts[name]) if name in hf_acts else math.inf
    errors["resid_post"] = rel_err(out, hf_acts["resid_post"])
    # A norm HF's layer has and ours lacks (Gemma 2's ln1_post dropped) counts as diverged.
    placement = "sandwich" if "ln1_post" in hf_acts else block.cfg.norm_placement
    order = block_order(block.cfg, placement)
    lacking = {"ln1_post", "ln2_post"} & set(hf_acts)
    return out, {
        name: errors.get(name, math.inf)
        for name in order
        if name in errors or name in points or name in lacking
    }
