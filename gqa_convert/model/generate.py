"""Text generation with a KV cache held at n_kv heads: greedy and sampled, batched prompts
with left padding, stop tokens. `GQATransformer.generate` is `generate` below.

The loop follows transformers' `generate`, so that greedy output equals it token for token:

- one prefill forward on the prompts, then one forward per new token, each through the
  model's own forward (`cache=`, so every decoder option, hook and soft-cap applies);
- rotary positions of a left-padded row count its attended tokens (the mask's cumsum - 1),
  the window of a sliding layer counts padded positions, as HF's masks do;
- dynamic rope: the frequencies of each step are those of its length (HF's max(position) +
  1), and cached keys keep the frequencies they were rotated with (model/kv_cache.py);
- longrope: when the sequence first grows past `original_max_position_embeddings`, the cache
  is dropped and the whole sequence fed again with the long factors
  (`Phi3ForCausalLM.prepare_inputs_for_generation`, the family that ships longrope);
- sampling: temperature, then top-k, then top-p (HF's warpers, in HF's order), then one
  `torch.multinomial` per step; with `seed`, from a generator seeded with it, which draws
  what HF draws after `torch.manual_seed(seed)`.
- a row that emitted a stop token gets `pad_token_id` after it; generation ends when every
  row has stopped or after `max_new_tokens`.

For the call, each layer projects Q/K/V with one `F.linear` over a fused copy of its
weights in HF's `[heads * d_head, d_model]` layout, HF's own op (model/fused.py: + the Q/K/V
weights in memory until the call returns): with 2 threads, torch's parallel `bmm` over TL's
per-head layout made decoding half as fast as HF's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from gqa_convert.model.fused import fused_projections

if TYPE_CHECKING:
    from gqa_convert.model.decoder import GQATransformer
    from gqa_convert.model.kv_cache import KVCache


def filter_logits(
    logits: Float[Tensor, "batch d_vocab"],
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Float[Tensor, "batch d_vocab"]:
    """Logits divided by `temperature`, those outside the `top_k` largest and outside the
    smallest set whose probability reaches `top_p` set to -inf (HF's warpers; ties at the
    k-th value are kept, and the most likely token always is)."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ascending, order = torch.sort(logits, descending=False)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[..., -1:] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def _check(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"temperature must be finite and > 0 (do_sample=False is greedy), got {temperature}"
        )
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be an int >= 0 (0: off), got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@torch.no_grad()
def generate(
    model: GQATransformer,
    tokens: Int[Tensor, "batch pos"] | str | list[str],
    max_new_tokens: int = 10,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_at_eos: bool = True,
    use_fast_path: bool | None = None,
    on_token: Callable[[Int[Tensor, " batch"]], None] | None = None,
    cache: KVCache | None = None,
) -> Int[Tensor, "batch pos_plus_new"]:
    """Prompt and new tokens, [batch, prompt + new] (fewer new if every row stopped).

    `tokens`: ids [batch, pos] (with `attention_mask`, 0 on LEFT padding), or text, which
    the attached tokenizer turns into left-padded ids. Greedy unless `do_sample`; sampling
    uses `temperature`, `top_k` (None / 0: off), `top_p` (None / 1: off) and `seed`.
    Stop tokens: `eos_token_id`, default the export's generation_config.json
    (`model.generation_defaults`); `stop_at_eos=False` ignores them. `on_token(new)` is
    called with each step's new tokens [batch] (for streaming). `cache`: an empty
    `model.new_cache()` to fill, to inspect afterwards (default: a new one).
    """
    _check(max_new_tokens, temperature, top_k, top_p)
    device = model.embed.W_E.device
    if isinstance(tokens, str | list):
        tokens, attention_mask = model.tokenize(tokens, padding_side="left")
    tokens = tokens.to(device)
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be [batch, pos] with pos >= 1, got {list(tokens.shape)}")
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        if attention_mask.shape != tokens.shape:
            raise ValueError(
                f"attention_mask {list(attention_mask.shape)} must be tokens' shape "
                f"{list(tokens.shape)}"
            )
        if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
            raise ValueError("attention_mask has right padding: pad prompts on the left")
        if bool(attention_mask.all()):
            attention_mask = None  # no padding: plain causal attention (as HF)

    defaults = model.generation_defaults
    if eos_token_id is None:
        eos_token_id = defaults.eos_token_ids
    stop = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    stop = torch.tensor(stop if stop_at_eos else [], dtype=torch.long, device=device)
    if pad_token_id is None:
        pad_token_id = defaults.pad_token_id
    if pad_token_id is None and len(stop):
        pad_token_id = int(stop[0])  # HF: pad with the first eos
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device).manual_seed(seed)

    rope = model.cfg.rope
    switch = rope.original_max_position_embeddings if rope.type == "longrope" else None
    capacity = tokens.shape[1] + max_new_tokens - 1  # every token fed: all but the last
    if cache is None:
        cache = model.new_cache(capacity)
    elif cache.length:
        raise ValueError("cache must be empty (model.new_cache())")
    for layer in cache.layers:  # buffers grow in blocks, never past what the call feeds
        layer.capacity = max(layer.capacity, capacity)
    with fused_projections(model):  # Q/K/V in HF's layout for this call
        logits = model(
            tokens,
            use_fast_path,
            cache=cache,
            attention_mask=attention_mask,
            logits_to_keep=1,
        )
        running = torch.ones(tokens.shape[0], dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            scores = logits[:, -1].float()
            if do_sample:
                probs = filter_logits(scores, temperature, top_k, top_p).softmax(dim=-1)
                new = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                new = scores.argmax(dim=-1)
            if len(stop):
                new = torch.where(running, new, pad_token_id)
                running &= ~torch.isin(new, stop)
            tokens = torch.cat([tokens, new[:, None]], dim=1)
            if attention_mask is not None:
                ones = attention_mask.new_ones(len(new), 1)
                attention_mask = torch.cat([attention_mask, ones], dim=1)
            if on_token is not None:
                on_token(new)
            if step == max_new_tokens - 1 or not bool(running.any()):
                break
            if switch is not None and cache.length <= switch < tokens.shape[1]:
                cache.layers, feed = model.new_cache(capacity).layers, tokens  # long factors
            else:
                feed = new[:, None]
            logits = model(
                feed, use_fast_path, cache=cache, attention_mask=attention_mask, logits_to_keep=1
            )
    return tokens
