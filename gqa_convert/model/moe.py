"""The mixture-of-experts MLP (Mixtral, Qwen3-MoE, OLMoE, gpt-oss), in TransformerLens 3.9's
names.

A router `W_gate` [d_model, n_experts] scores each token (as HF's `F.linear`, so the logits
are HF's bit for bit on the same input); the `top_k` experts of highest softmax probability
(softmax in fp32, ties as `torch.topk` breaks them, as in HF's routers) each
run a gated SiLU MLP on the token, and their outputs are summed weighted by those
probabilities, divided by their sum when `norm_topk_prob` (Mixtral always). Mixtral scales
the expert outputs by the fp32 weights; Qwen3-MoE and OLMoE cast the weights to the compute
dtype first (`weights_in_fp32`). A token's k weighted outputs are summed in that product's
dtype, then cast, as transformers' default experts forward does (in bf16 the logits are
HF's bit for bit). Only the tokens routed to an expert pass through it. gpt-oss
(MoEConfig's `router_bias`, `softmax_after_topk`, `expert_bias`, `clamped_swiglu`): the
router adds a bias `b_gate`, picks the top-k logits and softmaxes those k (in their dtype);
each expert adds its biases and applies the clamped SwiGLU (`Expert`).

Each expert is its own module, `experts.{e}.W_gate / W_in` [d_model, d_expert] and
`experts.{e}.W_out` [d_expert, d_model] (our dense MLP's layout; TL's MoE keeps the
nn.Linear transposes, which interop writes). Hooks, TL's `MoE` names with TL's contents,
tokens flattened to rows (row = batch index * pos + position):
  hook_expert_weights  [batch * pos, n_experts]  the router's softmax (fp32), before top-k;
                       with `softmax_after_topk` (gpt-oss) the router's logits, what its
                       top-k picks from (the k picked are then softmaxed: -inf in a
                       column keeps every token away from that expert)
  hook_expert_indices  [batch * pos, top_k]      the chosen experts, best first
  experts.{e}.hook_gate / hook_pre / hook_post  [tokens routed to e, d_expert]: x W_gate,
                       x W_in (+ b_gate, b_in), silu(gate) * pre (gpt-oss: the clamped
                       SwiGLU's output) (TL's MoEGatedMLP names), the rows ordered
                       as TL's and HF's eager loop order them: by slot (the tokens that
                       chose e first), then by token
and ours, which TL does not have:
  hook_router_logits   [batch, pos, n_experts]  the router's scores before the softmax
  hook_topk_weights    [batch * pos, top_k]     the weights each chosen expert's output is
                       scaled by (renormalised when norm_topk_prob, in the compute dtype
                       unless weights_in_fp32)
  experts.{e}.hook_out [tokens routed to e, d_model]: the expert's output, unweighted
run_with_cache(remove_batch_dim=True) keeps the row-per-token hooks whole (TL takes their first
row). A hook that returns a tensor reroutes, as in TL: new `hook_expert_weights` are what top-k
picks from (zero a column to keep every token away from that expert), new
`hook_expert_indices` send each slot's token to another expert with the slot's weight, and
new `hook_topk_weights` rescale the chosen experts (zero: ablate).

Named options (config.MoEConfig), for the DeepSeek-V3 style router of GLM-4.5:
- `router_in_fp32` (GLM-4.5, ERNIE 4.5 MoE, Hunyuan MoE): `W_gate` and
  `e_score_correction_bias` stay fp32 when the model is cast (`fp32_params`, `_apply`), and
  the logits are F.linear of the input cast to fp32, as HF's routers that keep them in fp32.
- `router = "sigmoid"`: `hook_expert_weights` holds each expert's sigmoid score (fp32)
  instead of the softmax; the chosen experts' weights are gathered from it.
- `score_correction_bias`: `e_score_correction_bias` [n_experts] (fp32 in HF) is added to
  those scores to choose the experts only (the weights are the scores without it).
- `n_group` > 1: the experts split into n_group equal groups, each scored by the sum of
  its 2 best (bias-corrected) scores; experts are chosen only within the `topk_group` best
  groups. A `hook_expert_weights` column set to -inf (sigmoid) or 0 (softmax) keeps every
  token away from that expert.
- `routed_scaling_factor`: the chosen weights times this, after `norm_topk_prob`.
- `d_shared_expert` not None: `shared_expert` (an `Expert`, the same W_gate / W_in / W_out
  layout and hooks) runs on every token, rows = batch * pos as the router hooks, and its
  output is added to the routed experts' sum unweighted (width 0: HF's zero-size tensors,
  output 0).
- `score_scales_input` (Llama 4): each chosen expert runs on the token times its weight (in
  the compute dtype), its output then added unscaled (Llama4TextMoe); with the sigmoid
  router, top-k of the sigmoid scores picks what HF's top-k of the logits picks, unless two
  logits large enough for their sigmoids to round to the same fp32 value tie.

Gemma 4's (26B-A4B), `dense_mlp`: the module is called with ln2's output x and the residual
stream `resid` entering ln2. A dense gated MLP `dense` (our GatedMLP, its hooks) runs on x,
then `ln_dense_post`; the router reads `resid` and the experts `ln_experts(resid)`, their
weighted sum through `ln_experts_post`; the output is the sum of the two. With
`router_input_norm` the router's input is rms_norm(resid) * router_scale * d_model^-0.5
(HF's Gemma4TextRouter, in its order); with `per_expert_scale` the renormalised weights are
times `per_expert_scale[e]` of each chosen expert (what hook_topk_weights holds). The experts
use the family's activation (`act_fn`: Gemma's tanh GELU; SiLU elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from gqa_convert.config import ModelConfig
from gqa_convert.model.hooks import HookPoint
from gqa_convert.model.mlp import ACTIVATIONS
from gqa_convert.model.norm import model_norm, rms_normalize


def param_dtype(root: nn.Module, name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype `root`'s tensor `name` takes in a model cast to `dtype`: `dtype`, or fp32 (or
    wider) for a router tensor its MoE keeps in fp32 (`MoEMLP.fp32_params`), for loaders that
    cast tensor by tensor as `.to(dtype)` would."""
    owner, _, leaf = name.rpartition(".")
    if leaf in getattr(root.get_submodule(owner), "fp32_params", ()):
        return torch.promote_types(dtype, torch.float32)
    return dtype


class Expert(nn.Module):
    """One expert: W_out(act(x W_gate) * (x W_in)), act SiLU unless given (Gemma 4's tanh
    GELU); with `bias`, each projection adds its bias (b_gate, b_in, b_out; gpt-oss); with
    `clamp` (alpha, limit), gpt-oss's clamped SwiGLU: g = min(gate, limit), u = clamp(pre,
    -limit, limit), post = (u + 1) * g * sigmoid(alpha g), in transformers' order of
    operations."""

    def __init__(
        self,
        d_model: int,
        d_expert: int,
        bias: bool = False,
        clamp: tuple[float, float] | None = None,
        act: Callable[[Tensor], Tensor] = F.silu,
    ):
        super().__init__()
        self.W_gate = nn.Parameter(torch.empty(d_model, d_expert))
        self.W_in = nn.Parameter(torch.empty(d_model, d_expert))
        self.W_out = nn.Parameter(torch.empty(d_expert, d_model))
        if bias:
            self.b_gate = nn.Parameter(torch.zeros(d_expert))
            self.b_in = nn.Parameter(torch.zeros(d_expert))
            self.b_out = nn.Parameter(torch.zeros(d_model))
        self.bias, self.clamp, self.act = bias, clamp, act
        # rows: the tokens routed to this expert, of the whole batch
        self.hook_gate = HookPoint(has_batch_dim=False)
        self.hook_pre = HookPoint(has_batch_dim=False)
        self.hook_post = HookPoint(has_batch_dim=False)
        self.hook_out = HookPoint(has_batch_dim=False)

    def forward(self, x: Float[Tensor, "tokens d_model"]) -> Float[Tensor, "tokens d_model"]:
        gate, pre = x @ self.W_gate, x @ self.W_in
        if self.bias:  # added after the matmul, as transformers' experts forward adds it
            gate, pre = gate + self.b_gate, pre + self.b_in
        gate, pre = self.hook_gate(gate), self.hook_pre(pre)
        if self.clamp is None:
            post = self.act(gate) * pre
        else:
            alpha, limit = self.clamp
            gate, pre = gate.clamp(max=limit), pre.clamp(min=-limit, max=limit)
            post = (pre + 1) * (gate * torch.sigmoid(gate * alpha))
        out = self.hook_post(post) @ self.W_out
        return self.hook_out(out + self.b_out if self.bias else out)


class MoEMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dense: nn.Module | None = None):
        """`dense`: the layer's dense MLP, for `dense_mlp` (the decoder's GatedMLP)."""
        super().__init__()
        moe = cfg.moe
        self.moe = moe
        self.top_k, self.norm_topk_prob = moe.top_k, moe.norm_topk_prob
        self.weights_in_fp32 = moe.weights_in_fp32
        self.softmax_after_topk = moe.softmax_after_topk
        self.W_gate = nn.Parameter(torch.empty(cfg.d_model, moe.n_experts))
        if moe.score_correction_bias:
            self.e_score_correction_bias = nn.Parameter(torch.empty(moe.n_experts))
        # HF's `_keep_in_fp32_modules_strict` (GLM-4.5, ERNIE 4.5 MoE) or fp32 nn.Linear
        # (Hunyuan MoE): the router's tensors stay fp32 when the model is cast (`_apply`)
        self.fp32_params: tuple[str, ...] = ()
        if moe.router_in_fp32:
            self.fp32_params = ("W_gate", "e_score_correction_bias")[
                : 1 + moe.score_correction_bias
            ]
        # gpt-oss: the router's bias [n_experts]
        self.b_gate = nn.Parameter(torch.zeros(moe.n_experts)) if moe.router_bias else None
        clamp = (moe.swiglu_alpha, moe.swiglu_limit) if moe.clamped_swiglu else None
        act = ACTIVATIONS[cfg.act_fn]
        self.experts = nn.ModuleList(
            Expert(cfg.d_model, moe.d_expert, moe.expert_bias, clamp, act)
            for _ in range(moe.n_experts)
        )
        if moe.d_shared_expert is not None:  # rows of its hooks: batch * pos tokens
            self.shared_expert = Expert(cfg.d_model, moe.d_shared_expert, act=act)
        if moe.router_input_norm:  # Gemma 4: [d_model]
            self.router_scale = nn.Parameter(torch.ones(cfg.d_model))
            self.eps, self.router_input_scale = cfg.eps, cfg.d_model**-0.5
        if moe.per_expert_scale:  # Gemma 4: [n_experts]
            self.per_expert_scale = nn.Parameter(torch.ones(moe.n_experts))
        if moe.dense_mlp:  # Gemma 4: the dense MLP beside the experts, and three norms
            self.dense = dense
            self.ln_dense_post, self.ln_experts, self.ln_experts_post = (
                model_norm(cfg),
                model_norm(cfg),
                model_norm(cfg),
            )
        self.hook_router_logits = HookPoint()
        # rows: batch * pos tokens (TL's)
        self.hook_expert_weights = HookPoint(has_batch_dim=False)
        self.hook_expert_indices = HookPoint(has_batch_dim=False)
        self.hook_topk_weights = HookPoint(has_batch_dim=False)

    def _apply(self, fn, recurse=True):
        """`nn.Module._apply` (`.to`, `.half`, ...), the `fp32_params` kept at fp32 or wider:
        moved as `fn` moves them, not narrowed (a cast to bf16 and back would lose the
        router's low bits, which HF's keeps)."""
        kept = {name: getattr(self, name).data for name in self.fp32_params}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            param = getattr(self, name)
            if param.dtype != old.dtype:
                wide = torch.promote_types(param.dtype, torch.float32)
                param.data = old.to(device=param.device, dtype=wide)
        return self

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        resid: Float[Tensor, "batch pos d_model"] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """`x`: ln2's output; `resid` (`dense_mlp` only): the residual stream entering ln2."""
        # HF's F.linear on the [n_experts, d_model] weight (a copy of E x d_model, small):
        # on the same input the logits are HF's bit for bit, so ties break as HF's do.
        moe = self.moe
        if moe.dense_mlp:  # Gemma 4: the dense MLP on x; router and experts on resid
            dense_out = self.ln_dense_post(self.dense(x))
            x = resid
        w = self.W_gate.T.contiguous()  # [n_experts, d_model]
        if moe.router_in_fp32:  # F.linear of the fp32 input and fp32 weight
            x_router, w = x.float(), w.float()
        elif moe.router_input_norm:  # Gemma 4: HF's order, (norm * scale) * d_model^-0.5
            x_router = rms_normalize(x, self.eps) * self.router_scale * self.router_input_scale
        else:
            x_router = x
        logits = self.hook_router_logits(F.linear(x_router, w, self.b_gate))
        if self.softmax_after_topk:  # gpt-oss: top-k of the logits, softmax over those k
            picks = self.hook_expert_weights(logits.flatten(0, 1))  # [batch * pos, n_experts]
            top, indices = picks.topk(self.top_k, dim=-1)
            weights = top.softmax(-1, dtype=top.dtype)  # in the logits' dtype, as HF's
        else:
            scores = logits.float().flatten(0, 1)  # [batch * pos, n_experts]
            scores = scores.sigmoid() if moe.router == "sigmoid" else scores.softmax(-1)
            scores = self.hook_expert_weights(scores)
            indices = self.choose(scores)  # [batch * pos, top_k]
            weights = scores.gather(-1, indices)  # fp32: the scores, without the correction bias
        if self.norm_topk_prob:
            # GLM-4.5's `+ 1e-20` is below an fp32 ulp of any sum of k sigmoid scores > 1e-12
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights * moe.routed_scaling_factor
        if moe.per_expert_scale:  # Gemma 4: each chosen expert's scale
            weights = weights * self.per_expert_scale[indices]
        if not self.weights_in_fp32:
            weights = weights.to(x.dtype)
        indices = self.hook_expert_indices(indices)
        weights = self.hook_topk_weights(weights)
        if moe.dense_mlp:  # Gemma 4: the experts' own input norm
            x = self.ln_experts(x)
        flat = x.reshape(-1, x.shape[-1])
        # Each token's top_k weighted outputs, summed at the end in the product's dtype (fp32
        # for Mixtral's fp32 weights), then cast: transformers' default experts forward
        # (grouped_mm), whose bf16 rounding an index_add_ per expert would not reproduce.
        dtype = torch.result_type(flat, weights)
        out = flat.new_zeros((*indices.shape, flat.shape[-1]), dtype=dtype)  # [tokens, k, m]
        for e in indices.unique().tolist():
            slot, token = torch.where(
                indices.transpose(0, 1) == e
            )  # TL's and HF's order: slot, then token
            w = weights[token, slot, None]
            if moe.score_scales_input:  # Llama 4: the expert runs on x * w
                out[token, slot] = self.experts[e](flat[token] * w)
            else:
                out[token, slot] = self.experts[e](flat[token]) * w
        out = out.sum(1).to(x.dtype)  # [batch * pos, d_model]
        if moe.d_shared_expert is not None:  # HF: routed + shared, in the compute dtype
            out = out + self.shared_expert(flat)
        if moe.dense_mlp:  # Gemma 4: the two branches, each through its norm, added
            return dense_out + self.ln_experts_post(out.view(x.shape))
        return out.view(x.shape)

    def choose(self, scores: Float[Tensor, "tokens n_experts"]) -> Tensor:
        """The top_k experts of each token [tokens, top_k], best first: by `scores` plus the
        correction bias, within the `topk_group` best of `n_group` groups (each group scored
        by the sum of its 2 best), as DeepSeek-V3's and GLM-4.5's routers choose."""
        moe = self.moe
        if moe.score_correction_bias:
            scores = scores + self.e_score_correction_bias.float()
        if moe.n_group > 1:
            groups = scores.view(scores.shape[0], moe.n_group, -1)  # [tokens, group, expert]
            group_scores = groups.topk(2, dim=-1).values.sum(-1)  # [tokens, n_group]
            best = group_scores.topk(moe.topk_group, dim=-1).indices  # [tokens, topk_group]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            scores = groups.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        return scores.topk(self.top_k, dim=-1).indices
