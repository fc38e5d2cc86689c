"""The mixture-of-experts MLP (Mixtral, Qwen3-MoE, OLMoE), in TransformerLens 3.9's names.

A router `W_gate` [d_model, n_experts] scores each token (as HF's `F.linear`, so the logits
are HF's bit for bit on the same input); the `top_k` experts of highest softmax probability
(softmax in fp32, ties as `torch.topk` breaks them, as in HF's routers) each
run a gated SiLU MLP on the token, and their outputs are summed weighted by those
probabilities, divided by their sum when `norm_topk_prob` (Mixtral always). Mixtral scales
the expert outputs by the fp32 weights; Qwen3-MoE and OLMoE cast the weights to the compute
dtype first (`weights_in_fp32`). A token's k weighted outputs are summed in that product's
dtype, then cast, as transformers' default experts forward does (in bf16 the logits are
HF's bit for bit). Only the tokens routed to an expert pass through it.

Each expert is its own module, `experts.{e}.W_gate / W_in` [d_model, d_expert] and
`experts.{e}.W_out` [d_expert, d_model] (our dense MLP's layout; TL's MoE keeps the
nn.Linear transposes, which interop writes). Hooks, TL's `MoE` names with TL's contents,
tokens flattened to rows (row = batch index * pos + position):
  hook_expert_weights  [batch * pos, n_experts]  the router's softmax (fp32), before top-k
  hook_expert_indices  [batch * pos, top_k]      the chosen experts, best first
  experts.{e}.hook_gate / hook_pre / hook_post  [tokens routed to e, d_expert]: x W_gate,
                       x W_in, silu(gate) * pre (TL's MoEGatedMLP names), the rows ordered
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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from gqa_convert.config import ModelConfig
from gqa_convert.model.hooks import HookPoint


class Expert(nn.Module):
    """One expert: W_out(silu(x W_gate) * (x W_in))."""

    def __init__(self, d_model: int, d_expert: int):
        super().__init__()
        self.W_gate = nn.Parameter(torch.empty(d_model, d_expert))
        self.W_in = nn.Parameter(torch.empty(d_model, d_expert))
        self.W_out = nn.Parameter(torch.empty(d_expert, d_model))
        # rows: the tokens routed to this expert, of the whole batch
        self.hook_gate = HookPoint(has_batch_dim=False)
        self.hook_pre = HookPoint(has_batch_dim=False)
        self.hook_post = HookPoint(has_batch_dim=False)
        self.hook_out = HookPoint(has_batch_dim=False)

    def forward(self, x: Float[Tensor, "tokens d_model"]) -> Float[Tensor, "tokens d_model"]:
        gate, pre = self.hook_gate(x @ self.W_gate), self.hook_pre(x @ self.W_in)
        return self.hook_out(self.hook_post(F.silu(gate) * pre) @ self.W_out)


class MoEMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = cfg.moe
        self.top_k, self.norm_topk_prob = moe.top_k, moe.norm_topk_prob
        self.weights_in_fp32 = moe.weights_in_fp32
        self.W_gate = nn.Parameter(torch.empty(cfg.d_model, moe.n_experts))
        self.experts = nn.ModuleList(
            Expert(cfg.d_model, moe.d_expert) for _ in range(moe.n_experts)
        )
        self.hook_router_logits = HookPoint()
        # rows: batch * pos tokens (TL's)
        self.hook_expert_weights = HookPoint(has_batch_dim=False)
        self.hook_expert_indices = HookPoint(has_batch_dim=False)
        self.hook_topk_weights = HookPoint(has_batch_dim=False)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        # HF's F.linear on the [n_experts, d_model] weight (a copy of E x d_model, small):
        # on the same input the logits are HF's bit for bit, so ties break as HF's do.
        logits = self.hook_router_logits(F.linear(x, self.W_gate.T.contiguous()))
        probs = logits.float().softmax(-1).flatten(0, 1)  # [batch * pos, n_experts]
        probs = self.hook_expert_weights(probs)
        weights, indices = probs.topk(self.top_k, dim=-1)  # [batch * pos, top_k], fp32
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        if not self.weights_in_fp32:
            weights = weights.to(x.dtype)
        indices = self.hook_expert_indices(indices)
        weights = self.hook_topk_weights(weights)
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
            out[token, slot] = self.experts[e](flat[token]) * weights[token, slot, None]
        return out.sum(1).to(x.dtype).view(x.shape)
