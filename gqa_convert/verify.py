"""Logit parity with the HF model, as a gate: run both on the same tokens and compare.

The reference is the source checkpoint run by transformers' own modelling code
(`trust_remote_code=False`); this is the only module that imports transformers models.

What is compared, in the compute dtype, over every position of every input:
  logits       max / mean |diff|, max |log-prob diff| (over the whole vocabulary),
               KL(HF || ours) per position (mean, max), top-1 agreement, top-5 overlap,
               and the worst position;
  activations  the relative error, max over positions of ||ours - hf|| / ||hf|| (the norm
               over the trailing axes of one position), of the embedding, the residual
               stream after every block and the final norm. On a failure, a second pass
               compares the components of each block, up to the first whose stream is
               over tolerance, in forward order: ln1 (attention input), q / k / v
               (projections, before rotary), rot_q / rot_k (after rotary), attn_out
               (after W_O), ln2 (MLP input), mlp_out, resid_post. The first component over
               tolerance is `first_divergence`.

HF's q / k after rotary are not a tensor its forward exposes: we hook `q_proj` / `k_proj`
and apply HF's own `apply_rotary_pos_emb` (from the family's modelling module) with the
cos / sin its `rotary_emb` returned during that same forward. So rot_q / rot_k compare our
rotary against HF's rotary code and frequencies on HF's own projections.

`first_divergence["layer"]` is a block index; -1 means the embedding, n_layers the final
norm or unembedding (every block matched, the logits did not).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from gqa_convert.config import ModelConfig, load_hf_config
from gqa_convert.errors import BadInputError, ParityError, UsageError

if TYPE_CHECKING:
    from gqa_convert.mapping import ConversionPlan
    from gqa_convert.model.decoder import GQATransformer

log = logging.getLogger(__name__)

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Tolerances:
    """Pass limits. `activation_rtol` bounds the relative error of every compared activation."""

    max_abs_logit_diff: float
    kl_max: float
    min_top1_agreement: float
    activation_rtol: float


# From scripts/measure_parity.py (table in the README): fp32 sits 200x above the worst
# correct conversion and 20x or more below the smallest mutation (rope theta off by 1%).
# bf16 / fp16 sit about twice above HF's own rounding noise (HF in that dtype against HF in
# fp32, on SmolLM2), so any reordering of low-precision arithmetic passes, and still 3x or
# more below every mutation but the 1% theta, which only fp32 can see.
TOLERANCES = {
    "float32": Tolerances(
        max_abs_logit_diff=1e-3, kl_max=1e-6, min_top1_agreement=0.99, activation_rtol=1e-4
    ),
    "bfloat16": Tolerances(
        max_abs_logit_diff=3.0, kl_max=0.03, min_top1_agreement=0.9, activation_rtol=0.15
    ),
    "float16": Tolerances(
        max_abs_logit_diff=0.5, kl_max=2e-3, min_top1_agreement=0.95, activation_rtol=0.05
    ),
}

# Elements of each float64 [positions, vocab] temporary of the logit statistics (32 MB):
# positions are compared this many vocab rows at a time (inspection.py bounds the memory).
STATS_CHUNK_ELEMENTS = 1 << 22
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

# Inside one block, in forward order.
# q_norm / k_norm only where the family has them (Qwen3, OLMo2). Post-norm blocks (OLMo2)
# run ln1 after attention and ln2 after the MLP: POST_NORM_COMPONENTS.
COMPONENTS = (
    "ln1",
    "q",
    "k",
    "v",
    "q_norm",
    "k_norm",
    "rot_q",
    "rot_k",
    "attn_out",
    "ln2",
    "mlp_out",
    "resid_post",
)
POST_NORM_COMPONENTS = (*COMPONENTS[1:9], "ln1", "mlp_out", "ln2", "resid_post")


@dataclass
class VerifyReport:
    """The result of `verify`; `to_dict()` is the `--json` output."""

    passed: bool
    dtype: str
    tokens: int
    sequences: int
    inputs: str  # "tokenizer" (real text) or "random" (token ids)
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    max_abs_logprob_diff: float
    kl_mean: float
    kl_max: float
    top1_agreement: float
    top5_overlap: float
    worst_position: dict[str, Any]
    tolerances: Tolerances
    failures: list[str]  # each check over tolerance, in words; empty when passed
    first_divergence: dict[str, Any] | None
    embed_rel_err: float
    layer_rel_err: list[float]  # residual stream after each block
    ln_final_rel_err: float
    components: dict[str, float] | None  # of the first diverging block, in forward order
    regimes: dict[str, dict[str, Any]] = field(default_factory=dict)
    inputs_detail: str = ""  # which inputs, in words: the tokenizer files, or why random
    # Positions whose logits hold NaN / Inf (the first few; side "ours", "hf" or "both"),
    # and per compared stream point the first such position. Any of them fails the gate.
    nonfinite_logits: list[dict[str, Any]] = field(default_factory=list)
    nonfinite_activations: dict[str, dict[str, Any]] = field(default_factory=dict)
    not_exercised: list[str] = field(default_factory=list)
    reference: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: _finite(v) for k, v in data.items()}

    def summary(self) -> str:
        """One line: passed or what failed and where."""
        if self.passed:
            return f"parity passed ({self.dtype}, {self.tokens} tokens)"
        where = self.first_divergence
        at = f"; first divergence: layer {where['layer']}, {where['component']}" if where else ""
        return f"parity failed ({self.dtype}): {'; '.join(self.failures)}{at}"


def _finite(value: Any) -> Any:
    """JSON has no inf / nan: they become strings, everything else is kept."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class ParityFailure(ParityError):
    """A parity check failed; `report` holds the full VerifyReport."""

    def __init__(self, report: VerifyReport):
        super().__init__(report.summary())
        self.report = report


def tolerances_for(
    dtype: str, overrides: Tolerances | dict[str, float] | None = None
) -> Tolerances:
    """The default tolerances of a compute dtype, with `overrides` (None values ignored)."""
    if dtype not in COMPUTE_DTYPES:
        raise UsageError(f"dtype {dtype!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
    if isinstance(overrides, Tolerances):
        return overrides
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(overrides) - {f.name for f in fields(Tolerances)}
    if unknown:
        raise UsageError(f"unknown tolerance(s): {', '.join(sorted(unknown))}")
    return replace(TOLERANCES[dtype], **overrides)


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


def _fresh_rotary(hf: nn.Module) -> None:
    """Reset HF's dynamic-NTK rotary to its initial frequencies: it keeps those of the
    longest sequence seen so far, so each input is compared as a fresh model runs it."""
    rotary = hf.model.rotary_emb
    if "dynamic" in str(getattr(rotary, "rope_type", "")) and hasattr(rotary, "original_inv_freq"):
        rotary.inv_freq = rotary.original_inv_freq.clone()
        rotary.max_seq_len_cached = rotary.original_max_seq_len


def has_tokenizer(src: Path) -> bool:
    return bool(tokenizer_files(src))


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


@contextmanager
def _loading(src: str | Path, what: str):
    """transformers' own failures to read `src` become a BadInputError naming it (exit 3)."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadInputError(
            f"{src}: transformers cannot load the reference {what} ({type(e).__name__}: {e})"
        ) from e


def load_reference(src: str | Path, dtype: str = "float32") -> nn.Module:
    """The HF model of `src` in `dtype`, by transformers' stock code (never remote code)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()  # "Loading weights" would cut into our output
    if bars:
        hf_logging.disable_progress_bar()
    try:
        with _loading(src, "model"):
            model = AutoModelForCausalLM.from_pretrained(
                src, dtype=COMPUTE_DTYPES[dtype], trust_remote_code=False
            )
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval()


def rel_err(ours: Tensor, ref: Tensor) -> float:
    """max over (batch, pos) of ||ours - ref|| / ||ref||, norms over the remaining axes."""
    if ours.shape != ref.shape:
        return math.inf
    b, p = ref.shape[:2]
    ours, ref = ours.float().reshape(b, p, -1), ref.float().reshape(b, p, -1)
    diff = (ours - ref).norm(dim=-1)
    scale = ref.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    err = (diff / scale).max().item()
    return math.inf if math.isnan(err) else err


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _hooks(pairs: Iterable[tuple[nn.Module, Callable[[Tensor], None]]]):
    """Forward hooks that read (never replace) each module's output, removed on exit."""
    handles = [
        module.register_forward_hook(lambda _m, _i, out, fn=fn: fn(_first(out)))
        for module, fn in pairs
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hf_points(hf: nn.Module, blocks: Sequence[int]) -> dict[str, nn.Module]:
    """HF modules whose outputs we compare: the stream, and the components of `blocks`.

    Post-norm blocks (OLMo2: `post_feedforward_layernorm`) compare ln1 / attn_out with the
    norm after attention and ln2 / mlp_out with the norm after the MLP, as our ln1 / ln2 are
    those norms. A fused `qkv_proj` (Phi-3) is read whole and split in `_hf_rotated`."""
    body = hf.model
    points = {"embed": body.embed_tokens, "ln_final": body.norm}
    points.update({f"resid_post.{i}": block for i, block in enumerate(body.layers)})
    for i in blocks:
        block, attn = body.layers[i], body.layers[i].self_attn
        post = getattr(block, "post_feedforward_layernorm", None)
        parts = {
            "ln1": block.post_attention_layernorm if post else block.input_layernorm,
            "attn_out": block.post_attention_layernorm if post else attn,
            "ln2": post or block.post_attention_layernorm,
            "mlp_out": post or block.mlp,
        }
        for name in ("q", "k", "v", "qkv"):
            if hasattr(attn, f"{name}_proj"):
                parts[name] = getattr(attn, f"{name}_proj")
        for name in ("q_norm", "k_norm"):
            if isinstance(getattr(attn, name, None), nn.Module):
                parts[name] = getattr(attn, name)
        points.update({f"{name}.{i}": module for name, module in parts.items()})
    return points


def _our_points(model: GQATransformer, blocks: Sequence[int]) -> dict[str, nn.Module]:
    points = {"embed": model.hook_embed, "ln_final": model.ln_final}
    points.update({f"resid_post.{i}": b.hook_resid_post for i, b in enumerate(model.blocks)})
    for i in blocks:
        block = model.blocks[i]
        parts = {
            "ln1": block.ln1,
            "q": block.attn.hook_q,
            "k": block.attn.hook_k,
            "v": block.attn.hook_v,
            "q_norm": block.attn.q_norm,
            "k_norm": block.attn.k_norm,
            # None on a layer without rotary (SmolLM3's NoPE): the attention has no rot hooks.
            "rot_q": getattr(block.attn, "hook_rot_q", None),
            "rot_k": getattr(block.attn, "hook_rot_k", None),
            "attn_out": block.hook_attn_out,
            "ln2": block.ln2,
            "mlp_out": block.hook_mlp_out,
        }
        points.update({f"{name}.{i}": m for name, m in parts.items() if m is not None})
    return points


def _hf_rotated(hf: nn.Module, blocks: Sequence[int], acts: dict[str, Any]) -> None:
    """Give HF's q / k / v our shape [batch, pos, head, d_head] and add q / k after HF's own
    rotary (its `apply_rotary_pos_emb`, with the cos / sin its forward computed), applied to
    q / k after their norm where the family has one, and not at all on a layer without
    rotary (SmolLM3's `use_rope = False`)."""
    cos, sin = acts.pop("rotary")
    for i in blocks:
        attn = hf.model.layers[i].self_attn
        if f"qkv.{i}" in acts:  # Phi-3's fused projection: rows q, then k, then v
            n_kv = hf.config.num_key_value_heads * attn.head_dim
            qkv = acts.pop(f"qkv.{i}")
            sizes = [qkv.shape[-1] - 2 * n_kv, n_kv, n_kv]
            acts[f"q.{i}"], acts[f"k.{i}"], acts[f"v.{i}"] = qkv.split(sizes, dim=-1)
        for name in ("q", "k", "v"):
            b, p, _ = acts[f"{name}.{i}"].shape
            acts[f"{name}.{i}"] = acts[f"{name}.{i}"].view(b, p, -1, attn.head_dim)
        # HF rotates [batch, head, pos, d_head]; ours is [batch, pos, head, d_head].
        q, k = (acts.get(f"{name}_norm.{i}", acts[f"{name}.{i}"]) for name in ("q", "k"))
        q, k = (t.reshape(*t.shape[:2], -1, attn.head_dim) for t in (q, k))  # OLMo2's norms
        if getattr(attn, "use_rope", True):
            apply_rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
            q, k = (
                t.transpose(1, 2)
                for t in apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            )
        acts[f"rot_q.{i}"], acts[f"rot_k.{i}"] = q, k


def _nonfinite_position(x: Tensor) -> int | None:
    """The first position (axis 1 of [batch, pos, ...]) holding a NaN or Inf, if any."""
    bad = ~torch.isfinite(x.reshape(x.shape[0], x.shape[1], -1)).all(-1).any(0)  # [pos]
    return int(bad.nonzero()[0, 0]) if bad.any() else None


def _compare(
    hf: nn.Module,
    ours: GQATransformer,
    tokens: Tensor,
    blocks: Sequence[int] = (),
    nonfinite: dict[str, dict[str, Any]] | None = None,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Run both on `tokens`: both logits, and the relative error at each compared point
    (`embed`, `resid_post.{l}`, `ln_final`, and `{component}.{l}` for l in `blocks`).
    A point where either side holds NaN / Inf goes into `nonfinite`: its first such
    position and which side ("ours", "hf" or "both")."""
    acts: dict[str, Any] = {}
    errors: dict[str, float] = {}

    def keep(name: str) -> Callable[[Tensor], None]:
        return lambda out: acts.__setitem__(name, out)

    def measure(name: str) -> Callable[[Tensor], None]:
        def record(out: Tensor) -> None:
            # A point HF lacks (an export with more layers than SRC) counts as diverged.
            errors[name] = rel_err(out, acts[name]) if name in acts else math.inf
            if nonfinite is None or name in nonfinite or name not in acts:
                return
            where = {"ours": _nonfinite_position(out), "hf": _nonfinite_position(acts[name])}
            sides = [side for side, pos in where.items() if pos is not None]
            if sides:
                position = min(where[side] for side in sides)
                side = "both" if len(sides) == 2 else sides[0]
                nonfinite[name] = {"position": position, "side": side}

        return record

    # rotary_emb returns (cos, sin); keep the pair, not its first element.
    _fresh_rotary(hf)
    rotary = hf.model.rotary_emb.register_forward_hook(
        lambda _m, _i, out: acts.__setitem__("rotary", out)
    )
    try:
        with torch.no_grad(), _hooks((m, keep(n)) for n, m in _hf_points(hf, blocks).items()):
            theirs = hf(input_ids=tokens, use_cache=False).logits
    finally:
        rotary.remove()
    _hf_rotated(hf, blocks, acts)
    with torch.no_grad(), _hooks((m, measure(n)) for n, m in _our_points(ours, blocks).items()):
        mine = ours(tokens)
    return mine, theirs, errors


def _localise(
    hf: nn.Module,
    ours: GQATransformer,
    inputs: Sequence[Tensor],
    last: int,
    rtol: float,
    chunk: int = 8,
) -> tuple[dict[str, Any] | None, dict[str, float] | None]:
    """The first (block, component) over `rtol` in forward order, in blocks 0..`last`, and
    that block's component errors; (None, None) if none is.

    Components, not the residual stream, decide: a bug whose output is small next to the
    stream (a wrong theta in a layer that attends mostly to the first token) is named where
    it is, not where the stream first crosses the tolerance. `chunk` blocks at a time bound
    the activations held.
    """
    for start in range(0, last + 1, chunk):
        blocks = range(start, min(start + chunk, last + 1))
        errors: dict[str, float] = {}
        for tokens in inputs:
            for name, err in _compare(hf, ours, tokens, blocks)[2].items():
                errors[name] = max(errors.get(name, 0.0), err)
        for layer in blocks:
            order = COMPONENTS if ours.cfg.norm_placement == "pre" else POST_NORM_COMPONENTS
            parts = {n: errors[f"{n}.{layer}"] for n in order if f"{n}.{layer}" in errors}
            bad = next((name for name, err in parts.items() if not err <= rtol), None)
            if bad is not None:
                return {"layer": layer, "component": bad}, parts
    return None, None


@dataclass
class _LogitStats:
    """Running totals of the logit comparison over all sequences.

    Maxima propagate NaN (Python's `max(0.0, nan)` is 0.0: a NaN must never read as a
    match). Positions where either side's logits hold NaN / Inf are listed in `nonfinite`
    (the first few) and counted in `n_nonfinite`; the gate fails on any.
    """

    n: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    count_abs: int = 0
    max_logprob: float = 0.0
    kl_sum: float = 0.0
    kl_max: float = 0.0
    top1: int = 0
    top5: float = 0.0
    worst: dict[str, Any] = field(default_factory=dict)
    nonfinite: list[dict[str, Any]] = field(default_factory=list)
    n_nonfinite: int = 0

    def add(
        self,
        seq: int,
        tokens: Int[Tensor, "1 pos"],
        ours: Float[Tensor, "1 pos vocab"],
        theirs: Float[Tensor, "1 pos vocab"],
    ) -> None:
        # float64 temporaries, STATS_CHUNK_ELEMENTS at a time: [1024, 128k] in one go took
        # 8.2 GB; in chunks of 2^22 elements (32 positions of 128k), 0.27 GB (measured).
        step = max(1, STATS_CHUNK_ELEMENTS // ours.shape[-1])
        for start in range(0, ours.shape[1], step):
            end = start + step
            self._add(seq, tokens, ours[0, start:end], theirs[0, start:end], start)

    def _add(
        self,
        seq: int,
        tokens: Int[Tensor, "1 pos"],
        ours: Float[Tensor, "chunk vocab"],
        theirs: Float[Tensor, "chunk vocab"],
        offset: int,
    ) -> None:
        ours, theirs = ours.double(), theirs.double()  # [chunk, vocab]
        bad_ours, bad_hf = ~torch.isfinite(ours).all(-1), ~torch.isfinite(theirs).all(-1)
        for i in (bad_ours | bad_hf).nonzero().flatten().tolist():
            self.n_nonfinite += 1
            if len(self.nonfinite) < 5:
                side = "both" if bad_ours[i] and bad_hf[i] else "ours" if bad_ours[i] else "hf"
                pos = offset + i
                self.nonfinite.append(
                    {
                        "sequence": seq,
                        "position": pos,
                        "token_id": int(tokens[0, pos]),
                        "side": side,
                    }
                )
        abs_diff = (ours - theirs).abs()
        lp_ours, lp_theirs = ours.log_softmax(-1), theirs.log_softmax(-1)
        kl = (lp_theirs.exp() * (lp_theirs - lp_ours)).sum(-1)  # KL(HF || ours), [chunk]
        per_pos = abs_diff.amax(-1)  # [chunk], NaN where either side has a NaN
        worst = int(per_pos.argmax())  # argmax takes NaN as the largest
        if not self.worst or not per_pos[worst] <= self.worst["max_abs_logit_diff"]:
            self.worst = {
                "sequence": seq,
                "position": offset + worst,
                "token_id": int(tokens[0, offset + worst]),
                "max_abs_logit_diff": float(per_pos[worst]),
                "kl": float(kl[worst]),
            }
        self.n += ours.shape[0]
        self.max_abs = _nanmax(self.max_abs, float(per_pos.max()))
        self.sum_abs += float(abs_diff.sum())
        self.count_abs += abs_diff.numel()
        self.max_logprob = _nanmax(self.max_logprob, float((lp_ours - lp_theirs).abs().max()))
        self.kl_sum += float(kl.sum())
        self.kl_max = _nanmax(self.kl_max, float(kl.max()))
        self.top1 += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        top5_ours, top5_theirs = ours.topk(5, -1).indices, theirs.topk(5, -1).indices
        shared = (top5_ours[:, :, None] == top5_theirs[:, None, :]).any(-1).sum(-1)  # [chunk]
        self.top5 += float(shared.sum()) / 5


def _nanmax(a: float, b: float) -> float:
    """max(a, b), NaN if either is NaN."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


_SIDES = {"ours": "our model", "hf": "the HF model", "both": "both models"}


def _nan_to_inf(x: float) -> float:
    return math.inf if math.isnan(x) else x


def verify(
    src: str | Path,
    converted: str | Path | None = None,
    *,
    dtype: str = "float32",
    prompts: Sequence[str] | None = None,
    seq_len: int | None = None,
    tolerances: Tolerances | dict[str, float] | None = None,
    model: GQATransformer | None = None,
    reference: nn.Module | None = None,
    revision: str | None = None,
    token: str | None = None,
) -> VerifyReport:
    """Compare our conversion of the HF checkpoint `src` with the HF model itself.

    `src` may be a Hub repo id, fetched at `revision` with `token` as `convert` fetches it
    (`hub.resolve_source`: the HF cache, HF_HUB_OFFLINE=1 works from it).

    Ours is `model` if given (cast in place to `dtype`), else the export `converted`, else
    `src` converted in memory. `reference` is a preloaded HF model of `src` in `dtype`.
    `prompts` are extra texts (they need a tokenizer in `src`); `seq_len` defaults to
    `default_seq_len`. `tolerances` overrides some or all of TOLERANCES[dtype].
    """
    from gqa_convert.hub import resolve_source
    from gqa_convert.model.decoder import GQATransformer

    limits = tolerances_for(dtype, tolerances)
    source = resolve_source(src, revision=revision, token=token)
    src = source.path
    source_cfg = load_hf_config(src)
    if seq_len is None:
        seq_len = default_seq_len(source_cfg)
    if seq_len < 1:
        raise UsageError(f"--seq-len must be positive, got {seq_len}")
    inputs, kind = make_inputs(src, source_cfg, prompts, seq_len)
    if kind == "tokenizer":
        inputs_detail = (
            f"text tokenized by SRC's tokenizer ({', '.join(tokenizer_files(src))}): the "
            f"built-in sentences, {seq_len} tokens, + {len(prompts or ())} prompt(s)"
        )
    else:
        inputs_detail = f"random token ids (seed 0): SRC has none of {', '.join(TOKENIZER_FILES)}"

    hf = reference if reference is not None else load_reference(src, dtype)
    if model is None:
        if converted is not None:
            model = GQATransformer.from_pretrained(converted)
        else:
            from gqa_convert.mapping import plan_conversion

            model = model_from_reference(plan_conversion(src), hf)
    model = model.to(COMPUTE_DTYPES[dtype]).eval()
    shape_fields = ("n_layers", "d_model", "n_heads", "n_key_value_heads", "d_head", "d_mlp")
    for name in (*shape_fields, "d_vocab"):
        if getattr(model.cfg, name) != getattr(source_cfg, name):
            raise BadInputError(
                f"{converted or 'the model'}: {name} = {getattr(model.cfg, name)}, "
                f"{src / 'config.json'} says {getattr(source_cfg, name)}: not a conversion of {src}"
            )

    stats, stream, nonfinite = _LogitStats(), {}, {}
    for i, tokens in enumerate(inputs):
        seen = {}
        ours, theirs, errors = _compare(hf, model, tokens, nonfinite=seen)
        for name, where in seen.items():
            token = int(tokens[0, where["position"]])
            nonfinite.setdefault(name, {"sequence": i, **where, "token_id": token})
        if ours.shape != theirs.shape:
            raise BadInputError(
                f"{converted or src}: our logits have shape {list(ours.shape)}, the HF model's "
                f"{list(theirs.shape)}: not a conversion of {src}"
            )
        stats.add(i, tokens, ours, theirs)
        for name, err in errors.items():
            stream[name] = max(stream.get(name, 0.0), err)
    n_layers = len(model.blocks)
    layer_errs = [stream.get(f"resid_post.{i}", math.inf) for i in range(n_layers)]
    embed_err, final_err = stream.get("embed", math.inf), stream.get("ln_final", math.inf)

    failures = []
    if stats.n_nonfinite:
        at = stats.nonfinite[0]
        failures.append(
            f"non-finite logits at {stats.n_nonfinite} position(s), first: sequence "
            f"{at['sequence']} position {at['position']} (token {at['token_id']}) in "
            f"{_SIDES[at['side']]}"
        )
    points = ["embed", *(f"resid_post.{i}" for i in range(n_layers)), "ln_final"]
    bad_point = next((name for name in points if name in nonfinite), None)
    if bad_point is not None:
        at = nonfinite[bad_point]
        failures.append(
            f"non-finite activation {bad_point}: sequence {at['sequence']} position "
            f"{at['position']} (token {at['token_id']}) in {_SIDES[at['side']]}"
        )
    figures = {
        "max_abs_logit_diff": _nan_to_inf(stats.max_abs),
        "kl_max": _nan_to_inf(stats.kl_max),
    }
    for name, value in figures.items():
        if not value <= getattr(limits, name):
            failures.append(f"{name} {value:.3g} > {getattr(limits, name):.3g}")
    top1 = stats.top1 / stats.n
    if top1 < limits.min_top1_agreement:
        failures.append(f"top1_agreement {top1:.4f} < {limits.min_top1_agreement:.4f}")
    over = [i for i, e in enumerate(layer_errs) if not e <= limits.activation_rtol]
    if over:
        failures.append(
            f"residual stream after block {over[0]}: relative error {layer_errs[over[0]]:.3g} "
            f"> {limits.activation_rtol:.3g}"
        )

    first, components = None, None
    if not embed_err <= limits.activation_rtol:
        failures.append(f"embedding: relative error {embed_err:.3g}")
        first = {"layer": -1, "component": "embed"}
    elif failures:
        last = over[0] if over else n_layers - 1
        first, components = _localise(hf, model, inputs, last, limits.activation_rtol)
        if first is None:
            name = "ln_final" if not final_err <= limits.activation_rtol else "unembed"
            first = {"layer": n_layers, "component": name}

    found, missed = regimes(source_cfg, max(t.shape[1] for t in inputs))
    for line in missed:
        log.warning("%s", line)
    return VerifyReport(
        passed=not failures,
        dtype=dtype,
        tokens=stats.n,
        sequences=len(inputs),
        inputs=kind,
        inputs_detail=inputs_detail,
        max_abs_logit_diff=_nan_to_inf(stats.max_abs),
        mean_abs_logit_diff=_nan_to_inf(stats.sum_abs / stats.count_abs),
        max_abs_logprob_diff=_nan_to_inf(stats.max_logprob),
        kl_mean=_nan_to_inf(stats.kl_sum / stats.n),
        kl_max=_nan_to_inf(stats.kl_max),
        top1_agreement=top1,
        top5_overlap=stats.top5 / stats.n,
        worst_position=stats.worst,
        nonfinite_logits=stats.nonfinite,
        nonfinite_activations={n: nonfinite[n] for n in points if n in nonfinite},
        tolerances=limits,
        failures=failures,
        first_divergence=first,
        embed_rel_err=embed_err,
        layer_rel_err=layer_errs,
        ln_final_rel_err=final_err,
        components=components,
        regimes=found,
        not_exercised=missed,
        reference={
            "source": source.repo_id or src.name,
            "revision": source.revision,
            "transformers_class": type(hf).__name__,
            "attn_implementation": getattr(hf.config, "_attn_implementation", None),
        },
    )


def verify_plan(
    plan: ConversionPlan, *, allow_nonfinite: bool = False, **kwargs: Any
) -> VerifyReport:
    """`verify` of `plan`'s mapping, on our model built from views of the HF model's tensors
    (one copy of the weights in memory, not two)."""
    reference = kwargs.pop("reference", None)
    if reference is None:
        reference = load_reference(plan.src, kwargs.get("dtype", "float32"))
    model = model_from_reference(plan, reference, allow_nonfinite=allow_nonfinite)
    return verify(plan.src, model=model, reference=reference, **kwargs)


def model_from_reference(
    plan: ConversionPlan, hf: nn.Module, *, allow_nonfinite: bool = False
) -> GQATransformer:
    """Our model whose weights are views of `hf`'s: each row of the plan's weight map applied
    to the HF tensor in torch (a reshape / permute is a view, not a copy).

    The layouts are the ones `write_export` applies to the file bytes with numpy; the round
    trip and parity tests check that both paths agree.
    """
    from gqa_convert.mapping import apply_layout
    from gqa_convert.model.decoder import GQATransformer

    hf_state = hf.state_dict()
    missing = sorted({t.source for t in plan.tasks} - set(hf_state))
    if missing:
        raise BadInputError(f"{plan.src}: the HF model has no {missing[:5]}")
    state = {}
    for task in plan.tasks:
        tensor = hf_state[task.source]
        if not allow_nonfinite and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise BadInputError(
                f"{plan.sources[task.source].path}: tensor {task.source!r} has {bad} NaN/Inf "
                f"value(s) of {tensor.numel()}; convert with --allow-nonfinite to keep them"
            )
        state[task.target] = apply_layout(task, tensor.detach(), plan.config)
    return GQATransformer.from_state_dict(plan.config, state)
