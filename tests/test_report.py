"""The logit statistics of the gate (verify/report.py) against a plain float64 computation."""

from __future__ import annotations

import math

import pytest
import torch

from gqa_convert.verify import report
from gqa_convert.verify.report import _LogitStats


def naive(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float]:
    """The same figures the obvious way: float64 log-softmax per side, sets for the top 5."""
    o, t = ours[0].double(), theirs[0].double()
    diff = o - t
    lp_o, lp_t = o.log_softmax(-1), t.log_softmax(-1)
    kl = (lp_t.exp() * (lp_t - lp_o)).sum(-1)
    top5 = sum(
        len(set(a.tolist()) & set(b.tolist())) / 5
        for a, b in zip(o.topk(5, -1).indices, t.topk(5, -1).indices, strict=True)
    )
    return {
        "max_abs": float(diff.abs().max()),
        "mean_abs": float(diff.abs().mean()),
        "max_logprob": float((lp_o - lp_t).abs().max()),
        "kl_sum": float(kl.sum()),
        "kl_max": float(kl.max()),
        "top1": int((o.argmax(-1) == t.argmax(-1)).sum()),
        "top5": top5,
    }


@pytest.fixture(params=[1 << 30, 3 * 1000], ids=["one-chunk", "chunks-of-3"])
def chunked(request, monkeypatch):
    """Whole sequences at once, or three positions at a time (the last chunk shorter: the
    work arrays are reused for chunks of fewer rows)."""
    monkeypatch.setattr(report, "STATS_CHUNK_ELEMENTS", request.param)


@pytest.mark.parametrize("spread", [1e-4, 2.0], ids=["close", "far"])
def test_statistics_equal_a_plain_float64_computation(chunked, spread):
    gen = torch.Generator().manual_seed(0)
    theirs = torch.randn(1, 11, 1000, generator=gen) * 4
    ours = theirs + torch.randn(1, 11, 1000, generator=gen) * spread
    # a tie for the largest logit on our side: top-1 is argmax's, the first of the tie
    ours[0, 4, 900] = ours[0, 4, 17] = theirs[0, 4, 17] = 50.0
    tokens = torch.arange(11)[None]
    stats = _LogitStats()
    stats.add(0, tokens, ours, theirs)
    stats.add(1, tokens, theirs, ours)  # a second sequence, the sides swapped
    want = [naive(ours, theirs), naive(theirs, ours)]

    assert stats.n == 22 and stats.n_nonfinite == 0
    assert stats.max_abs == max(w["max_abs"] for w in want)  # the same float64 subtraction
    assert stats.sum_abs / stats.count_abs == pytest.approx(
        sum(w["mean_abs"] for w in want) / 2, rel=1e-12
    )
    assert stats.max_logprob == pytest.approx(max(w["max_logprob"] for w in want), rel=1e-9)
    # KL(HF || ours) as lse differences: float64 rounding of values near log(1000) + 12
    assert stats.kl_sum == pytest.approx(sum(w["kl_sum"] for w in want), rel=1e-6, abs=1e-12)
    assert stats.kl_max == pytest.approx(max(w["kl_max"] for w in want), rel=1e-6, abs=1e-12)
    assert stats.top1 == sum(w["top1"] for w in want)
    assert stats.top5 == pytest.approx(sum(w["top5"] for w in want))
    if spread > 0.1:
        assert stats.kl_max > 1e-3  # the far case is far: these are not all zeros
        assert stats.top1 < 22


def test_a_nan_row_is_counted_and_poisons_the_maxima(chunked):
    gen = torch.Generator().manual_seed(1)
    theirs = torch.randn(1, 7, 1000, generator=gen)
    ours = theirs.clone()
    ours[0, 5, 3] = math.nan
    theirs[0, 2, 8] = math.inf
    stats = _LogitStats()
    stats.add(0, torch.arange(7)[None], ours, theirs)
    assert stats.n_nonfinite == 2
    assert [(e["position"], e["side"]) for e in stats.nonfinite] == [(2, "hf"), (5, "ours")]
    assert math.isnan(stats.max_abs)
    assert stats.worst["position"] == 5  # the NaN, whichever chunk comes after it
