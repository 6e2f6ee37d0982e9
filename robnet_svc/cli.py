"""Command line: a thin click group; each command calls one function of the pipeline.

Exit codes: 0 success, 1 certified accuracy under ``--fail-under``, 2 bad input or usage,
3 a soundness error (a bug: a certified sample was broken by an attack).
Errors are one line on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import sys

import click

from robnet_svc import __version__
from robnet_svc.errors import RobnetError, SoundnessError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="robnet-svc")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Make ONNX image classifiers certifiably robust to bias fields (smooth intensity changes)."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins_cmd(as_json: bool) -> None:
    """List every bound method, perturbation and dataset, with the distribution it comes from."""
    from robnet_svc.plugins import load_registry

    registry = load_registry()
    listing = registry.listing()
    for line in registry.broken:
        click.echo(f"robnet-svc: warning: {line}", err=True)
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for kind in ("bound_methods", "perturbations", "datasets"):
        table = Table(title=kind.replace("_", " "), title_justify="left")
        for col in ("name", "distribution", "version", "description"):
            table.add_column(col)
        for row in listing[kind]:
            table.add_row(row["name"], row["distribution"], row["version"], row["description"])
        console.print(table)


@cli.command("inspect")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--image-shape", default=None, metavar="CxHxW",
              help="How to view a flat [N,D] input as an image, e.g. 1x28x28.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect_cmd(model: str, image_shape: str | None, as_json: bool) -> None:
    """Pre-flight check of an ONNX model: inputs, outputs, ops, and bound-engine support."""
    from robnet_svc.onnx_io import format_inspection, inspect_model

    report = inspect_model(model, image_shape=image_shape)
    click.echo(json.dumps(report, indent=2) if as_json else format_inspection(report))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI, turning errors into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="robnet-svc", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors: click's own message, exit 2
        exc.show()
        sys.exit(2 if exc.exit_code not in (0, 1) else exc.exit_code)
    except click.exceptions.Abort:
        click.echo("robnet-svc: aborted", err=True)
        sys.exit(130)
    except (RobnetError, SoundnessError) as exc:
        if debug:
            raise
        label = "soundness error" if isinstance(exc, SoundnessError) else "error"
        click.echo(f"robnet-svc: {label}: {_one_line(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("robnet-svc: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug in robnet-svc: still one line, unless --debug
        if debug:
            raise
        click.echo(f"robnet-svc: internal error: {type(exc).__name__}: {_one_line(str(exc))} "
                   "(re-run with --debug for the traceback)", err=True)
        sys.exit(3)


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    main()
