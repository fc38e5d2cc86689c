"""What TransformerLens 3.9's `HookedTransformer` offers beyond the hooks, on our decoder:
`run_with_cache` returning an `ActivationCache`, the stacked weights (`W_U`, `W_Q`, ...),
`accumulated_bias`, `tokens_to_residual_directions`, `to_single_token`, `to_str_tokens`,
and TL's switches for the optional hook points (`set_use_attn_result`,
`set_use_split_qkv_input`, `set_use_hook_mlp_in`, `set_ungroup_grouped_query_attention`;
`set_use_attn_in` is refused, as TL refuses it for grouped-query attention); TL's
next-token loss (`lm_cross_entropy_loss`) for the forward's `return_type`.

A mixin of `GQATransformer` (it reads `blocks`, `embed`, `unembed`, `cfg` and the tokenizer
methods), kept out of decoder.py so that the decoder stays the model. Biases TL has and no
family of ours has (`b_U`, the MLPs' `b_in` / `b_out`) are zeros here, as in a converted TL
model; a MoE layer has no `W_in` / `W_out` (TL's `MoE` has none either).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from gqa_convert.model.activation_cache import ActivationCache
from gqa_convert.model.hooks import HookedRootModule

RETURN_TYPES = ("logits", "loss", "both", None)


def lm_cross_entropy_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    per_token: bool = False,
) -> Float[Tensor, ""] | Float[Tensor, "batch pos_minus_1"]:
    """TL's next-token loss: -log p(token i + 1) at each position i, averaged over the
    positions whose token and next token are both attended (`attention_mask`), or per token
    (masked positions 0)."""
    log_probs = F.log_softmax(logits, dim=-1)
    predicted = log_probs[..., :-1, :].gather(-1, tokens[..., 1:, None])[..., 0]
    n_tokens = predicted.numel()
    if attention_mask is not None:
        mask = attention_mask[:, -tokens.shape[1] :].bool()
        keep = mask[:, :-1] & mask[:, 1:]
        predicted = predicted.masked_fill(~keep, 0.0)
        n_tokens = int(keep.sum())
    return -predicted if per_token else -predicted.sum() / n_tokens


class TransformerLensAPI(HookedRootModule):
    """TL's HookedTransformer methods that need no more than the modules (see module doc)."""

    def run_with_cache(
        self,
        *model_args: Any,
        return_cache_object: bool = True,
        remove_batch_dim: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache | dict[str, Tensor]]:
        """The output and an `ActivationCache` (TL's methods; `return_cache_object=False`:
        the plain dict). Takes `HookedRootModule.run_with_cache`'s options (`names_filter`,
        `device`, `dtype`, `pos_slice`, `incl_bwd`, ...) and the forward's (`stop_at_layer`,
        `return_type`, `prepend_bos`, `padding_side`, a string or strings as input)."""
        out, cache = super().run_with_cache(
            *model_args, remove_batch_dim=remove_batch_dim, **kwargs
        )
        if return_cache_object:
            return out, ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
        return out, cache

    # ---- TL's switches ---------------------------------------------------------------------

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """`attn.hook_result`: each head's output [batch, pos, head, d_model] (memory!)."""
        self._set_attention(use_attn_result=use_attn_result)

    def set_ungroup_grouped_query_attention(self, ungroup: bool) -> None:
        """K / V (and their hooks) at n_heads, expanded, as TL's option."""
        if ungroup and self.cfg.qk_norm == "proj":
            raise ValueError("a q/k norm over the whole projection needs K at n_kv heads")
        self._set_attention(ungroup_grouped_query_attention=ungroup)

    def _set_attention(self, **change: bool) -> None:
        for block in self.blocks:
            block.attn.cfg = replace(block.attn.cfg, **change)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """`hook_q_input` / `hook_k_input` / `hook_v_input`: resid_pre copied per head
        ([batch, pos, heads, d_model], K / V at n_kv heads), each normed by ln1 on its own."""
        for block in self.blocks:
            block.use_split_qkv_input = use_split_qkv_input

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """`hook_mlp_in`: a copy of resid_mid, the MLP's input before ln2."""
        for block in self.blocks:
            block.use_hook_mlp_in = use_hook_mlp_in

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        if use_attn_in:
            raise ValueError(
                "use_attn_in needs n_heads K/V inputs: with grouped-query attention use "
                "set_use_split_qkv_input instead (TransformerLens refuses it too)"
            )

    def inactive_hooks(self) -> dict[str, str]:
        return {
            f"blocks.{i}.{name}": setting
            for i, block in enumerate(self.blocks)
            for name, setting in block.inactive_hooks().items()
        }

    # ---- weights, as TL names them ------------------------------------------------------

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        """Zeros: no family of ours has an unembedding bias."""
        return self.W_U.new_zeros(self.W_U.shape[-1])

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    def _stack(self, module: str, name: str) -> Tensor:
        return torch.stack([getattr(getattr(b, module), name) for b in self.blocks])

    @property
    def W_Q(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack("attn", "W_Q")

    @property
    def W_K(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack("attn", "W_K")

    @property
    def W_V(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack("attn", "W_V")

    @property
    def W_O(self) -> Float[Tensor, "n_layers n_heads d_head d_model"]:
        return self._stack("attn", "W_O")

    @property
    def b_Q(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack("attn", "b_Q")

    @property
    def b_K(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack("attn", "b_K")

    @property
    def b_V(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack("attn", "b_V")

    @property
    def b_O(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stack("attn", "b_O")

    @property
    def W_in(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        return self._stack("mlp", "W_in")

    @property
    def W_gate(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        return self._stack("mlp", "W_gate")

    @property
    def W_out(self) -> Float[Tensor, "n_layers d_mlp d_model"]:
        return self._stack("mlp", "W_out")

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> Float[Tensor, " d_model"]:
        """TL's: the sum of the output biases (`b_O`; MLP biases are zero here) of the layers
        before `layer`, plus layer `layer`'s `b_O` when `mlp_input`."""
        if mlp_input and layer >= self.cfg.n_layers:
            raise ValueError(f"mlp_input needs a layer < n_layers = {self.cfg.n_layers}")
        bias = torch.zeros(self.cfg.d_model, device=self.W_U.device)
        for block in self.blocks[: layer + int(mlp_input)]:
            bias += block.attn.b_O
        return bias

    # ---- tokens -------------------------------------------------------------------------

    def to_single_token(self, string: str) -> int:
        """The id of `string`, which must be one token (no BOS)."""
        ids = self.to_tokens(string, prepend_bos=False)[0]
        if ids.numel() != 1:
            raise ValueError(f"{string!r} is {ids.numel()} tokens, not one")
        return int(ids[0])

    def to_str_tokens(
        self, text: str | Int[Tensor, "... pos"] | list[int], prepend_bos: bool | None = None
    ) -> list[str]:
        """Each token of `text` (a string, tokenised as `to_tokens`, or ids) as a string."""
        if isinstance(text, str):
            text = self.to_tokens(text, prepend_bos=prepend_bos)[0]
        ids = text.flatten().tolist() if isinstance(text, Tensor) else list(text)
        return [self.tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids]

    def tokens_to_residual_directions(
        self, tokens: str | int | Int[Tensor, "..."]
    ) -> Float[Tensor, "... d_model"]:
        """TL's: the unembedding column of each token ([d_model] for one token, a string
        being one token; [..., d_model] for a tensor of several)."""
        if isinstance(tokens, Tensor) and tokens.numel() > 1:
            return self.W_U[:, tokens].movedim(0, -1)
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        elif isinstance(tokens, Tensor):
            tokens = int(tokens.item())
        elif not isinstance(tokens, int):
            raise ValueError(f"invalid token type: {type(tokens).__name__}")
        return self.W_U[:, tokens]
