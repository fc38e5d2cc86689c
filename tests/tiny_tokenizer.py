"""A tiny BPE tokenizer (vocabulary 128, as tests/hf_models.py's TINY models), trained here on
a fixed text with the `tokenizers` library, so tests and README snippets can pass strings to
a converted toy model without any download."""

from __future__ import annotations

from pathlib import Path

TEXT = (
    "The quick brown fox jumps over the lazy dog. Grouped-query attention shares each key "
    "and value head among several query heads, which makes the KV cache smaller. "
    "Sparse autoencoders find features in the residual stream of a language model."
)
SPECIAL = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def save_tiny_tokenizer(folder: Path, vocab_size: int = 128) -> Path:
    """Write tokenizer.json and its config into `folder` (an HF checkpoint); returns it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()))
    tok.train_from_iterator([TEXT], trainer)
    assert tok.get_vocab_size() <= vocab_size
    PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL).save_pretrained(folder)
    return folder
