"""RMSNorm, LayerNorm, and the q / k norms some families put around rotary.

Every norm carries TransformerLens's two hook points (TL's `RMSNorm` / `LayerNorm`):
`hook_scale` [..., 1], the divisor sqrt(mean(x^2) + eps) in fp32, and `hook_normalized`
[..., d], x / scale in fp32, before the weight. `normalize` is the one place that computes
them: a new norm module (a LayerNorm, a norm of another family) calls it with its own
variance, so it gets the same hook points with the same semantics.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from gqa_convert.model.attention_config import AttentionConfig
from gqa_convert.model.hooks import HookPoint, through


def normalize(
    x32: Float[Tensor, "... d"],
    var_eps: Float[Tensor, "... 1"],
    hook_scale: HookPoint,
    hook_normalized: HookPoint,
    rows: bool = False,
) -> Float[Tensor, "... d"]:
    """x32 / sqrt(var_eps), through TL's hook points: `hook_scale` sees sqrt(var_eps) and
    `hook_normalized` the result (`rows`: both seen as [-1, last dim], TL's view of the q/k
    norms over d_head). Computed as HF does, x32 * rsqrt(var_eps), bit for bit, unless a
    hook changes the scale (then x32 / the hook's scale, TL's formula); gradients reach
    `hook_scale` as in TL's graph (`InverseOf`)."""
    if not hook_scale.has_hooks:
        out = x32 * torch.rsqrt(var_eps)
    else:
        scale, changed = through(hook_scale, var_eps.sqrt(), rows)
        if changed:
            out = x32 / scale
        elif scale.requires_grad:
            out = x32 * InverseOf.apply(scale, var_eps)
        else:
            out = x32 * torch.rsqrt(var_eps)
    if not hook_normalized.has_hooks:
        return out
    return through(hook_normalized, out, rows)[0]


class InverseOf(torch.autograd.Function):
    """1 / scale with its value computed as rsqrt(var_eps) (HF's, bit for bit) and its
    gradient flowing back through `scale` only (d(1/s)/ds = -1/s^2), as through TL's
    x / scale."""

    @staticmethod
    def forward(ctx: Any, scale: Tensor, var_eps: Tensor) -> Tensor:
        inv = torch.rsqrt(var_eps)
        ctx.save_for_backward(inv)
        return inv

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (inv,) = ctx.saved_tensors
        return -grad * inv * inv, None


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
        self.hook_scale = HookPoint()  # [..., 1]: sqrt(mean(x^2) + eps), fp32
        self.hook_normalized = HookPoint()  # [..., d]: x / scale, fp32, before the weight

    def forward(self, x: Float[Tensor, "... d"], rows: bool = False) -> Float[Tensor, "... d"]:
        """`rows`: the hook points see [-1, d] (see `normalize`)."""
        x32 = self.normalized(x, rows)
        if self.offset:
            return (x32 * (self.offset + self.w.float())).to(x.dtype)
        if self.weight_in_fp32:
            return (self.w * x32).to(x.dtype)
        return self.w * x32.to(x.dtype)

    def normalized(self, x: Float[Tensor, "... d"], rows: bool = False) -> Float[Tensor, "... d"]:
        """x / sqrt(mean(x^2) + eps) in fp32, through the hook points."""
        x32 = x.float()
        var_eps = x32.pow(2).mean(-1, keepdim=True) + self.eps
        return normalize(x32, var_eps, self.hook_scale, self.hook_normalized, rows)


class WeightlessRMSNorm(RMSNorm):
    """An RMSNorm with no weight (Llama 4's q / k norm): normalise in fp32, cast back, as
    HF's Llama4TextL2Norm; the hook points are RMSNorm's."""

    def __init__(self, d: int, eps: float):
        nn.Module.__init__(self)
        self.d, self.eps = d, eps
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "... d"], rows: bool = False) -> Float[Tensor, "... d"]:
        return self.normalized(x, rows).to(x.dtype)


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

    def forward(self, x: Float[Tensor, "... d"], rows: bool = False) -> Float[Tensor, "... d"]:
        """`rows`: the hook points see [-1, d] (see `normalize`)."""
        hooked = self.hook_scale.has_hooks or self.hook_normalized.has_hooks
        if not (self.weight_in_fp32 or hooked):
            return F.layer_norm(x, self.w.shape, self.w, self.b, self.eps)
        x32 = x.float()
        centred = x32 - x32.mean(-1, keepdim=True)
        var_eps = centred.pow(2).mean(-1, keepdim=True) + self.eps
        # HF's (x - mean) * rsqrt(var + eps), through TL's hook points
        normalized = normalize(centred, var_eps, self.hook_scale, self.hook_normalized, rows)
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


def model_norm(cfg: Any) -> RMSNorm | LayerNorm:
    """A norm of d_model with the family's numerics (a ModelConfig's norm fields): RMSNorm
    (OLMo2's fp32 weight, Gemma's offset) or LayerNorm (Cohere's in fp32, StarCoder2's with a
    bias)."""
    return make_norm(
        cfg.d_model,
        cfg.eps,
        cfg.norm_type,
        cfg.norm_weight_in_fp32,
        cfg.norm_offset,
        cfg.norm_bias,
    )


def qk_norm(cfg: AttentionConfig, heads: int) -> RMSNorm | LayerNorm | None:
    """The q (or k) norm: over d_head, shared by the heads ("head", Qwen3, TL's
    `use_qk_norm`; "weightless": no weight, Llama 4's), over d_head with weights per head
    ("heads", Cohere's [heads, d_head]), or over all heads' projection together ("proj",
    OLMo2, [heads * d_head] weights); of the model's norm type (Cohere's are LayerNorms);
    None: no norm."""
    if cfg.qk_norm is None:
        return None
    if cfg.qk_norm == "weightless":
        return WeightlessRMSNorm(cfg.d_head, cfg.eps)
    size = {"head": cfg.d_head, "heads": (heads, cfg.d_head)}.get(cfg.qk_norm, heads * cfg.d_head)
    norm = make_norm(size, cfg.eps, cfg.norm_type, cfg.norm_weight_in_fp32, cfg.norm_offset)
    return norm if cfg.dtype is None else norm.to(cfg.dtype)


def rms_normalize(x: Float[Tensor, "... d"], eps: float) -> Float[Tensor, "... d"]:
    """A weightless RMSNorm (Gemma 4's of v): x / sqrt(mean(x^2) + eps) in fp32, cast back."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def apply_qk_norm(
    norm: RMSNorm | LayerNorm | None, x: Float[Tensor, "batch pos head d_head"]
) -> Float[Tensor, "batch pos head d_head"]:
    """`norm` over each head ([..., d_head] weights, or [heads, d_head]; its hook points see
    [batch * pos * head, d_head], as TL's) or over the flattened heads ([batch, pos, head *
    d_head])."""
    if norm is None:
        return x
    width = norm.d if isinstance(norm, WeightlessRMSNorm) else norm.w.shape[-1]
    if width == x.shape[-1]:
        return norm(x, rows=True)
    return norm(x.flatten(2)).view(x.shape)  # [b, p, n * h] -> [b, p, n, h]
