"""Rotary embeddings: the inverse frequencies of every rope type, computed as transformers'
`ROPE_INIT_FUNCTIONS` compute them (fp32, the same operations in the same order), and
HF's rotate-half rotation, on the first `rotary_dim` dims of each head.

    type      inv_freq                                          depends on the length
    default   1 / theta^(2i/dim)                                no
    linear    default / factor                                  no
    dynamic   default at theta * (factor*L/n_ctx - factor + 1)^(dim/(dim-2)), L > n_ctx
                                                                yes: past n_ctx
    yarn      default and default/factor blended by a ramp (beta_fast, beta_slow)
                                                                no
    longrope  1 / (ext * theta^(2i/dim)), ext = short_factor,
              or long_factor past original_max_position_embeddings
                                                                yes: past the original
    llama3    NTK-by-parts smoothing of default                 no

yarn and longrope also multiply cos and sin by `attention_factor`.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from gqa_convert.config import RopeConfig


def length_dependent(rope: RopeConfig) -> bool:
    """True when the frequencies depend on the sequence length (dynamic, longrope)."""
    return rope.type in ("dynamic", "longrope")


def rotary_inv_freq(
    rope: RopeConfig, dim: int, n_pos: int | None = None, n_ctx: int | None = None
) -> Float[Tensor, " half_dim"]:
    """Inverse frequencies for `dim` rotary dims, in fp32; `n_pos` is the sequence length
    (None: short, as HF's model at init), `n_ctx` the dynamic threshold."""
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    base = rope.theta
    if rope.type == "dynamic":
        # HF's init uses seq_len = n_ctx in Python floats; past n_ctx its forward recomputes
        # from a tensor seq_len (torch.max(position_ids) + 1), so in fp32.
        seq_len: float | Tensor = n_ctx
        if n_pos is not None and n_pos > n_ctx:
            seq_len = torch.tensor(n_pos)
        base = base * ((rope.factor * seq_len / n_ctx) - (rope.factor - 1)) ** (dim / (dim - 2))
    if rope.type == "longrope":
        long = n_pos is not None and n_pos > rope.original_max_position_embeddings
        ext = torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32)
        return 1.0 / (ext * base**exponent)
    if rope.type == "yarn":
        return _yarn(rope, dim)
    inv_freq = 1.0 / (base**exponent)
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type == "llama3":
        return _llama3(rope, inv_freq)
    return inv_freq


def _yarn(rope: RopeConfig, dim: int) -> Tensor:
    base, factor, old_len = rope.theta, rope.factor, rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF: prevent a division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # share of the unscaled frequency
    return interpolation * (1 - keep) + extrapolation * keep


def _llama3(rope: RopeConfig, inv_freq: Tensor) -> Tensor:
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_len = rope.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def cos_sin(
    inv_freq: Float[Tensor, " half_dim"], n_pos: int, attention_factor: float, dtype: torch.dtype
) -> tuple[Float[Tensor, "pos dim"], Float[Tensor, "pos dim"]]:
    """cos, sin [n_pos, rotary_dim] in HF's convention (frequencies repeated twice), times
    the attention factor, computed in fp32 and cast to `dtype`."""
    pos = torch.arange(n_pos, device=inv_freq.device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq.float())  # [pos, dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_factor).to(dtype), (emb.sin() * attention_factor).to(dtype)


def apply_rotary(
    x: Float[Tensor, "batch pos head d_head"],
    cos: Float[Tensor, "pos rotary_dim"] | None,
    sin: Float[Tensor, "pos rotary_dim"] | None,
) -> Float[Tensor, "batch pos head d_head"]:
    """HF's rotate-half convention: pairs (i, i + rotary_dim/2) rotate together, on the first
    rotary_dim dims of each head (all of them unless partial); None: no rotary (NoPE)."""
    if cos is None:
        return x
    dim = cos.shape[-1]
    x_rot, x_pass = x[..., :dim], x[..., dim:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = (x_rot * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)  # fp32 cos: OLMo2
    return out if x_pass.shape[-1] == 0 else torch.cat((out, x_pass), dim=-1)
