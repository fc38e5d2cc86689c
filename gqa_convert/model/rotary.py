"""Rotary position embedding: HF's inverse frequencies, cos/sin tables, the rotation itself.

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


def rotary_inv_freq(rope: RopeConfig, rotary_dim: int) -> Float[Tensor, " half_rotary_dim"]:
    """Inverse frequencies computed as HF does, in fp32 (llama3 smoothing included)."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    if rope.type == "default":
        return inv_freq
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
) -> tuple[Tensor, Tensor]:
    """cos, sin [*positions.shape, rotary_dim], angles in fp32 then cast to `dtype`.

    `positions` is [pos] (one table for the batch) or [batch, pos] (per-row positions, for
    left-padded batches).
    """
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device, torch.float32)
    if adjacent_pairs:
        emb = freqs.repeat_interleave(2, dim=-1)  # f0 f0 f1 f1 ...
    else:
        emb = torch.cat((freqs, freqs), dim=-1)  # f0 f1 ... f0 f1 ...
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(
    x: Float[Tensor, "batch pos head d_head"],
    cos: Float[Tensor, "pos rotary_dim"] | Float[Tensor, "batch pos rotary_dim"],
    sin: Float[Tensor, "pos rotary_dim"] | Float[Tensor, "batch pos rotary_dim"],
    adjacent_pairs: bool = False,
) -> Float[Tensor, "batch pos head d_head"]:
    """Rotate the first `cos.shape[-1]` features of every head; the rest pass through."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    if adjacent_pairs:  # [x0, x1] -> [-x1, x0] for each adjacent pair
        pairs = x_rot.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    else:  # rotate-half: [x1, x2] -> [-x2, x1]
        x1, x2 = x_rot.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    out = x_rot * cos + rotated * sin
    return out if x_pass.shape[-1] == 0 else torch.cat((out, x_pass), dim=-1)
