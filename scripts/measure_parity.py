"""Measure HF-vs-ours diffs of correct conversions and of broken ones, per compute dtype.

The numbers behind `gqa_convert.verify.TOLERANCES` (issue 3): for each dtype, the worst
diffs of correct conversions (every tiny family case of tests/test_parity.py, and SmolLM2
when built) next to the smallest signal of each deliberate mutation (tests/mutations.py).
Activation errors are relative (`verify.rel_err`), over every block and component.

Usage: python scripts/measure_parity.py [--no-smollm2] [--seq-len N] [--smollm2-seq-len N]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gqa_convert.api import convert_in_memory
from gqa_convert.config import load_hf_config
from gqa_convert.verify import (
    COMPUTE_DTYPES,
    Tolerances,
    _compare_models,
    _localise,
    _LogitStats,
    default_seq_len,
    load_reference,
    make_inputs,
    rel_err,
    verify,
)
from gqa_convert.verify.ours import Ours
from gqa_convert.verify.reference import Reference
from tests import mutations as M
from tests.hf_models import make_hf_checkpoint
from tests.test_parity import CASES

LOOSE = Tolerances(math.inf, math.inf, 0.0, math.inf)  # measure only: nothing fails


def correct(src: Path, dtype: str, seq_len: int | None, hf=None) -> dict[str, float]:
    """Logit figures and the worst activation error of a correct conversion."""
    hf = hf or load_reference(src, dtype)
    model = convert_in_memory(src)
    report = verify(src, model=model, dtype=dtype, seq_len=seq_len, tolerances=LOOSE, reference=hf)
    cfg = load_hf_config(src)
    inputs, _ = make_inputs(src, cfg, None, report.tokens // report.sequences)
    # Every component of every block (on HF's input), with nothing ever called diverged.
    ref, ours = Reference(src, dtype, model=hf), Ours(dtype, model=model)
    result = _compare_models(ref, ours, inputs, math.inf)
    _localise(ref, ours, result, math.inf)
    worst = max(result.worst_component, result.embed_err, *result.layer_errs, result.final_err)
    return {
        "logit": report.max_abs_logit_diff,
        "kl": report.kl_max,
        "top1": report.top1_agreement,
        "act": worst,
    }


def rounding_noise(src: Path, dtype: str, seq_len: int | None, hf=None) -> dict[str, float]:
    """HF in `dtype` against HF in fp32: the scale of any reordering of low-precision ops."""
    hf = hf or load_reference(src, dtype)
    hf32 = load_reference(src, "float32")
    cfg = load_hf_config(src)
    inputs, _ = make_inputs(src, cfg, None, seq_len or default_seq_len(cfg))
    stats, worst = _LogitStats(), 0.0
    for i, tokens in enumerate(inputs):
        low, high = {}, {}
        for model, acts in ((hf, low), (hf32, high)):
            hooks = [
                block.register_forward_hook(lambda m, a, out, n=n, acts=acts: acts.update({n: out}))
                for n, block in enumerate(model.model.layers)
            ]
            with torch.no_grad():
                acts["logits"] = model(input_ids=tokens, use_cache=False).logits
            for hook in hooks:
                hook.remove()
        stats.add(i, tokens, low.pop("logits").float(), high.pop("logits"))
        worst = max(worst, *(rel_err(low[k], high[k]) for k in low))
    return {"logit": stats.max_abs, "kl": stats.kl_max, "top1": stats.top1 / stats.n, "act": worst}


def mutation_signal(src: Path, mutation, dtype: str, seq_len: int, hf=None) -> dict[str, float]:
    """The figures of one broken conversion under the default tolerances of `dtype`."""
    model = M.mutated_model(src, mutation)
    report = verify(src, model=model, dtype=dtype, seq_len=seq_len, reference=hf)
    where = report.first_divergence
    act = (report.components or {}).get(where["component"], math.nan) if where else math.nan
    return {
        "logit": report.max_abs_logit_diff,
        "kl": report.kl_max,
        "top1": report.top1_agreement,
        "act": act,
        "caught": not report.passed,
        "where": f"{where['layer']}/{where['component']}" if where else "-",
    }


def smollm2() -> Path | None:
    path = Path(__file__).resolve().parent / "build_smollm2.py"
    spec = importlib.util.spec_from_file_location("build_smollm2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.build_smollm2(module.default_smollm2_dir())
    except module.SmolLM2NotInstalled:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-smollm2", action="store_true")
    parser.add_argument("--seq-len", type=int, default=None, help="tiny models (default: verify's)")
    parser.add_argument("--smollm2-seq-len", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp())
    tiny = {}
    for name, (family, overrides, save, _) in CASES.items():
        tiny[name] = make_hf_checkpoint(work / name, family, **save, **overrides)
    big = None if args.no_smollm2 else smollm2()
    llama = tiny["llama-gqa4"]
    mutations = {
        "swap KV heads 0,1 in layer 1": (llama, M.swap_kv_heads()),
        "grouping h % n_kv in layer 1": (llama, M.grouping_modulo()),
        "rope theta 10000 -> 10100 (1%)": (llama, M.wrong_rope_theta(10_100.0)),
        "rope theta 10000 -> 500000": (llama, M.wrong_rope_theta(5e5)),
        "ln1 of layer 1 = ones": (llama, M.norm_to_ones()),
        "W_O transposed in layer 1": (llama, M.w_o_transposed()),
        "sliding window 8 ignored": (tiny["mistral-window-8"], M.sliding_window_ignored()),
    }
    print("| dtype | model | max abs logit | KL max | top-1 | max act rel err |")
    print("| --- | --- | --- | --- | --- | --- |")
    for dtype in COMPUTE_DTYPES:
        worst = {"logit": 0.0, "kl": 0.0, "top1": 1.0, "act": 0.0}
        for src in tiny.values():
            found = correct(src, dtype, args.seq_len)
            for key in ("logit", "kl", "act"):
                worst[key] = max(worst[key], found[key])
            worst["top1"] = min(worst["top1"], found["top1"])
        print(_row(dtype, f"{len(tiny)} tiny cases (worst)", worst))
        if dtype != "float32":
            noise = rounding_noise(llama, dtype, args.seq_len)
            print(_row(dtype, "tiny llama: HF itself vs HF fp32", noise))
        if big is not None:
            hf = load_reference(big, dtype)
            print(_row(dtype, "SmolLM2-135M", correct(big, dtype, args.smollm2_seq_len, hf)))
            if dtype != "float32":
                noise = rounding_noise(big, dtype, args.smollm2_seq_len, hf)
                print(_row(dtype, "SmolLM2: HF itself vs HF fp32", noise))
            del hf
    print()
    print("| dtype | mutation | max abs logit | KL max | top-1 | act rel err at | caught |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dtype in COMPUTE_DTYPES:
        for name, (src, mutation) in mutations.items():
            print(_mutation_row(dtype, name, mutation_signal(src, mutation, dtype, 64)))
    for dtype in ("float32", "bfloat16") if big is not None else ():
        hf = load_reference(big, dtype)
        for name, mutation in {
            "SmolLM2: swap KV heads 0,1 in layer 1": M.swap_kv_heads(),
            "SmolLM2: rope theta 1e5 -> 1e4": M.wrong_rope_theta(1e4),
            "SmolLM2: rope theta 1e5 -> 1.01e5 (1%)": M.wrong_rope_theta(1.01e5),
        }.items():
            print(_mutation_row(dtype, name, mutation_signal(big, mutation, dtype, 128, hf)))


def _row(dtype: str, name: str, f: dict) -> str:
    return (
        f"| {dtype} | {name} | {f['logit']:.3g} | {f['kl']:.3g} | {f['top1']:.4f} | "
        f"{f['act']:.3g} |"
    )


def _mutation_row(dtype: str, name: str, f: dict) -> str:
    return (
        f"| {dtype} | {name} | {f['logit']:.3g} | {f['kl']:.3g} | {f['top1']:.4f} | "
        f"{f['act']:.3g} at {f['where']} | {f['caught']} |"
    )


if __name__ == "__main__":
    main()
