"""Rotary position embedding: the inverse frequencies of every rope type, computed as
transformers' `ROPE_INIT_FUNCTIONS` compute them (fp32, the same operations in the same
order), the cos / sin tables, and the rotation itself.

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
    ntk_alpha default at theta * alpha^(dim/(dim-2)) (Hunyuan)  no
    proportional  the first partial * dim/2 of default, then 0s, / factor (Gemma 4)
                                                                no

yarn and longrope also multiply cos and sin by `attention_factor`.

Two pairings, as TransformerLens's `rotary_adjacent_pairs`:

    rotate-half (HF Llama, GPT-NeoX; default)   pairs (i, i + r/2):  cos table [f0..f_{r/2-1}, f0..]
    adjacent pairs (GPT-J)                      pairs (2i, 2i + 1):  cos table [f0, f0, f1, f1, ..]

Only the first `rotary_dim` (r) features of each head rotate; the rest pass through.
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
        if n_ctx is None:
            raise ValueError("dynamic rope needs n_ctx (its original context length)")
        # HF's init uses seq_len = n_ctx in Python floats; past n_ctx its forward recomputes
        # from a tensor seq_len (torch.max(position_ids) + 1), so in fp32.
        seq_len: float | Tensor = n_ctx
        if n_pos is not None and n_pos > n_ctx:
            seq_len = torch.tensor(n_pos)
        base = base * ((rope.factor * seq_len / n_ctx) - (rope.factor - 1)) ** (dim / (dim - 2))
    if rope.type == "ntk_alpha":  # HunYuanDenseV1RotaryEmbedding, in Python floats as there
        base = base * rope.alpha ** (dim / (dim - 2))
    if rope.type == "longrope":
        long = n_pos is not None and n_pos > rope.original_max_position_embeddings
        ext = torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32)
        return 1.0 / (ext * base**exponent)
    if rope.type == "yarn":
        return _yarn(rope, dim)
    if rope.type == "proportional":  # the whole head rotates, its last angles at 0
        angles = int(rope.partial_rotary_factor * dim // 2)
        rotated = 1.0 / (base ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / dim))
        return torch.cat((rotated, torch.zeros(dim // 2 - angles))) / rope.factor
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


def rotary_table(
    inv_freq: Float[Tensor, " half_rotary_dim"],
    positions: Tensor,
    dtype: torch.dtype,
    adjacent_pairs: bool = False,
    attention_factor: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """cos, sin [*positions.shape, rotary_dim], times `attention_factor` (yarn, longrope),
    angles in fp32 then cast to `dtype`.

    `positions` is [pos] (one table for the batch) or [batch, pos] (per-row positions, for
    left-padded batches).
    """
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device, torch.float32)
    if adjacent_pairs:
        emb = freqs.repeat_interleave(2, dim=-1)  # f0 f0 f1 f1 ...
    else:
        emb = torch.cat((freqs, freqs), dim=-1)  # f0 f1 ... f0 f1 ...
    cos, sin = emb.cos(), emb.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype), sin.to(dtype)


def apply_rotary(
    x: Float[Tensor, "batch pos head d_head"],
    cos: Float[Tensor, "pos rotary_dim"] | Float[Tensor, "batch pos rotary_dim"] | None,
    sin: Float[Tensor, "pos rotary_dim"] | Float[Tensor, "batch pos rotary_dim"] | None,
    adjacent_pairs: bool = False,
) -> Float[Tensor, "batch pos head d_head"]:
    """Rotate the first `cos.shape[-1]` features of every head; the rest pass through.
    `cos` None: no rotary (NoPE layers). fp32 cos / sin rotate in fp32 (OLMo2), then the
    result is cast back to x's dtype."""
    if cos is None:
        return x
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    if adjacent_pairs:  # [x0, x1] -> [-x1, x0] for each adjacent pair
        pairs = x_rot.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    else:  # rotate-half: [x1, x2] -> [-x2, x1]
        x1, x2 = x_rot.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    out = (x_rot * cos + rotated * sin).to(x.dtype)
    return out if x_pass.shape[-1] == 0 else torch.cat((out, x_pass), dim=-1)
