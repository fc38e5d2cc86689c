"""Grouped-query attention with the TransformerLens `GroupedQueryAttention` API.

    MHA  n_kv = n_heads      q0 q1 q2 q3      each query head has its own K/V head
                             k0 k1 k2 k3
    GQA  1 < n_kv < n_heads  q0 q1 q2 q3      group = n_heads // n_kv query heads share
                             k0 k0 k1 k1      one K/V head: head h reads KV head h // group
    MQA  n_kv = 1            q0 q1 q2 q3      every query head reads the single K/V head
                             k0 k0 k0 k0

K/V weights are stored unexpanded (`_W_K`, `_W_V`: [n_kv, d_model, d_head]); `W_K` / `W_V`
expand with `repeat_interleave` (the grouping of HF's `repeat_kv`). In the forward pass K/V
stay at n_kv heads and are expanded only inside `calculate_attention_scores` /
`calculate_z_scores`, or never, on the SDPA fast path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from gqa_convert.config import ModelConfig
from gqa_convert.model.hooks import HookPoint
from gqa_convert.model.norm import apply_qk_norm, qk_norm
from gqa_convert.model.rotary import apply_rotary

__all__ = ["GroupedQueryAttention", "apply_rotary", "attention_mask"]


def attention_mask(
    q_len: int, k_len: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """Bool [q_len, k_len], True where query i may attend key j (causal, optional window)."""
    i = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window  # HF: keep keys with q_idx - kv_idx < sliding_window
    return allowed


class GroupedQueryAttention(nn.Module):
    """Attention whose query heads share K/V heads in groups (see the module docstring).

    `attn_type="local"` masks keys `cfg.sliding_window` or more positions back. With
    `layer_id` set and `cfg.scale_attn_by_inverse_layer_idx`, scores are divided by
    `layer_id + 1` (TransformerLens's documented option; off for every HF family here).
    """

    def __init__(self, cfg: ModelConfig, attn_type: str = "global", layer_id: int | None = None):
        super().__init__()
        if attn_type not in ("global", "local"):
            raise ValueError(f"attn_type must be 'global' or 'local', got {attn_type!r}")
        if attn_type == "local" and not cfg.sliding_window:
            raise ValueError("attn_type='local' needs cfg.sliding_window")
        self.cfg, self.attn_type, self.layer_id = cfg, attn_type, layer_id
        n, k, m, h = cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_head
        self.repeat_kv_heads = cfg.group_size
        self.W_Q = nn.Parameter(torch.empty(n, m, h))
        self._W_K = nn.Parameter(torch.empty(k, m, h))
        self._W_V = nn.Parameter(torch.empty(k, m, h))
        self.W_O = nn.Parameter(torch.empty(n, h, m))
        # Biases are zero unless the checkpoint has them (cfg.qkv_bias / cfg.o_bias).
        self.b_Q = nn.Parameter(torch.zeros(n, h))
        self._b_K = nn.Parameter(torch.zeros(k, h))
        self._b_V = nn.Parameter(torch.zeros(k, h))
        self.b_O = nn.Parameter(torch.zeros(m))
        # Scores are divided by attn_scale: sqrt(d_head), or 1 / Granite's attention_multiplier.
        self.attn_scale = 1 / cfg.attention_multiplier if cfg.attention_multiplier else h**0.5
        # RMSNorm of q and k before rotary (Qwen3 per head, OLMo2 over the projection), or None.
        self.q_norm, self.k_norm = qk_norm(cfg, n), qk_norm(cfg, k)
        if cfg.scale_attn_by_inverse_layer_idx and layer_id is not None:
            self.attn_scale *= layer_id + 1

        self.hook_q = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_k = HookPoint()  # [batch, pos, kv_head_index, d_head]
        self.hook_v = HookPoint()  # [batch, pos, kv_head_index, d_head]
        self.hook_rot_q = HookPoint()  # after rotary
        self.hook_rot_k = HookPoint()  # after rotary
        self.hook_attn_scores = HookPoint()  # [batch, head_index, query_pos, key_pos]
        self.hook_pattern = HookPoint()  # [batch, head_index, query_pos, key_pos]
        self.hook_z = HookPoint()  # [batch, pos, head_index, d_head]

    @property
    def W_K(self) -> Float[Tensor, "head_index d_model d_head"]:
        return torch.repeat_interleave(self._W_K, self.repeat_kv_heads, dim=0)

    @property
    def W_V(self) -> Float[Tensor, "head_index d_model d_head"]:
        return torch.repeat_interleave(self._W_V, self.repeat_kv_heads, dim=0)

    @property
    def b_K(self) -> Float[Tensor, "head_index d_head"]:
        return torch.repeat_interleave(self._b_K, self.repeat_kv_heads, dim=0)

    @property
    def b_V(self) -> Float[Tensor, "head_index d_head"]:
        return torch.repeat_interleave(self._b_V, self.repeat_kv_heads, dim=0)

    @staticmethod
    def _project(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
        if x.ndim == 3:  # [batch, pos, d_model], one input for every head
            return torch.einsum("bpm,nmh->bpnh", x, W) + b
        return torch.einsum("bpnm,nmh->bpnh", x, W) + b  # per-head inputs

    def calculate_qkv_matrices(
        self,
        query_input: Float[Tensor, "batch pos d_model"]
        | Float[Tensor, "batch pos head_index d_model"],
        key_input: Float[Tensor, "batch pos d_model"]
        | Float[Tensor, "batch pos kv_head_index d_model"],
        value_input: Float[Tensor, "batch pos d_model"]
        | Float[Tensor, "batch pos kv_head_index d_model"],
    ) -> tuple[
        Float[Tensor, "batch pos head_index d_head"],
        Float[Tensor, "batch pos kv_head_index d_head"],
        Float[Tensor, "batch pos kv_head_index d_head"],
    ]:
        """Q at n_heads, K and V at n_kv heads, from the unexpanded `_W_K` / `_W_V`."""
        q = self.hook_q(self._project(query_input, self.W_Q, self.b_Q))
        k = self.hook_k(self._project(key_input, self._W_K, self._b_K))
        v = self.hook_v(self._project(value_input, self._W_V, self._b_V))
        return q, k, v

    def calculate_attention_scores(
        self,
        q: Float[Tensor, "batch query_pos head_index d_head"],
        k: Float[Tensor, "batch key_pos kv_head_index d_head"],
    ) -> Float[Tensor, "batch head_index query_pos key_pos"]:
        """Scaled Q.K scores; K is expanded to n_heads here (repeat_interleave over heads)."""
        k = torch.repeat_interleave(k, self.repeat_kv_heads, dim=2)
        return torch.einsum("bqnh,bknh->bnqk", q, k) * (1.0 / self.attn_scale)

    def calculate_z_scores(
        self,
        v: Float[Tensor, "batch key_pos kv_head_index d_head"],
        pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    ) -> Float[Tensor, "batch query_pos head_index d_head"]:
        """Pattern-weighted values; V is expanded to n_heads here."""
        v = torch.repeat_interleave(v, self.repeat_kv_heads, dim=2)
        return torch.einsum("bknh,bnqk->bqnh", v, pattern)

    @property
    def needs_pattern(self) -> bool:
        """True when a hook reads scores or pattern, so the fast path cannot be used."""
        return self.hook_attn_scores.has_hooks or self.hook_pattern.has_hooks

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        cos: Float[Tensor, "pos rotary_dim"] | None,
        sin: Float[Tensor, "pos rotary_dim"] | None,
        use_fast_path: bool | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        q, k, v = self.calculate_qkv_matrices(x, x, x)
        q, k = apply_qk_norm(self.q_norm, q), apply_qk_norm(self.k_norm, k)
        q = self.hook_rot_q(apply_rotary(q, cos, sin))
        k = self.hook_rot_k(apply_rotary(k, cos, sin))
        window = self.cfg.sliding_window if self.attn_type == "local" else None
        if use_fast_path is None:
            use_fast_path = not self.needs_pattern
        if use_fast_path:
            z = self._sdpa(q, k, v, window)
        else:
            scores = self.calculate_attention_scores(q, k)
            mask = attention_mask(q.shape[1], k.shape[1], window, q.device)
            scores = self.hook_attn_scores(scores.masked_fill(~mask, float("-inf")))
            pattern = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            z = self.calculate_z_scores(v, self.hook_pattern(pattern))
        z = self.hook_z(z)
        # One matmul over (head, d_head) together, as HF's o_proj: einsum "bqnh,nhm->bqm"
        # sums per-head partial products, each rounded in bf16 (twice HF's error, measured).
        return z.flatten(2) @ self.W_O.flatten(0, 1) + self.b_O  # [b, q, n*h] @ [n*h, m]

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, window: int | None) -> Tensor:
        """torch SDPA with enable_gqa: K/V are never materialised at n_heads."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # -> [batch, head, pos, d_head]
        mask = None if window is None else attention_mask(q.shape[2], k.shape[2], window, q.device)
        z = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            scale=1.0 / self.attn_scale,
            enable_gqa=self.repeat_kv_heads > 1,
        )
        return z.transpose(1, 2)  # [batch, pos, head_index, d_head]
