"""Where a conversion's tensors come from: one reader per checkpoint format, one interface.

A `Source` answers what mapping, verification and export ask of a checkpoint, whatever its
format: the HF config, each tensor's HF name, dense shape and dtype, and `read(name)`, that
tensor as a dense numpy array, one at a time. Quantised formats are dequantised here, tensor
by tensor, so a conversion holds one dense tensor (and its temporaries) at a time:

  dense          safetensors / pytorch_model.bin, as stored (dense.py)
  fp8            fine-grained FP8: blocks, one scale per tensor or per row (fp8.py)
  fbgemm_fp8     FP8 with a scale per row (fp8.py; refused: transformers cannot check it on CPU)
  compressed-tensors  float8 and int pack-quantized of llm-compressor (compressed.py)
  mxfp4          gpt-oss's FP4 experts (mxfp4.py)
  gguf           llama.cpp's files (gguf.py)

`open_source` picks the reader from the folder's contents: a `.gguf` file (or `gguf_file`),
else config.json's `quantization_config` (none: dense). A source the gate could not check
(transformers has no CPU dequantisation of the format) carries a `refusal`; `convert` and
`verify` raise it, `inspect` reports it.

For the gate's reference, a source also says how transformers loads it
(`hf_quantization`: the quantization_config transformers dequantises with) and hands
transformers' loader the tensors as stored (`hf_inputs`), so the reference is transformers'
own dequantisation, checked against ours.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gqa_convert.checkpoint import DTYPES, TensorInfo
from gqa_convert.errors import BadInputError, GQAConvertError, UnsupportedModelError


@dataclass(frozen=True)
class SourceTensor:
    """One tensor as the conversion sees it: HF name, dense shape, the dtype `read` returns.

    `parts` are the stored tensors it is made of (the tensor itself when stored dense; a
    weight and its scales when quantised); `scheme` says how it is quantised (None: dense).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code of the dense array: F32, F16 or BF16
    path: Path  # the file holding its (main) bytes
    parts: tuple[TensorInfo, ...] = ()
    scheme: str | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the dense array `read` returns."""
        return DTYPES[self.dtype][0].itemsize * int(np.prod(self.shape, dtype=np.int64))

    @property
    def stored_bytes(self) -> int:
        """Bytes of its parts in the files."""
        return sum(part.nbytes for part in self.parts)


@dataclass
class Source:
    """A checkpoint, as a set of dense tensors read one at a time (see the module docstring).

    `path` is what names it (a folder, or a .gguf file); `folder` the folder it lives in;
    `stored` every tensor of its safetensors / .bin files, by stored name (empty for GGUF).
    `hf_config` is the HF config of the dense model (config.json without its
    quantization_config, or what transformers derives from GGUF metadata). `files` are the
    files a conversion reads (for the manifest's hashes). `quantization` records the source's
    quantisation for the manifest (None: dense); `default_dtype` is the export's dtype when
    none is asked for (None: each tensor keeps its own).
    """

    path: Path
    folder: Path
    hf_config: dict[str, Any]
    tensors: dict[str, SourceTensor]
    files: list[Path]
    stored: dict[str, TensorInfo] = field(default_factory=dict)  # safetensors / .bin tensors
    quantization: dict[str, Any] | None = None
    default_dtype: str | None = None
    refusal: GQAConvertError | None = None
    # Whether the folder's tokenizer / generation_config files are the model's, to copy into
    # the export (not beside a .gguf file: the GGUF holds its own, and the folder's may not
    # be its model's).
    passthrough: bool = True
    # How transformers loads it, for the gate's reference: the quantization_config it
    # dequantises with (None: plain), and keyword arguments of AutoConfig.from_pretrained.
    hf_quantization: dict[str, Any] | None = None
    readers: dict[str, Callable[[], np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def quantized(self) -> bool:
        return self.quantization is not None

    @property
    def dequantisation_bytes(self) -> int:
        """What dequantising holds at once besides its result, on the gate's two sides
        (transformers' and ours): 4x the largest tensor in float32 (measured 3.5x on
        SmolLM2's GGUF); 0 for a dense source."""
        if not self.quantized:
            return 0
        return 4 * max(4 * int(np.prod(t.shape, dtype=np.int64)) for t in self.tensors.values())

    def read(self, name: str) -> np.ndarray:
        """The dense tensor `name` as a numpy array in its storage dtype (BF16 as uint16)."""
        return self.readers[name]()

    def transformers_config(self) -> Any:
        """transformers' own config of the source: AutoConfig of its config.json."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.folder, trust_remote_code=False)

    def hf_inputs(self, model: Any) -> Mapping[str, Any]:
        """What transformers' loader reads to build the reference `model`: its state-dict
        input, by name, each value materialised with `value[...]` (a torch tensor)."""
        from gqa_convert.sources.dense import stored_inputs

        return stored_inputs(self)


def open_source(
    path: str | Path, gguf_file: str | None = None, *, check_sizes: bool = True
) -> Source:
    """The source at `path`: a .gguf file, a folder holding `gguf_file` (or one .gguf and no
    config.json), or an HF checkpoint folder, dense or quantised by its quantization_config.
    Headers only: no tensor is read. `check_sizes=False` accepts files shorter than their
    headers say (`inspect` reports them)."""
    from gqa_convert.config import read_json

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        if gguf_file is not None and gguf_file != path.name:
            raise BadInputError(f"{path}: --gguf-file {gguf_file} names another file")
        return _open_gguf(path, check_sizes)
    _check_folder(path)
    if gguf_file is not None:
        gguf = path / gguf_file
        if Path(gguf_file).name != gguf_file or not gguf.is_file():
            raise BadInputError(f"{path}: no file {gguf_file!r} in the folder (--gguf-file)")
        return _open_gguf(gguf, check_sizes)
    if not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _open_gguf(ggufs[0], check_sizes)
        if ggufs:
            names = ", ".join(p.name for p in ggufs)
            raise BadInputError(f"{path}: several .gguf files ({names}); pick one with --gguf-file")
    hf_config = read_json(path / "config.json")
    quantization = hf_config.get("quantization_config")
    if quantization is None:
        from gqa_convert.sources.dense import open_dense

        return open_dense(path, hf_config, check_sizes)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if not isinstance(method, str):
        raise BadInputError(
            f"{path / 'config.json'}: quantization_config = {quantization!r} names no quant_method"
        )
    if method not in FORMATS:
        raise UnsupportedModelError(
            f"{path / 'config.json'}: quantization_config.quant_method = {method!r} is not "
            f"supported (supported: {', '.join(FORMATS)}, and GGUF files)"
        )
    return FORMATS[method](path, hf_config, check_sizes)


def _open_gguf(path: Path, check_sizes: bool) -> Source:
    from gqa_convert.sources.gguf import open_gguf

    return open_gguf(path, check_sizes)


def _check_folder(src: Path) -> None:
    if not src.is_dir():
        missing = "no such folder" if not src.exists() else "not a folder or .gguf file"
        raise BadInputError(f"{src}: {missing} (expected an HF checkpoint folder or a .gguf file)")
    try:
        empty = not any(src.iterdir())
    except OSError as e:
        raise BadInputError(f"{src}: cannot list the folder ({e.strerror})") from None
    if empty:
        raise BadInputError(f"{src}: empty folder (expected config.json and model.safetensors)")


Opener = Callable[[Path, dict[str, Any], bool], Source]  # (folder, config.json, check_sizes)


def _format(module: str, function: str) -> Opener:
    """The opener `function` of sources/`module`.py, imported when a checkpoint needs it."""

    def opener(path: Path, hf_config: dict[str, Any], check_sizes: bool) -> Source:
        import importlib

        found = importlib.import_module(f"gqa_convert.sources.{module}")
        return getattr(found, function)(path, hf_config, check_sizes)

    return opener


# quantization_config.quant_method -> its reader
FORMATS: dict[str, Opener] = {
    "fp8": _format("fp8", "open_fp8"),
    "fbgemm_fp8": _format("fp8", "open_fbgemm_fp8"),
    "compressed-tensors": _format("compressed", "open_compressed_tensors"),
    "mxfp4": _format("mxfp4", "open_mxfp4"),
}
