"""GQATransformer: embedding, RMSNorm, rotary, GQA blocks, gated SiLU MLP, unembedding.

The families differ by a few named options of `ModelConfig`, each a line or two here or in
the attention: `qk_norm` (model/norm.py), `norm_placement` "post" (ln1 / ln2 on the
sublayer's output, OLMo2), Granite's four multipliers, `rope_layers` (no rotary on SmolLM3's
NoPE layers), partial rotary and the rope scalings (model/rotary.py), `moe` (a mixture of
experts for the MLP of the layers it names, model/moe.py).

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
from gqa_convert.model.attention import GroupedQueryAttention
from gqa_convert.model.hooks import HookPoint
from gqa_convert.model.moe import MoEMLP
from gqa_convert.model.norm import RMSNorm
from gqa_convert.model.rotary import length_dependent, rotary_inv_freq, rotary_table

__all__ = ["GQATransformer", "RMSNorm", "rotary_inv_freq"]


class GatedMLP(nn.Module):
    """W_out(silu(x W_gate) * (x W_in)), weights stored [d_model, d_mlp] / [d_mlp, d_model]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.W_gate = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp], gate before the activation
        self.hook_post = HookPoint()  # [batch, pos, d_mlp], input of W_out

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        gate = self.hook_pre(x @ self.W_gate)
        return self.hook_post(F.silu(gate) * (x @ self.W_in)) @ self.W_out


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


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.cfg = cfg
        self.ln1 = RMSNorm(cfg.d_model, cfg.eps, cfg.norm_weight_in_fp32)
        self.attn = GroupedQueryAttention(cfg, cfg.attn_types[layer_id], layer_id)
        self.ln2 = RMSNorm(cfg.d_model, cfg.eps, cfg.norm_weight_in_fp32)
        self.mlp = MoEMLP(cfg) if cfg.is_moe_layer(layer_id) else GatedMLP(cfg)
        self.use_rope = cfg.rope_layers[layer_id]  # False: a NoPE layer, no rotary at all
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self, resid: Tensor, cos: Tensor, sin: Tensor, use_fast_path: bool | None = None
    ) -> Tensor:
        """Pre-norm: resid + m * sublayer(ln(resid)); post-norm: resid + m * ln(sublayer(resid)),
        m being Granite's residual_multiplier (1 elsewhere). hook_attn_out / hook_mlp_out
        see the sublayer's output before m (after the post-norm, as TransformerLens)."""
        pre, m = self.cfg.norm_placement == "pre", self.cfg.residual_multiplier
        resid = self.hook_resid_pre(resid)
        x = self.ln1(resid) if pre else resid
        rotary = (cos, sin) if self.use_rope else None
        attn_out = self.attn(x, x, x, rotary=rotary, use_fast_path=use_fast_path)
        attn_out = self.hook_attn_out(attn_out if pre else self.ln1(attn_out))
        resid = self.hook_resid_mid(resid + attn_out * m)
        mlp_out = self.mlp(self.ln2(resid) if pre else resid)
        mlp_out = self.hook_mlp_out(mlp_out if pre else self.ln2(mlp_out))
        return self.hook_resid_post(resid + mlp_out * m)


class GQATransformer(nn.Module):
    """A Llama-family decoder in TransformerLens layout: tokens [batch, pos] -> logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.ln_final = RMSNorm(cfg.d_model, cfg.eps, cfg.norm_weight_in_fp32)
        self.unembed = Unembed(cfg)
        # fp32 always, as HF's: a plain tensor, not a buffer, so `.to(bfloat16)` cannot round
        # the frequencies (a phase error growing with position). rotary() moves its device.
        self.rotary_inv_freq = rotary_inv_freq(cfg.rope, cfg.rotary_dim, None, cfg.n_ctx)

    def rotary(
        self, n_pos: int, dtype: torch.dtype, device: torch.device | None = None
    ) -> tuple[Tensor, Tensor]:
        """cos, sin [n_pos, rotary_dim] in HF's convention (frequencies repeated twice), on
        `device` (default: the embedding's).

        dynamic and longrope frequencies depend on n_pos: recomputed for each call, as a
        fresh HF model does for a sequence of this length."""
        rope = self.cfg.rope
        inv_freq = self.rotary_inv_freq
        if length_dependent(rope):
            inv_freq = rotary_inv_freq(rope, self.cfg.rotary_dim, n_pos, self.cfg.n_ctx)
        pos = torch.arange(n_pos, device=device or self.embed.W_E.device)
        return rotary_table(inv_freq, pos, dtype, attention_factor=rope.attention_factor)

    def forward(
        self, tokens: Int[Tensor, "batch pos"], use_fast_path: bool | None = None
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits. `use_fast_path`: None picks SDPA unless a hook reads scores or pattern;
        False forces the reference path (explicit scores, pattern, repeat_interleave)."""
        resid = self.hook_embed(self.embed(tokens)) * self.cfg.embedding_multiplier
        cos, sin = self.rotary(
            tokens.shape[1], torch.float32 if self.cfg.rotary_in_fp32 else resid.dtype
        )
        for block in self.blocks:
            resid = block(resid, cos, sin, use_fast_path)
        return self.unembed(self.ln_final(resid)) / self.cfg.logits_scaling

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
        model.rotary_inv_freq = rotary_inv_freq(cfg.rope, cfg.rotary_dim, None, cfg.n_ctx)
        return model.to(device=device, dtype=dtype) if dtype else model.to(device)


def _zero_by_config(cfg: ModelConfig, name: str) -> bool:
    """Biases the source family does not have: zero in our model, never read from files."""
    leaf = name.rsplit(".", 1)[-1]
    return (leaf in ("b_Q", "_b_K", "_b_V") and not cfg.qkv_bias) or (
        leaf == "b_O" and not cfg.o_bias
    )
