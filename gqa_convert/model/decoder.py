"""GQATransformer: embedding, RMSNorm, rotary, GQA blocks, gated MLP, unembedding.

The families differ by a few named options of `ModelConfig`, each a line or two here or in
the attention: `qk_norm` (model/norm.py), `norm_placement` "post" (ln1 / ln2 on the
sublayer's output, OLMo2) or "sandwich" (ln1 / ln2 before, ln1_post / ln2_post after each
sublayer, Gemma 2/3), Granite's four multipliers, `rope_layers` (no rotary on SmolLM3's
NoPE layers), partial rotary and the rope scalings (model/rotary.py); Gemma's norm offset
(model/norm.py), embedding scale, GeGLU (`act_fn`), soft-caps on attention scores
(attention.py) and logits, `query_pre_attn_scalar`, and a rotary per layer type
(`rope_local`).

Parameter names are TransformerLens HookedTransformer names (`embed.W_E`,
`blocks.{l}.attn.W_Q`, `blocks.{l}.mlp.W_gate`, `unembed.W_U`, ...). The numerics follow
HF's Llama: RMSNorm in fp32 then cast back, rotary cos/sin computed in fp32 then cast to
the compute dtype, softmax in fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from gqa_convert.config import ModelConfig
from gqa_convert.model.attention import GroupedQueryAttention, soft_cap
from gqa_convert.model.hooks import HookPoint
from gqa_convert.model.norm import RMSNorm
from gqa_convert.model.rotary import length_dependent, rotary_inv_freq, rotary_table

__all__ = ["GQATransformer", "RMSNorm", "rotary_inv_freq"]


# HF's ACT2FN names -> the function (gelu_pytorch_tanh: Gemma's GeGLU).
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class GatedMLP(nn.Module):
    """W_out(act(x W_gate) * (x W_in)), weights stored [d_model, d_mlp] / [d_mlp, d_model];
    act is `cfg.act_fn` (SiLU, or Gemma's tanh GELU)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.act_fn]
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.W_gate = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp], gate before the activation
        self.hook_post = HookPoint()  # [batch, pos, d_mlp], input of W_out

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        gate = self.hook_pre(x @ self.W_gate)
        return self.hook_post(self.act(gate) * (x @ self.W_in)) @ self.W_out


class Embed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return self.W_E[tokens]


class Unembed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab))

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        return x @ self.W_U


def norm(cfg: ModelConfig) -> RMSNorm:
    """An RMSNorm of d_model with the family's numerics (OLMo2's fp32 weight, Gemma's offset)."""
    return RMSNorm(cfg.d_model, cfg.eps, cfg.norm_weight_in_fp32, cfg.norm_offset)


def scale_embeddings(cfg: ModelConfig, x: Tensor) -> Tensor:
    """Embeddings times the multiplier: Granite's as a Python float, Gemma's sqrt(d_model)
    first rounded to x's dtype (through fp32), as HF's embed_scale buffer."""
    m = cfg.embedding_multiplier
    if cfg.embedding_multiplier_in_dtype:
        return x * torch.tensor(m, dtype=torch.float32, device=x.device).to(x.dtype)
    return x * m


def final_logits(cfg: ModelConfig, logits: Tensor) -> Tensor:
    """What follows the unembedding: Granite's logits_scaling, Gemma 2's soft-cap."""
    return soft_cap(logits / cfg.logits_scaling, cfg.final_logit_softcap)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.cfg = cfg
        self.ln1 = norm(cfg)
        self.attn = GroupedQueryAttention(cfg, cfg.attn_types[layer_id], layer_id)
        self.ln2 = norm(cfg)
        if cfg.norm_placement == "sandwich":  # Gemma 2/3: TL's names for the norms after
            self.ln1_post, self.ln2_post = norm(cfg), norm(cfg)
        self.mlp = GatedMLP(cfg)
        self.use_rope = cfg.rope_layers[layer_id]  # False: a NoPE layer, no rotary at all
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self, resid: Tensor, cos: Tensor, sin: Tensor, use_fast_path: bool | None = None
    ) -> Tensor:
        """Pre-norm: resid + m * sublayer(ln(resid)); post-norm: resid + m * ln(sublayer(resid));
        sandwich: resid + m * ln_post(sublayer(ln(resid))), m being Granite's
        residual_multiplier (1 elsewhere). hook_attn_out / hook_mlp_out see the sublayer's
        output before m (after the post-norm, as TransformerLens)."""
        pre, m = self.cfg.norm_placement != "post", self.cfg.residual_multiplier
        resid = self.hook_resid_pre(resid)
        x = self.ln1(resid) if pre else resid
        rotary = (cos, sin) if self.use_rope else None
        attn_out = self.attn(x, x, x, rotary=rotary, use_fast_path=use_fast_path)
        attn_out = self.hook_attn_out(self.norm_after(1, attn_out))
        resid = self.hook_resid_mid(resid + attn_out * m)
        mlp_out = self.mlp(self.ln2(resid) if pre else resid)
        mlp_out = self.hook_mlp_out(self.norm_after(2, mlp_out))
        return self.hook_resid_post(resid + mlp_out * m)

    def norm_after(self, i: int, out: Tensor) -> Tensor:
        """Sublayer i's output through the norm after it: ln{i} under "post" (OLMo2),
        ln{i}_post under "sandwich" (Gemma 2/3), none under "pre"."""
        placement = self.cfg.norm_placement
        if placement == "pre":
            return out
        return getattr(self, f"ln{i}" if placement == "post" else f"ln{i}_post")(out)


class GQATransformer(nn.Module):
    """A Llama-family decoder in TransformerLens layout: tokens [batch, pos] -> logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.ln_final = norm(cfg)
        self.unembed = Unembed(cfg)
        self.reset_rotary()

    def reset_rotary(self) -> None:
        """The inverse frequencies, of global layers and (Gemma 3) of local ones when they
        differ. fp32 always, as HF's: plain tensors, not buffers, so `.to(bfloat16)` cannot
        round them (a phase error growing with position). rotary() moves their device."""
        cfg = self.cfg
        self.rotary_inv_freq = rotary_inv_freq(cfg.rope, cfg.rotary_dim, None, cfg.n_ctx)
        self.rotary_inv_freq_local = None
        if cfg.rope_local is not None:
            self.rotary_inv_freq_local = rotary_inv_freq(cfg.rope_local, cfg.rotary_dim)

    def rotary(
        self,
        n_pos: int,
        dtype: torch.dtype,
        device: torch.device | None = None,
        attn_type: str = "global",
    ) -> tuple[Tensor, Tensor]:
        """cos, sin [n_pos, rotary_dim] in HF's convention (frequencies repeated twice), on
        `device` (default: the embedding's), for layers of `attn_type`.

        dynamic and longrope frequencies depend on n_pos: recomputed for each call, as a
        fresh HF model does for a sequence of this length."""
        rope = self.cfg.rope_for(attn_type)
        inv_freq = self.rotary_inv_freq
        if attn_type == "local" and self.rotary_inv_freq_local is not None:
            inv_freq = self.rotary_inv_freq_local
        if length_dependent(rope):
            inv_freq = rotary_inv_freq(rope, self.cfg.rotary_dim, n_pos, self.cfg.n_ctx)
        pos = torch.arange(n_pos, device=device or self.embed.W_E.device)
        return rotary_table(inv_freq, pos, dtype, attention_factor=rope.attention_factor)

    def forward(
        self, tokens: Int[Tensor, "batch pos"], use_fast_path: bool | None = None
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits. `use_fast_path`: None picks SDPA unless a hook reads scores or pattern;
        False forces the reference path (explicit scores, pattern, repeat_interleave)."""
        resid = scale_embeddings(self.cfg, self.hook_embed(self.embed(tokens)))
        dtype = torch.float32 if self.cfg.rotary_in_fp32 else resid.dtype
        # cos / sin per layer type (Gemma 3's local layers have their own rotary)
        tables = {t: self.rotary(tokens.shape[1], dtype, None, t) for t in set(self.cfg.attn_types)}
        for block in self.blocks:
            resid = block(resid, *tables[block.attn.attn_type], use_fast_path)
        return final_logits(self.cfg, self.unembed(self.ln_final(resid)))

    @classmethod
    def from_pretrained(
        cls, converted_dir: str | Path, dtype: torch.dtype | None = None, device: str = "cpu"
    ) -> GQATransformer:
        """Load an export of `gqa-convert convert` (config.json + safetensors)."""
        from gqa_convert.export import load_export  # files are export's business, not ours

        cfg, state = load_export(Path(converted_dir))
        return cls.from_state_dict(cfg, state, dtype=dtype, device=device)

    @classmethod
    def from_state_dict(
        cls,
        cfg: ModelConfig,
        state: dict[str, Tensor],
        dtype: torch.dtype | None = None,
        device: str = "cpu",
    ) -> GQATransformer:
        """Build on the meta device and take `state`'s tensors as parameters (no copy).

        Every parameter must come from `state`, except biases the config says are absent,
        which are zero; any missing or unexpected name is an error.
        """
        with torch.device("meta"):
            model = cls(cfg)
        zero = {
            name for name in model.state_dict() if name not in state and _zero_by_config(cfg, name)
        }
        missing = set(model.state_dict()) - set(state) - zero
        unexpected = set(state) - set(model.state_dict())
        if missing or unexpected:
            raise ValueError(
                f"state dict does not match the model: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        ref_dtype = dtype or state["embed.W_E"].dtype
        full = dict(state)
        for name in zero:
            full[name] = torch.zeros(model.get_parameter(name).shape, dtype=ref_dtype)
        model.load_state_dict(full, assign=True, strict=True)
        model.reset_rotary()
        return model.to(device=device, dtype=dtype) if dtype else model.to(device)


def _zero_by_config(cfg: ModelConfig, name: str) -> bool:
    """Biases the source family does not have: zero in our model, never read from files."""
    leaf = name.rsplit(".", 1)[-1]
    return (leaf in ("b_Q", "_b_K", "_b_V") and not cfg.qkv_bias) or (
        leaf == "b_O" and not cfg.o_bias
    )
