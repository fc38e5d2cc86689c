"""Grouped-query attention, a drop-in for TransformerLens 3.9's `GroupedQueryAttention`.

    MHA  n_kv = n_heads      q0 q1 q2 q3      each query head has its own K/V head
                             k0 k1 k2 k3
    GQA  1 < n_kv < n_heads  q0 q1 q2 q3      group = n_heads // n_kv query heads share
                             k0 k0 k1 k1      one K/V head: head h reads KV head h // group
    MQA  n_kv = 1            q0 q1 q2 q3      every query head reads the single K/V head
                             k0 k0 k0 k0

K/V weights are stored unexpanded (`_W_K`, `_W_V`: [n_kv, d_model, d_head]); `W_K` / `W_V`
are copies expanded with `repeat_interleave` (the grouping of HF's `repeat_kv`). In the
forward pass K/V stay at n_kv heads (also in a KV cache entry) and are expanded only inside
`calculate_attention_scores` / `calculate_z_scores`, or never, on the SDPA fast path.

TL's constructor (`cfg` a dict, a `HookedTransformerConfig` or our `ModelConfig`;
`attn_type`; `layer_id`), forward signature and semantics (rotary offset by the cache, KV
cache entry, left-padding `attention_mask`, `additive_attention_mask`), hook names and shapes;
`tests/test_tl_conformance.py` checks them against TL on identical weights. Our decoder calls
the same forward with two keyword-only extras: `rotary=(cos, sin)` computed once for all
layers, and `use_fast_path`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from gqa_convert.config import ModelConfig
from gqa_convert.model.attention_config import AttentionConfig, attention_config
from gqa_convert.model.fused import FusedProjections
from gqa_convert.model.hooks import HookPoint
from gqa_convert.model.norm import apply_qk_norm, qk_norm, rms_normalize
from gqa_convert.model.rotary import apply_rotary, length_dependent, rotary_inv_freq, rotary_table

# Buffers TL's attention holds and derives from its config; we derive them per call.
TL_BUFFERS = ("mask", "IGNORE", "rotary_sin", "rotary_cos")
HALF = (torch.float16, torch.bfloat16)


def soft_cap(x: Tensor, cap: float | None) -> Tensor:
    """Gemma 2's soft-cap: tanh(x / cap) * cap, in HF's order of operations; None: x."""
    return x if cap is None else torch.tanh(x / cap) * cap


def causal_mask(
    q_len: int, k_len: int, window: int | None, device: torch.device
) -> Bool[Tensor, "q_len k_len"]:
    """True where query i (the last q_len of k_len positions) may attend key j."""
    i = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window  # HF and TL: keep keys with q_idx - kv_idx < window
    return allowed


def same_chunk(
    q_len: int,
    k_len: int,
    size: int,
    attention_mask: Tensor | None,
    device: torch.device,
    offset: int = 0,
) -> Bool[Tensor, "*batch q_len k_len"]:
    """Llama 4's chunked attention: True where key j is in query i's `size`-token chunk,
    chunks counted from each row's first attended token (HF's `chunked_overlay` with its
    left padding) when `attention_mask` [batch, offset + k_len] is given. The k_len keys are
    positions offset .. offset + k_len - 1 (a generation cache that dropped the first
    `offset`, as a window layer does)."""
    if attention_mask is None:
        pos = torch.arange(offset, offset + k_len, device=device)
    else:  # [batch, k_len]; pads before: < 0, masked
        pos = (attention_mask.cumsum(dim=-1) - 1)[:, -k_len:]
    chunk = torch.div(pos, size, rounding_mode="floor")
    return chunk[..., -q_len:, None] == chunk[..., None, :]


def dropped(entry: Any, k_len: int) -> int:
    """Positions before the `k_len` keys an entry returned: those a generation cache no
    longer holds (`LayerCache` of a window or chunked layer); 0 for TL's entries."""
    seen = getattr(entry, "seen", None)
    return 0 if seen is None else seen - k_len


class GroupedQueryAttention(nn.Module):
    """Attention whose query heads share K/V heads in groups (see the module docstring).

    `cfg`: our `ModelConfig`, a dict with TL's field names or a TL `HookedTransformerConfig`
    (see `attention_config` for the fields read and refused). `attn_type="local"` masks keys
    `window_size` (ours: `sliding_window`) or more positions back. With
    `scale_attn_by_inverse_layer_idx`, scores are also divided by `layer_id + 1`.
    """

    def __init__(
        self,
        cfg: ModelConfig | dict[str, Any] | Any,
        attn_type: str = "global",
        layer_id: int | None = None,
    ):
        super().__init__()
        if attn_type not in ("global", "local"):
            raise ValueError(f"attn_type must be 'global' or 'local', got {attn_type!r}")
        acfg = attention_config(cfg, attn_type, layer_id)
        if attn_type == "local" and not isinstance(acfg.window_size, int):
            field = "sliding_window" if isinstance(cfg, ModelConfig) else "window_size"
            raise ValueError(f"attn_type='local' needs an int cfg.{field}")
        if acfg.qk_norm == "proj" and acfg.ungroup_grouped_query_attention:
            raise ValueError("a q/k norm over the whole projection needs K at n_kv heads")
        self.cfg: AttentionConfig = acfg
        self.attn_type, self.layer_id = attn_type, layer_id
        self.window = acfg.window_size if attn_type == "local" else None
        n, k, m, h = acfg.n_heads, acfg.n_key_value_heads, acfg.d_model, acfg.d_head
        self.repeat_kv_heads = acfg.group_size
        dt = acfg.dtype
        # Gemma 4: a layer attending an earlier layer's K/V has no K/V weights, a k = v
        # layer no V weights (None).
        own_k, own_v = acfg.kv_source is None, acfg.kv_source is None and not acfg.k_eq_v
        self.W_Q = nn.Parameter(torch.empty(n, m, h, dtype=dt))
        self._W_K = nn.Parameter(torch.empty(k, m, h, dtype=dt)) if own_k else None
        self._W_V = nn.Parameter(torch.empty(k, m, h, dtype=dt)) if own_v else None
        self.W_O = nn.Parameter(torch.empty(n, h, m, dtype=dt))
        # Biases are zero unless the checkpoint has them (ModelConfig.qkv_bias / o_bias).
        self.b_Q = nn.Parameter(torch.zeros(n, h, dtype=dt))
        self._b_K = nn.Parameter(torch.zeros(k, h, dtype=dt)) if own_k else None
        self._b_V = nn.Parameter(torch.zeros(k, h, dtype=dt)) if own_v else None
        self.b_O = nn.Parameter(torch.zeros(m, dtype=dt))
        # RMSNorm of q and k before rotary (Qwen3 per head, OLMo2 over the projection), or
        # after it (Hunyuan), Cohere's LayerNorm per head; or None.
        self.q_norm, self.k_norm = qk_norm(acfg, n), qk_norm(acfg, k) if own_k else None
        # Granite SWA's (and gpt-oss's) sinks: a learned logit per head, an extra score
        # column of every softmax, dropped after it.
        self.sinks = nn.Parameter(torch.zeros(n, dtype=dt)) if acfg.attn_sinks else None
        # Q/K/V in HF's fused layout, set only during `generate` (model/fused.py)
        self.fused: FusedProjections | None = None
        self.attn_scale = acfg.attn_scale  # sqrt(d_head), or 1 / Granite's attention_multiplier
        if acfg.scale_attn_by_inverse_layer_idx:
            if layer_id is None:
                raise ValueError("cfg.scale_attn_by_inverse_layer_idx needs a layer_id")
            self.attn_scale *= layer_id + 1

        # TL's hook points, in TL's order. K/V hooks are at n_kv heads, or n_heads under
        # ungroup_grouped_query_attention.
        self.hook_k = HookPoint()  # [batch, kv_pos, kv_head_index, d_head]
        self.hook_q = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_v = HookPoint()  # [batch, kv_pos, kv_head_index, d_head]
        self.hook_z = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head_index, query_pos, key_pos]
        self.hook_pattern = HookPoint()  # [batch, head_index, query_pos, key_pos]
        self.hook_result = HookPoint()  # [batch, pos, head_index, d_model], use_attn_result
        if acfg.positional_embedding_type == "rotary":
            self.hook_rot_k = HookPoint()  # after rotary, keys of every position so far
            self.hook_rot_q = HookPoint()  # after rotary
        if self.sinks is not None:  # ours (TL has no sinks): [head_index], the sink logits
            self.hook_sinks = HookPoint(has_batch_dim=False)

    @property
    def W_K(self) -> Float[Tensor, "head_index d_model d_head"]:
        """A copy of `_W_K` expanded to n_heads (writing to it changes nothing)."""
        return torch.repeat_interleave(self._W_K, self.repeat_kv_heads, dim=0)

    @W_K.setter
    def W_K(self, value: Tensor) -> None:  # TL's setter: stores the unexpanded weight
        self._W_K = value

    @property
    def W_V(self) -> Float[Tensor, "head_index d_model d_head"]:
        W = self._W_K if self.cfg.k_eq_v else self._W_V  # Gemma 4's k = v: K's weights
        return torch.repeat_interleave(W, self.repeat_kv_heads, dim=0)

    @W_V.setter
    def W_V(self, value: Tensor) -> None:
        self._W_V = value

    @property
    def b_K(self) -> Float[Tensor, "head_index d_head"]:
        return torch.repeat_interleave(self._b_K, self.repeat_kv_heads, dim=0)

    @b_K.setter
    def b_K(self, value: Tensor) -> None:
        self._b_K = value

    @property
    def b_V(self) -> Float[Tensor, "head_index d_head"]:
        return torch.repeat_interleave(self._b_V, self.repeat_kv_heads, dim=0)

    @b_V.setter
    def b_V(self, value: Tensor) -> None:
        self._b_V = value

    def _project(self, name: str, x: Tensor, W: Tensor, b: Tensor) -> Tensor:
        """x @ W + b per head: [batch, pos, d_model] or per-head inputs [batch, pos, heads,
        d_model] -> [batch, pos, heads, d_head]. In half precision rounded once, as HF's
        q/k/v_proj (`F.linear`); `+ b` after a bf16 matmul rounds twice (0.031 on the bf16
        gate of Qwen2, measured: scripts/measure_half_bias.py)."""
        if x.ndim == 3 and self.fused is not None:  # in `generate`: one F.linear, as HF
            return self.fused.project(name, x, W, b)
        if x.ndim == 3:  # [batch, pos, d_model], one input for every head
            # [1, b*p, m] @ [n, m, h] -> [n, b*p, h]: a batched matmul reading W in place
            # (einsum "bpm,nmh->bpnh" took 2.6x as long for one token, d_model 1024, 16
            # heads, one thread: 217 vs 82 us, measured).
            batch, pos, m = x.shape
            x = x.reshape(1, batch * pos, m)
            if x.dtype in HALF:  # x @ W + b rounded once, as HF's (and TL's) F.linear
                out = torch.baddbmm(b[:, None, :], x.expand(W.shape[0], -1, -1), W)
            else:  # fp32, as before: the second rounding is at fp32 precision (1e-6 from
                out = torch.matmul(x, W) + b[:, None, :]  # F.linear: measure_half_bias.py)
            return out.permute(1, 0, 2).unflatten(0, (batch, pos))
        return torch.einsum("bpnm,nmh->bpnh", x, W) + b  # per-head inputs, as TL's

    def _project_out(
        self, z: Float[Tensor, "batch pos head_index d_head"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """z @ W_O + b_O as HF's o_proj: one matmul over (head, d_head) together with b_O
        folded in (F.linear, one rounding in bf16). einsum "bqnh,nhm->bqm" sums per-head
        partial products, each rounded in bf16 (twice HF's error, measured); adding b_O
        after the matmul rounds twice (0.023 on the bf16 gate, measured)."""
        return F.linear(z.flatten(2), self.W_O.flatten(0, 1).T, self.b_O)  # [b, q, n*h] -> m

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
        """Q at n_heads, K and V at n_kv heads from the unexpanded `_W_K` / `_W_V` (at
        n_heads under `ungroup_grouped_query_attention`). Inputs are shared ([batch, pos,
        d_model]) or per head ([batch, pos, heads, d_model], TL's `use_split_qkv_input`).
        Per-head q/k norms (TL's `use_qk_norm`) apply here, after hook_q / hook_k, as TL's."""
        ungroup = self.cfg.ungroup_grouped_query_attention
        q = self.hook_q(self._project("q", query_input, self.W_Q, self.b_Q))
        W_K, b_K = (self.W_K, self.b_K) if ungroup else (self._W_K, self._b_K)
        W_V, b_V = (self.W_V, self.b_V) if ungroup else (self._W_V, self._b_V)
        if self.cfg.kv_source is not None:  # Gemma 4: K/V are an earlier layer's
            if self.cfg.qk_norm in ("head", "heads"):
                q = apply_qk_norm(self.q_norm, q)
            return q, None, None
        k = self.hook_k(self._project("k", key_input, W_K, b_K))
        # Gemma 4's k = v layers: v is k's projection, before k's norm
        v = self.hook_v(k if self.cfg.k_eq_v else self._project("v", value_input, W_V, b_V))
        if self.cfg.v_norm:  # Gemma 4: a weightless RMSNorm of v
            v = rms_normalize(v, self.cfg.eps)
        per_head = ("head", "heads", "weightless")
        if self.cfg.qk_norm in per_head and not self.cfg.qk_norm_after_rotary:
            q, k = apply_qk_norm(self.q_norm, q), apply_qk_norm(self.k_norm, k)
        return q, k, v

    def calculate_attention_scores(
        self,
        q: Float[Tensor, "batch query_pos head_index d_head"],
        k: Float[Tensor, "batch key_pos kv_head_index d_head"],
    ) -> Float[Tensor, "batch head_index query_pos key_pos"]:
        """Scaled Q.K scores, soft-capped where the config says (Gemma 2, as TL: before the
        mask); K is expanded to n_heads here (repeat_interleave over heads)."""
        if not self.cfg.ungroup_grouped_query_attention:
            k = torch.repeat_interleave(k, self.repeat_kv_heads, dim=2)
        scores = torch.einsum("bqnh,bknh->bnqk", q, k) * (1.0 / self.attn_scale)
        return soft_cap(scores, self.cfg.attn_scores_soft_cap)

    def calculate_z_scores(
        self,
        v: Float[Tensor, "batch key_pos kv_head_index d_head"],
        pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    ) -> Float[Tensor, "batch query_pos head_index d_head"]:
        """Pattern-weighted values through `hook_z` (as TL); V is expanded to n_heads here."""
        if not self.cfg.ungroup_grouped_query_attention:
            v = torch.repeat_interleave(v, self.repeat_kv_heads, dim=2)
        return self.hook_z(torch.einsum("bknh,bnqk->bqnh", v, pattern))

    @property
    def can_fuse(self) -> bool:
        """Whether `generate` may project with fused copies (model/fused.py): not under
        TL's `ungroup_grouped_query_attention`, whose K/V are remade at n_heads per call."""
        return not self.cfg.ungroup_grouped_query_attention

    @property
    def needs_pattern(self) -> bool:
        """True when a hook reads scores or pattern, so the fast path cannot be used."""
        return self.hook_attn_scores.has_hooks or self.hook_pattern.has_hooks

    def rotary(
        self,
        k_len: int,
        dtype: torch.dtype,
        attention_mask: Int[Tensor, "batch k_len"] | None = None,
        device: torch.device | None = None,
    ) -> tuple[Tensor, Tensor]:
        """cos, sin for keys 0..k_len-1: [k_len, rotary_dim], or with `attention_mask`
        [batch, k_len, rotary_dim] with TL's positions (each row counts from its first
        attended token; pads before it sit at 0).

        dynamic and longrope frequencies are those of the whole sequence, cache included
        (HF's rule: the largest position + 1), recomputed per call; keys are cached unrotated,
        so every step rotates all keys and the queries with the same frequencies."""
        if attention_mask is None:
            positions = torch.arange(k_len, device=device)
        else:
            positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        rope = self.cfg.rope
        n_pos = None
        if length_dependent(rope):
            n_pos = k_len if attention_mask is None else int(positions.max()) + 1
        inv_freq = rotary_inv_freq(rope, self.cfg.rotary_dim, n_pos, self.cfg.n_ctx)
        pairs = self.cfg.rotary_adjacent_pairs
        return rotary_table(inv_freq, positions, dtype, pairs, rope.attention_factor)

    def forward(
        self,
        query_input: Float[Tensor, "batch pos d_model"]
        | Float[Tensor, "batch pos head_index d_model"],
        key_input: Float[Tensor, "batch kv_pos d_model"]
        | Float[Tensor, "batch kv_pos kv_head_index d_model"],
        value_input: Float[Tensor, "batch kv_pos d_model"]
        | Float[Tensor, "batch kv_pos kv_head_index d_model"],
        past_kv_cache_entry: Any | None = None,
        additive_attention_mask: Float[Tensor, "batch 1 1 kv_pos"] | None = None,
        attention_mask: Int[Tensor, "batch offset_pos"] | None = None,
        position_bias: Tensor | None = None,
        *,
        rotary: tuple[Tensor, Tensor] | None = None,
        use_fast_path: bool | None = None,
        positions: Int[Tensor, "*batch pos"] | None = None,
        shared_kv: dict[int, tuple[Tensor, Tensor]] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """TL's forward. `past_kv_cache_entry` (ours, `KeyValueCacheEntry`, or TL's) gets the
        new K/V appended (unrotated, after the q/k norms, at n_kv heads) and the queries'
        rotary positions start after it; a generation `LayerCache` (keys_rotated) gets them
        after rotary, `rotary` then being the new positions' tables; `attention_mask`
        [batch, cached + new positions] marks left padding (0); `additive_attention_mask`
        is added to the masked scores. `position_bias` is ignored, as TL ignores it outside
        relative positional bias.

        Ours, keyword-only: `rotary=(cos, sin)` [kv_pos, rotary_dim] for the key positions
        (our decoder computes them once for every layer; None on a layer without rotary);
        `use_fast_path`: None picks SDPA unless a hook reads scores or pattern, False forces
        the reference path (so do a soft-cap on the scores and sinks); `positions` [pos] or
        [batch, pos], the queries' positions (Ministral 3's query scale; None: those of
        `rotary`'s rule); `shared_kv` (Gemma 4's KV sharing, one dict per forward pass):
        {layer: (keys after rotary, values)} of every key position attended, written by
        `kv_store` layers, read by those with a `kv_source` (which neither cache nor
        rotate keys of their own).
        """
        q, k, v = self.calculate_qkv_matrices(query_input, key_input, value_input)
        if self.cfg.kv_source is not None:
            if shared_kv is None or self.cfg.kv_source not in shared_kv:
                raise ValueError(
                    f"layer {self.layer_id} attends the K/V of layer {self.cfg.kv_source}: "
                    "run the model (or pass shared_kv)"
                )
            kv = shared_kv[self.cfg.kv_source]
            return self._attend_shared(q, kv, rotary, attention_mask, use_fast_path)
        if self.cfg.qk_norm == "proj":  # where TL applies OLMo's norms: after calculate_qkv
            q, k = apply_qk_norm(self.q_norm, q), apply_qk_norm(self.k_norm, k)
        # TL's entry caches keys before rotary; ours for generation (`LayerCache`,
        # keys_rotated) after it, so `rotary` then holds the new positions' tables only.
        entry = past_kv_cache_entry
        cached_before_rotary = entry is not None and not getattr(entry, "keys_rotated", False)
        if cached_before_rotary:
            k, v = entry.append(k, v)
        q_len = q.shape[1]
        rotates = self.cfg.positional_embedding_type == "rotary"
        if rotates:
            if rotary is None:
                dtype = torch.float32 if self.cfg.rotary_in_fp32 else q.dtype
                rotary = self.rotary(k.shape[1], dtype, attention_mask, q.device)
            cos, sin = rotary
            q = self.hook_rot_q(self._rotate(q, cos[..., -q_len:, :], sin[..., -q_len:, :]))
            k_new = k.shape[1]
            k = self._rotate(k, cos[..., -k_new:, :], sin[..., -k_new:, :])
        elif rotary is not None:
            raise ValueError("rotary given, but cfg.positional_embedding_type is not 'rotary'")
        tuning = self.cfg.temperature_tuning  # Llama 4's: after the cache, by its length
        if self.cfg.query_scale_beta is not None and not tuning:  # Ministral 3, after rotary
            q = (q * self._query_scale(positions, attention_mask, k.shape[1], q_len, q)).to(q.dtype)
        if entry is not None and not cached_before_rotary:
            k, v = entry.append(k, v)
        if self.cfg.query_scale_beta is not None and tuning:  # every key so far, dropped too
            k_len = dropped(entry, k.shape[1]) + k.shape[1]
            q = (q * self._query_scale(positions, attention_mask, k_len, q_len, q)).to(q.dtype)
        if rotates:
            k = self.hook_rot_k(k)  # every key the queries attend
        if self.cfg.qk_norm_after_rotary:  # Hunyuan: the cache holds k before this norm
            q, k = apply_qk_norm(self.q_norm, q), apply_qk_norm(self.k_norm, k)
        if self.cfg.kv_store and shared_kv is not None:  # Gemma 4: later layers attend these
            shared_kv[self.layer_id] = (k, v)
        offset = dropped(entry, k.shape[1])
        return self._attend(q, k, v, attention_mask, additive_attention_mask, use_fast_path, offset)

    def _attend_shared(
        self,
        q: Float[Tensor, "batch pos head_index d_head"],
        kv: tuple[Tensor, Tensor],
        rotary: tuple[Tensor, Tensor] | None,
        attention_mask: Int[Tensor, "batch offset_pos"] | None,
        use_fast_path: bool | None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Gemma 4's KV-shared layer: its queries, rotated, attend another layer's keys
        (rotated) and values, every position that layer attended."""
        k, v = kv
        if rotary is not None:
            cos, sin = rotary
            q_len = q.shape[1]
            q = self.hook_rot_q(self._rotate(q, cos[..., -q_len:, :], sin[..., -q_len:, :]))
        return self._attend(q, k, v, attention_mask, None, use_fast_path)

    def _attend(
        self,
        q: Float[Tensor, "batch pos head_index d_head"],
        k: Float[Tensor, "batch kv_pos kv_head_index d_head"],
        v: Float[Tensor, "batch kv_pos kv_head_index d_head"],
        attention_mask: Int[Tensor, "batch offset_pos"] | None,
        additive_attention_mask: Tensor | None,
        use_fast_path: bool | None,
        offset: int = 0,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Masked attention of `q` over `k` / `v` (rotated, the cache's included), then W_O;
        `offset`: the positions before the keys held (a cache dropped them)."""
        q_len, k_len = q.shape[1], k.shape[1]
        chunk = self.cfg.chunk_size  # Llama 4's chunked layers
        in_chunk = None  # their positions count from the start, dropped keys included
        spans = (offset + k_len - 1) // chunk != offset // chunk if chunk else False
        if chunk is not None and (spans or attention_mask is not None):
            in_chunk = same_chunk(q_len, k_len, chunk, attention_mask, q.device, offset)
        if attention_mask is not None:  # [batch, positions so far]: those of the keys held
            attention_mask = attention_mask[:, -k_len:]

        if use_fast_path is None:
            use_fast_path = not self.needs_pattern
        # SDPA can neither soft-cap scores nor add a sink column: soft-capped attention
        # (Gemma 2) and sinks (Granite SWA) always take the reference path.
        use_fast_path = (
            use_fast_path and self.cfg.attn_scores_soft_cap is None and self.sinks is None
        )
        # SDPA without a mask: causal when queries and keys are the same positions; none at
        # all for one query (the newest position sees every key held).
        windowed = self.window is not None and k_len > self.window
        windowed = windowed or in_chunk is not None  # keys of more than one chunk
        unmasked = attention_mask is None and additive_attention_mask is None and not windowed
        is_causal = use_fast_path and unmasked and q_len == k_len and q_len > 1
        mask = None
        if not (use_fast_path and unmasked and (q_len == 1 or is_causal)):
            mask = causal_mask(q_len, k_len, self.window, q.device)  # [q, k]
            if in_chunk is not None:  # [q, k], or [batch, 1, q, k] with a mask
                mask = mask & (in_chunk if in_chunk.dim() == 2 else in_chunk[:, None])
            if attention_mask is not None:
                mask = mask & attention_mask[:, None, None, :].bool()  # [batch, 1, q, k]
        if use_fast_path:
            z = self.hook_z(self._sdpa(q, k, v, mask, additive_attention_mask, is_causal))
        else:
            scores = self.calculate_attention_scores(q, k).masked_fill(~mask, float("-inf"))
            if additive_attention_mask is not None:
                scores = scores + additive_attention_mask
            scores = self.hook_attn_scores(scores)
            pattern = self._softmax(scores)
            pattern = torch.where(pattern.isnan(), 0.0, pattern).to(v.dtype)  # all keys masked
            z = self.calculate_z_scores(v, self.hook_pattern(pattern))
        if self.cfg.use_attn_result:  # per-head outputs, as TL: [batch, pos, head, d_model]
            result = self.hook_result(torch.einsum("bqnh,nhm->bqnm", z, self.W_O))
            return result.sum(dim=2) + self.b_O
        return self._project_out(z)

    def _softmax(self, scores: Float[Tensor, "batch head q k"]) -> Float[Tensor, "batch head q k"]:
        """Softmax over keys in fp32; with sinks, each head's sink logit (through
        `hook_sinks`) is one more column, dropped after the softmax: the pattern then sums
        to less than 1, the rest being the sink's share. `sinks_softmax_in_dtype` (gpt-oss):
        the row's max subtracted and the softmax taken in the scores' dtype, as GptOss's
        eager attention (in bf16 each rounds there, as HF's)."""
        if self.sinks is None:
            return F.softmax(scores, dim=-1, dtype=torch.float32)
        sinks = self.hook_sinks(self.sinks)  # [head_index]
        sink = sinks.to(scores.dtype)[None, :, None, None].expand(*scores.shape[:3], 1)
        scores = torch.cat((scores, sink), dim=-1)  # [batch, head, q, k + 1]
        if not self.cfg.sinks_softmax_in_dtype:
            return F.softmax(scores, dim=-1, dtype=torch.float32)[..., :-1]
        scores = scores - scores.max(dim=-1, keepdim=True).values
        return F.softmax(scores, dim=-1, dtype=scores.dtype)[..., :-1]

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotary on x's first rotary_dim features (pairs by `rotary_adjacent_pairs`); in
        fp32 with `rotary_math_in_fp32` (Cohere), then cast back."""
        pairs = self.cfg.rotary_adjacent_pairs
        if self.cfg.rotary_math_in_fp32:
            return apply_rotary(x.float(), cos, sin, pairs).to(x.dtype)
        return apply_rotary(x, cos, sin, pairs)

    def _query_scale(
        self,
        positions: Tensor | None,
        attention_mask: Tensor | None,
        k_len: int,
        q_len: int,
        q: Tensor,
    ) -> Tensor:
        """Ministral 3's 1 + beta * log(1 + floor(position / length)) per query position
        (Llama 4's temperature tuning: floor((token index + 1) / length), the index counting
        padding and the cache as Llama4TextAttention's),
        computed in fp32 as Ministral3Attention does, cast to q's dtype, shaped to broadcast
        over [batch, pos, head, d_head]. Llama 4's stays fp32 (log1p(steps) * beta + 1, as
        Llama4TextAttention's): q times it is then rounded once, to q's dtype, as HF's.
        `positions` [pos] or [batch, pos] (our decoder's); None: those `rotary` would use
        (the mask's cumsum - 1, or the last q_len of k_len)."""
        if self.cfg.temperature_tuning:  # Llama 4: indices of all keys held (no window), + 1
            positions = torch.arange(k_len - q_len + 1, k_len + 1, device=q.device)
        elif positions is None:
            if attention_mask is not None:
                positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)[:, -q_len:]
            else:
                positions = torch.arange(k_len - q_len, k_len, device=q.device)
        steps = torch.floor(positions / self.cfg.query_scale_length)
        if self.cfg.temperature_tuning:
            return (torch.log1p(steps) * self.cfg.query_scale_beta + 1)[..., None, None]
        scale = 1 + self.cfg.query_scale_beta * torch.log(1 + steps)
        return scale[..., None, None].to(q.dtype)

    def _sdpa(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        additive: Tensor | None,
        is_causal: bool,
    ) -> Tensor:
        """torch SDPA with enable_gqa: K/V are never materialised at n_heads. `mask` None:
        causal if `is_causal`, else no mask; a query whose every key is masked gets z = 0,
        as in TL."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # -> [batch, head, pos, d_head]
        if additive is not None:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~mask, float("-inf")
            ) + additive.to(q.dtype)
        z = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            scale=1.0 / self.attn_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        if mask is not None:
            z = torch.where(z.isnan(), 0.0, z)
        return z.transpose(1, 2)  # [batch, pos, head_index, d_head]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Accept TL's state dict as it is: its derived buffers are not state here."""
        for name in TL_BUFFERS:
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
