"""The round trip: an export (ours, perhaps edited) back to an HF checkpoint folder.

Each row of the family's map runs backwards: the einops layout is reversed ("(n h) m ->
n m h" becomes "n m h -> (n h) m") and the HF name comes back; the parts of a fused source
(Phi-3's qkv_proj) are concatenated back in row order. Bytes are only moved, so a conversion
(without --dtype) and its round trip give tensors bit-identical to the source's. A tied
export whose unembed.W_U was edited away from embed.W_E transposed is written untied
(lm_head.weight, tie_word_embeddings: false): HF would otherwise rebuild the unembedding
from the embedding and drop the edit.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import einops
import numpy as np

from gqa_convert.checkpoint import (
    TensorInfo,
    TensorSpec,
    read_array,
    read_weights,
    write_sharded,
)
from gqa_convert.config import ModelConfig, from_hf, read_json
from gqa_convert.errors import BadInputError
from gqa_convert.export import (
    DEFAULT_SHARD_BYTES,
    PASSTHROUGH,
    atomic_folder,
    check_export_tensors,
    write_json,
)
from gqa_convert.weight_map import TensorTask, axis_sizes, expected_tasks

log = logging.getLogger(__name__)


def reverse_layout(layout: str) -> str:
    left, right = layout.split("->")
    return f"{right.strip()} -> {left.strip()}"


def export_to_hf(
    converted: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write `out`, an HF checkpoint (config.json + safetensors in HF names) of `converted`."""
    converted = Path(converted)
    data = read_json(converted / "config.json")
    hf_config = data.pop("hf_config", None)
    if not isinstance(hf_config, dict):
        raise BadInputError(f"{converted / 'config.json'}: no hf_config; not a gqa-convert export")
    cfg = ModelConfig.from_dict(data)
    ours = read_weights(converted)
    check_export_tensors(converted, cfg, ours)
    if from_hf(hf_config) != cfg:
        raise BadInputError(
            f"{converted / 'config.json'}: hf_config disagrees with the model config; "
            "edit tensors, not the config"
        )
    if cfg.tie_word_embeddings and not _still_tied(ours):
        # HF would rebuild lm_head from the embedding and lose the edit: write it untied.
        log.warning(
            "%s: unembed.W_U is no longer embed.W_E transposed (an edit); writing an untied "
            "lm_head.weight and tie_word_embeddings: false",
            converted,
        )
        cfg = replace(cfg, tie_word_embeddings=False)
        hf_config = {**hf_config, "tie_word_embeddings": False}
    by_source: dict[str, list[TensorTask]] = {}
    for task in expected_tasks(cfg)[0]:
        by_source.setdefault(task.source, []).append(task)
    # A fused source comes back from all its parts, in row order (or interleaved, gpt-oss's
    # gate / up columns), a stacked one from every expert's; a source two targets read
    # whole (tied embeddings) from the first, W_E.
    sources = {
        name: sorted(
            parts, key=lambda t: (t.expert or 0, t.rows or t.interleave or t.columns or ())
        )
        if parts[0].rows or parts[0].interleave or parts[0].columns or parts[0].expert is not None
        else parts[:1]
        for name, parts in by_source.items()
    }
    specs = [
        TensorSpec(name, ours[parts[0].target].dtype, parts[0].source_shape)
        for name, parts in sources.items()
    ]

    def back(task: TensorTask) -> np.ndarray:
        layout = reverse_layout(task.layout)
        array = read_array(ours[task.target])
        return einops.rearrange(array, layout, **axis_sizes(layout, cfg))

    def joined(parts: list[TensorTask]) -> np.ndarray:
        """One expert's (or an unstacked source's) tensor from its parts."""
        pieces = [back(task) for task in parts]
        if len(pieces) == 1:
            return pieces[0]
        if parts[0].interleave is not None:  # [..., i] x parts -> [..., (i parts)]
            return np.stack(pieces, axis=-1).reshape(*pieces[0].shape[:-1], -1)
        if parts[0].columns is not None:  # Llama 4's halves: [..., i] x parts -> [..., (parts i)]
            return np.concatenate(pieces, axis=-1)
        return np.concatenate(pieces, axis=0)

    def arrays():
        for name, parts in sources.items():
            if parts[0].expert is None:
                yield name, joined(parts)
                continue
            experts: dict[int, list[TensorTask]] = {}
            for task in parts:
                experts.setdefault(task.expert, []).append(task)
            yield name, np.stack([joined(p) for p in experts.values()])  # [n_experts, ...]

    with atomic_folder(Path(out), overwrite, (converted,)) as tmp:
        write_sharded(tmp, specs, arrays(), shard_bytes, progress)
        write_json(tmp / "config.json", hf_config)
        for name in PASSTHROUGH:
            if (converted / name).is_file():
                shutil.copy2(converted / name, tmp / name)
    log.info("wrote HF checkpoint %s (%d tensors)", out, len(specs))
    return Path(out)


def _still_tied(ours: dict[str, TensorInfo]) -> bool:
    """Whether the export's unembed.W_U [d_model, d_vocab] is bit for bit its embed.W_E
    [d_vocab, d_model] transposed (same dtype, same stored bits)."""
    w_e, w_u = ours["embed.W_E"], ours["unembed.W_U"]
    if w_e.dtype != w_u.dtype:
        return False
    return bool(np.array_equal(read_array(w_u), read_array(w_e).T))
