"""Checkpoint I/O: safetensors headers, one-tensor-at-a-time reads, streaming writes.

Safetensors is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}}`, then the raw bytes. Reading the
header ourselves lets `inspect` and planning touch no tensor data, lets a truncated file be
caught before any work, and lets the writer stream tensors to disk without holding a state
dict. Arrays are numpy in their *storage* dtype: bfloat16 travels as uint16 (same width), the
1-byte floats of quantised checkpoints as uint8, since no layout change here needs arithmetic.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import pickle
import struct
import threading
import warnings
import weakref
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gqa_convert.errors import BadInputError, OutputError, UnsupportedModelError, listing

if TYPE_CHECKING:
    import torch

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
    # 1-byte floats of quantised checkpoints, as their bytes (sources/floats.py decodes them)
    "F8_E4M3": (np.dtype("u1"), "float8_e4m3fn"),
    "F8_E5M2": (np.dtype("u1"), "float8_e5m2"),
    "F8_E8M0": (np.dtype("u1"), "float8_e8m0fnu"),
}
CODE_OF_TORCH_NAME = {torch_name: code for code, (_, torch_name) in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# PyTorch pickles, read only when a folder has no safetensors, and only with weights_only.
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_NAME = "pytorch_model.bin"
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: absolute [start, end) offsets in `path`.

    For a `.bin` (a torch pickle) the offsets are [0, nbytes) of the tensor itself.
    """

    name: str
    path: Path
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(
    path: Path, check_size: bool = True
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors listed in one safetensors file, checked against the file's size (unless
    not `check_size`: `inspect` describes a truncated file and reports it)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BadInputError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise BadInputError(
                    f"{path}: corrupt safetensors header (header length {n}, file {size} bytes)"
                )
            if n > size - 8:
                raise BadInputError(
                    f"{path}: truncated safetensors file (header of {n} bytes, file {size} bytes)"
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
            numbers = (*shape, begin, end)
            if not isinstance(dtype, str) or not all(_is_count(x) for x in numbers):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise BadInputError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if dtype not in DTYPES:
            raise UnsupportedModelError(
                f"{path}: tensor {name!r} has dtype {dtype}, which gqa-convert does not read "
                f"(it reads {', '.join(DTYPES)})"
            )
        np_dtype = DTYPES[dtype][0]
        if end - begin != np_dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise BadInputError(f"{path}: tensor {name!r}: byte range does not match its shape")
        if check_size and base + end > size:
            raise BadInputError(
                f"{path}: truncated: tensor {name!r} ends at byte {base + end}, file has {size}"
            )
        infos[name] = TensorInfo(name, path, dtype, shape, base + begin, base + end)
    return infos, metadata


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def find_index(src: Path) -> Path | None:
    """The index of a sharded checkpoint folder, if any: safetensors', else pytorch_model.bin's
    when the folder holds no safetensors."""
    if (src / INDEX_NAME).exists():
        return src / INDEX_NAME
    if (src / BIN_INDEX_NAME).exists() and not any(src.glob("*.safetensors")):
        return src / BIN_INDEX_NAME
    return None


def weight_files(src: Path) -> list[Path]:
    """The weight files of a checkpoint folder: the index's shards, or the single file.

    Safetensors win; `pytorch_model.bin` (sharded or not) is read only when there are none.
    """
    index = find_index(src)
    if index is not None:
        return sorted({src / shard for shard in _index_map(index).values()})
    if (src / SINGLE_NAME).exists():
        return [src / SINGLE_NAME]
    found = sorted(src.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if found:
        raise BadInputError(f"{src}: several .safetensors files and no {INDEX_NAME}")
    if (src / BIN_NAME).exists():
        return [src / BIN_NAME]
    raise BadInputError(
        f"{src}: no weights: none of {SINGLE_NAME}, {INDEX_NAME}, {BIN_NAME}, {BIN_INDEX_NAME}"
    )


def _index_map(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise BadInputError(f"{index_path}: not a valid index (no weight_map object)") from None
    for name, shard in weight_map.items():
        # Shards live in the checkpoint folder: a stranger's index may not point elsewhere.
        if not isinstance(shard, str) or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise BadInputError(
                f"{index_path}: tensor {name!r} names shard {shard!r}, not a file in the folder"
            )
    return weight_map


def read_weights(src: Path, check_sizes: bool = True) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint folder, from headers only, cross-checked with the index."""
    src = Path(src)
    index = find_index(src)
    expected = _index_map(index) if index is not None else None
    index_name = index.name if index is not None else INDEX_NAME
    infos: dict[str, TensorInfo] = {}
    problems = []
    for path in weight_files(src):
        if not path.is_file():
            users = sum(1 for shard in (expected or {}).values() if src / shard == path)
            problems.append(f"{path}: shard named by {index_name} ({users} tensors) is missing")
            continue
        for name, info in read_tensor_infos(path, check_sizes).items():
            if name in infos:
                problems.append(f"tensor {name!r} is in both {infos[name].path} and {path}")
            infos[name] = info
    for name, shard in (expected or {}).items():
        info = infos.get(name)
        if info is None and (src / shard).is_file():
            problems.append(f"{src / shard}: tensor {name!r} listed in {index_name} is not in it")
        elif info is not None and info.path != src / shard:
            problems.append(
                f"{src / index_name}: {name!r} is listed in {shard}, found in {info.path.name}"
            )
    if problems:
        raise BadInputError(listing(f"{src}: inconsistent weight files", problems))
    return infos


def read_tensor_infos(path: Path, check_size: bool = True) -> dict[str, TensorInfo]:
    """The tensors of one weight file, by the reader its suffix names in `READERS`."""
    return READERS[path.suffix][0](path, check_size)


def read_array(info: TensorInfo) -> np.ndarray:
    """One tensor's bytes as a numpy array in its storage dtype (bfloat16 as uint16)."""
    return READERS[info.path.suffix][1](info)


def _read_safetensors_array(info: TensorInfo) -> np.ndarray:
    # np.empty, not bytearray: a bytearray is zero-filled first, 40% of the read's CPU time.
    # The buffered reader loops until full (a raw read stops at 2 GiB on Linux).
    array = np.empty(info.shape, dtype=DTYPES[info.dtype][0])
    try:
        with open(info.path, "rb") as f:
            f.seek(info.start)
            got = f.readinto(array.reshape(-1).view(np.uint8))
    except OSError as e:
        raise BadInputError(
            f"{info.path}: cannot read tensor {info.name!r} ({e.strerror})"
        ) from None
    if got != info.nbytes:
        raise BadInputError(f"{info.path}: truncated while reading tensor {info.name!r}")
    return array


def map_array(info: TensorInfo) -> np.ndarray:
    """`read_array`'s array, of a safetensors file mapped instead of read: no copy is made
    until the caller casts or rearranges it (verification casts every tensor to its compute
    dtype, the conversion rearranges it: reading it first into a buffer of its own was a
    tenth of the conversion's CPU time and a third of verification's load).

    A private mapping (writable, the file never written), unmapped when the array and every
    tensor sharing it are gone; no file descriptor stays open with it (Python's mmap keeps
    one per mapping: a model verified in its storage dtype holds thousands of tensors).
    Other formats, and systems without mmap(2), are read. The file's size is checked before
    it is mapped; one truncated while mapped raises SIGBUS when read, as any mapped reader.
    """
    if info.path.suffix != ".safetensors" or info.nbytes == 0 or _LIBC is None:
        return read_array(info)
    start = info.start - info.start % mmap.ALLOCATIONGRANULARITY
    length = info.end - start
    try:
        with open(info.path, "rb") as f:
            if os.fstat(f.fileno()).st_size < info.end:
                raise BadInputError(f"{info.path}: truncated before tensor {info.name!r}")
            flags, prot = mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE
            address = _LIBC.mmap(None, length, prot, flags, f.fileno(), start)
            if address in (None, ctypes.c_void_p(-1).value):
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
    except OSError as e:
        raise BadInputError(
            f"{info.path}: cannot read tensor {info.name!r} ({e.strerror})"
        ) from None
    buffer = (ctypes.c_uint8 * length).from_address(address)
    # unmapped with the last array or tensor over it; not at exit (the process's end does)
    weakref.finalize(buffer, _LIBC.munmap, address, length).atexit = False
    flat = np.frombuffer(buffer, dtype=np.uint8, offset=info.start - start)
    return flat.view(DTYPES[info.dtype][0]).reshape(info.shape)


def _libc() -> ctypes.CDLL | None:
    """mmap(2) / munmap(2) (and fallocate(2) where there is one) of the C library, None
    where there are none (Windows)."""
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
            ctypes.c_int64,
        ]  # fmt: skip
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        if hasattr(libc, "fallocate"):  # Linux only
            libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin's tensors, memory-mapped, cached while the file is unchanged."""
    stat = path.stat()
    return _load_torch(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=4)
def _load_torch(path: str, size: int, mtime_ns: int) -> dict[str, torch.Tensor]:
    # weights_only=True: the unpickler builds tensors and plain containers only, and refuses
    # any other global, so a pickle carrying code (a __reduce__ calling os.system) never runs.
    import torch

    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": the refusal says enough
            warnings.simplefilter("ignore")
            data = torch.load(
                path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
            )
    except pickle.UnpicklingError as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        why = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
        reason = (why or lines or [type(e).__name__])[0].strip()
        raise BadInputError(
            f"{path}: refused: not a plain PyTorch state dict, loading it would run code or "
            f"build objects (weights_only=True refused it: {reason})"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadInputError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: holds a {type(data).__name__}, not a state dict")
    for name, value in data.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise BadInputError(f"{path}: entry {name!r} is {type(value).__name__!r}, not a tensor")
    return data


def _read_torch_infos(path: Path, check_size: bool = True) -> dict[str, TensorInfo]:
    # A .bin is unpickled whole, so a truncated one fails whatever `check_size` says.
    infos = {}
    for name, tensor in _torch_state_dict(path).items():
        code = CODE_OF_TORCH_NAME.get(str(tensor.dtype).removeprefix("torch."))
        if code is None:
            raise UnsupportedModelError(
                f"{path}: tensor {name!r} has dtype {tensor.dtype}, which gqa-convert does not read"
            )
        shape = tuple(tensor.shape)
        nbytes = DTYPES[code][0].itemsize * int(np.prod(shape, dtype=np.int64))
        infos[name] = TensorInfo(name, path, code, shape, 0, nbytes)
    return infos


def _read_torch_array(info: TensorInfo) -> np.ndarray:
    import torch

    tensor = _torch_state_dict(info.path)[info.name].contiguous().reshape(-1)
    raw = tensor.view(torch.uint8).numpy()  # storage bytes, whatever the dtype
    return raw.view(DTYPES[info.dtype][0]).reshape(info.shape)


# weight file suffix -> (its tensors' TensorInfos, one tensor's array)
READERS: dict[str, tuple[Callable[[Path], dict[str, TensorInfo]], Callable[..., np.ndarray]]] = {
    ".safetensors": (lambda path, check: read_header(path, check)[0], _read_safetensors_array),
    ".bin": (_read_torch_infos, _read_torch_array),
}


def count_nonfinite(array: np.ndarray, code: str, chunk: int = 1 << 22) -> int:
    """How many NaN or Inf values `array` (storage dtype `code`) holds; 0 for non-floats.

    `chunk` elements at a time, so no temporary is larger than a chunk. The 16-bit floats
    (bfloat16 is stored as uint16) are checked on their bits, faster than numpy's float16:
    NaN and Inf are the values whose exponent bits are all ones.
    """
    if code not in ("F64", "F32", "F16", "BF16"):
        return 0
    flat = np.ascontiguousarray(array).reshape(-1)
    exponent = np.uint16({"BF16": 0x7F80, "F16": 0x7C00}.get(code, 0))
    if exponent:
        flat = flat.view(np.uint16)
    bad = 0
    for i in range(0, flat.size, chunk):
        part = flat[i : i + chunk]
        if exponent:
            bad += int(np.count_nonzero((part & exponent) == exponent))
        else:
            bad += part.size - int(np.count_nonzero(np.isfinite(part)))
    return bad


def check_finite(info: TensorInfo, array: np.ndarray) -> None:
    """Raise BadInputError if `array`, the tensor `info` describes, holds NaN or Inf."""
    bad = count_nonfinite(array, info.dtype)
    if bad:
        raise BadInputError(
            f"{info.path}: tensor {info.name!r} has {bad} NaN/Inf value(s) of {array.size}; "
            "convert with --allow-nonfinite (allow_nonfinite=True) to keep them"
        )


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return DTYPES[self.dtype][0].itemsize * int(np.prod(self.shape, dtype=np.int64))


class BackgroundSha256:
    """sha256 fed on another thread (hashlib releases the GIL), so hashing what is written
    overlaps the next tensor's read and rearrangement. At most `depth` chunks wait, so
    memory stays bounded; `hexdigest` waits for the rest."""

    def __init__(self, initial: bytes = b"", depth: int = 2):
        self._digest = hashlib.sha256(initial)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._waiting: deque[Future] = deque()
        self._depth = depth

    def update(self, data: np.ndarray | bytes) -> None:
        self._waiting.append(self._pool.submit(self._digest.update, data))
        while len(self._waiting) > self._depth:
            self._waiting.popleft().result()

    def hexdigest(self) -> str:
        while self._waiting:
            self._waiting.popleft().result()
        self._pool.shutdown()
        return self._digest.hexdigest()


def preallocate(fd: int, path: Path, nbytes: int) -> None:
    """Reserve the blocks of a file of `nbytes` before it is written (Linux fallocate(2)):
    the writes then only copy (0.24 s instead of 0.35-0.43 s for 1.7 GB here,
    scripts/bench_ab.py), and a disk too small fails now, before gigabytes are written.
    A file system without it (or a system without fallocate) is written as before; nothing
    is emulated by writing zeros."""
    err = _fallocate(fd, nbytes)
    if err == errno.ENOSPC:
        raise OutputError(f"{path}: no space left on the device for its {nbytes:,} bytes")


def _fallocate(fd: int, nbytes: int) -> int:
    """fallocate(fd, 0, 0, nbytes): 0, or the errno it failed with (EOPNOTSUPP where the
    call is missing)."""
    call = getattr(_LIBC, "fallocate", None)
    if call is None or nbytes <= 0:
        return errno.EOPNOTSUPP
    return ctypes.get_errno() if call(fd, 0, 0, nbytes) else 0


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
        self.sha256 = BackgroundSha256(struct.pack("<Q", len(raw)) + raw)
        try:
            self._file = open(path, "wb")  # noqa: SIM115 (closed in close())
            preallocate(self._file.fileno(), path, 8 + len(raw) + offset)
            self._file.write(struct.pack("<Q", len(raw)) + raw)
        except OSError as e:
            raise OutputError(f"{path}: cannot write ({e.strerror})") from None

    def write(self, name: str, array: np.ndarray) -> None:
        spec = self._pending.pop()
        if (name, array.shape, array.dtype) != (spec.name, spec.shape, DTYPES[spec.dtype][0]):
            raise ValueError(
                f"{self.path}: got {name} {array.shape} {array.dtype}, expected {spec}"
            )
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)  # zero-size too
        self.sha256.update(data)
        try:
            self._file.write(data)
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


def write_sharded(
    folder: Path,
    specs: list[TensorSpec],
    arrays: Iterator[tuple[str, np.ndarray]],
    shard_bytes: int,
    progress: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """Write `arrays` (in `specs` order) as HF-named shards + index; return {file: sha256}."""
    shards = shard_specs(specs, shard_bytes)
    names = shard_names(len(shards))
    hashes = {}
    for file_name, shard in zip(names, shards, strict=True):
        writer = SafetensorsWriter(folder / file_name, shard)
        for spec in shard:
            name, array = next(arrays)
            writer.write(name, array)
            if progress:
                progress(spec.nbytes)
        writer.close()
        hashes[file_name] = writer.sha256.hexdigest()
    if len(shards) > 1:
        weight_map = {s.name: n for n, shard in zip(names, shards, strict=True) for s in shard}
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
        raw = json.dumps(index, indent=2, sort_keys=True) + "\n"
        try:
            (folder / INDEX_NAME).write_text(raw, encoding="utf-8")
        except OSError as e:
            raise OutputError(f"{folder / INDEX_NAME}: cannot write ({e.strerror})") from None
        hashes[INDEX_NAME] = hashlib.sha256(raw.encode()).hexdigest()
    return hashes


def sha256_file(path: Path, chunk: int = 8 << 20, stop: threading.Event | None = None) -> str:
    """The sha256 of a file, fed from mappings of `chunk` bytes of it, each unmapped before
    the next (hashlib releases the GIL on large updates; mapped, the page cache's bytes are
    hashed where they are instead of copied into a buffer first: 1.8 of the 16 GB
    conversion's CPU seconds). One mapping of the whole file would do, but a mapped page
    counts in the process's resident memory while the mapping lives: one of a 5 GB shard
    took the 8B conversion's peak from 3.7 to 5.4 GB. 8, 16 and 64 MB mappings hash a 4 GB
    shard equally fast here (2.64-2.70 CPU-s). A file that cannot be mapped (empty, or a
    pipe) is read.

    Setting `stop` abandons the work (the result is then meaningless): a cancelled
    conversion need not wait for the hash of a 10 GB shard.
    """
    digest = hashlib.sha256()
    chunk = max(mmap.ALLOCATIONGRANULARITY, chunk - chunk % mmap.ALLOCATIONGRANULARITY)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            mapped = mmap.mmap(f.fileno(), min(size, chunk), access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # empty (ValueError), or not mappable
            buf = memoryview(bytearray(chunk))  # one buffer, reused
            while (n := f.readinto(buf)) and not (stop and stop.is_set()):
                digest.update(buf[:n])
            return digest.hexdigest()
        offset = 0
        while True:
            with mapped:
                if hasattr(mapped, "madvise"):
                    mapped.madvise(mmap.MADV_SEQUENTIAL)  # read ahead, as read() would
                digest.update(mapped)
            offset += chunk
            if offset >= size or (stop and stop.is_set()):
                return digest.hexdigest()
            length = min(size - offset, chunk)
            mapped = mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ, offset=offset)


def to_torch(array: np.ndarray, code: str) -> torch.Tensor:
    """A numpy array in storage dtype -> torch tensor of the real dtype (shares memory):
    bfloat16 from uint16, the float8 formats from uint8."""
    import torch  # the plain conversion path moves bytes and never needs torch

    tensor = torch.from_numpy(array)
    real = DTYPES[code][1]
    if str(tensor.dtype).removeprefix("torch.") == real:
        return tensor
    if not hasattr(torch, real):
        raise BadInputError(
            f"tensor dtype {code} ({real}) needs a newer torch than {torch.__version__}"
        )
    return tensor.view(getattr(torch, real))
