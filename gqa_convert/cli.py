"""The command line: parse options, call one library function, print, map errors to exit codes."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

from gqa_convert import __version__
from gqa_convert.errors import GQAConvertError, UsageError

app = typer.Typer(
    help="Convert HF Llama-family checkpoints to a TransformerLens-layout GQA model.",
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


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count -> bytes."""
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
    }
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).upper() not in units:
        raise UsageError(f"--shard-size: cannot read {text!r} (examples: 5GB, 500MB, 2GiB)")
    size = int(float(match.group(1)) * units[match.group(2).upper()])
    if size <= 0:
        raise UsageError("--shard-size must be positive")
    return size


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="HF checkpoint folder (config.json + safetensors).")],
    out: Annotated[Path, typer.Argument(help="Output folder; must not exist unless --overwrite.")],
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    shard_size: Annotated[
        str, typer.Option(help="Largest safetensors shard, e.g. 5GB, 500MB.")
    ] = "5GB",
) -> None:
    """Convert SRC into OUT: TransformerLens-layout safetensors + config.json."""
    from gqa_convert.export import write_export
    from gqa_convert.mapping import plan_conversion

    shard_bytes = parse_size(shard_size)
    plan = plan_conversion(src)
    total = sum(plan.sources[t.source].nbytes for t in plan.tasks)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("converting", total=total)
        write_export(
            plan,
            out,
            overwrite=overwrite,
            shard_bytes=shard_bytes,
            progress=lambda n: bar.advance(task, n),
        )
    cfg = plan.config
    err.print(
        f"wrote {out}: {cfg.architecture}, {cfg.n_layers} layers, {cfg.n_heads} heads / "
        f"{cfg.n_key_value_heads} KV heads, {len(plan.tasks)} tensors"
    )


def main() -> None:
    """Console entry point: run the app, turning our errors into one line and an exit code."""
    try:
        app(standalone_mode=False)
    except GQAConvertError as e:
        if state["debug"]:
            raise
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(UsageError.exit_code)
        raise


if __name__ == "__main__":
    main()
