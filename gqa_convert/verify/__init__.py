"""Logit parity with the HF model, as a gate: run both on the same tokens and compare.

One loop, whatever the model size (`_compare_models`): the HF reference (reference.py) and
our model (ours.py) advance together one decoder layer at a time over the hidden states of
all inputs. At each layer HF's layer runs on HF's stream and ours on our stream (the
free-running figures: residual stream errors and, at the end, the logits): every figure
the verdict reads, at the cost of one forward of each model. Only when the verdict fails
does a second pass (`_localise`) find where: each block from the first on HF's stream,
its components compared with HF's (teacher forcing, compare.py), up to the first block
with one over tolerance. A part is materialised when the stream reaches it:

  whole     every part is read once and kept (or a model in memory is used as is)
  streamed  a part is released when the stream has passed it: peak memory is about one
            layer on each side, the embedding or the unembedding, and the activations

The mode is chosen from `memory.estimate` against the budget (`max_memory`, default what
is available): whole-model when it fits. `first_divergence["layer"]` is a block index; -1
means the embedding, n_layers the final norm or unembedding (every block matched, the logits
did not).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from gqa_convert.config import from_hf
from gqa_convert.errors import BadInputError, UsageError
from gqa_convert.memory import (
    SUB_LAYER,
    Estimate,
    choose_mode,
    estimate,
    part_elements,
    peak_rss,
    return_freed_memory,
)
from gqa_convert.sources import Source, open_source
from gqa_convert.verify.compare import (
    COMPONENTS,
    POST_NORM_COMPONENTS,
    block_order,
    expert_errors,
    hf_experts,
    note_nonfinite,
    recording_routes,
    rel_err,
    run_hf_layer,
    run_our_block,
    same_expert_sets,
)
from gqa_convert.verify.inputs import (
    DEFAULT_SENTENCES,
    TOKENIZER_FILES,
    default_seq_len,
    has_tokenizer,
    inputs_detail,
    length_thresholds,
    make_inputs,
    read_prompts_file,
    regimes,
    tokenizer_files,
)
from gqa_convert.verify.ours import Ours
from gqa_convert.verify.reference import Part, Reference, load_reference
from gqa_convert.verify.report import (
    COMPUTE_DTYPES,
    TOLERANCES,
    ParityFailure,
    Tolerances,
    VerifyReport,
    _LogitStats,
    judge,
    make_report,
    stream_points,
    tolerances_for,
)

if TYPE_CHECKING:
    from gqa_convert.mapping import ConversionPlan
    from gqa_convert.model.decoder import GQATransformer

__all__ = [
    "COMPONENTS",
    "COMPUTE_DTYPES",
    "DEFAULT_SENTENCES",
    "POST_NORM_COMPONENTS",
    "TOKENIZER_FILES",
    "TOLERANCES",
    "ParityFailure",
    "Tolerances",
    "VerifyReport",
    "default_seq_len",
    "has_tokenizer",
    "length_thresholds",
    "load_reference",
    "make_inputs",
    "read_prompts_file",
    "regimes",
    "rel_err",
    "tokenizer_files",
    "tolerances_for",
    "verify",
    "verify_plan",
]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (layers done, layers in all)


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
    streaming: bool | str | None = None,
    max_memory: int | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
    plan: ConversionPlan | None = None,
    allow_nonfinite: bool = False,
    revision: str | None = None,
    token: str | None = None,
    gguf_file: str | None = None,
) -> VerifyReport:
    """Compare our conversion of the HF checkpoint `src` with the HF model itself.

    `src` may be a Hub repo id, fetched at `revision` with `token` as `convert` fetches it
    (`hub.resolve_source`: the HF cache, HF_HUB_OFFLINE=1 works from it). It may be
    quantised or a .gguf file (`gguf_file`: which one of the folder or repo, sources/):
    the HF model is then transformers' own dequantisation of it, and ours our
    dequantisation (`converted`'s, or the source's read by our reader).

    Ours is `model` if given (cast in place to `dtype`), else the export folder `converted`
    (config.json + safetensors, read part by part), else `src` mapped through the weight map
    (`plan`, default `plan_conversion(src)`; a NaN / Inf weight is an error unless
    `allow_nonfinite`). `reference` is a preloaded HF model of `src` in `dtype`.
    `prompts` are extra texts (they need a tokenizer in `src`); `seq_len` defaults to
    `default_seq_len`. `tolerances` overrides some or all of TOLERANCES[dtype].

    `streaming`: True / False / "sub-layer" force the mode, None picks whole-model when its
    estimate fits `max_memory` bytes (default: what is available), else layer-streamed when
    that fits, else sub-layer (verify/sublayer.py: a layer's modules run in parts); a
    streamed need over the budget raises InsufficientMemoryError before anything is loaded.
    A preloaded `model` or `reference` means whole-model. `device`: cpu, cuda, cuda:N or
    auto; with several GPUs a whole-model reference is spread over them by accelerate's
    device map. `progress(done, total)` is called after each layer.
    """
    from gqa_convert.hub import resolve_source

    limits = tolerances_for(dtype, tolerances)
    source = resolve_source(src, revision=revision, token=token, gguf_file=gguf_file)
    src = source.path
    if plan is not None and plan.source is not None:
        opened = plan.source
    else:
        opened = open_source(src, gguf_file)
    if opened.refusal is not None:
        raise opened.refusal
    source_cfg = from_hf(opened.hf_config)
    if seq_len is None:
        seq_len = default_seq_len(source_cfg)
    if seq_len < 1:
        raise UsageError(f"--seq-len must be positive, got {seq_len}")
    target = resolve_device(device)

    need = None
    if model is not None or reference is not None:
        if streaming:
            raise UsageError("streaming reads both models from files: pass no model/reference")
        mode, budget = "whole", None
    else:
        need = _estimate(opened, converted, source_cfg, dtype, seq_len, 1 + len(prompts or ()))
        mode, budget, _ = choose_mode(need, max_memory, streaming)
    streamed = mode != "whole"
    if streamed:
        return_freed_memory()
    inputs, kind = make_inputs(src, source_cfg, prompts, seq_len)
    part = part_elements(source_cfg) if mode == SUB_LAYER else 0

    ref = Reference(
        opened,
        dtype,
        model=reference,
        streaming=streamed,
        sub_layer=(source_cfg, part) if part else None,
    )
    place = placement(target, ref.model, streamed, dtype)
    ref.place(place)
    if model is None and converted is None and plan is None:
        from gqa_convert.mapping import plan_source

        plan = plan_source(opened)
    ours = Ours(
        dtype,
        model=model,
        files=Path(converted) if converted is not None and model is None else None,
        plan=plan,
        reference=ref,
        # An export's layers are cast one at a time into the previous one's arrays even
        # whole-model: holding them all made 3.4 GB of fresh pages (Ours._cast).
        streaming=streamed or (converted is not None and model is None),
        allow_nonfinite=allow_nonfinite,
        device_of=place,
        part_elements=part,
    )
    _check_shape(ours.cfg, source_cfg, converted, src)
    result = _compare_models(ref, ours, inputs, limits.activation_rtol, progress)
    if result.logit_shapes is not None:
        theirs, mine = result.logit_shapes
        raise BadInputError(
            f"{converted or src}: our logits have shape {mine}, the HF model's {theirs}: "
            f"not a conversion of {src}"
        )
    routing = {i: agree / total for i, (agree, total) in result.routing.items() if total}

    def verdict() -> tuple[list[str], dict[str, Any] | None, dict[str, float] | None]:
        return judge(
            result.stats,
            limits,
            result.embed_err,
            result.layer_errs,
            result.final_err,
            result.localised,
            result.nonfinite,
            result.unembed_err,
            routing,
        )

    failures, first, components = verdict()
    if failures and first is not None and first["layer"] >= 0:  # where does it start?
        _localise(ref, ours, result, limits.activation_rtol)
        failures, first, components = verdict()
    found, missed = regimes(source_cfg, max(t.shape[1] for t in inputs))
    for line in missed:
        log.warning("%s", line)
    memory: dict[str, Any] = {"device": str(target)}
    if need is not None:
        memory.update(estimate=need.to_dict(), budget=budget)
    if target.type == "cuda":
        memory["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return make_report(
        result.stats,
        limits,
        dtype,
        sequences=len(inputs),
        inputs=kind,
        inputs_detail=inputs_detail(src, kind, seq_len, prompts),
        failures=failures,
        first_divergence=first,
        embed_rel_err=result.embed_err,
        layer_rel_err=result.layer_errs,
        ln_final_rel_err=result.final_err,
        components=components,
        regimes=found,
        not_exercised=missed,
        nonfinite_activations={
            n: result.nonfinite[n] for n in stream_points(ours.n_layers) if n in result.nonfinite
        },
        reference={
            "source": source.repo_id or src.name,
            "revision": source.revision,
            **ref.info(),
        },
        mode=mode,
        routing_agreement=(
            sum(a for a, _ in result.routing.values()) / sum(t for _, t in result.routing.values())
            if routing
            else None
        ),
        routing_agreement_per_layer=routing,
        peak_memory_bytes=peak_rss(),
        memory=memory,
    )


def _check_shape(cfg: Any, source_cfg: Any, converted: str | Path | None, src: Path) -> None:
    """Our model's shape must be SRC's: an edited export (a layer more, another d_model) is
    bad input, named in one line, before anything is compared."""
    shape_fields = ("n_layers", "d_model", "n_heads", "n_key_value_heads", "d_head", "d_mlp")
    for name in (*shape_fields, "d_vocab"):
        if getattr(cfg, name) != getattr(source_cfg, name):
            raise BadInputError(
                f"{converted or 'the model'}: {name} = {getattr(cfg, name)}, "
                f"{src / 'config.json'} says {getattr(source_cfg, name)}: not a conversion of {src}"
            )


def verify_plan(
    plan: ConversionPlan, *, allow_nonfinite: bool = False, **kwargs: Any
) -> VerifyReport:
    """`verify` of `plan`'s mapping applied to the source tensors (our weights are views of
    the HF reference's, one copy in memory). Convert's gate checks the written files
    instead (`api.convert_plan`: `verify(plan.src, tmp, ...)`)."""
    return verify(plan.src, plan=plan, allow_nonfinite=allow_nonfinite, **kwargs)


def _estimate(
    source: Source,
    converted: str | Path | None,
    cfg: Any,
    dtype: str,
    seq_len: int,
    sequences: int,
) -> Estimate:
    """`memory.estimate` for this source: the bytes read per element are those of its dense
    tensors (a quantised source's are dequantised first, in float32 for most formats), and
    ours are a second copy when read from an export's files (held one layer at a time, even
    whole-model) or dequantised by our reader (held whole)."""
    from gqa_convert.checkpoint import DTYPES

    storage = max(DTYPES[t.dtype][0].itemsize for t in source.tensors.values())
    return estimate(
        cfg,
        dtype=dtype,
        storage_bytes=storage,
        tokens=seq_len,
        sequences=sequences,
        second_copy=converted is not None or source.quantized,
        ours_by_layer=converted is not None,
        dequantisation=source.dequantisation_bytes,
    )


# ---- devices ---------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """cpu, cuda, cuda:N or auto (cuda when there is one) as a torch device; a CUDA device
    that is not there is a UsageError."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        target = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto") from None
    if target.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto")
    if target.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {device}: no CUDA device here (use cpu or auto)")
        if target.index is not None and target.index >= count:
            raise UsageError(f"--device {device}: there are {count} CUDA device(s)")
    return target


def placement(
    target: torch.device, skeleton: nn.Module, streamed: bool, dtype: str
) -> Callable[[Part], torch.device]:
    """Where each part goes: `target`, or for `cuda` (no index) with several GPUs and the
    whole model, accelerate's device map of the reference over all of them."""
    if target.type != "cuda" or target.index is not None or streamed:
        one = torch.device("cuda", 0) if target.type == "cuda" and target.index is None else target
        return lambda part: one
    if torch.cuda.device_count() < 2:
        return lambda part: torch.device("cuda", 0)
    from accelerate import infer_auto_device_map

    device_map = infer_auto_device_map(
        skeleton,
        no_split_module_classes=getattr(skeleton, "_no_split_modules", None),
        dtype=COMPUTE_DTYPES[dtype],
    )
    return placement_from_device_map(device_map)


def placement_from_device_map(device_map: dict[str, Any]) -> Callable[[Part], torch.device]:
    """Parts -> devices from an accelerate device map ({"model.layers.3": 1, ...})."""
    names = {"embed": "model.embed_tokens", "final": "lm_head"}

    def device_of(part: Part) -> torch.device:
        name = names[part] if isinstance(part, str) else f"model.layers.{part}"
        while True:
            if name in device_map:
                where = device_map[name]
                if where == "disk":
                    raise UsageError("the device map offloads to disk; give more memory")
                if isinstance(where, int):
                    return torch.device("cuda", where)
                return torch.device(where)
            if not name:
                return torch.device("cpu")
            name = name.rpartition(".")[0]

    return device_of


def _to(value: Any, device: torch.device) -> Any:
    """Tensors in (nested tuples / dicts of) `value` moved to `device`."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


# ---- the loop --------------------------------------------------------------------------


@dataclass
class _Comparison:
    stats: _LogitStats
    embed_err: float = math.inf
    layer_errs: list[float] = field(default_factory=list)
    final_err: float = math.inf
    unembed_err: float = math.inf  # the unembedding's output, before scaling / soft-cap
    localised: tuple[dict[str, Any], dict[str, float] | None] | None = None
    worst_component: float = 0.0  # over every component compared (measure_parity.py)
    logit_shapes: tuple[list[int], list[int]] | None = None  # (HF's, ours) if they differ
    # Stream points (report.stream_points) where either side first holds NaN / Inf.
    nonfinite: dict[str, dict[str, Any]] = field(default_factory=dict)
    # MoE layer -> [tokens whose expert set is HF's, tokens], both models free-running.
    routing: dict[int, list[int]] = field(default_factory=dict)
    # For `_localise`: HF's stream entering block 0 and each layer's arguments, per input,
    # and our final norm's error on HF's final stream (teacher-forced).
    entry: list[Tensor] = field(default_factory=list)
    calls: list[list[Any]] = field(default_factory=list)
    # What our blocks take beside the stream, per input (Gemma 4: Ours.block_inputs).
    extras: list[dict[str, Any]] = field(default_factory=list)
    forced_final_err: float = 0.0


def _compare_models(
    ref: Reference,
    ours: Ours,
    inputs: Sequence[Tensor],
    rtol: float,
    progress: Progress | None = None,
) -> _Comparison:
    """Both models free-running over `inputs`, layer by layer (see the module docstring):
    every figure the verdict reads; where a failure starts is `_localise`'s."""
    result = _Comparison(_LogitStats())
    views = ours.views  # ours are views of HF's held tensors
    with torch.no_grad():
        with ref.holding("embed"):
            hf_h = [ref.embed(tokens) for tokens in inputs]
            if views:
                with ours.holding("embed"):
                    our_h = [ours.embed(tokens) for tokens in inputs]
                    extras = [ours.block_inputs(t, h) for t, h in zip(inputs, our_h, strict=True)]
            # What the family's forward does before the first layer (Granite's multiplier)
            # is in the stream both sides compare; HF's from its own forward, on the tokens
            # (Gemma 4's per-layer inputs are computed from them, by the embedding part).
            entries = [ref.layer_calls(h, t) for h, t in zip(hf_h, inputs, strict=True)]
        if not views:
            with ours.holding("embed"):
                our_h = [ours.embed(tokens) for tokens in inputs]
                extras = [ours.block_inputs(t, h) for t, h in zip(inputs, our_h, strict=True)]
        hf_h = [entry for entry, _ in entries]
        calls = [layer_calls for _, layer_calls in entries]
        result.entry, result.calls, result.extras = list(hf_h), calls, extras
        result.embed_err = max(rel_err(o, h) for o, h in zip(our_h, hf_h, strict=True))
        for s, tokens in enumerate(inputs):
            note_nonfinite(result.nonfinite, "embed", s, tokens, our_h[s], hf_h[s])
        n = max(ref.n_layers, ours.n_layers)
        result.layer_errs = [0.0] * ours.n_layers
        for i in range(n):
            with ref.holding(i) as layer, ours.holding(i) as block:
                err = _step(ref, ours, i, layer, block, hf_h, our_h, calls, result, extras)
            if i < ours.n_layers:
                result.layer_errs[i] = err
                if i < ref.n_layers:
                    for s, tokens in enumerate(inputs):
                        name = f"resid_post.{i}"
                        note_nonfinite(result.nonfinite, name, s, tokens, our_h[s], hf_h[s])
            if progress is not None:
                progress(i + 1, n)
        _final(ref, ours, inputs, hf_h, our_h, views, result)
    return result


def _step(
    ref: Reference,
    ours: Ours,
    i: int,
    layer: nn.Module | None,
    block: nn.Module | None,
    hf_h: list[Tensor],
    our_h: list[Tensor],
    calls: list[list[Any]],
    result: _Comparison,
    extras: list[dict[str, Any]],
) -> float:
    """Layer `i` on every input: advance both streams (in place), each side on its own.
    Returns the residual error after the layer."""
    worst = 0.0
    for s in range(len(hf_h)):
        with recording_routes(layer, block) as routes:
            new_hf, new_ours = _step_one(
                ref, ours, i, layer, block, hf_h, our_h, calls, s, extras[s]
            )
        if routes["hf"] and routes["ours"]:
            agree, total = same_expert_sets(routes["ours"][-1], routes["hf"][-1])
            counts = result.routing.setdefault(i, [0, 0])
            counts[0], counts[1] = counts[0] + agree, counts[1] + total
        if layer is None or block is None:
            worst = math.inf
        else:
            worst = max(worst, rel_err(new_ours, new_hf))
        hf_h[s], our_h[s] = new_hf, new_ours
    return worst


def _step_one(
    ref: Reference,
    ours: Ours,
    i: int,
    layer: nn.Module | None,
    block: nn.Module | None,
    hf_h: list[Tensor],
    our_h: list[Tensor],
    calls: list[list[Any]],
    s: int,
    extra: dict[str, Any],
) -> tuple[Tensor, Tensor]:
    """Layer `i` on input `s`: HF's output on HF's stream, ours on ours (free-running)."""
    new_hf, new_ours = hf_h[s], our_h[s]
    if layer is not None:
        where = ref.device(i)
        new_hf, _ = run_hf_layer(layer, hf_h[s].to(where), _to(calls[s][i], where), False)
    if block is not None:
        where = ours.device(i)
        cos, sin = ours.rotary(our_h[s].shape[1], i)
        kwargs = ours.block_kwargs(extra, i, where)  # Gemma 4's per-layer input, shared K/V
        new_ours = block(our_h[s].to(where), cos, sin, **kwargs)
    return new_hf, new_ours


def _localise(ref: Reference, ours: Ours, result: _Comparison, rtol: float) -> None:
    """Where a failure starts: each block on HF's stream (teacher forcing), its components
    compared with HF's (compare.py), from block 0 to the first with one over `rtol`, else
    the final norm on HF's final stream. Run only when the free-running figures failed:
    a block's own error need not show in the stream at that block (a small error can grow
    over the layers after it), so every block from the first is checked, in order. With
    `rtol` inf every block is compared (measure_parity.py: `worst_component`)."""
    order = block_order(ours.cfg)
    hf_h = list(result.entry)
    # Gemma 4's shared K/V: written afresh by this pass's blocks (on HF's stream)
    extras = [{**e, "shared_kv": {}} if "shared_kv" in e else e for e in result.extras]
    with torch.no_grad():
        for i in range(max(ref.n_layers, ours.n_layers)):
            parts: dict[str, float] = {}
            with ref.holding(i) as layer, ours.holding(i) as block:
                entry = list(hf_h)
                for s in range(len(hf_h)):
                    new_hf, errors = _forced_one(
                        ref, ours, i, layer, block, hf_h[s], result, s, extras[s]
                    )
                    if errors is None:  # a layer one side lacks, or another d_model
                        errors = dict.fromkeys(order, math.inf)
                    parts = {c: max(parts.get(c, 0.0), errors[c]) for c in errors}
                    hf_h[s] = new_hf
                bad = next((c for c in parts if not parts[c] <= rtol), None)
                expert = None
                if bad == "mlp_out" and layer is not None and block is not None:
                    expert = _bad_expert(ref, ours, i, layer, block, entry, result, rtol)
            result.worst_component = max(result.worst_component, *parts.values())
            if bad is not None:
                where = {"layer": i, "component": bad}
                result.localised = (where if expert is None else {**where, "expert": expert}, parts)
                return
    if not result.forced_final_err <= rtol:
        result.localised = ({"layer": len(result.layer_errs), "component": "ln_final"}, None)


def _bad_expert(
    ref: Reference,
    ours: Ours,
    i: int,
    layer: nn.Module,
    block: nn.Module,
    entry: list[Tensor],
    result: _Comparison,
    rtol: float,
) -> int | None:
    """The first routed expert (by index) of MoE layer `i` whose own output is over `rtol`
    (compare.expert_errors, on HF's MLP input from HF's stream `entry`), None if none is
    (a router, a shared expert, the weighting) or the layer has no routed experts."""
    if hf_experts(layer) is None or not hasattr(block.mlp, "experts"):
        return None
    worst: dict[int, float] = {}
    for s, hidden in enumerate(entry):
        where = ref.device(i)
        with recording_routes(layer, None) as routes:
            _, acts = run_hf_layer(layer, hidden.to(where), _to(result.calls[s][i], where), True)
        if "ln2" not in acts or not routes["hf"]:
            return None
        x = acts["ln2"].flatten(0, 1)
        for e, err in expert_errors(layer, block, x, routes["hf"][-1]).items():
            worst[e] = max(worst.get(e, 0.0), err)
    return next((e for e in sorted(worst) if not worst[e] <= rtol), None)


def _forced_one(
    ref: Reference,
    ours: Ours,
    i: int,
    layer: nn.Module | None,
    block: nn.Module | None,
    hidden: Tensor,
    result: _Comparison,
    s: int,
    extra: dict[str, Any],
) -> tuple[Tensor, dict[str, float] | None]:
    """Layer `i` on input `s`'s HF stream `hidden`: HF's output, and our block's components'
    errors on the same input (None when they cannot be compared)."""
    if layer is None:
        return hidden, None
    where = ref.device(i)
    new_hf, acts = run_hf_layer(layer, hidden.to(where), _to(result.calls[s][i], where), True)
    if block is None or hidden.shape[-1] != ours.cfg.d_model:
        return new_hf, None
    where = ours.device(i)
    cos, sin = ours.rotary(hidden.shape[1], i)
    kwargs = ours.block_kwargs(extra, i, where)  # Gemma 4's per-layer input, shared K/V
    _, errors = run_our_block(block, hidden.to(where), cos, sin, acts, **kwargs)
    return new_hf, errors


def _final(
    ref: Reference,
    ours: Ours,
    inputs: Sequence[Tensor],
    hf_h: list[Tensor],
    our_h: list[Tensor],
    views: bool,
    result: _Comparison,
) -> None:
    """Final norm and logits on each side (the unembedding of one side held at a time,
    unless ours are views of HF's), the logit statistics, and our final norm on HF's
    stream (for `_localise`)."""
    theirs: list[tuple[Tensor, Tensor, Tensor] | None] = []
    mine: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []

    def run_ours() -> None:
        for s, hidden in enumerate(our_h):
            normed, logits, raw = ours.final(hidden)
            forced = ours.model.ln_final(hf_h[s].to(normed.device))
            mine.append((normed, logits, raw, forced))

    with ref.holding("final"):
        theirs = [ref.final(h) for h in hf_h]
        if views:
            with ours.holding("final"):
                run_ours()
    if not views:
        with ours.holding("final"):
            run_ours()
    final_errs, forced_errs, unembed_errs = [], [], []
    for s, tokens in enumerate(inputs):
        (hf_normed, hf_logits, hf_raw), (normed, logits, raw, forced) = theirs[s], mine[s]
        if logits.shape != hf_logits.shape:
            result.logit_shapes = (list(hf_logits.shape), list(logits.shape))
            return
        final_errs.append(rel_err(normed, hf_normed))
        unembed_errs.append(rel_err(raw, hf_raw))
        note_nonfinite(result.nonfinite, "ln_final", s, tokens, normed, hf_normed)
        forced_errs.append(rel_err(forced, hf_normed))
        result.stats.add(s, tokens, logits, hf_logits)
        theirs[s] = mine[s] = None  # type: ignore[call-overload]
    result.final_err = max(final_errs)
    result.unembed_err = max(unembed_errs)
    result.forced_final_err = max(forced_errs)
