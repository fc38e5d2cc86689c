"""Dense checkpoints (safetensors, or pytorch_model.bin), and what every safetensors-based
format shares: the stored tensors, the files read, the reference's lazy inputs."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gqa_convert import checkpoint
from gqa_convert.checkpoint import TensorInfo, find_index, read_weights
from gqa_convert.sources import Source, SourceTensor

if TYPE_CHECKING:
    import torch


def open_dense(folder: Path, hf_config: dict[str, Any], check_sizes: bool = True) -> Source:
    """An HF checkpoint folder without quantization_config: every tensor as stored."""
    stored = read_weights(folder, check_sizes)
    tensors = {
        name: SourceTensor(name, info.shape, info.dtype, info.path, (info,))
        for name, info in stored.items()
    }
    readers = {name: partial(_read, info) for name, info in stored.items()}
    return Source(
        path=folder,
        folder=folder,
        hf_config=hf_config,
        tensors=tensors,
        files=stored_files(folder, stored),
        stored=stored,
        readers=readers,
    )


def _read(info: TensorInfo) -> Any:
    return checkpoint.map_array(info)


def stored_files(folder: Path, stored: dict[str, TensorInfo]) -> list[Path]:
    """The files a conversion of `folder` reads: config.json, the index, the weight files."""
    files = [folder / "config.json"]
    index = find_index(folder)  # model.safetensors.index.json or pytorch_model.bin's
    if index is not None:
        files.append(index)
    return files + sorted({info.path for info in stored.values()})


class StoredTensor:
    """A stored tensor read (by our reader, as stored: fp8 stays fp8) only when
    transformers' loader materialises it with `tensor[...]`, as it does a safetensors
    slice: one tensor at a time is read and cast, not the whole part."""

    def __init__(self, info: TensorInfo):
        self.info = info

    def get_dtype(self) -> str:  # a safetensors slice's: transformers asks it
        return self.info.dtype

    def get_shape(self) -> list[int]:
        return list(self.info.shape)

    def __getitem__(self, key: Any) -> torch.Tensor:
        return checkpoint.to_torch(checkpoint.map_array(self.info), self.info.dtype)[key]


def stored_inputs(source: Source) -> dict[str, StoredTensor]:
    """transformers' loader input for a safetensors-based source: every stored tensor."""
    return {name: StoredTensor(info) for name, info in source.stored.items()}
