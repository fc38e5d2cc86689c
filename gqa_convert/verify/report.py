"""The verdict: tolerances, the running logit statistics, and the report `verify` returns.

What is compared, in the compute dtype, over every position of every input:
  logits       max / mean |diff|, max |log-prob diff| (over the whole vocabulary),
               KL(HF || ours) per position (mean, max), top-1 agreement, top-5 overlap,
               and the worst position;
  activations  the relative error, max over positions of ||ours - hf|| / ||hf|| (the norm
               over the trailing axes of one position), of the embedding, the residual
               stream after every block and the final norm (both models free-running), and
               the components of each block on HF's input to it (see compare.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from gqa_convert.errors import ParityError, UsageError
from gqa_convert.memory import STATS_CHUNK_ELEMENTS

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Tolerances:
    """Pass limits. `activation_rtol` bounds the relative error of every compared activation;
    `min_routing_agreement` the fraction of tokens of each MoE layer whose chosen experts are
    HF's (as a set)."""

    max_abs_logit_diff: float
    kl_max: float
    min_top1_agreement: float
    activation_rtol: float
    min_routing_agreement: float = 0.0


# From scripts/measure_parity.py (table in the README): fp32 sits 200x above the worst
# correct conversion and 20x or more below the smallest mutation (rope theta off by 1%).
# bf16 / fp16 sit about twice above HF's own rounding noise (HF in that dtype against HF in
# fp32, on SmolLM2), so any reordering of low-precision arithmetic passes, and still 3x or
# more below every mutation but the 1% theta, which only fp32 can see.
TOLERANCES = {
    # Routing at fp32 must be HF's on every token; in bf16 / fp16 a near-tie may flip (not
    # measured yet): reported, not gated.
    "float32": Tolerances(
        max_abs_logit_diff=1e-3,
        kl_max=1e-6,
        min_top1_agreement=0.99,
        activation_rtol=1e-4,
        min_routing_agreement=1.0,
    ),
    "bfloat16": Tolerances(
        max_abs_logit_diff=3.0, kl_max=0.03, min_top1_agreement=0.9, activation_rtol=0.15
    ),
    "float16": Tolerances(
        max_abs_logit_diff=0.5, kl_max=2e-3, min_top1_agreement=0.95, activation_rtol=0.05
    ),
}


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
    mode: str = "whole"  # "whole" (both models held) or "streamed" (one layer at a time)
    # MoE: the fraction of tokens (all inputs, all MoE layers) whose set of chosen experts is
    # HF's, both models free-running, and per MoE layer; None / empty for a dense model.
    routing_agreement: float | None = None
    routing_agreement_per_layer: dict[int, float] = field(default_factory=dict)
    peak_memory_bytes: int = 0  # this process's peak RSS (ru_maxrss) when verify returned
    memory: dict[str, Any] = field(default_factory=dict)  # estimates, budget, device(s)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: _finite(v) for k, v in data.items()}

    def summary(self) -> str:
        """One line: passed or what failed and where."""
        if self.passed:
            return f"parity passed ({self.dtype}, {self.tokens} tokens)"
        where = self.first_divergence
        at = f"; first divergence: {where_words(where)}" if where else ""
        return f"parity failed ({self.dtype}): {'; '.join(self.failures)}{at}"


def where_words(where: dict[str, Any]) -> str:
    """`first_divergence` in words: "layer 1, mlp_out" (", expert 2" when one is named)."""
    expert = f", expert {where['expert']}" if where.get("expert") is not None else ""
    return f"layer {where['layer']}, {where['component']}{expert}"


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
    _work: Tensor | None = field(default=None, repr=False, compare=False)

    def add(
        self,
        seq: int,
        tokens: Int[Tensor, "1 pos"],
        ours: Float[Tensor, "1 pos vocab"],
        theirs: Float[Tensor, "1 pos vocab"],
    ) -> None:
        """Fold in one sequence, STATS_CHUNK_ELEMENTS at a time: float64 temporaries of
        [1024, 128k] in one go took 8.2 GB; in chunks of 2^22 elements (32 positions of 128k),
        0.27 GB (measured)."""
        step = max(1, STATS_CHUNK_ELEMENTS // ours.shape[-1])
        for start in range(0, ours.shape[1], step):
            end = start + step
            self._add(seq, tokens, ours[0, start:end], theirs[0, start:end], start)

    def _scratch(self, rows: int, vocab: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Four float64 [rows, vocab] work arrays on the CPU, allocated once and reused by
        every chunk. Fresh ones per chunk cost more than the arithmetic: an array above
        glibc's mmap threshold (32 MB at most) is mapped and zeroed page by page on every
        allocation (Gemma-3-270M's gate: 12.7 s of system time, 4.5 s with reuse)."""
        if self._work is None or self._work.shape[2] != vocab or self._work.shape[1] < rows:
            self._work = None  # the old arrays go before the new ones are allocated
            self._work = torch.empty(4, rows, vocab, dtype=torch.float64)
        o, t, d, w = self._work[:, :rows]
        return o, t, d, w

    def _add(
        self,
        seq: int,
        tokens: Int[Tensor, "1 pos"],
        ours: Float[Tensor, "chunk vocab"],
        theirs: Float[Tensor, "chunk vocab"],
        offset: int,
    ) -> None:
        # float64 copies (exact), their difference, and one array of scratch: [chunk, vocab]
        o, t, diff, work = self._scratch(*ours.shape)
        o.copy_(ours)
        t.copy_(theirs)
        # A row holds NaN / Inf iff its float64 sum does not: float32 logits (< 3.5e38)
        # summed over any vocabulary cannot reach float64's 1.8e308.
        bad_ours, bad_hf = ~torch.isfinite(o.sum(-1)), ~torch.isfinite(t.sum(-1))
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
        torch.sub(o, t, out=diff)
        torch.abs(diff, out=work)
        per_pos = work.amax(-1)  # [chunk], NaN where either side has a NaN
        sum_abs = float(work.sum())
        # log p = x - logsumexp(x): lp_ours - lp_theirs = diff - (lse_ours - lse_theirs), so
        # KL(HF || ours) = lse_ours - lse_theirs - sum(p_theirs * diff) (p sums to 1) and
        # the largest |log-prob diff| is at diff's max or min: no [chunk, vocab] log-prob
        # arrays (a third of the gate's time at a 262k vocabulary). float64 throughout; two
        # exponentials of the chunk, the costliest step: p_theirs reuses lse_theirs' one.
        lse_ours = _logsumexp(o, work)[0]
        lse_theirs, total_theirs = _logsumexp(t, work)  # work: exp(theirs - its row max)
        shift = lse_ours - lse_theirs  # [chunk]
        kl = shift - work.mul_(diff).sum(-1) / total_theirs  # KL(HF || ours), [chunk]
        lp_diff = torch.maximum(diff.amax(-1) - shift, shift - diff.amin(-1))  # [chunk]
        worst = int(per_pos.argmax())  # argmax takes NaN as the largest
        held = self.worst["max_abs_logit_diff"] if self.worst else None
        if held is None or (not math.isnan(held) and not per_pos[worst] <= held):  # NaN stays
            self.worst = {
                "sequence": seq,
                "position": offset + worst,
                "token_id": int(tokens[0, offset + worst]),
                "max_abs_logit_diff": float(per_pos[worst]),
                "kl": float(kl[worst]),
            }
        self.n += ours.shape[0]
        self.max_abs = _nanmax(self.max_abs, float(per_pos.max()))
        self.sum_abs += sum_abs
        self.count_abs += diff.numel()
        self.max_logprob = _nanmax(self.max_logprob, float(lp_diff.max()))
        self.kl_sum += float(kl.sum())
        self.kl_max = _nanmax(self.kl_max, float(kl.max()))
        # The rankings on the logits as they came (float32 orders as its float64 copy).
        (ours_top, ours_first), (theirs_top, theirs_first) = _ranking(ours), _ranking(theirs)
        self.top1 += int((ours_first == theirs_first).sum())
        shared = (ours_top[:, :, None] == theirs_top[:, None, :]).any(-1).sum(-1)  # [chunk]
        self.top5 += float(shared.sum()) / 5


def _ranking(
    logits: Float[Tensor, "chunk vocab"],
) -> tuple[Int[Tensor, "chunk 5"], Int[Tensor, " chunk"]]:
    """The ids of the five largest logits, and argmax's id: topk's first, but for a tie for
    the largest, where argmax names the first of the tie and topk may name another."""
    values, top = logits.cpu().topk(5, -1)
    first = top[:, 0].clone()
    tied = values[:, 0] == values[:, 1]
    if tied.any():
        first[tied] = logits.cpu()[tied].argmax(-1)
    return top, first


def _logsumexp(
    x: Float[Tensor, "chunk vocab"], work: Float[Tensor, "chunk vocab"]
) -> tuple[Float[Tensor, " chunk"], Float[Tensor, " chunk"]]:
    """log(sum(exp(x), -1)), max-shifted as torch.logsumexp (NaN and +-Inf rows as its),
    and sum(exp(x - row max), -1). `work` is its scratch, left holding exp(x - row max):
    torch's allocates two [chunk, vocab] temporaries."""
    top = x.amax(-1, keepdim=True)  # [chunk, 1]
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # all -inf: as torch
    total = torch.sub(x, top, out=work).exp_().sum(-1)
    return total.log() + top[:, 0], total


def _nanmax(a: float, b: float) -> float:
    """max(a, b), NaN if either is NaN."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


_SIDES = {"ours": "our model", "hf": "the HF model", "both": "both models"}


def _nan_to_inf(x: float) -> float:
    return math.inf if math.isnan(x) else x


def stream_points(n_layers: int) -> list[str]:
    """The free-running stream's compared points, in order."""
    return ["embed", *(f"resid_post.{i}" for i in range(n_layers)), "ln_final"]


def judge(
    stats: _LogitStats,
    limits: Tolerances,
    embed_err: float,
    layer_errs: list[float],
    final_err: float,
    localised: tuple[dict[str, Any], dict[str, float]] | None,
    nonfinite: dict[str, dict[str, Any]] | None = None,
    unembed_err: float | None = None,
    routing: dict[int, float] | None = None,
) -> tuple[list[str], dict[str, Any] | None, dict[str, float] | None]:
    """The failures in words, and on a failure where it starts: the embedding (layer -1),
    the first block with a component over tolerance (`localised`), else the final norm, the
    unembedding, or (`unembed_err`, the unembedding's own output, within tolerance) what
    follows it, "final_logits" (Granite's logits_scaling, Gemma 2's soft-cap), all at layer
    n_layers. `nonfinite`: the stream points holding NaN / Inf (stream_points order), from
    `_Comparison.nonfinite`."""
    failures = []
    if stats.n_nonfinite:
        at = stats.nonfinite[0]
        failures.append(
            f"non-finite logits at {stats.n_nonfinite} position(s), first: sequence "
            f"{at['sequence']} position {at['position']} (token {at['token_id']}) in "
            f"{_SIDES[at['side']]}"
        )
    points = stream_points(len(layer_errs))
    bad_point = next((name for name in points if name in (nonfinite or {})), None)
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
    low = [i for i, a in (routing or {}).items() if a < limits.min_routing_agreement]
    if low:
        failures.append(
            f"routing of MoE layer {low[0]}: {routing[low[0]]:.4f} of the tokens choose HF's "
            f"experts < {limits.min_routing_agreement:.4f}"
        )
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
        if localised is not None:
            first, components = localised
        else:
            name = "ln_final" if not final_err <= limits.activation_rtol else "unembed"
            if name == "unembed" and unembed_err is not None:
                name = "unembed" if not unembed_err <= limits.activation_rtol else "final_logits"
            first = {"layer": len(layer_errs), "component": name}
    return failures, first, components


def make_report(
    stats: _LogitStats,
    limits: Tolerances,
    dtype: str,
    **fields_: Any,
) -> VerifyReport:
    """A VerifyReport from the statistics and the remaining fields (passed from failures)."""
    return VerifyReport(
        passed=not fields_["failures"],
        dtype=dtype,
        tokens=stats.n,
        max_abs_logit_diff=_nan_to_inf(stats.max_abs),
        mean_abs_logit_diff=_nan_to_inf(stats.sum_abs / stats.count_abs),
        max_abs_logprob_diff=_nan_to_inf(stats.max_logprob),
        kl_mean=_nan_to_inf(stats.kl_sum / stats.n),
        kl_max=_nan_to_inf(stats.kl_max),
        top1_agreement=stats.top1 / stats.n,
        top5_overlap=stats.top5 / stats.n,
        worst_position=stats.worst,
        nonfinite_logits=stats.nonfinite,
        tolerances=limits,
        **fields_,
    )
