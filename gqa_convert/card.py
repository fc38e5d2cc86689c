"""The model card (README.md) of an export: front matter, layout, how to load, parity."""

from __future__ import annotations

from typing import Any

from gqa_convert.config import ModelConfig


def _front_matter(cfg: ModelConfig, manifest: dict[str, Any]) -> str:
    source = manifest["source"]["id"]
    lines = ["---", "library_name: gqa-convert"]
    if manifest["source"].get("hub") and _is_hub_id(source):
        lines.append(f"base_model: {source}")
    lines += [
        "tags:",
        "- gqa-convert",
        "- transformer-lens",
        "- grouped-query-attention",
        f"- {cfg.family}",
        "---",
    ]
    return "\n".join(lines)


def _is_hub_id(source: str) -> bool:
    """`org/name` with no path look (local sources are recorded as absolute paths)."""
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~"))


def _parity(manifest: dict[str, Any]) -> str:
    verification = manifest["verification"]
    report = verification.get("report")
    if verification["status"] == "skipped" or not report:
        return "Verification was **skipped** (`--no-verify`): logits were not compared with HF's."
    head = "The logits of this export's files were compared with the HF model's" + (
        " and **failed**; it was exported with `--force`."
        if verification["status"] != "passed"
        else "."
    )
    rows = [
        ("passed", report.get("passed")),
        ("compute dtype", report.get("dtype")),
        ("tokens", report.get("tokens")),
        ("max abs logit diff", report.get("max_abs_logit_diff")),
        ("mean abs logit diff", report.get("mean_abs_logit_diff")),
        ("max abs log-prob diff", report.get("max_abs_logprob_diff")),
        ("KL(HF || ours) max", report.get("kl_max")),
        ("top-1 agreement", report.get("top1_agreement")),
        ("routing agreement (MoE)", report.get("routing_agreement")),
    ]
    table = "\n".join(f"| {name} | {_fmt(value)} |" for name, value in rows if value is not None)
    return f"{head}\n\n| figure | value |\n| --- | --- |\n{table}"


def _dequantised(manifest: dict[str, Any]) -> str:
    """A sentence on a quantised source: its weights were dequantised (dense here)."""
    quantization = manifest["source"].get("quantization")
    if not quantization:
        return ""
    how = ", ".join(str(quantization[k]) for k in ("method", "format") if quantization.get(k))
    return (
        f" The source is quantised ({how}): its weights were dequantised, so these are"
        " dense, and were checked against transformers' own dequantisation of it."
    )


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _norm_offset(cfg: ModelConfig) -> str:
    """For Gemma: how our norm weights and embedding relate to TransformerLens's."""
    if not cfg.norm_offset:
        return ""
    post = ", `ln1_post.w`, `ln2_post.w`" if cfg.norm_placement == "sandwich" else ""
    qk = ", `attn.q_norm.w`, `attn.k_norm.w`" if cfg.qk_norm else ""
    return f"""
## Norm weights and embedding scale ({cfg.family})

Every RMSNorm weight here (`ln1.w`, `ln2.w`{post}{qk}, `ln_final.w`) is the checkpoint's
own `w`, stored as HF stores it; the norm computes `x * ({cfg.norm_offset:g} + w)` in fp32,
then casts, as {cfg.architecture}'s RMSNorm does. TransformerLens 3.9's processed Gemma
weights hold `{cfg.norm_offset:g} + w` instead, and its `embed.W_E` is ours times
sqrt(d_model) = {cfg.embedding_multiplier:.6g} (our model multiplies the embeddings by it, that
number rounded to the compute dtype first, as HF does). `to_hooked_transformer` makes both
conversions, so TransformerLens computes HF's logits; `to-hf` gives back the original bytes.
"""


def _mlp_rows(cfg: ModelConfig) -> str:
    """The layout rows of the MLPs: dense, and an MoE layer's router and experts."""
    dense = (
        "| `blocks.{l}.mlp.W_gate`, `.W_in` / `.W_out` | `[d_model, d_mlp]` / `[d_mlp, d_model]` |"
    )
    if cfg.moe is None:
        return dense
    m, e, i = cfg.d_model, cfg.moe.n_experts, cfg.moe.d_expert
    rows = [
        f"| MoE layers: `blocks.{{l}}.mlp.W_gate` (router) | `[d_model, n_experts]`: `{[m, e]}` |",
        f"| `blocks.{{l}}.mlp.experts.{{e}}.W_gate`, `.W_in` / `.W_out` | `{[m, i]}` / `{[i, m]}` "
        f"(top {cfg.moe.top_k} of {e} experts per token) |",
    ]
    if cfg.moe.dense_mlp:  # Gemma 4: a dense MLP beside the experts on every MoE layer
        rows.append(
            "| MoE layers: `blocks.{l}.mlp.dense.W_gate`, `.W_in` / `.W_out` (beside the "
            f"experts) | `[d_model, d_mlp]` / `[d_mlp, d_model]`: `{[m, cfg.d_mlp]}` |"
        )
    dense_layers = [n for n, moe in enumerate(cfg.moe.layers) if not moe]
    if dense_layers:
        rows.insert(0, dense.replace("| `blocks", f"| dense layers {dense_layers}: `blocks", 1))
    return "\n".join(rows)


def render_model_card(cfg: ModelConfig, manifest: dict[str, Any]) -> str:
    """The README.md text for an export described by `manifest` (see export.build_manifest)."""
    source = manifest["source"]["id"]
    tool = manifest["tool"]
    h, kv = cfg.d_head, cfg.n_key_value_heads
    return f"""{_front_matter(cfg, manifest)}

# {source.rstrip("/").split("/")[-1]} in grouped-query-attention form

`{source}` ({cfg.architecture}) converted by gqa-convert {tool["version"]} into the
TransformerLens layout: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} query heads
sharing {cfg.n_key_value_heads} key/value heads (groups of {cfg.group_size}), d_head {cfg.d_head},
dtype {manifest["output"]["dtype"]}.{_dequantised(manifest)}

## Layout

| tensor | shape |
| --- | --- |
| `blocks.{{l}}.attn.W_Q` | `[n_heads, d_model, d_head]`: `{[cfg.n_heads, cfg.d_model, h]}` |
| `blocks.{{l}}.attn._W_K`, `._W_V` | `[n_kv_heads, d_model, d_head]`: `{[kv, cfg.d_model, h]}` |
| `blocks.{{l}}.attn.W_O` | `[n_heads, d_head, d_model]` |
{_mlp_rows(cfg)}
| `embed.W_E` / `unembed.W_U` | `[d_vocab, d_model]` / `[d_model, d_vocab]` |

Query head `h` reads key/value head `h // {cfg.group_size}`. `conversion.json` records the
sha256 of every source file read and every file written here.

## Load it

```python
from gqa_convert import GQATransformer
model = GQATransformer.from_pretrained("path/to/this/folder")
logits = model(tokens)  # LongTensor[batch, pos] -> [batch, pos, d_vocab]
```

With TransformerLens (`pip install 'gqa-convert[tl]'`):

```python
from gqa_convert.interop import to_hooked_transformer
model = to_hooked_transformer("path/to/this/folder")
```

Back to an HF checkpoint: `gqa-convert to-hf path/to/this/folder hf-out`.
{_norm_offset(cfg)}
## Parity with the source

{_parity(manifest)}
"""
