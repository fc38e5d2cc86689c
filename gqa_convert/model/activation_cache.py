"""`ActivationCache`: what `run_with_cache` returns, with TransformerLens 3.9's semantics.

Written here (TL is an optional extra), method for method as TL's `ActivationCache` and with
its results on the same activations (tests/test_activation_cache.py runs both):

- a dict of {hook name: activation} with TL's key shorthand (`get_act_name`):
  `cache["resid_post", 0]`, `cache["q", 1, "attn"]`, `cache["scale", 2, "ln1"]`,
  `cache["pre5"]`, negative layers counting from the end;
- the residual stream: `accumulated_resid` (logit lens), `decompose_resid`,
  `stack_head_results` / `compute_head_results` (per-head outputs from `hook_z` and `W_O`),
  `stack_neuron_results` / `get_neuron_results`, `get_full_resid_decomposition`,
  `stack_activation`;
- `apply_ln_to_stack` (divides by the cached `hook_scale` of the layer's norm, or recomputes
  `ln_final` per component for the logit lens) and `logit_attrs`;
- `pos_slice` / `batch_slice` arguments in TL's `Slice` semantics, `remove_batch_dim`,
  `apply_slice_to_batch_dim`, `to`, `keys` / `values` / `items` / iteration / `len`.

What the methods read from the model: `cfg.n_layers`, `n_heads`, `d_mlp`, `d_model`,
`normalization_type`, `attn_only`; `blocks[l].attn.W_O`, `blocks[l].mlp.W_out`,
`ln_final`, `accumulated_bias`, `tokens_to_residual_directions`, `to_single_token`
(GQATransformer has them all, as TL's HookedTransformer). Tensors are created on the cached
activations' device (TL uses `cfg.device`). Neuron results need a dense MLP: on an MoE layer
they raise an error (TL's `MoE` has no `W_out` either).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import ItemsView, Iterator, KeysView, ValuesView
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

log = logging.getLogger(__name__)

SliceInput = int | tuple | list | slice | Tensor | np.ndarray | None


class Slice:
    """TL's `Slice`: None leaves a dimension as it is; an int indexes it (the dimension
    goes); a tuple is `slice(*t)`; a list, tensor or array of indices takes those."""

    def __init__(self, input_slice: SliceInput = None):
        if isinstance(input_slice, tuple):
            self.slice, self.mode = slice(*input_slice), "slice"
        elif isinstance(input_slice, int):
            self.slice, self.mode = input_slice, "int"
        elif isinstance(input_slice, slice):
            self.slice, self.mode = input_slice, "slice"
        elif isinstance(input_slice, list | Tensor | np.ndarray):
            values = input_slice.detach().cpu() if isinstance(input_slice, Tensor) else input_slice
            self.slice, self.mode = np.asarray(values), "array"
        elif input_slice is None:
            self.slice, self.mode = slice(None), "identity"
        else:
            raise ValueError(f"invalid slice {input_slice!r}")

    def apply(self, tensor: Tensor, dim: int = 0) -> Tensor:
        index: list[Any] = [slice(None)] * tensor.ndim
        index[dim] = self.slice
        return tensor[tuple(index)]

    def indices(self, max_ctx: int | None = None) -> np.ndarray:
        if self.mode == "int":
            return np.array([self.slice], dtype=np.int64)
        if max_ctx is None:
            raise ValueError("max_ctx must be given for a slice that is not an int")
        return np.arange(max_ctx, dtype=np.int64)[self.slice]

    def __repr__(self) -> str:
        return f"Slice: {self.slice} Mode: {self.mode} "

    @classmethod
    def unwrap(cls, slice_input: Slice | SliceInput) -> Slice:
        """A Slice; an int becomes [int], so that the dimension stays (run_with_cache's)."""
        if isinstance(slice_input, Slice):
            return slice_input
        return cls([slice_input] if isinstance(slice_input, int) else slice_input)


def as_slice(value: Slice | SliceInput) -> Slice:
    return value if isinstance(value, Slice) else Slice(value)


ACT_ALIASES = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_mid": "mid",
    "mlp_post": "post",
}
LAYER_TYPE_ALIASES = {
    "a": "attn",
    "m": "mlp",
    "b": "",
    "block": "",
    "blocks": "",
    "attention": "attn",
}
ATTN_ACTS = ("k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores")
MLP_ACTS = ("pre", "post", "mid", "pre_linear")


def get_act_name(name: str, layer: int | str | None = None, layer_type: str | None = None) -> str:
    """TL's `utils.get_act_name`: shorthand -> hook name. `("resid_post", 0)` ->
    "blocks.0.hook_resid_post", `("q", 1)` -> "blocks.1.attn.hook_q", `"pre5"` ->
    "blocks.5.mlp.hook_pre", `("scale", 4, "ln1")` -> "blocks.4.ln1.hook_scale",
    `"scale"` -> "ln_final.hook_scale", a full name -> itself."""
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    match = re.match(r"([a-z]+)(\d+)([a-z]?.*)", name)
    if match is not None:
        name, layer, layer_type = match.groups(0)  # type: ignore[assignment]
    name = ACT_ALIASES.get(name, name)
    if name in ATTN_ACTS:
        layer_type = "attn"
    elif name in MLP_ACTS:
        layer_type = "mlp"
    elif layer_type in LAYER_TYPE_ALIASES:
        layer_type = LAYER_TYPE_ALIASES[layer_type]
    full = f"blocks.{layer}." if layer is not None else ""
    if layer_type:
        full += f"{layer_type}."
    full += f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return full


class ActivationCache:
    """{hook name: activation} of one forward pass, with TL's methods (see the module doc).
    `model`: the model that ran (GQATransformer); `has_batch_dim`: False after
    `remove_batch_dim`."""

    def __init__(self, cache_dict: dict[str, Tensor], model: Any, has_batch_dim: bool = True):
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim
        self.has_embed = "hook_embed" in cache_dict
        self.has_pos_embed = "hook_pos_embed" in cache_dict

    # ---- a dict ---------------------------------------------------------------------------

    def __getitem__(self, key: str | tuple) -> Tensor:
        """By hook name, or TL's shorthand: a string or (name, layer[, layer_type])."""
        if isinstance(key, str):
            return self.cache_dict[key if key in self.cache_dict else get_act_name(key)]
        if len(key) > 1 and key[1] is not None and key[1] < 0:
            key = (key[0], self.model.cfg.n_layers + key[1], *key[2:])
        return self.cache_dict[get_act_name(*key)]

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __contains__(self, key: object) -> bool:
        return key in self.cache_dict

    def __repr__(self) -> str:
        return f"ActivationCache with keys {list(self.cache_dict)}"

    def keys(self) -> KeysView[str]:
        return self.cache_dict.keys()

    def values(self) -> ValuesView[Tensor]:
        return self.cache_dict.values()

    def items(self) -> ItemsView[str, Tensor]:
        return self.cache_dict.items()

    def to(self, device: str | torch.device) -> ActivationCache:
        """Every activation moved to `device` (in place; returns self)."""
        self.cache_dict = {k: v.to(device) for k, v in self.cache_dict.items()}
        return self

    def toggle_autodiff(self, mode: bool = False) -> None:
        """TL's: `torch.set_grad_enabled(mode)`, globally."""
        log.warning("Changed the global state, set autodiff to %s", mode)
        torch.set_grad_enabled(mode)

    # ---- the batch dimension ---------------------------------------------------------------

    def _batch_size(self) -> int:
        """The most common leading size among the activations (TL's rule)."""
        counts = Counter(v.shape[0] for v in self.cache_dict.values() if v.ndim > 0)
        return counts.most_common(1)[0][0] if counts else 1

    def remove_batch_dim(self) -> ActivationCache:
        """Drop the batch dimension of a batch of one (in place; returns self)."""
        if not self.has_batch_dim:
            log.warning("Tried removing batch dimension after already having removed it.")
            return self
        if (size := self._batch_size()) != 1:
            raise ValueError(f"cannot remove the batch dimension of a batch of {size}")
        for key, value in self.cache_dict.items():
            if value.ndim > 0 and value.shape[0] == 1:
                self.cache_dict[key] = value[0]
        self.has_batch_dim = False
        return self

    def apply_slice_to_batch_dim(self, batch_slice: Slice | SliceInput) -> ActivationCache:
        """A new cache of the rows `batch_slice` takes (an int drops the dimension)."""
        batch_slice = as_slice(batch_slice)
        if not (self.has_batch_dim or batch_slice.mode == "empty"):
            raise ValueError("cannot index into a cache without a batch dimension")
        size = self._batch_size()
        sliced = {
            name: batch_slice.apply(value) if value.ndim > 0 and value.shape[0] == size else value
            for name, value in self.cache_dict.items()
        }
        keeps_batch = batch_slice.mode != "int" and self.has_batch_dim
        return ActivationCache(sliced, self.model, has_batch_dim=keeps_batch)

    # ---- the residual stream ---------------------------------------------------------------

    def _layer(self, layer: int | None) -> int:
        """None and -1 mean n_layers (the input of the unembedding)."""
        return self.model.cfg.n_layers if layer is None or layer == -1 else layer

    def _device(self) -> torch.device:
        return next(iter(self.cache_dict.values())).device

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: Slice | SliceInput = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:
        """[components, *batch_and_pos, d_model]: resid_pre of each layer up to `layer`
        (and resid_mid of each with `incl_mid`, of `layer` with `mlp_input`); `layer` =
        n_layers (None, -1) ends with the final resid_post ("final_post"). `apply_ln`:
        through ln_final, recomputed per component, at n_layers; else the cached scale."""
        pos_slice = as_slice(pos_slice)
        layer = self._layer(layer)
        n_layers = self.model.cfg.n_layers
        labels, parts = [], []
        for i in range(layer + 1):
            if i == n_layers:
                parts.append(self["resid_post", n_layers - 1])
                labels.append("final_post")
                continue
            parts.append(self["resid_pre", i])
            labels.append(f"{i}_pre")
            if (incl_mid and i < layer) or (mlp_input and i == layer):
                parts.append(self["resid_mid", i])
                labels.append(f"{i}_mid")
        stack = torch.stack([pos_slice.apply(p, dim=-2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(
                stack,
                layer,
                pos_slice=pos_slice,
                mlp_input=mlp_input,
                has_batch_dim=self.has_batch_dim,
                recompute_ln=layer == n_layers,
            )
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: Slice | SliceInput = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:
        """The input of `layer` (its MLP's with `mlp_input`) as a stack of what wrote it:
        the embedding, then each layer's attn_out and mlp_out (`mode` "attn" / "mlp": one
        kind only)."""
        pos_slice = as_slice(pos_slice)
        layer = self._layer(layer)
        incl_attn, incl_mlp = mode != "mlp", mode != "attn" and not self.model.cfg.attn_only
        parts, labels = [], []
        if incl_embeds:
            for key, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
                if key in self.cache_dict:
                    parts.append(self[key])
                    labels.append(label)
        for i in range(layer):
            if incl_attn:
                parts.append(self["attn_out", i])
                labels.append(f"{i}_attn_out")
            if incl_mlp:
                parts.append(self["mlp_out", i])
                labels.append(f"{i}_mlp_out")
        if mlp_input and incl_attn:
            parts.append(self["attn_out", layer])
            labels.append(f"{layer}_attn_out")
        stack = torch.stack([pos_slice.apply(p, dim=-2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    def compute_head_results(self) -> None:
        """Cache each head's output, `blocks.{l}.attn.hook_result` [*batch_and_pos, head,
        d_model] = z_h W_O[h] (attn_out = their sum + b_O), unless already cached."""
        if "blocks.0.attn.hook_result" in self.cache_dict:
            log.warning("Tried to compute head results when they were already cached")
            return
        for i in range(self.model.cfg.n_layers):
            z = self["z", i, "attn"][..., None]  # [..., head, d_head, 1]
            result = (z * self.model.blocks[i].attn.W_O).sum(dim=-2)
            self.cache_dict[f"blocks.{i}.attn.hook_result"] = result

    def stack_head_results(
        self,
        layer: int = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: Slice | SliceInput = None,
        apply_ln: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:
        """[layer * n_heads (+1), *batch_and_pos, d_model]: each head's output in the layers
        before `layer` ("L0H0", ...), and with `incl_remainder` the rest of resid_post."""
        pos_slice = as_slice(pos_slice)
        layer = self._layer(layer)
        self.compute_head_results()
        labels: list[str] = []
        parts = []
        for i in range(layer):
            parts.append(pos_slice.apply(self["result", i, "attn"], dim=-3))
            labels.extend(f"L{i}H{h}" for h in range(self.model.cfg.n_heads))
        if parts:
            stack = torch.cat(parts, dim=-2).movedim(-2, 0)  # [heads, ..., d_model]
            if incl_remainder:
                rest = pos_slice.apply(self["resid_post", layer - 1], dim=-2) - stack.sum(0)
                stack = torch.cat([stack, rest[None]])
                labels.append("remainder")
        elif incl_remainder:
            stack = pos_slice.apply(self["resid_post", layer - 1], dim=-2)[None]
            labels.append("remainder")
        else:
            shape = pos_slice.apply(self["hook_embed"], dim=-2).shape
            stack = torch.zeros(0, *shape, device=self._device())
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_activation(
        self, activation_name: str, layer: int = -1, sublayer_type: str | None = None
    ) -> Tensor:
        """[layer, ...]: the activation `activation_name` of each layer before `layer`."""
        layer = self._layer(layer)
        return torch.stack([self[activation_name, i, sublayer_type] for i in range(layer)])

    def _dense_mlp(self, layer: int) -> Any:
        mlp = self.model.blocks[layer].mlp
        if not hasattr(mlp, "W_out"):
            raise ValueError(
                f"layer {layer}'s MLP is a mixture of experts: neuron results need a dense MLP"
            )
        return mlp

    def get_neuron_results(
        self,
        layer: int,
        neuron_slice: Slice | SliceInput = None,
        pos_slice: Slice | SliceInput = None,
        project_output_onto: Tensor | None = None,
    ) -> Tensor:
        """Each neuron's output of `layer`, post_n * W_out[n]: [..., neurons, d_model], or
        projected onto `project_output_onto` ([d_model] or [d_model, n_outs])."""
        neuron_slice, pos_slice = as_slice(neuron_slice), as_slice(pos_slice)
        W_out = neuron_slice.apply(self._dense_mlp(layer).W_out, dim=0)
        acts = pos_slice.apply(self["post", layer, "mlp"], dim=-2)
        acts = neuron_slice.apply(acts, dim=-1)
        if project_output_onto is None:
            return acts[..., None] * W_out
        projected = W_out @ project_output_onto
        return acts * projected if projected.ndim == 1 else acts[..., None] * projected

    def _cached_ln_scale(
        self, layer: int | None, mlp_input: bool, pos_slice: Slice, batch_slice: Slice | None = None
    ) -> Tensor:
        n_layers = self.model.cfg.n_layers
        if layer is None or layer == n_layers:
            key = "ln_final.hook_scale"
        else:
            key = f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
        if key not in self.cache_dict:
            raise KeyError(f"apply_ln needs the cached norm scale {key!r}, which is not cached")
        scale = pos_slice.apply(self.cache_dict[key], dim=-2)
        if batch_slice is not None and self.has_batch_dim:
            scale = batch_slice.apply(scale)
        return scale

    def stack_neuron_results(
        self,
        layer: int,
        pos_slice: Slice | SliceInput = None,
        neuron_slice: Slice | SliceInput = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        apply_ln: bool = False,
        project_output_onto: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, list[str]]:
        """[layer * neurons (+1), *batch_and_pos, d_model (or n_outs)]: every neuron's output
        in the layers before `layer` ("L0N0", ...), as `get_neuron_results`."""
        layer = self._layer(layer)
        neuron_slice, pos_slice = as_slice(neuron_slice), as_slice(pos_slice)
        project, squeeze = project_output_onto, False
        if project is not None and project.ndim == 1:
            project, squeeze = project[:, None], True
        neurons = neuron_slice.apply(torch.arange(self.model.cfg.d_mlp), dim=0)
        neurons = [int(neurons)] if neurons.ndim == 0 else neurons.tolist()
        labels = [f"L{i}N{n}" for i in range(layer) for n in neurons]
        template = pos_slice.apply(self["hook_embed"], dim=-2)
        if project is not None:
            template = template[..., :1].expand(*template.shape[:-1], project.shape[-1])
        rest = pos_slice.apply(self["resid_post", layer - 1], dim=-2) if incl_remainder else None
        if apply_ln and project is not None:
            # The cached-scale norm is linear: (a_n / s) * (W_out[n] @ p), without the
            # [..., d_mlp, d_model] intermediate (no centering: RMSNorm).
            scale = self._cached_ln_scale(layer, False, pos_slice)
            parts = []
            for i in range(layer):
                acts = neuron_slice.apply(pos_slice.apply(self["post", i, "mlp"], dim=-2), -1)
                W_out = neuron_slice.apply(self._dense_mlp(i).W_out, dim=0)
                parts.append((acts / scale)[..., None] * (W_out @ project))
            if rest is not None:
                rest = self.apply_ln_to_stack(rest[None], layer, pos_slice=pos_slice)[0]
            apply_ln = False  # applied
        else:
            parts = [
                self.get_neuron_results(i, neuron_slice, pos_slice, project) for i in range(layer)
            ]
        if parts:
            stack = torch.cat(parts, dim=-2).movedim(-2, 0)  # [neurons, ..., d]
        else:
            stack = torch.zeros(0, *template.shape, device=self._device())
        if rest is not None:
            rest = rest @ project if project is not None else rest
            stack = torch.cat([stack, (rest - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        if squeeze:
            stack = stack.squeeze(-1)
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(
        self,
        residual_stack: Float[Tensor, "components *batch_and_pos d_model"],
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: Slice | SliceInput = None,
        batch_slice: Slice | SliceInput = None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
    ) -> Float[Tensor, "components *batch_and_pos d_model"]:
        """Each component as the input of `layer`'s norm (ln1, ln2 with `mlp_input`,
        ln_final at n_layers) sees it: divided by that norm's cached `hook_scale` (no weight:
        TL's semantics). `recompute_ln` at n_layers: ln_final applied to each component on
        its own (its own scale, and the weight), the logit lens."""
        if self.model.cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre"):
            return residual_stack
        pos_slice, batch_slice = as_slice(pos_slice), as_slice(batch_slice)
        layer = self._layer(layer)
        if has_batch_dim:
            residual_stack = batch_slice.apply(residual_stack, dim=1)
        if recompute_ln and layer == self.model.cfg.n_layers:
            out = []
            for x in residual_stack:
                shape = x.shape
                x = x if has_batch_dim else x[None]
                x = x[:, None] if x.ndim == 2 else x
                out.append(self.model.ln_final(x).reshape(shape))
            return torch.stack(out)
        if self.model.cfg.normalization_type in ("LN", "LNPre"):
            residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
        return residual_stack / self._cached_ln_scale(layer, mlp_input, pos_slice, batch_slice)

    def logit_attrs(
        self,
        residual_stack: Float[Tensor, "components *batch_and_pos d_model"],
        tokens: str | int | Int[Tensor, "..."],
        incorrect_tokens: str | int | Int[Tensor, "..."] | None = None,
        pos_slice: Slice | SliceInput = None,
        batch_slice: Slice | SliceInput = None,
        has_batch_dim: bool = True,
    ) -> Float[Tensor, " components *batch_and_pos"]:
        """How much each component writes along the unembedding direction of `tokens`
        (minus that of `incorrect_tokens`), after the final norm's cached scale."""
        directions = self.model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            if _token_shape(self.model, tokens) != _token_shape(self.model, incorrect_tokens):
                raise ValueError("tokens and incorrect_tokens must have the same shape")
            directions = directions - self.model.tokens_to_residual_directions(incorrect_tokens)
        scaled = self.apply_ln_to_stack(
            residual_stack,
            layer=-1,
            pos_slice=pos_slice,
            batch_slice=batch_slice,
            has_batch_dim=has_batch_dim,
        )
        return (scaled * directions).sum(dim=-1)

    def get_full_resid_decomposition(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice: Slice | SliceInput = None,
        return_labels: bool = False,
        project_output_onto: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, list[str]]:
        """The input of `layer` as every head's output, every neuron's (or each MLP's,
        `expand_neurons=False`), the embedding and the accumulated biases, in TL's order
        and labels; `project_output_onto` as in `get_neuron_results`."""
        layer = self._layer(layer)
        pos_slice = as_slice(pos_slice)
        project, squeeze = project_output_onto, False
        if project is not None and project.ndim == 1:
            project, squeeze = project[:, None], True
        folded = apply_ln and project is not None

        def finish(stack: Tensor) -> Tensor:  # each small part: norm, then projection
            if folded:
                stack = self.apply_ln_to_stack(
                    stack, layer, pos_slice=pos_slice, mlp_input=mlp_input
                )
            return stack @ project if project is not None else stack

        heads, labels = self.stack_head_results(
            layer + int(mlp_input), pos_slice=pos_slice, return_labels=True
        )
        parts = [finish(heads)]
        if not self.model.cfg.attn_only and layer > 0:
            if expand_neurons:
                neurons, neuron_labels = self.stack_neuron_results(
                    layer,
                    pos_slice=pos_slice,
                    return_labels=True,
                    apply_ln=folded,
                    project_output_onto=project,
                )
                parts.append(neurons)
            else:
                mlps, neuron_labels = self.decompose_resid(
                    layer,
                    mlp_input=mlp_input,
                    pos_slice=pos_slice,
                    incl_embeds=False,
                    mode="mlp",
                    return_labels=True,
                )
                parts.append(finish(mlps))
            labels.extend(neuron_labels)
        for key, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
            if key in self.cache_dict:
                parts.append(finish(pos_slice.apply(self[key], -2)[None]))
                labels.append(label)
        bias = self.model.accumulated_bias(layer, mlp_input, include_mlp_biases=expand_neurons)
        if folded:
            shape = (1, *heads.shape[1:-1], self.model.cfg.d_model)
            parts.append(finish(bias.expand(shape)))
        else:
            if project is not None:
                bias = bias @ project
            parts.append(bias.expand((1, *parts[0].shape[1:])))
        labels.append("bias")
        stack = torch.cat(parts)
        if apply_ln and not folded:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        if squeeze:
            stack = stack.squeeze(-1)
        return (stack, labels) if return_labels else stack


def _token_shape(model: Any, tokens: str | int | Tensor) -> tuple[int, ...]:
    if isinstance(tokens, str):
        return ()
    return tuple(torch.as_tensor(tokens).shape)
