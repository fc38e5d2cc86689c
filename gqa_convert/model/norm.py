"""RMSNorm, and the q / k norms some families put between the projections and rotary."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from gqa_convert.model.attention_config import AttentionConfig


class RMSNorm(nn.Module):
    """HF's RMSNorm: normalise in fp32, cast back, then scale by `w`; with `weight_in_fp32`
    (OLMo2's), scale in fp32, then cast back. The same in fp32.

    `offset` (Gemma's 1.0): scale by (offset + w) computed in fp32, then cast back, as
    GemmaRMSNorm; `w` stays the checkpoint's own (TransformerLens stores 1 + w instead)."""

    def __init__(self, d_model: int, eps: float, weight_in_fp32: bool = False, offset: float = 0.0):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d_model))
        self.eps = eps
        self.weight_in_fp32 = weight_in_fp32
        self.offset = offset

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x32 * (self.offset + self.w.float())).to(x.dtype)
        if self.weight_in_fp32:
            return (self.w * x32).to(x.dtype)
        return self.w * x32.to(x.dtype)


def qk_norm(cfg: AttentionConfig, heads: int) -> RMSNorm | None:
    """The q (or k) norm: over d_head, shared by the heads ("head", Qwen3, TL's
    `use_qk_norm`), or over all heads' projection together ("proj", OLMo2, [heads * d_head]
    weights); None: no norm."""
    if cfg.qk_norm is None:
        return None
    size = cfg.d_head if cfg.qk_norm == "head" else heads * cfg.d_head
    norm = RMSNorm(size, cfg.eps, cfg.norm_weight_in_fp32, cfg.norm_offset)
    return norm if cfg.dtype is None else norm.to(cfg.dtype)


def apply_qk_norm(
    norm: RMSNorm | None, x: Float[Tensor, "batch pos head d_head"]
) -> Float[Tensor, "batch pos head d_head"]:
    """`norm` over each head ([..., d_head] weights) or over the flattened heads."""
    if norm is None:
        return x
    if norm.w.shape[-1] == x.shape[-1]:
        return norm(x)
    return norm(x.flatten(2)).view(x.shape)  # [b, p, n * h] -> [b, p, n, h]
