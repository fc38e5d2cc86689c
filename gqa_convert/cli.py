"""The command line: parse options, call one library function, print, map errors to exit codes."""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from gqa_convert import __version__
from gqa_convert.errors import GQAConvertError, InsufficientMemoryError, ParityError, UsageError

if TYPE_CHECKING:
    from gqa_convert.mapping import ConversionPlan
    from gqa_convert.verify import VerifyReport

HELP = """Convert HF GQA decoder checkpoints to a TransformerLens-layout GQA model.

Families (configs/*.toml): Llama; Mistral (sliding window); Qwen2 (q/k/v biases,
sliding upper layers); Qwen3 (q/k RMSNorm per head); Phi-3/3.5/4-mini (fused qkv_proj and
gate_up_proj, partial rotary, longrope); OLMo2 (post-norms, q/k RMSNorm over the
projection); Granite (embedding/attention/residual multipliers, logits scaling);
SmolLM3 (layers without rotary); Gemma (norms scaling by 1 + w, embeddings times
sqrt(d_model), GeGLU); Gemma-2 (sandwich norms, attention and final logit soft-caps,
query_pre_attn_scalar, alternating local/global layers); Gemma-3 text (Gemma-2 without
soft-caps, q/k RMSNorm per head, a rotary per layer type); Gemma4 text, dense (norms by
plain w, global layers with their own head size, KV heads and proportional rope, k = v, K/V
shared from earlier layers, per-layer input embeddings, layer_scalar); mixtures of experts:
Mixtral, Qwen3-MoE, OLMoE (top-k router, per-expert gated MLPs, Qwen3-MoE's dense layers),
gpt_oss (attention sinks, yarn, a biased router with top-k then softmax, stacked experts with
interleaved gate / up and biases, clamped SwiGLU; MXFP4 experts dequantised); the
dense families of 2026: Seed_OSS (q/k/v and o biases by their own switches), InternLM3
(Llama with every projection biased), Helium (interleaved rotary), ERNIE4_5 (interleaved
rotary in fp32, use_bias), OLMo3 (OLMo2 with 3:1 sliding layers, a rotary per layer
type), EXAONE4 (post-norms, q/k norm, global layers without rotary), Ministral (windows by
layer_types), Ministral3 (llama_4_scaling_beta query scale), GLM4 (sandwich norms,
interleaved rotary on half of each head), StarCoder2 (LayerNorm with bias, ungated GELU MLP),
Apertus (ungated xIELU MLP with learned parameters, q/k norm), Cohere (parallel block,
LayerNorm, interleaved rotary, logit scale), Cohere2 (Cohere with 3:1 windows, rotary on local
layers only), Hunyuan_v1_dense (q/k norm after rotary, ntk_alpha rope), Granite_SWA (Granite
with windows, per-layer theta and attention sinks); Llama4 text (Llama4ForCausalLM: NoPE
every 4th layer with attention temperature tuning, chunked attention and a weightless q/k
norm on the rotary layers, interleaved rotary; MoE layers with a sigmoid top-k router
scaling the expert input and a shared expert, interleaved with dense layers); the mixtures
of experts of 2026: GLM4_MoE (GLM-4.5 / 4.6: sigmoid router with a correction bias for the
choice, grouped top-k, routed scaling factor, a shared expert, dense first layers, q/k norm,
partial rotary), ERNIE4_5_MoE (softmax router with a correction bias, shared experts, MoE
layers by start / end / interval), Hunyuan_v1_MoE (a shared MLP beside the routed experts).
Refused with the reason: Qwen 3.5 / 3.5-MoE and Qwen3-Next (Gated DeltaNet layers), Mistral 4 and
glm4_moe_lite (multi-head latent attention): not GQA.

Rope: default, linear, dynamic, yarn, longrope, llama3, proportional (Gemma 4), in both
config.json spellings.
Anything else is refused, naming the field."""

app = typer.Typer(
    help=HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)
state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        print(f"gqa-convert {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(message)s")


def parse_size(text: str, option: str = "--shard-size") -> int:
    """'5GB', '500MB', '2GiB', '1.5GB' or '800000000B' -> bytes. The unit is required: a bare
    number (`--max-memory 1.5`, meant as GB) would silently be bytes."""
    units = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if match and not match.group(2):
        number = match.group(1)
        raise UsageError(
            f"{option} {number}: give a unit, e.g. {number}GB, {number}MB or {number}B"
        )
    if not match or match.group(2).upper() not in units:
        raise UsageError(f"{option}: cannot read {text!r} (examples: 5GB, 500MB, 2GiB)")
    size = int(float(match.group(1)) * units[match.group(2).upper()])
    if size <= 0:
        raise UsageError(f"{option} must be positive")
    return size


# Options shared by `verify` and the gate of `convert`.
PromptOpt = Annotated[
    list[str] | None,
    typer.Option("--prompt", help="Extra text to compare on (repeatable; needs a tokenizer)."),
]
PromptsFileOpt = Annotated[
    Path | None, typer.Option(help="A file of extra prompts, one per non-empty line.")
]
SeqLenOpt = Annotated[
    int | None,
    typer.Option(
        help="Tokens per input (default: 128, or 64 past a small sliding window, llama3 / "
        "longrope original_max_position_embeddings or dynamic NTK max_position_embeddings; "
        "at most 1024)."
    ),
]
MaxLogitOpt = Annotated[float | None, typer.Option(help="Tolerance: max |logit diff|.")]
MaxKlOpt = Annotated[float | None, typer.Option(help="Tolerance: max KL(HF || ours).")]
MinTop1Opt = Annotated[float | None, typer.Option(help="Tolerance: min top-1 agreement.")]
ActRtolOpt = Annotated[
    float | None, typer.Option(help="Tolerance: relative error of each compared activation.")
]
MaxMemoryOpt = Annotated[
    str | None,
    typer.Option(
        help="Memory budget of the check, with its unit: 6GB, 1.5GiB, 800MB (default: what "
        "is available). Whole-model when it fits, else layer-streamed, else sub-layer (one "
        "layer's parts at a time); exit 3 if even that does not fit."
    ),
]
StreamingOpt = Annotated[
    bool | None,
    typer.Option(
        "--streaming/--no-streaming",
        help="Force layer-streamed / whole-model verification (default: by the budget).",
    ),
]
SubLayerOpt = Annotated[
    bool,
    typer.Option(
        "--sub-layer",
        help="Force sub-layer verification: each layer's attention one KV head at a time, "
        "its MLP and the vocabulary in chunks, MoE experts one at a time (default: only "
        "when one layer does not fit).",
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(help="Where to verify: cpu, cuda, cuda:N or auto (several GPUs: cuda)."),
]


def _verify_kwargs(
    prompt: list[str] | None,
    prompts_file: Path | None,
    seq_len: int | None,
    max_logit_diff: float | None,
    max_kl: float | None,
    min_top1: float | None,
    activation_rtol: float | None,
    max_memory: str | None = None,
    streaming: bool | None = None,
    device: str = "cpu",
    sub_layer: bool = False,
) -> dict:
    """The keyword arguments of `verify.verify` that the options shared by `verify` and
    `convert` set (unset tolerances: the compute dtype's defaults)."""
    from gqa_convert.verify import read_prompts_file

    prompts = list(prompt or []) + (read_prompts_file(prompts_file) if prompts_file else [])
    tolerances = {
        "max_abs_logit_diff": max_logit_diff,
        "kl_max": max_kl,
        "min_top1_agreement": min_top1,
        "activation_rtol": activation_rtol,
    }
    if sub_layer and streaming is not None:
        raise UsageError("--sub-layer: give it without --streaming / --no-streaming")
    return {
        "prompts": prompts or None,
        "seq_len": seq_len,
        "tolerances": tolerances,
        "max_memory": parse_size(max_memory, "--max-memory") if max_memory else None,
        "streaming": "sub-layer" if sub_layer else streaming,
        "device": device,
    }


@contextmanager
def layer_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A transient rich bar over layers on stderr; yields verify's `progress(done, total)`."""
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _show_report(report: VerifyReport) -> None:
    """The parity report as rich tables on stderr."""
    from rich.table import Table

    from gqa_convert.verify.report import where_words

    limits = report.tolerances
    act = max([report.embed_rel_err, *report.layer_rel_err, report.ln_final_rel_err])
    title = (
        f"parity with HF ({report.dtype}, {report.tokens} tokens, {report.inputs} inputs, "
        f"{report.mode}, peak {_gb(report.peak_memory_bytes)})"
    )
    table = Table("check", "value", "tolerance", title=title, title_justify="left")
    rows = [
        ("max |logit diff|", report.max_abs_logit_diff, f"<= {limits.max_abs_logit_diff:.3g}"),
        ("mean |logit diff|", report.mean_abs_logit_diff, "not gated"),
        ("max |log-prob diff|", report.max_abs_logprob_diff, "not gated"),
        ("KL(HF || ours) mean", report.kl_mean, "not gated"),
        ("KL(HF || ours) max", report.kl_max, f"<= {limits.kl_max:.3g}"),
        ("top-1 agreement", report.top1_agreement, f">= {limits.min_top1_agreement:.3g}"),
        ("top-5 overlap", report.top5_overlap, "not gated"),
        ("max activation rel err", act, f"<= {limits.activation_rtol:.3g}"),
    ]
    if report.routing_agreement is not None:  # MoE: tokens choosing HF's experts
        limit = limits.min_routing_agreement
        rows.append(("routing agreement", report.routing_agreement, f">= {limit:.3g}"))
    for name, value, limit in rows:
        table.add_row(name, f"{value:.3g}", limit)
    worst = report.worst_position
    table.add_row(
        "worst position",
        f"seq {worst['sequence']} pos {worst['position']} (token {worst['token_id']})",
        "",
    )
    err.print(table)
    err.print(f"inputs: {escape(report.inputs_detail)}", highlight=False)
    if report.first_divergence is not None:
        where = report.first_divergence
        blocks = Table("block", "residual rel err", title="residual stream", title_justify="left")
        for i, e in enumerate(report.layer_rel_err):
            mark = "[red]" if not e <= limits.activation_rtol else ""
            blocks.add_row(str(i), f"{mark}{e:.3g}")
        err.print(blocks)
        if report.components:
            parts = Table("component", "rel err", title=f"inside block {where['layer']}")
            for name, e in report.components.items():
                parts.add_row(name, f"{'[red]' if name == where['component'] else ''}{e:.3g}")
            err.print(parts)
        err.print(f"first divergence: {where_words(where)}")
    for line in report.not_exercised:
        err.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False)
    verdict = "[green]PASSED[/green]" if report.passed else "[red]FAILED[/red]"
    err.print(f"parity {verdict}", highlight=False)


def _parity_exit(report: VerifyReport, what: str) -> None:
    err.print(
        f"[red]error:[/red] {escape(report.summary())}; {escape(what)}",
        highlight=False,
        soft_wrap=True,  # one line, as every error
    )
    raise typer.Exit(ParityError.exit_code)


TokenOpt = Annotated[
    str | None,
    typer.Option(help="Hub token (default: HF_TOKEN, else the `hf auth login` one). Never shown."),
]
GgufFileOpt = Annotated[
    str | None,
    typer.Option(
        help="The .gguf file of SRC (a folder or Hub repo) to read, when it holds several or "
        "a config.json too. SRC may also be the .gguf file itself."
    ),
]


@app.command()
def convert(
    src: Annotated[
        Path,
        typer.Argument(
            help="HF checkpoint folder (dense, FP8, compressed-tensors), .gguf file, or Hub "
            "repo id (org/name)."
        ),
    ],
    out: Annotated[Path, typer.Argument(help="Output folder; must not exist unless --overwrite.")],
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    shard_size: Annotated[
        str, typer.Option(help="Largest safetensors shard, with its unit: 5GB, 500MB.")
    ] = "5GB",
    allow_nonfinite: Annotated[
        bool, typer.Option(help="Convert weights holding NaN or Inf instead of refusing.")
    ] = False,
    verify: Annotated[
        bool, typer.Option(help="Check logit parity with the HF model before writing.")
    ] = True,
    force: Annotated[
        bool, typer.Option(help="Write OUT even if parity fails (recorded in the manifest).")
    ] = False,
    verify_dtype: Annotated[
        str | None,
        typer.Option(
            help="Compute dtype of the check: float32, bfloat16, float16 (default: float32, "
            "or --dtype's when that is float16 / bfloat16)."
        ),
    ] = None,
    prompt: PromptOpt = None,
    prompts_file: PromptsFileOpt = None,
    seq_len: SeqLenOpt = None,
    max_logit_diff: MaxLogitOpt = None,
    max_kl: MaxKlOpt = None,
    min_top1: MinTop1Opt = None,
    activation_rtol: ActRtolOpt = None,
    max_memory: MaxMemoryOpt = None,
    streaming: StreamingOpt = None,
    sub_layer: SubLayerOpt = False,
    device: DeviceOpt = "cpu",
    revision: Annotated[
        str | None, typer.Option(help="Branch, tag or commit of a Hub SRC (default: main).")
    ] = None,
    token: TokenOpt = None,
    gguf_file: GgufFileOpt = None,
    push_to: Annotated[
        str | None,
        typer.Option(help="Then push OUT to this Hub repo (org/name), if verification passed."),
    ] = None,
    dtype: Annotated[
        str,
        typer.Option(
            help="Dtype of the written tensors: auto (the source's; a quantised source's "
            "compute dtype, config.json's dtype, else bfloat16), float32, float16, bfloat16."
        ),
    ] = "auto",
    dry_run: Annotated[
        bool,
        typer.Option(
            help="Print the plan (every tensor, shape, dtype, source, shard); write nothing."
        ),
    ] = False,
) -> None:
    """Convert SRC into OUT: TransformerLens-layout safetensors + config.json.

    Writes OUT into a temporary folder, checks logit parity of those files with the HF model
    and renames the folder into place; on a failure nothing is written and it exits 5.
    A quantised SRC (FP8, compressed-tensors, GGUF) is dequantised tensor by tensor; the
    export is dense, checked against transformers' own dequantisation.
    """
    from gqa_convert.api import convert_plan
    from gqa_convert.hub import is_repo_id, push_export, resolve_source
    from gqa_convert.mapping import plan_conversion

    shard_bytes = parse_size(shard_size)
    if dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise UsageError(f"--dtype: {dtype!r} is not auto, float32, float16 or bfloat16")
    out_dtype = None if dtype == "auto" else dtype
    if push_to is not None and not verify:
        raise UsageError("--push-to pushes a verified export only; drop --no-verify")
    if push_to is not None and not is_repo_id(push_to):
        raise UsageError(f"--push-to: {push_to!r} is not a Hub repo id (org/name)")
    source = resolve_source(src, revision=revision, token=token, gguf_file=gguf_file)
    plan = plan_conversion(source.path, gguf_file=gguf_file)
    if dry_run:
        print_plan(plan, plan.output_dtype(out_dtype))
        return
    options = {}
    if verify:  # (imports torch: --no-verify moves bytes only)
        options = _verify_kwargs(
            prompt,
            prompts_file,
            seq_len,
            max_logit_diff,
            max_kl,
            min_top1,
            activation_rtol,
            max_memory,
            streaming,
            device,
            sub_layer=sub_layer,
        )
    if verify_dtype is not None:
        options["dtype"] = verify_dtype

    def show(report: VerifyReport) -> None:
        _show_report(report)
        if not report.passed and force:
            err.print("[yellow]warning:[/yellow] parity failed; writing anyway (--force)")

    def verifying(done: int, total: int) -> None:
        bar.describe(f"verifying parity with the HF model: layer {done}/{total}")

    if verify:
        options["progress"] = verifying
    written = plan.output_dtype(out_dtype)
    total = sum(output_bytes(plan.sources[t.source], written) for t in plan.tasks)
    with progress_bar("converting", total) as bar:  # advanced by written bytes too
        try:
            done = convert_plan(
                plan,
                out,
                source=source,
                overwrite=overwrite,
                shard_bytes=shard_bytes,
                dtype=out_dtype,
                progress=bar.advance,
                allow_nonfinite=allow_nonfinite,
                verify=verify,
                force=force,
                verify_options=options,
                on_verify=lambda: bar.describe("verifying parity with the HF model"),
                on_report=show,
            )
        except ParityError as e:  # verify.ParityFailure, its report shown by `show`
            _parity_exit(e.report, f"nothing written to {out} (--force writes it anyway)")
    cfg = plan.config
    err.print(
        f"wrote {out}: {cfg.architecture}, {cfg.n_layers} layers, {cfg.n_heads} heads / "
        f"{cfg.n_key_value_heads} KV heads, {len(plan.tasks)} tensors"
    )
    if push_to is not None:
        if not done.report.passed:
            _parity_exit(done.report, f"{out} was written (--force) but not pushed to {push_to}")
        _show_push(push_export(out, push_to, token=token))


RevisionOpt = Annotated[
    str | None, typer.Option(help="Branch, tag or commit of a Hub SRC (default: main).")
]


@app.command("verify")
def verify_command(
    src: Annotated[
        Path,
        typer.Argument(
            help="HF checkpoint folder, .gguf file or Hub repo id (org/name): the reference."
        ),
    ],
    converted: Annotated[
        Path | None, typer.Argument(help="An export of ours (default: convert SRC in memory).")
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="Compute dtype: float32, bfloat16 or float16.")
    ] = "float32",
    prompt: PromptOpt = None,
    prompts_file: PromptsFileOpt = None,
    seq_len: SeqLenOpt = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the report as one JSON object on stdout.")
    ] = False,
    max_logit_diff: MaxLogitOpt = None,
    max_kl: MaxKlOpt = None,
    min_top1: MinTop1Opt = None,
    activation_rtol: ActRtolOpt = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    max_memory: MaxMemoryOpt = None,
    streaming: StreamingOpt = None,
    sub_layer: SubLayerOpt = False,
    device: DeviceOpt = "cpu",
    gguf_file: GgufFileOpt = None,
) -> None:
    """Compare logits (and activations) of our model with the HF model's; exit 5 on failure.
    A quantised SRC is dequantised by transformers for the HF side, by us for ours."""
    import json

    from gqa_convert.verify import verify

    options = _verify_kwargs(
        prompt,
        prompts_file,
        seq_len,
        max_logit_diff,
        max_kl,
        min_top1,
        activation_rtol,
        max_memory,
        streaming,
        device,
        sub_layer=sub_layer,
    )
    with layer_progress("comparing with the HF model") as advance:
        report = verify(
            src,
            converted,
            dtype=dtype,
            revision=revision,
            token=token,
            gguf_file=gguf_file,
            progress=advance,
            **options,
        )
    if json_output:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _show_report(report)
    if not report.passed:
        _parity_exit(report, "the conversion does not match the HF model")


@app.command()
def push(
    out: Annotated[Path, typer.Argument(help="An export folder written by `convert`.")],
    repo_id: Annotated[str, typer.Argument(help="Hub model repo (org/name); created if missing.")],
    private: Annotated[bool, typer.Option(help="Create the repo private.")] = False,
    revision: Annotated[
        str | None, typer.Option(help="Branch to push to, created if new (default: main).")
    ] = None,
    create_pr: Annotated[
        bool, typer.Option(help="Open a pull request (against --revision) instead.")
    ] = False,
    commit_message: Annotated[str | None, typer.Option(help="The commit's title.")] = None,
    token: TokenOpt = None,
    force: Annotated[
        bool, typer.Option(help="Push even if verification failed or was skipped.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option(help="List what would be uploaded (files, sizes, card); send nothing.")
    ] = False,
) -> None:
    """Push OUT to the Hub in one commit, its README.md as the model card."""
    from gqa_convert.hub import push_export

    result = push_export(
        out,
        repo_id,
        private=private,
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
        token=token,
        force=force,
        dry_run=dry_run,
    )
    _show_push(result)


def _show_push(result) -> None:
    """A dry run's files and card on stdout; a push's summary on stderr, its URL on stdout."""
    from rich.table import Table

    if result.dry_run:
        out = Console(highlight=False, soft_wrap=True)
        title = f"dry run: would push to {result.repo_id}@{result.revision} (nothing sent)"
        table = Table("file", "bytes", title=title, title_justify="left")
        for name, size in result.files:
            table.add_row(name, f"{size:,}")
        table.add_row("total", f"{result.total_bytes:,}")
        out.print(table)
        out.print("README.md (the model card):", markup=False)
        out.print(result.card, markup=False)
        out.print("A push also removes .safetensors files of an earlier export from the branch.")
        return
    where = f"{result.repo_id}@{result.revision}"
    err.print(f"pushed {len(result.files)} files ({result.total_bytes:,} bytes) to {escape(where)}")
    if result.deleted:
        err.print(f"removed stale files: {escape(', '.join(result.deleted))}")
    print(result.pr_url or result.commit_url)


class Bar:
    """One task of a rich Progress: `advance(nbytes)`, and `describe(text)` for a new stage."""

    def __init__(self, progress: Progress, description: str, total: int):
        self._progress = progress
        self._task = progress.add_task(description, total=total)

    def advance(self, nbytes: int) -> None:
        self._progress.advance(self._task, nbytes)

    def describe(self, description: str) -> None:
        self._progress.update(self._task, description=description)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Bar]:
    """A transient rich bar over bytes on stderr."""
    with Progress(
        SpinnerColumn(),
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,  # off a terminal the bar would only leave blank lines
    ) as progress:
        yield Bar(progress, description, total)


@app.command("to-hf")
def to_hf(
    converted: Annotated[Path, typer.Argument(help="An export of `gqa-convert convert`.")],
    out: Annotated[Path, typer.Argument(help="Output HF checkpoint folder.")],
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    shard_size: Annotated[
        str, typer.Option(help="Largest safetensors shard, with its unit: 5GB, 500MB.")
    ] = "5GB",
) -> None:
    """Write CONVERTED back as an HF checkpoint (HF names, same dtype) that transformers loads.
    The export of a quantised source comes back dense (no re-quantisation)."""
    from gqa_convert.checkpoint import read_weights
    from gqa_convert.to_hf import export_to_hf

    total = sum(info.nbytes for info in read_weights(converted).values())
    with progress_bar("writing HF checkpoint", total) as bar:
        export_to_hf(
            converted,
            out,
            overwrite=overwrite,
            shard_bytes=parse_size(shard_size),
            progress=bar.advance,
        )
    err.print(f"wrote {out}")


@app.command("inspect")
def inspect_command(
    src: Annotated[
        Path, typer.Argument(help="HF checkpoint folder, .gguf file or Hub repo id (org/name).")
    ],
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    gguf_file: GgufFileOpt = None,
) -> None:
    """Describe SRC from config.json and safetensors headers (or a GGUF's metadata) only: no
    tensor data is read; of a Hub repo, only those are fetched. A quantised SRC: how, and the
    dense size of its export."""
    from gqa_convert.inspection import inspect_checkpoint

    info = inspect_checkpoint(src, revision=revision, token=token, gguf_file=gguf_file)
    if json_output:
        print(json.dumps(info, indent=2))
        return
    table = Table(title=str(src), title_justify="left", show_header=False)
    for key, value in info.items():
        if key == "files":
            value = "\n".join(
                f"{n}: {_gb(f['bytes'])}, {f['tensors']} tensors" for n, f in value.items()
            )
        elif key == "estimated_peak_memory_bytes":
            value = ", ".join(f"{k} {_gb(v)}" for k, v in value.items())
        elif key == "fetched":
            value = "\n".join(f"{n}: {b:,} bytes" for n, b in value.items()) or "nothing (cache)"
        elif key in ("tensor_bytes", "export_tensor_bytes"):
            value = _gb(value)
        elif key == "quantization" and value is not None:
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif key == "parameters":
            value = f"{value:,}"
        table.add_row(key, escape(str(value)))
    Console(highlight=False, soft_wrap=True).print(table)
    if info.get("refused"):
        err.print(f"[yellow]warning:[/yellow] {escape(info['refused'])}", highlight=False)
    for name, sizes in info["truncated_files"].items():
        err.print(
            f"[yellow]warning:[/yellow] {escape(name)} is truncated: {sizes['bytes']:,} bytes, "
            f"its header says {sizes['header_says']:,}; convert will refuse it",
            highlight=False,
        )


@app.command("generate")
def generate_command(
    out: Annotated[Path, typer.Argument(help="An export folder written by `convert`.")],
    prompt: Annotated[str, typer.Argument(help="The text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    temperature: Annotated[
        float | None, typer.Option(help="Sample at this temperature (0: greedy, the default).")
    ] = None,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k most likely tokens.")] = None,
    top_p: Annotated[
        float | None, typer.Option(help="Sample from the smallest set of this probability.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the sampling (reproducible).")] = None,
    device: Annotated[
        str, typer.Option(help="cpu, cuda, cuda:N or auto (cuda when there is one).")
    ] = "cpu",
    dtype: Annotated[
        str, typer.Option(help="Compute dtype: auto (the export's), float32, bfloat16, float16.")
    ] = "auto",
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object at the end instead of streaming.")
    ] = False,
) -> None:
    """Continue PROMPT with the model in OUT, streaming the text as it comes: the quick check
    that a converted model talks. Greedy unless --temperature (> 0), --top-k or --top-p ask
    for sampling; stops at the export's stop tokens (generation_config.json). The KV cache
    grows with the tokens generated: exit 3 if memory runs out."""
    import math
    import time

    import torch

    from gqa_convert.memory import is_out_of_memory
    from gqa_convert.model.decoder import GQATransformer
    from gqa_convert.verify import resolve_device

    sample = bool(temperature) or top_k is not None or top_p is not None
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise UsageError(f"--temperature must be a finite number >= 0, got {temperature}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise UsageError("--temperature 0 is greedy: drop --top-k / --top-p, or raise it")
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {top_p}")
    if dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise UsageError(f"--dtype: {dtype!r} is not auto, float32, float16 or bfloat16")
    target = resolve_device(device)  # exit 2 for a device that is not here
    model = GQATransformer.from_pretrained(
        out, dtype=None if dtype == "auto" else getattr(torch, dtype), device=str(target)
    )
    tokens = model.to_tokens(prompt)
    if tokens.shape[1] == 0:
        raise UsageError("the prompt is empty once tokenized")
    tok, new_ids, shown = model.tokenizer, [], [""]
    console = Console(highlight=False, soft_wrap=True)

    def stream(new: torch.Tensor) -> None:
        new_ids.append(int(new[0]))
        if json_output:
            return
        text = tok.decode(new_ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            console.print(text[len(shown[0]) :], end="", markup=False)
            shown[0] = text

    if not json_output:
        console.print(prompt, end="", style="bold", markup=False)
    start = time.perf_counter()
    try:
        result = model.generate(
            tokens,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature or 1.0,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            on_token=stream,
        )
    except RuntimeError as e:  # torch's OutOfMemoryError is one
        if not is_out_of_memory(e):
            raise
        if not json_output:
            console.print()
        raise InsufficientMemoryError(
            f"not enough memory on {target} to go on after {len(new_ids)} new tokens "
            f"(prompt: {tokens.shape[1]}): lower --max-new-tokens"
        ) from None
    seconds = time.perf_counter() - start
    stopped = bool(new_ids) and new_ids[-1] in model.generation_defaults.eos_token_ids
    summary = {
        "prompt": prompt,
        "completion": tok.decode(new_ids, skip_special_tokens=True),
        "prompt_tokens": tokens[0].tolist(),
        "new_tokens": result[0, tokens.shape[1] :].tolist(),
        "stop_reason": "eos" if stopped else "max_new_tokens",
        "sampling": {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
        if sample
        else None,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(len(new_ids) / seconds, 2),
    }
    if json_output:
        print(json.dumps(summary, indent=2))
        return
    console.print()
    err.print(
        f"{len(new_ids)} tokens in {seconds:.2f} s ({summary['tokens_per_second']} tokens/s), "
        f"stopped: {summary['stop_reason']}"
    )


def output_bytes(info, dtype: str | None) -> int:
    """The bytes the source tensor `info` takes in the export, cast to `dtype` (None: as is)."""
    from gqa_convert.checkpoint import DTYPES
    from gqa_convert.dtypes import CODES

    if dtype is None:
        return info.nbytes
    return info.nbytes // DTYPES[info.dtype][0].itemsize * DTYPES[CODES[dtype]][0].itemsize


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def print_plan(plan: ConversionPlan, dtype: str | None) -> None:
    """`convert --dry-run`: every target tensor, its shape, dtype, source and shard."""
    from gqa_convert.inspection import plan_table

    rows = plan_table(plan, dtype)
    print(f"# plan for {plan.src}: {len(rows)} tensors; nothing written")
    width = max(len(r["target"]) for r in rows)
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        source = f"{r['source']} [{r['shard']}]"
        print(f"{r['target']:<{width}}  {shape:<16} {r['dtype']:<9} <- {source}")


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM, raised where the program is, so cleanup (the temporary folder) runs.

    Our own type rather than KeyboardInterrupt, which typer turns into a silent exit code.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def _catch_signals() -> None:
    """Ctrl-C and SIGTERM raise Interrupted, unless the caller chose to ignore them (nohup)."""
    for signum, default in (
        (signal.SIGINT, signal.default_int_handler),
        (signal.SIGTERM, signal.SIG_DFL),
    ):
        if signal.getsignal(signum) is default:
            signal.signal(signum, _on_signal)


def _fail(message: str, code: int) -> None:
    """Print `error: message` (and, with --debug, the traceback first); exit with `code`."""
    if state["debug"]:
        traceback.print_exc()
    err.print("[red]error:[/red]", escape(message), highlight=False, soft_wrap=True)
    sys.exit(code)


def main() -> None:
    """Console entry point: run the app, turning our errors into one line and an exit code.

    The codes are `GQAConvertError.exit_code` of each error type (table in the README),
    2 for command-line mistakes, 130 for Ctrl-C, 143 for SIGTERM, 1 for a bug.
    """
    _catch_signals()
    try:
        code = app(standalone_mode=False)  # a command's typer.Exit(code) comes back as a value
    except GQAConvertError as e:
        _fail(str(e), e.exit_code)
    except Interrupted as e:
        name = "Ctrl-C" if e.signum == signal.SIGINT else signal.Signals(e.signum).name
        _fail(f"interrupted ({name})", 128 + e.signum)
    except (typer.Abort, KeyboardInterrupt):
        _fail("interrupted", 130)
    except typer.TyperException as e:  # usage errors: unknown option, missing argument
        if hasattr(e, "show"):
            e.show()
        else:
            err.print(f"Error: {e}", markup=False)
        sys.exit(UsageError.exit_code)
    except Exception as e:
        hint = "" if state["debug"] else " (--debug shows the traceback)"
        _fail(f"internal error, please report it: {type(e).__name__}: {e}{hint}", 1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
