"""Sub-layer verification of MoE layers (issue 28): a gpt-oss-120b-shaped checkpoint (2 layers,
d_model 2880, 64 / 8 heads of 64, 128 experts of width 2880 stacked as the Hub stacks them,
vocab 201088, bf16: about 15 GB) converted with the gate under a budget no whole layer fits.

    python scripts/measure_moe_sub_layer.py FOLDER [--experts N] [--max-memory 12GB] [--keep]

Builds FOLDER/src (scripts/build_moe_shaped.py, random bf16, one tensor in memory) and
FOLDER/src-swap-experts1 (hard links, but for the files holding layer 1's experts: copies
with experts 1 and 2 exchanged in gate_up_proj, down_proj and their biases), then, each
command in its own process (peak RSS: its own ru_maxrss, scripts/measure_sub_layer.py's
launcher):

  1. `convert src out --max-memory BUDGET`: the gate must pick sub-layer and exit 0;
  2. `verify src-swap-experts1 out --json --max-memory BUDGET`: must exit 5 naming layer 1,
     mlp_out, expert 1.

BUDGET: 12GB at 128 experts (the full run: 15 GB for src, 15 GB for out, 6.4 GB for the
copies, about 37 GB of disk); with --experts N (a reduced run) halfway between the
sub-layer and layer-streamed estimates of convert's gate, so that the mode choice, not a
flag, picks sub-layer. FOLDER is deleted at the end unless --keep. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from build_moe_shaped import GPT_OSS_120B_SHAPE, build, gpt_oss_config
from measure_sub_layer import run

from gqa_convert.checkpoint import read_weights

STACKED = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


def swap_experts(src: Path, layer: int, a: int = 1, b: int = 2) -> Path:
    """A copy of `src` with experts a and b of layer `layer` exchanged in every stacked
    tensor (each expert's slice is contiguous along the first axis)."""
    out = src.with_name(f"{src.name}-swap-experts{layer}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    weights = read_weights(src)
    infos = [weights[f"model.layers.{layer}.mlp.experts.{name}"] for name in STACKED]
    copied = {info.path for info in infos}
    for path in src.iterdir():
        (shutil.copyfile if path in copied else os.link)(path, out / path.name)
    for info in infos:
        size = (info.end - info.start) // info.shape[0]  # bytes of one expert's slice
        with open(out / info.path.name, "r+b") as f:
            f.seek(info.start + a * size)
            first = f.read(size)
            f.seek(info.start + b * size)
            second = f.read(size)
            f.seek(info.start + a * size)
            f.write(second)
            f.seek(info.start + b * size)
            f.write(first)
    return out


def budget_for(shape: dict) -> tuple[int, dict]:
    """Halfway between the sub-layer and layer-streamed estimates of convert's gate."""
    from gqa_convert.config import from_hf
    from gqa_convert.memory import estimate

    need = estimate(from_hf(gpt_oss_config(shape)), storage_bytes=2, second_copy=True)
    return (need.sub_layer + need.streamed) // 2, need.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--experts", type=int, default=GPT_OSS_120B_SHAPE["experts"])
    parser.add_argument("--max-memory", help="convert's and verify's budget (see above)")
    parser.add_argument("--keep", action="store_true", help="keep FOLDER")
    args = parser.parse_args()
    shape = {**GPT_OSS_120B_SHAPE, "experts": args.experts}
    budget, need = budget_for(shape)
    full = args.experts == GPT_OSS_120B_SHAPE["experts"]
    budget_arg = args.max_memory or ("12GB" if full else f"{budget}B")
    folder = args.folder.expanduser()
    result: dict = {"shape": shape, "estimates": need, "budget": budget_arg}
    try:
        src = build(folder / "src", shape, family="gpt_oss_120b")
        swapped = swap_experts(src, 1)
        out = folder / "out"
        gate = run("convert", str(src), str(out), "--max-memory", budget_arg, "--seq-len", "128")
        manifest = json.loads((out / "conversion.json").read_text()) if gate["exit"] == 0 else {}
        report = manifest.get("verification", {}).get("report", {})
        gate["mode"], gate["passed"] = report.get("mode"), report.get("passed")
        gate["max_abs_logit_diff"] = report.get("max_abs_logit_diff")
        result["convert"] = {k: v for k, v in gate.items() if k != "stdout"}
        bad = run(
            "verify", str(swapped), str(out), "--json", "--max-memory", budget_arg,
            "--seq-len", "128",
        )  # fmt: skip
        body = json.loads(bad["stdout"]) if bad["stdout"].strip() else {}
        result["swap_experts_1_2_layer_1"] = {
            "exit": bad["exit"],
            "peak_rss_bytes": bad["peak_rss_bytes"],
            "mode": body.get("mode"),
            "first_divergence": body.get("first_divergence"),
            "stderr_tail": bad["stderr_tail"][-600:],
        }
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(result, indent=2))
    ok = (
        result.get("convert", {}).get("exit") == 0
        and result["convert"].get("mode") == "sub-layer"
        and result.get("swap_experts_1_2_layer_1", {}).get("first_divergence")
        == {"layer": 1, "component": "mlp_out", "expert": 1}
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
