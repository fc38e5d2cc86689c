"""What both models are run on: the token sequences, and which length regimes they reach."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from gqa_convert.config import ModelConfig
from gqa_convert.errors import BadInputError, UsageError
from gqa_convert.verify.reference import _loading

DEFAULT_MIN_SEQ_LEN = 128
MAX_DEFAULT_SEQ_LEN = 1024  # the default never grows past this; longer regimes are reported

# A default text for checkpoints with a tokenizer: prose, code, numbers, other scripts.
DEFAULT_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "In 1905, Albert Einstein published four papers that changed physics.",
    "Grouped-query attention lets several query heads share one key and value head.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "The recipe needs 250 g of flour, 3 eggs, 0.5 l of milk and a pinch of salt.",
    "Le chat dort sur le canapé pendant que la pluie tombe doucement.",
    "東京は日本の首都です。",
    "To be, or not to be, that is the question.",
    "SELECT name, COUNT(*) FROM users GROUP BY name ORDER BY 2 DESC;",
    "She opened the window, and the smell of the sea filled the room.",
    "Researchers convert checkpoints to study how attention heads route information.",
)


def length_thresholds(cfg: ModelConfig) -> list[tuple[str, int]]:
    """The sequence lengths past which the model computes differently: a sliding window,
    llama3 / longrope's original_max_position_embeddings, dynamic NTK's n_ctx."""
    found = [("sliding_window", cfg.sliding_window)]
    if cfg.rope.type in ("llama3", "longrope"):
        name = f"{cfg.rope.type}_original_max_position_embeddings"
        found.append((name, cfg.rope.original_max_position_embeddings))
    if cfg.rope.type == "dynamic":
        found.append(("dynamic_max_position_embeddings", cfg.n_ctx))
    return [(name, size) for name, size in found if size]


def default_seq_len(cfg: ModelConfig) -> int:
    """Long enough to cross every length threshold (by 64 tokens) when they are small;
    capped at MAX_DEFAULT_SEQ_LEN."""
    need = max([DEFAULT_MIN_SEQ_LEN] + [size + 64 for _, size in length_thresholds(cfg)])
    return min(need, MAX_DEFAULT_SEQ_LEN)


def regimes(cfg: ModelConfig, longest: int) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Which length-dependent behaviours the inputs reached, and those they did not."""
    found, missed = {}, []
    for name, size in length_thresholds(cfg):
        exercised = longest > size
        found[name] = {"size": size, "exercised": exercised}
        if not exercised:
            missed.append(
                f"{name} = {size} was not exercised (longest input {longest} tokens; "
                f"pass --seq-len {size + 64} or longer)"
            )
    return found, missed


# The files transformers builds a tokenizer from (fast tokenizer.json, sentencepiece, BPE
# vocab.json + merges.txt, WordPiece vocab.txt): any of them means SRC ships a tokenizer,
# which transformers must then load (or the check stops with exit 3).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def tokenizer_files(src: Path) -> list[str]:
    """The tokenizer files in `src` (see TOKENIZER_FILES)."""
    return [name for name in TOKENIZER_FILES if (Path(src) / name).is_file()]


def has_tokenizer(src: Path) -> bool:
    return bool(tokenizer_files(src))


def inputs_detail(src: Path, kind: str, seq_len: int, prompts: Sequence[str] | None) -> str:
    """Which inputs were used, in words (the report's `inputs_detail`)."""
    if kind == "tokenizer":
        return (
            f"text tokenized by SRC's tokenizer ({', '.join(tokenizer_files(src))}): the "
            f"built-in sentences, {seq_len} tokens, + {len(prompts or ())} prompt(s)"
        )
    return f"random token ids (seed 0): SRC has none of {', '.join(TOKENIZER_FILES)}"


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path}: cannot read the prompts file ({e})") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise BadInputError(f"{path}: the prompts file has no non-empty line")
    return prompts


def make_inputs(
    src: Path, cfg: ModelConfig, prompts: Sequence[str] | None, seq_len: int
) -> tuple[list[Int[Tensor, "1 pos"]], str]:
    """The token sequences to compare on, and "tokenizer" or "random".

    With a tokenizer in `src`: DEFAULT_SENTENCES repeated to exactly `seq_len` tokens, plus
    each of `prompts` (cut to `seq_len`). Without one: `seq_len` random ids (seed 0).
    """
    if not has_tokenizer(src):
        if prompts:
            raise UsageError(
                f"{src}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}), so --prompt "
                "cannot be used"
            )
        generator = torch.Generator().manual_seed(0)
        return [torch.randint(0, cfg.d_vocab, (1, seq_len), generator=generator)], "random"
    from transformers import AutoTokenizer

    with _loading(src, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    first = tokenizer(" ".join(DEFAULT_SENTENCES)).input_ids
    more = tokenizer(" " + " ".join(DEFAULT_SENTENCES), add_special_tokens=False).input_ids
    ids = list(first)
    while len(ids) < seq_len:
        ids += more
    sequences = [ids[:seq_len]]
    sequences += [tokenizer(p).input_ids[:seq_len] for p in prompts or ()]
    for i, seq in enumerate(sequences):
        if not seq:
            raise UsageError(f"prompt {i}: tokenizes to no tokens")
        if max(seq) >= cfg.d_vocab:
            raise BadInputError(
                f"{src}: the tokenizer yields id {max(seq)}, beyond vocab_size {cfg.d_vocab}"
            )
    return [torch.tensor([seq]) for seq in sequences], "tokenizer"
