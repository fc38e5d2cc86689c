"""Per-family weight maps and quirks, read from the TOML tables in `configs/`.

A family is data: which `architectures` / `model_type` names it answers to, which rows map
HF tensors to ours, which source tensors are dropped on purpose, and the few values its
modelling code hard-wires. `extends = "llama"` inherits every row of the parent and adds
its own (a child row with the same target and `when` replaces the parent's; a dropped
source, the same source and `when`).

A fused source (Phi-3's `qkv_proj`, `gate_up_proj`) is several rows with the same source,
each naming the parts its first axis is made of (`fused = ["(n h)", "(k h)", "(k h)"]`) and
the one it takes (`part = 1`). A stacked source ([n_experts, ...], `expert_axis = true`) gives
each expert `{e}` its slice first; `interleaved = true` parts alternate along the last axis
(gpt-oss's gate / up columns), `last_axis = true` parts follow each other along it (Llama
4's halves). Rows of a `variant` (MoE's "fused_experts", transformers' in-memory layout)
replace the default rows of the same target when the checkpoint holds their sources
(mapping.plan_tasks).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from gqa_convert.errors import UnsupportedModelError

SLIDING_WINDOW_RULES = (
    "never",
    "always",
    "qwen2",
    "no_rope_layers",
    "pattern",
    "pattern_first",
    "use_sliding_window",
)
# Conditions a row's `when` may name: config flags, or the kind of the layer's MLP, or
# of its attention (Gemma 4: local / global sizes; K/V of its own, V of its own, shared).
MLP_KINDS = ("dense", "ungated", "moe")
ATTN_KINDS = ("local", "global", "own_kv", "own_v", "shared_kv")
WHEN = (
    "qkv_bias",
    "o_bias",
    "mlp_bias",
    "norm_bias",
    "qk_norm",
    "xielu",
    "tied",
    "untied",
    "shared_expert",
    "per_layer_input",
    *MLP_KINDS,
    *ATTN_KINDS,
)


# Models transformers runs whose layers are not all GQA attention, by config.json's
# model_type (the text model's and the composite's) and architecture: refused with the
# reason, not as an unknown architecture.
GATED_DELTANET = (
    "three layers in four are Gated DeltaNet (linear attention) layers, not GQA attention"
)
LATENT_ATTENTION = (
    "its attention is multi-head latent attention (low-rank compressed K/V shared by every "
    "head), not GQA"
)
NOT_GQA = {
    "qwen3_5": ("Qwen 3.5", GATED_DELTANET),
    "qwen3_5_text": ("Qwen 3.5", GATED_DELTANET),
    "qwen3_5_moe": ("Qwen 3.5-MoE", GATED_DELTANET),
    "qwen3_5_moe_text": ("Qwen 3.5-MoE", GATED_DELTANET),
    "qwen3_next": ("Qwen3-Next", GATED_DELTANET),
    "mistral4": ("Mistral 4", LATENT_ATTENTION),
    "glm4_moe_lite": ("GLM-4.7-Flash (glm4_moe_lite)", LATENT_ATTENTION),
}
NOT_GQA_ARCHITECTURES = {
    "Qwen3_5ForCausalLM": "qwen3_5",
    "Qwen3_5ForConditionalGeneration": "qwen3_5",
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe",
    "Qwen3_5MoeForConditionalGeneration": "qwen3_5_moe",
    "Qwen3NextForCausalLM": "qwen3_next",
    "Mistral4ForCausalLM": "mistral4",
    "Glm4MoeLiteForCausalLM": "glm4_moe_lite",
}


@dataclass(frozen=True)
class TensorRow:
    """One line of a family's weight map. `{l}` in names stands for the layer index."""

    source: str
    target: str | None = None  # None for dropped sources
    layout: str | None = None  # einops pattern, e.g. "(n h) m -> n m h"
    # Conditions, all of which must hold: config flags (qkv_bias, o_bias, mlp_bias, qk_norm,
    # xielu, tied, untied) or the kind of the layer's MLP (dense: gated, ungated, moe).
    when: str | tuple[str, ...] | None = None
    drop: bool = False
    fused: tuple[str, ...] = ()  # the parts of a fused source's first axis, as axis groups
    part: int | None = None  # which of `fused` this row takes
    # The source's first axis is the expert (a stacked [n_experts, ...] tensor): the row
    # takes expert {e}, then `fused` / `part` act on the next axis.
    expert_axis: bool = False
    # The `fused` parts alternate along the source's last axis instead of following each
    # other on its first (gpt-oss's gate_up_proj [E, d_model, 2 * d_expert]: gate
    # `[..., ::2]`, up `[..., 1::2]`).
    interleaved: bool = False
    # The `fused` parts follow each other along the source's last axis (Llama 4's
    # gate_up_proj [E, d_model, 2 * d_expert]: gate `[..., :i]`, up `[..., i:]`).
    last_axis: bool = False
    # A layout some checkpoints use instead of the default rows' (e.g. "fused_experts"):
    # its rows replace the default rows of the same target when the plan finds their sources.
    variant: str | None = None
    # In a child table: the parent's row of this key is removed, none added (Cohere's
    # parallel block has no ln2).
    omit: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "fused", tuple(self.fused))
        when = (self.when,) if isinstance(self.when, str) else tuple(self.when or ())
        object.__setattr__(self, "when", when)
        if not set(when) <= set(WHEN):
            raise ValueError(f"tensor row {self.source}: `when` {when} (known: {WHEN})")
        if bool(self.fused) != (self.part is not None) or (
            self.fused and not 0 <= self.part < len(self.fused)
        ):
            raise ValueError(f"tensor row {self.source}: `fused` and `part` go together")

    @property
    def key(self) -> tuple[str | None, tuple[str, ...], str | None]:
        """What a child row replaces: the parent's row with the same key."""
        return (self.target or self.source, self.when, self.variant)

    @property
    def per_layer(self) -> bool:
        return "{l}" in self.source

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.source


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    sliding_window_rule: str
    fixed: dict[str, Any]  # values the family's code hard-wires (qkv_bias, qk_norm, ...)
    defaults: dict[str, Any]  # config.json fields it reads beyond Llama's, with their defaults
    rope_aliases: dict[str, str]  # rope_type spellings its config class renames
    rows: tuple[TensorRow, ...]
    # The config.json field its MLP reads the activation from (Gemma 2/3: hidden_activation),
    # and the activation spellings its config class renames (Gemma: gelu -> gelu_pytorch_tanh).
    activation_field: str = "hidden_act"
    activation_aliases: dict[str, str] = field(default_factory=dict)
    # MoE settings (config.MoEConfig fields): a config.json field name, a list of spellings,
    # or a value the modelling code hard-wires; empty for dense families.
    moe: dict[str, Any] = field(default_factory=dict)
    # The transformers class a checkpoint of this family loads as when it is not one of
    # `architectures` (InternLM3: LlamaForCausalLM), matched together with `model_types`.
    loads_as: str | None = None
    # config.json spellings the config class renames (its attribute_map): alias -> field.
    field_aliases: dict[str, str] = field(default_factory=dict)
    # The config.json field that switches the q/k/v, o and MLP biases on (qkv, o, mlp);
    # a bias the family's code hard-wires is in `fixed` (qkv_bias, o_bias, mlp_bias).
    bias_fields: dict[str, str] = field(default_factory=dict)
    eps_field: str = "rms_norm_eps"  # Cohere: layer_norm_eps, StarCoder2: norm_epsilon
    # Whether the config class reads `layer_types` (Mistral's and Llama's ignore it).
    reads_layer_types: bool = False
    # Layers after the last that transformers ignores (GLM-4.5's multi-token prediction):
    # the name prefix of a layer's tensors, `{l}` its index; sources under it at indices >=
    # n_layers are dropped.
    extra_layers: str | None = None

    def rows_for(self, variant: str | None = None) -> tuple[TensorRow, ...]:
        """The default rows, or those of `variant` in place of the defaults they replace."""
        chosen = [r for r in self.rows if variant is not None and r.variant == variant]
        replaced = {(r.target, r.when) for r in chosen}
        default = [r for r in self.rows if r.variant is None]
        return (*(r for r in default if (r.target, r.when) not in replaced), *chosen)

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.variant for r in self.rows if r.variant))


def _read_table(name: str) -> dict[str, Any]:
    path = resources.files("gqa_convert.configs") / f"{name}.toml"
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _build(name: str) -> Family:
    table = _read_table(name)
    parent = _build(table["extends"]) if "extends" in table else None
    rows = list(parent.rows) if parent else []
    for raw in table.get("tensors", []):
        row = TensorRow(**raw)
        rows = [r for r in rows if r.key != row.key]
        if not row.omit:
            rows.append(row)
    rule = table.get("sliding_window_rule", parent.sliding_window_rule if parent else "never")
    if rule not in SLIDING_WINDOW_RULES:
        raise ValueError(f"configs/{name}.toml: unknown sliding_window_rule {rule!r}")
    return Family(
        name=name,
        architectures=tuple(table["architectures"]),
        model_types=tuple(table.get("model_types", ())),
        sliding_window_rule=rule,
        fixed={**(parent.fixed if parent else {}), **table.get("fixed", {})},
        defaults={**(parent.defaults if parent else {}), **table.get("defaults", {})},
        rope_aliases={**(parent.rope_aliases if parent else {}), **table.get("rope_aliases", {})},
        rows=tuple(rows),
        activation_field=table.get(
            "activation_field", parent.activation_field if parent else "hidden_act"
        ),
        activation_aliases={
            **(parent.activation_aliases if parent else {}),
            **table.get("activation_aliases", {}),
        },
        moe={**(parent.moe if parent else {}), **table.get("moe", {})},
        loads_as=table.get("loads_as"),
        field_aliases={
            **(parent.field_aliases if parent else {}),
            **table.get("field_aliases", {}),
        },
        bias_fields={**(parent.bias_fields if parent else {}), **table.get("bias_fields", {})},
        eps_field=table.get("eps_field", parent.eps_field if parent else "rms_norm_eps"),
        reads_layer_types=table.get(
            "reads_layer_types", parent.reads_layer_types if parent else False
        ),
        extra_layers=table.get("extra_layers"),
    )


@cache
def families() -> tuple[Family, ...]:
    """Every family shipped in `configs/`, in name order."""
    names = sorted(
        entry.name.removesuffix(".toml")
        for entry in resources.files("gqa_convert.configs").iterdir()
        if entry.name.endswith(".toml")
    )
    return tuple(_build(name) for name in names)


def supported_architectures() -> list[str]:
    return sorted(arch for family in families() for arch in family.architectures)


def family_for(architectures: list[str] | None, model_type: str | None) -> Family:
    """The family for config.json's `architectures` and `model_type`: the one naming both
    (its architecture, or the class it loads as, with its model type: transformers picks the
    config class by model type), else the one naming the architecture, else, without
    `architectures`, the one naming the model type."""
    arch = architectures[0] if architectures else None
    for family in families():
        if model_type in family.model_types and arch in (*family.architectures, family.loads_as):
            return family
    for family in families():
        if arch is not None and arch in family.architectures:
            return family
        if arch is None and model_type in family.model_types:
            return family
    stated = f"architectures={architectures!r}" if architectures else f"model_type={model_type!r}"
    refused = NOT_GQA.get(model_type) or NOT_GQA.get(NOT_GQA_ARCHITECTURES.get(arch))
    if refused:
        name, why = refused
        raise UnsupportedModelError(f"config.json: {stated}: {name} is not supported: {why}")
    raise UnsupportedModelError(
        f"config.json: unsupported architecture ({stated}); "
        f"supported: {', '.join(supported_architectures())}"
    )
