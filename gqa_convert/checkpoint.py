"""Checkpoint I/O: safetensors headers, one-tensor-at-a-time reads, streaming writes.

Safetensors is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}}`, then the raw bytes. Reading the
header ourselves lets `inspect` and planning touch no tensor data, lets a truncated file be
caught before any work, and lets the writer stream tensors to disk without holding a state
dict. Arrays are numpy in their *storage* dtype: bfloat16 travels as uint16 (same width),
since no layout change here needs arithmetic.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gqa_convert.errors import BadInputError, OutputError

# safetensors dtype code -> (numpy storage dtype, torch dtype name)
DTYPES: dict[str, tuple[np.dtype, str]] = {
    "F64": (np.dtype("<f8"), "float64"),
    "F32": (np.dtype("<f4"), "float32"),
    "F16": (np.dtype("<f2"), "float16"),
    "BF16": (np.dtype("<u2"), "bfloat16"),
    "I64": (np.dtype("<i8"), "int64"),
    "I32": (np.dtype("<i4"), "int32"),
    "I16": (np.dtype("<i2"), "int16"),
    "I8": (np.dtype("i1"), "int8"),
    "U8": (np.dtype("u1"), "uint8"),
    "BOOL": (np.dtype("?"), "bool"),
}
CODE_OF_TORCH_NAME = {torch_name: code for code, (_, torch_name) in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: absolute [start, end) offsets in `path`."""

    name: str
    path: Path
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors listed in one safetensors file, checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BadInputError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise BadInputError(
                    f"{path}: corrupt safetensors header (header length {n}, file {size} bytes)"
                )
            raw = f.read(n)
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path}: corrupt safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    base, infos = 8 + n, {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = (
                entry["dtype"],
                tuple(entry["shape"]),
                entry["data_offsets"],
            )
            np_dtype = DTYPES[dtype][0]
        except (KeyError, TypeError, ValueError):
            raise BadInputError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if end - begin != np_dtype.itemsize * int(np.prod(shape, dtype=np.int64)) or begin < 0:
            raise BadInputError(f"{path}: tensor {name!r}: byte range does not match its shape")
        if base + end > size:
            raise BadInputError(
                f"{path}: truncated: tensor {name!r} ends at byte {base + end}, file has {size}"
            )
        infos[name] = TensorInfo(name, path, dtype, shape, base + begin, base + end)
    return infos, metadata


def weight_files(src: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the index's shards, or the single file."""
    index_path = src / INDEX_NAME
    if index_path.exists():
        return sorted({src / shard for shard in _index_map(index_path).values()})
    if (src / SINGLE_NAME).exists():
        return [src / SINGLE_NAME]
    found = sorted(src.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if found:
        raise BadInputError(f"{src}: several .safetensors files and no {INDEX_NAME}")
    raise BadInputError(f"{src}: no model.safetensors or {INDEX_NAME} in the folder")


def _index_map(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise BadInputError(f"{index_path}: not a valid index (no weight_map object)") from None
    return weight_map


def read_weights(src: Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint folder, from headers only, cross-checked with the index."""
    src = Path(src)
    index_path = src / INDEX_NAME
    expected = _index_map(index_path) if index_path.exists() else None
    infos: dict[str, TensorInfo] = {}
    problems = []
    for path in weight_files(src):
        if not path.exists():
            users = sum(1 for shard in (expected or {}).values() if src / shard == path)
            problems.append(f"{path}: shard named by {INDEX_NAME} ({users} tensors) is missing")
            continue
        infos.update(read_header(path)[0])
    for name, shard in (expected or {}).items():
        info = infos.get(name)
        if info is None and (src / shard).exists():
            problems.append(f"{src / shard}: tensor {name!r} listed in {INDEX_NAME} is not in it")
        elif info is not None and info.path != src / shard:
            problems.append(
                f"{INDEX_NAME}: {name!r} is listed in {shard}, found in {info.path.name}"
            )
    if problems:
        raise BadInputError("\n".join(problems))
    return infos


def read_array(info: TensorInfo) -> np.ndarray:
    """One tensor's bytes as a numpy array in its storage dtype (bfloat16 as uint16)."""
    buf = bytearray(info.nbytes)
    try:
        with open(info.path, "rb") as f:
            f.seek(info.start)
            got = f.readinto(buf)
    except OSError as e:
        raise BadInputError(
            f"{info.path}: cannot read tensor {info.name!r} ({e.strerror})"
        ) from None
    if got != info.nbytes:
        raise BadInputError(f"{info.path}: truncated while reading tensor {info.name!r}")
    return np.frombuffer(buf, dtype=DTYPES[info.dtype][0]).reshape(info.shape)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return DTYPES[self.dtype][0].itemsize * int(np.prod(self.shape, dtype=np.int64))


class SafetensorsWriter:
    """Writes one safetensors file whose header is known up front, tensor by tensor.

    The tensors must come in `specs` order with the stated dtype and shape; `close` checks
    that all of them came. Nothing but the current tensor is held in memory.
    """

    def __init__(
        self, path: Path, specs: list[TensorSpec], metadata: Mapping[str, str] | None = None
    ):
        header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for spec in specs:
            header[spec.name] = {
                "dtype": spec.dtype,
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path, self._pending = path, list(reversed(specs))
        try:
            self._file = open(path, "wb")  # noqa: SIM115 (closed in close())
            self._file.write(struct.pack("<Q", len(raw)) + raw)
        except OSError as e:
            raise OutputError(f"{path}: cannot write ({e.strerror})") from None

    def write(self, name: str, array: np.ndarray) -> None:
        spec = self._pending.pop()
        if (name, array.shape, array.dtype) != (spec.name, spec.shape, DTYPES[spec.dtype][0]):
            raise ValueError(
                f"{self.path}: got {name} {array.shape} {array.dtype}, expected {spec}"
            )
        try:
            self._file.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write ({e.strerror})") from None

    def close(self) -> None:
        if self._pending:
            raise ValueError(f"{self.path}: {len(self._pending)} tensors never written")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()


def shard_specs(specs: Iterable[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of tensors of at most `max_bytes` each (a larger tensor stands alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [s for s in shards if s]


def shard_names(n: int) -> list[str]:
    """HF's file names: model.safetensors, or model-00001-of-0000N.safetensors."""
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
