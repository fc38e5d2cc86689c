"""RMSNorm, and the q / k norms some families put between the projections and rotary."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """HF's RMSNorm: normalise in fp32, cast back, then scale by `w`."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.w * x32.to(x.dtype)


def qk_norm(kind: str | None, heads: int, d_head: int, eps: float) -> RMSNorm | None:
    """The q (or k) norm: over d_head, shared by the heads ("head", Qwen3), or over all
    heads' projection together ("proj", OLMo2, [heads * d_head] weights); None: no norm."""
    if kind is None:
        return None
    return RMSNorm(d_head if kind == "head" else heads * d_head, eps)


def apply_qk_norm(
    norm: RMSNorm | None, x: Float[Tensor, "batch pos head d_head"]
) -> Float[Tensor, "batch pos head d_head"]:
    """`norm` over each head ([..., d_head] weights) or over the flattened heads."""
    if norm is None:
        return x
    if norm.w.shape[-1] == x.shape[-1]:
        return norm(x)
    return norm(x.flatten(2)).view(x.shape)  # [b, p, n * h] -> [b, p, n, h]
