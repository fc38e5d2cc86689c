"""The MLP without a gate (TransformerLens's `MLP`), and the xIELU activation.

    gated (model/decoder.py GatedMLP)  W_out(act(x W_gate + b_gate) * (x W_in + b_in)) + b_out
    ungated (MLP, here)                W_out(act(x W_in + b_in)) + b_out

StarCoder2's `c_fc` / `c_proj` (tanh GELU, biases by `use_bias`) and Apertus's `up_proj` /
`down_proj` (xIELU, no biases) are ungated. Biases exist only where the family has them
(`ModelConfig.mlp_bias`); a projection with a bias is one `F.linear`, as HF's nn.Linear.

xIELU (Apertus) has learned parameters per layer, stored as HF stores them under
`mlp.act_fn.*` (TransformerLens's names too): `alpha_p`, `alpha_n` [1] before their softplus,
`beta` and `eps` scalars; computed as transformers' `XIELUActivation` (its Python path):

    x > 0:   softplus(alpha_p) * x * x + beta * x
    x <= 0:  (expm1(min(x, eps)) - x) * (beta + softplus(alpha_n)) + beta * x

Hooks (TL's MLP names): `hook_pre` [batch, pos, d_mlp] before the activation, `hook_post`
after it (the input of W_out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from gqa_convert.config import ModelConfig
from gqa_convert.model.hooks import HookPoint

# HF's ACT2FN names -> the function (gelu_pytorch_tanh: Gemma's GeGLU, StarCoder2's MLP).
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def linear(x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    """x @ W [.., d_in] @ [d_in, d_out], plus b as HF's nn.Linear adds it (one F.linear)."""
    return x @ W if b is None else F.linear(x, W.T, b)


def bias(size: int, on: bool) -> nn.Parameter | None:
    """A bias of `size`, zero until loaded, where the family has one."""
    return nn.Parameter(torch.zeros(size)) if on else None


class XIELU(nn.Module):
    """transformers' XIELUActivation with its parameters as loaded (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha_p = nn.Parameter(torch.zeros(1))
        self.alpha_n = nn.Parameter(torch.zeros(1))
        self.beta = nn.Parameter(torch.zeros(()))
        self.eps = nn.Parameter(torch.zeros(()))

    def forward(self, x: Float[Tensor, "... d_mlp"]) -> Float[Tensor, "... d_mlp"]:
        alpha_p = F.softplus(self.alpha_p)
        alpha_n = self.beta + F.softplus(self.alpha_n)
        return torch.where(
            x > 0,
            alpha_p * x * x + self.beta * x,
            (torch.expm1(torch.min(x, self.eps)) - x) * alpha_n + self.beta * x,
        )


class MLP(nn.Module):
    """W_out(act(x W_in + b_in)) + b_out, weights [d_model, d_mlp] / [d_mlp, d_model]; act
    is `cfg.act_fn`, xIELU as the module `act_fn` (its parameters are the layer's)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_in, self.b_out = bias(cfg.d_mlp, cfg.mlp_bias), bias(cfg.d_model, cfg.mlp_bias)
        if cfg.act_fn == "xielu":
            self.act_fn = XIELU()
        else:
            self.act = ACTIVATIONS[cfg.act_fn]
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp], before the activation
        self.hook_post = HookPoint()  # [batch, pos, d_mlp], input of W_out

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(linear(x, self.W_in, self.b_in))
        act = self.act_fn(pre) if hasattr(self, "act_fn") else self.act(pre)
        return linear(self.hook_post(act), self.W_out, self.b_out)
