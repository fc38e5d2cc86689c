"""GGUF files (llama.cpp): metadata for the config, tensors in llama.cpp's names and blocks.

Read as transformers' GGUF loader reads them (transformers/modeling_gguf_pytorch_utils.py,
integrations/ggml.py), so that both sides of the gate agree on what the file means:

- the config: the metadata fields transformers maps (its `GGUF_CONFIG_MAPPING` and
  defaults), completed by the model type's transformers config class, as
  `AutoConfig.from_pretrained(..., gguf_file=)` builds it (tested equal); tied embeddings
  when there is no `output.weight`;
- names: llama.cpp's (`blk.0.attn_q.weight`) to the family's HF names by gguf's own tensor
  name map, as transformers maps them; MoE experts stacked (`ffn_gate_exps` and
  `ffn_up_exps` concatenated into `experts.gate_up_proj`);
- values: `gguf.quants.dequantize` of each tensor's blocks (float32), then what llama.cpp's
  converter did undone, per llama.cpp architecture (`UNDO`): the rotary row permutation of
  attn_q / attn_k (Llama: llama.cpp interleaves each head's rotary halves), or norms stored
  as `1 + w` (Gemma 2 / 3).

The header is parsed here (a few ms; gguf's GGUFReader parses every tokenizer entry and
takes seconds), the bytes of one tensor are read when asked for. The reference side hands
the same bytes to transformers' own code (`hf_inputs`): its tensor processor and name map.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from gqa_convert.checkpoint import TensorInfo
from gqa_convert.errors import BadInputError, UnsupportedModelError
from gqa_convert.sources import Source, SourceTensor

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# Metadata arrays longer than this are kept as their length only (the tokenizer's
# vocabulary, merges and scores): the config needs no more of them.
MAX_KEPT_ARRAY = 4096

# GGUF value types: id -> struct format (8: string, 9: array)
SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


@dataclass(frozen=True)
class Undo:
    """What llama.cpp's converter did to a tensor of this architecture, to undo."""

    permute_qk: bool = False  # attn_q / attn_k rows: rotary halves interleaved per head
    norm_offset: float = 0.0  # norm weights stored as offset + w


# llama.cpp architecture -> its undo, as transformers' TENSOR_PROCESSORS apply them
UNDO = {
    "llama": Undo(permute_qk=True),
    "gemma2": Undo(norm_offset=1.0),
    "gemma3": Undo(norm_offset=1.0),
}
# transformers' spelling of an architecture's model type -> gguf-py's (get_gguf_hf_weights_map)
GGUF_MODEL_TYPE = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gemma3_text": "gemma3"}
# and llama.cpp's architecture -> transformers' model type (load_gguf_checkpoint)
MODEL_TYPE = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
# Stacked experts: llama.cpp's tensors -> the fused HF tensor and the part each one is.
EXPERTS = {
    "ffn_gate_exps": ("mlp.experts.gate_up_proj", 0),
    "ffn_up_exps": ("mlp.experts.gate_up_proj", 1),
    "ffn_down_exps": ("mlp.experts.down_proj", None),
}


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of a GGUF file: name, ggml type, shape (numpy order), absolute bytes."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]  # numpy order: llama.cpp's dims reversed
    start: int
    end: int

    def type_name(self) -> str:
        import gguf

        try:
            return gguf.GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"ggml type {self.ggml_type}"


class _Reader:
    """Little-endian reads from a GGUF file, turning a short read into a BadInputError."""

    def __init__(self, f: BinaryIO, path: Path):
        self.f, self.path = f, path

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise BadInputError(f"{self.path}: truncated GGUF file (header cut short)")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > 1 << 24:
            raise BadInputError(f"{self.path}: corrupt GGUF header (a string of {n} bytes)")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, kind: int, keep: bool = True) -> Any:
        if kind in SCALARS:
            return self.unpack(SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind != 9:
            raise BadInputError(f"{self.path}: corrupt GGUF header (value type {kind})")
        item, count = self.unpack("<I"), self.unpack("<Q")
        if item in SCALARS and (not keep or count > MAX_KEPT_ARRAY):
            self.f.seek(struct.calcsize(SCALARS[item]) * count, 1)
            return count
        values = [self.value(item, keep) for _ in range(count)]
        return values if keep and count <= MAX_KEPT_ARRAY else count


def read_gguf_header(
    path: Path, check_size: bool = True
) -> tuple[dict[str, Any], list[GgufTensor]]:
    """The metadata (long arrays as their length) and the tensors of a GGUF file."""
    import gguf

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            r = _Reader(f, path)
            if r.take(4) != MAGIC:
                raise BadInputError(f"{path}: not a GGUF file (no GGUF magic)")
            version = r.unpack("<I")
            if version not in (2, 3):
                raise UnsupportedModelError(f"{path}: GGUF version {version} (reads 2 and 3)")
            n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
            metadata = {}
            for _ in range(n_kv):
                key = r.string()
                metadata[key] = r.value(r.unpack("<I"), keep=not key.startswith("tokenizer.ggml."))
            raw = []
            for _ in range(n_tensors):
                name = r.string()
                n_dims = r.unpack("<I")
                dims = [r.unpack("<Q") for _ in range(n_dims)]
                raw.append((name, dims, r.unpack("<I"), r.unpack("<Q")))
            alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
            start = -(-f.tell() // alignment) * alignment
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({e.strerror})") from None
    tensors = []
    for name, dims, kind, offset in raw:
        if kind not in gguf.GGML_QUANT_SIZES:
            raise UnsupportedModelError(f"{path}: tensor {name!r} has unknown ggml type {kind}")
        block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
        if dims and dims[0] % block:
            raise BadInputError(f"{path}: tensor {name!r}: row of {dims[0]} is not whole blocks")
        nbytes = (
            int(np.prod(dims[1:], dtype=np.int64)) * (dims[0] // block) * block_bytes if dims else 0
        )
        begin = start + offset
        if check_size and begin + nbytes > size:
            raise BadInputError(
                f"{path}: truncated GGUF file: tensor {name!r} ends at byte {begin + nbytes}, "
                f"the file has {size}"
            )
        tensors.append(GgufTensor(name, kind, tuple(reversed(dims)), begin, begin + nbytes))
    return metadata, tensors


def read_blocks(path: Path, tensor: GgufTensor) -> np.ndarray:
    """A tensor's stored bytes, shaped as gguf-py's reader gives them to `dequantize`: the
    element dtype for F32 / F16, else uint8 rows of blocks [..., bytes per row]."""
    import gguf

    kind = gguf.GGMLQuantizationType(tensor.ggml_type)
    data = np.empty(tensor.end - tensor.start, dtype=np.uint8)
    try:
        with open(path, "rb") as f:
            f.seek(tensor.start)
            got = f.readinto(data)
    except OSError as e:
        raise BadInputError(f"{path}: cannot read tensor {tensor.name!r} ({e.strerror})") from None
    if got != data.size:
        raise BadInputError(f"{path}: truncated while reading tensor {tensor.name!r}")
    if kind == gguf.GGMLQuantizationType.F32:
        return data.view(np.float32).reshape(tensor.shape)
    if kind == gguf.GGMLQuantizationType.F16:
        return data.view(np.float16).reshape(tensor.shape)
    return data.reshape(*tensor.shape[:-1], -1)


def dequantize(path: Path, tensor: GgufTensor) -> np.ndarray:
    """float32 values of a stored tensor, by gguf-py (the package transformers uses)."""
    import gguf

    blocks = read_blocks(path, tensor)
    try:
        values = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType(tensor.ggml_type))
    except NotImplementedError as e:
        raise UnsupportedModelError(f"{path}: tensor {tensor.name!r}: {e}") from None
    return np.ascontiguousarray(values, dtype=np.float32).reshape(tensor.shape)


def unpermute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of attn_q / attn_k rows: per head, it interleaves the two
    rotary halves ([n_head, 2, d/2] rows -> [n_head, d/2, 2]); this puts them back."""
    rows = weight.shape[0]
    w = weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(w.swapaxes(2, 1).reshape(weight.shape))


# ---- the config, as transformers derives it --------------------------------------------


def parsed_config(metadata: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """The config dict transformers' `load_gguf_checkpoint` builds from the metadata (its
    tables, its renames); the model type's config class then fills the rest."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str):
        raise BadInputError("GGUF metadata has no general.architecture")
    name = str(metadata.get("general.name", "")).lower()
    updated = "mistral" if "llama" in architecture and "mistral" in name else architecture
    updated = MODEL_TYPE.get(architecture, updated)
    if architecture not in GGUF_CONFIG_MAPPING and updated not in GGUF_CONFIG_MAPPING:
        raise UnsupportedModelError(
            f"GGUF architecture {architecture!r} is not one transformers' GGUF loader maps, so "
            "the gate has no reference for it (it maps: "
            f"{', '.join(k for k in GGUF_CONFIG_MAPPING if k not in ('general', 'tokenizer'))})"
        )
    config: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in tensor_names}
    defaults = GGUF_CONFIG_DEFAULTS_MAPPING.get(
        updated, GGUF_CONFIG_DEFAULTS_MAPPING.get(architecture) or {}
    )
    for key, value in defaults.items():
        config.setdefault(key, value)
    for key, value in metadata.items():
        key = key.replace(architecture, updated)
        prefix, _, rest = key.partition(".")
        if isinstance(value, str) and architecture in value:
            value = value.replace(architecture, updated)
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if renamed not in (None, -1):
            config[renamed] = value
    if config.get("model_type") == "gemma3":
        config["model_type"] = "gemma3_text"
    if "vocab_size" not in config and isinstance(metadata.get("tokenizer.ggml.tokens"), int):
        config["vocab_size"] = metadata["tokenizer.ggml.tokens"]
    return config


def hf_config_of(config: dict[str, Any]) -> dict[str, Any]:
    """The full HF config dict: the model type's transformers config class over `config`,
    as AutoConfig builds it (its defaults fill what the file does not state)."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UnsupportedModelError(f"GGUF model type {model_type!r} has no transformers config")
    hf = CONFIG_MAPPING[model_type].from_dict(dict(config)).to_dict()
    hf.pop("_name_or_path", None)
    return hf


# ---- the source ------------------------------------------------------------------------


@dataclass
class GgufSource(Source):
    """A GGUF file as a source: see the module docstring."""

    architecture: str = ""
    gguf_config: dict[str, Any] = field(default_factory=dict)  # parsed_config's
    gguf_tensors: dict[str, GgufTensor] = field(default_factory=dict)

    def transformers_config(self) -> Any:
        """transformers' config of the file: its config class over the metadata's fields
        (parsed as `AutoConfig.from_pretrained(gguf_file=)` parses them, without the
        tokenizer's tens of thousands of entries: tested equal)."""
        from transformers import CONFIG_MAPPING

        return CONFIG_MAPPING[self.gguf_config["model_type"]].from_dict(dict(self.gguf_config))

    def hf_inputs(self, model: Any) -> dict[str, Any]:
        """The tensors transformers' GGUF loader hands its model, by HF name: its own name map
        and tensor processor over gguf-py's dequantisation, one block (layer) at a time."""
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        processor = TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)(
            config=dict(self.gguf_config)
        )
        mapping = get_gguf_hf_weights_map(model, processor)
        groups: dict[str, _TransformersBlock] = {}
        inputs: dict[str, Any] = {}
        for tensor in self.gguf_tensors.values():
            key = _block_of(tensor.name)
            group = groups.setdefault(key, _TransformersBlock(self.path, processor, mapping))
            group.tensors.append(tensor)
        for group in groups.values():
            for name in group.names():
                inputs[name] = _Processed(group, name)
        return inputs


def _block_of(name: str) -> str:
    match = re.match(r"blk\.(\d+)\.", name)
    return match.group(1) if match else name


class _TransformersBlock:
    """transformers' `load_gguf_checkpoint` loop over the tensors of one block (a layer, or
    a top-level tensor): gguf-py's dequantisation, its tensor processor, its name map."""

    def __init__(self, path: Path, processor: Any, mapping: dict[str, str]):
        self.path, self.processor, self.mapping = path, processor, mapping
        self.tensors: list[GgufTensor] = []
        self._done: dict[str, Any] | None = None

    def names(self) -> list[str]:
        """The HF names this block yields (for the MoE experts, their fused tensors)."""
        names = []
        for tensor in self.tensors:
            base = tensor.name.removesuffix(".weight")
            if tensor.name in self.mapping:
                names.append(self.mapping[tensor.name])
            elif base in self.mapping and self.mapping[base] not in names:
                names.append(self.mapping[base])
        return names

    def run(self) -> dict[str, Any]:
        import gguf
        import torch

        if self._done is None:
            parsed: dict[str, Any] = {"tensors": {}}
            for tensor in self.tensors:
                # gguf-py's dequantize of the tensor's bytes, as transformers calls it on
                # GGUFReader's `tensor.data` (the bytes at the offsets our header parse gives,
                # tested equal to GGUFReader's); not our `dequantize`, so a bug there shows
                weights = gguf.quants.dequantize(
                    read_blocks(self.path, tensor), gguf.GGMLQuantizationType(tensor.ggml_type)
                )
                result = self.processor.process(
                    weights=weights,
                    name=tensor.name,
                    tensor_key_mapping=self.mapping,
                    parsed_parameters=parsed,
                )
                if result.name is None or result.name not in self.mapping:
                    continue
                parsed["tensors"][self.mapping[result.name]] = torch.from_numpy(
                    np.copy(result.weights)
                )
            self._done = parsed["tensors"]
        return self._done

    def take(self, name: str) -> Any:
        done = self.run()
        tensor = done.pop(name)
        if not done:
            self._done = None  # all handed over: a second read computes them again
        return tensor


class _Processed:
    """One tensor of a `_TransformersBlock`, computed (with its block) when transformers'
    loader materialises it."""

    def __init__(self, block: _TransformersBlock, name: str):
        self.block, self.name = block, name

    def get_dtype(self) -> str:
        return "F32"

    def __getitem__(self, key: Any) -> Any:
        return self.block.take(self.name)[key]


def open_gguf(path: Path, check_sizes: bool = True) -> GgufSource:
    """A GGUF file as a source (headers only; see the module docstring)."""
    from gqa_convert.config import from_hf

    metadata, stored = read_gguf_header(path, check_sizes)
    names = {t.name for t in stored}
    try:
        config = parsed_config(metadata, names)
    except (BadInputError, UnsupportedModelError) as e:
        raise type(e)(f"{path}: {e}") from None
    architecture = metadata["general.architecture"]
    if metadata.get(f"{architecture}.expert_count") and architecture == "llama":
        raise UnsupportedModelError(
            f"{path}: a llama GGUF with {metadata[f'{architecture}.expert_count']} experts "
            "(Mixtral, as llama.cpp writes it): transformers' GGUF loader reads it as a dense "
            "Llama and drops the experts, so the gate has no reference for it"
        )
    hf_config = hf_config_of(config)
    cfg = from_hf(hf_config)
    hf_names = _hf_names(cfg, architecture, config["model_type"])
    undo = UNDO.get(architecture, Undo())
    tensors: dict[str, SourceTensor] = {}
    readers: dict[str, Callable[[], np.ndarray]] = {}
    experts: dict[str, list[GgufTensor | None]] = {}
    for tensor in stored:
        info = TensorInfo(
            tensor.name, path, tensor.type_name(), tensor.shape, tensor.start, tensor.end
        )
        leaf = tensor.name.split(".")[-2] if tensor.name.count(".") >= 2 else ""
        if leaf in EXPERTS and tensor.name.startswith("blk."):
            fused, part = EXPERTS[leaf]
            name = f"model.layers.{tensor.name.split('.')[1]}.{fused}"
            slots = experts.setdefault(name, [None, None] if part is not None else [None])
            slots[part or 0] = tensor
            continue
        name = hf_names.get(tensor.name, tensor.name)
        transform = _transform(tensor.name, undo, config)
        tensors[name] = SourceTensor(name, tensor.shape, "F32", path, (info,), tensor.type_name())
        readers[name] = partial(_read, path, tensor, transform)
    for name, slots in experts.items():
        if any(slot is None for slot in slots):
            raise BadInputError(
                f"{path}: {name}: ffn_gate_exps without ffn_up_exps, or the reverse"
            )
        parts = tuple(
            TensorInfo(t.name, path, t.type_name(), t.shape, t.start, t.end) for t in slots
        )
        shape = (slots[0].shape[0], sum(t.shape[1] for t in slots), *slots[0].shape[2:])
        schemes = "+".join(sorted({t.type_name() for t in slots}))
        tensors[name] = SourceTensor(name, shape, "F32", path, parts, schemes)
        readers[name] = partial(_read_stacked, path, tuple(slots))
    types = Counter(t.type_name() for t in stored)
    file_type = metadata.get("general.file_type")
    return GgufSource(
        path=path,
        folder=path.parent,
        hf_config=hf_config,
        tensors=tensors,
        files=[path],
        quantization={
            "method": "gguf",
            "format": _file_type_name(file_type),
            "file": path.name,
            "tensor_types": dict(types),
            "architecture": architecture,
        },
        default_dtype="bfloat16",
        passthrough=False,
        readers=readers,
        architecture=architecture,
        gguf_config=config,
        gguf_tensors={t.name: t for t in stored},
    )


def _file_type_name(file_type: Any) -> str | None:
    import gguf

    try:
        return gguf.LlamaFileType(file_type).name
    except (ValueError, TypeError):
        return None if file_type is None else str(file_type)


def _hf_names(cfg: Any, architecture: str, model_type: str) -> dict[str, str]:
    """llama.cpp tensor name -> the family's HF name, by gguf-py's tensor name map over every
    HF name the family's weight map reads (as transformers maps its model's names)."""
    import gguf

    from gqa_convert.weight_map import expected_tasks

    arch_name = GGUF_MODEL_TYPE.get(model_type, model_type)
    arch = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name), None)
    if arch is None:
        arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == architecture)
    name_map = gguf.get_tensor_name_map(arch, cfg.n_layers)
    names: dict[str, str] = {}
    variants = [None, *_variants(cfg)]
    for variant in variants:
        tasks, droppable = expected_tasks(cfg, variant)
        for hf in [t.source for t in tasks] + droppable:
            base, suffix = hf, ""
            if hf.endswith((".weight", ".bias")):
                base, _, leaf = hf.rpartition(".")
                suffix = "." + leaf
            found = name_map.get_name(base)
            if found is not None:
                names.setdefault(found + suffix, hf)
    return names


def _variants(cfg: Any) -> list[str]:
    from gqa_convert.weight_map import family_of

    return list(family_of(cfg).variants)


def _transform(name: str, undo: Undo, config: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    """What to apply to the dequantised values of the llama.cpp tensor `name`."""
    if undo.permute_qk and (".attn_q." in name or ".attn_k." in name):
        heads = config.get("num_attention_heads")
        kv = config.get("num_key_value_heads")
        if heads is not None and kv is not None:
            return partial(unpermute_rotary, n_head=heads if ".attn_q." in name else kv)
    if undo.norm_offset and "norm.weight" in name:
        offset = np.float32(undo.norm_offset)
        return lambda w: w - offset
    return lambda w: w


def _read(
    path: Path, tensor: GgufTensor, transform: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    return transform(dequantize(path, tensor))


def _read_stacked(path: Path, parts: tuple[GgufTensor, ...]) -> np.ndarray:
    """Experts stacked [E, rows, cols]; gate and up concatenated on the rows (gate first)."""
    values = [dequantize(path, t) for t in parts]
    return values[0] if len(values) == 1 else np.concatenate(values, axis=1)
