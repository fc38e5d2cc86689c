"""RMSNorm, LayerNorm, and the q / k norms some families put around rotary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from gqa_convert.model.attention_config import AttentionConfig
from gqa_convert.model.hooks import HookPoint


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


class LayerNorm(nn.Module):
    """LayerNorm over the last axis: (x - mean) / sqrt(var + eps), times `w` (any shape
    broadcasting over the input's trailing axes: Cohere's per-head q / k norms are
    [heads, d_head]), plus `b` with `bias` (StarCoder2).

    `weight_in_fp32` (CohereLayerNorm): centred, normalised by rsqrt and scaled by w in fp32,
    then cast back. Otherwise torch's `layer_norm` in the input's dtype (nn.LayerNorm,
    StarCoder2's); while a hook is on `hook_scale` or `hook_normalized`, step by step in
    fp32 as TransformerLens's LayerNorm (the same numbers in fp32).

    Hooks (TransformerLens's LayerNorm names): `hook_scale` sqrt(var + eps) [..., 1] (a
    tensor returned replaces it), `hook_normalized` the centred input over that scale,
    before w and b [..., d] (fp32)."""

    def __init__(
        self,
        shape: int | tuple[int, ...],
        eps: float,
        weight_in_fp32: bool = False,
        bias: bool = False,
    ):
        super().__init__()
        self.w = nn.Parameter(torch.ones(shape))
        self.b = nn.Parameter(torch.zeros(shape)) if bias else None
        self.eps = eps
        self.weight_in_fp32 = weight_in_fp32
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        hooked = self.hook_scale.has_hooks or self.hook_normalized.has_hooks
        if not (self.weight_in_fp32 or hooked):
            return F.layer_norm(x, self.w.shape, self.w, self.b, self.eps)
        x32 = x.float()
        centred = x32 - x32.mean(-1, keepdim=True)
        var_eps = centred.pow(2).mean(-1, keepdim=True) + self.eps
        inv = torch.rsqrt(var_eps)  # HF's: (x - mean) * rsqrt(var + eps)
        if self.hook_scale.has_hooks:
            scale = var_eps.sqrt()
            replaced = self.hook_scale(scale)
            if replaced is not scale:
                inv = 1 / replaced
        normalized = self.hook_normalized(centred * inv)
        out = self.w.float() * normalized
        if self.b is not None:
            out = out + self.b.float()
        return out.to(x.dtype)


def make_norm(
    size: int | tuple[int, ...],
    eps: float,
    norm_type: str = "rms",
    weight_in_fp32: bool = False,
    offset: float = 0.0,
    bias: bool = False,
) -> RMSNorm | LayerNorm:
    """An RMSNorm (`offset`: Gemma's 1 + w) or a LayerNorm (`bias`: StarCoder2's)."""
    if norm_type == "layer":
        return LayerNorm(size, eps, weight_in_fp32, bias)
    return RMSNorm(size, eps, weight_in_fp32, offset)


def qk_norm(cfg: AttentionConfig, heads: int) -> RMSNorm | LayerNorm | None:
    """The q (or k) norm: over d_head, shared by the heads ("head", Qwen3, TL's
    `use_qk_norm`), over d_head with weights per head ("heads", Cohere's [heads, d_head]),
    or over all heads' projection together ("proj", OLMo2, [heads * d_head] weights); of
    the model's norm type (Cohere's are LayerNorms); None: no norm."""
    if cfg.qk_norm is None:
        return None
    size = {"head": cfg.d_head, "heads": (heads, cfg.d_head)}.get(cfg.qk_norm, heads * cfg.d_head)
    norm = make_norm(size, cfg.eps, cfg.norm_type, cfg.norm_weight_in_fp32, cfg.norm_offset)
    return norm if cfg.dtype is None else norm.to(cfg.dtype)


def apply_qk_norm(
    norm: RMSNorm | LayerNorm | None, x: Float[Tensor, "batch pos head d_head"]
) -> Float[Tensor, "batch pos head d_head"]:
    """`norm` over each head ([..., d_head] weights, or [heads, d_head]) or over the
    flattened heads."""
    if norm is None:
        return x
    if norm.w.shape[-1] == x.shape[-1]:
        return norm(x)
    return norm(x.flatten(2)).view(x.shape)  # [b, p, n * h] -> [b, p, n, h]
