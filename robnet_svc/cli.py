"""Command line: a thin click group; each command calls one function of the pipeline.

Exit codes (the same with or without ``--debug``): 0 success, 1 certified accuracy under
``--fail-under``, 2 bad input or usage (a run that does not fit in memory too, with what to
change), 3 a soundness error (a bug: a certified sample was broken by an attack), 4 an
internal error (any other bug), 5 ``harden --strict``: the target eps was not reached within
the clean-accuracy budget, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM, handled like
Ctrl-C). Errors are one line on stderr; ``--debug`` adds the traceback above it.

Heavy modules (torch, the pipeline) are imported inside the commands, so that ``--help``
and quick commands start fast. Under torchrun (docs/distributed.md) every rank runs the
same command; only rank 0 shows progress, logs and prints results, errors name the rank.
"""

from __future__ import annotations

import json
import os
import sys

import click

from robnet_svc import __version__
from robnet_svc.config import config_option
from robnet_svc.errors import RobnetError, SoundnessError, out_of_memory
from robnet_svc.options import BUDGET_MISSED, click_option, command_options


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
    from robnet_svc.plugins import kinds, load_registry

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
    for kind in (k for k in kinds() if k.table):
        table = Table(title=kind.key.replace("_", " "), title_justify="left")
        for col in ("name", "distribution", "version", "description"):
            table.add_column(col)
        for row in listing[kind.key]:
            table.add_row(row["name"], row["distribution"], row["version"], row["description"])
        console.print(table)
        options = [(row["name"], key, opt) for row in listing[kind.key] for key, opt in row.get("options", {}).items()]
        if options:
            table = Table(title=f"{kind.label} options (--{kind.label.replace(' ', '-')}-option KEY=VALUE)",
                          title_justify="left")
            for col in ("name", "option", "default", "type", "help"):
                table.add_column(col)
            for name, key, opt in options:
                choices = f" ({'|'.join(map(str, opt['choices']))})" if opt["choices"] is not None else ""
                table.add_row(name, key, json.dumps(opt["default"]), opt["type"] + choices, opt["help"])
            console.print(table)


@cli.command("inspect")
@click.argument("model", type=click.Path(path_type=str))
@click_option("image_shape")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect_cmd(model: str, image_shape: str | None, as_json: bool) -> None:
    """Pre-flight check of an ONNX model: inputs, outputs, ops, and bound-engine support."""
    from robnet_svc.onnx_io import format_inspection, inspect_model

    report = inspect_model(model, image_shape=image_shape)
    click.echo(json.dumps(report, indent=2) if as_json else format_inspection(report))


# --------------------------------------------------------------------------- harden / certify

def _run_options(command: str):
    """The options of ``harden`` or ``certify``: MODEL, every ``Options`` field the command has
    (declared once, in ``robnet_svc.options``), then ``--fail-under``, ``--json`` and ``--config``."""

    def decorate(func):
        decorators = [
            click.argument("model", type=click.Path(path_type=str)),
            *command_options(command),
            click.option("--fail-under", type=click.FloatRange(0, 1), default=None, metavar="FRACTION",
                         help="Exit 1 when the certified accuracy is below FRACTION."),
            click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout."),
            config_option,
        ]
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return decorate


@cli.command("harden")
@_run_options("harden")
@click.pass_context
def harden_cmd(ctx: click.Context, **params) -> None:
    """Fine-tune MODEL (ONNX) to be certifiably robust; write model.robust.onnx, certificate.h5, summary.json."""
    from robnet_svc import pipeline

    report, is_main = _run(ctx, pipeline.harden, params)
    _finish(report, "after", params, is_main)
    selection = report.summary()["selection"]
    if params.get("strict") and selection is not None and not selection["within_budget"]:
        if is_main:
            click.echo(f"robnet-svc: --strict: the target eps was not reached within the clean-accuracy budget "
                       f"(exit {BUDGET_MISSED})", err=True)
        sys.exit(BUDGET_MISSED)


@cli.command("certify")
@_run_options("certify")
@click.pass_context
def certify_cmd(ctx: click.Context, **params) -> None:
    """Certify MODEL (ONNX) on a test set, without training (a deployment gate with --fail-under)."""
    from robnet_svc import pipeline

    report, is_main = _run(ctx, pipeline.certify, params)
    _finish(report, "model", params, is_main)


@cli.group("report")
def report_group() -> None:
    """Read certificates."""


@report_group.command("show")
@click.argument("file", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (summary, provenance, per-class) instead.")
def report_show_cmd(file: str, as_json: bool) -> None:
    """Print the summary, provenance and per-class table of a certificate.h5."""
    from robnet_svc.report import read_report, render

    report = read_report(file)
    if as_json:
        click.echo(json.dumps({"summary": report.summary(), "provenance": report.provenance.as_dict(),
                               "per_class": report.per_class()}, indent=2, default=str))
        return
    from rich.console import Console

    render(report, Console())


@cli.command("export-vnnlib")
@click.argument("certificate", type=click.Path(path_type=str))
@click.argument("model", type=click.Path(path_type=str))
@click.option("--out", required=True, help="Output folder (refused if it exists and is not empty).")
@click.option("--dataset", default=None, help="Dataset plugin (default and only choice: the certificate's).")
@click.option("--data-dir", default=None, help="Folder of the dataset (default: the certificate's).")
@click.option("--samples", default="certified", show_default=True, metavar="certified|all|N",
              help="Which samples of the certificate: the certified ones, all, or the first N.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Timeout column of instances.csv (seconds per instance for a verifier).")
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out.")
@click.option("--device", default="cpu", show_default=True, help="Where the re-certification check runs.")
@click.option("--json", "as_json", is_flag=True, help="Print export.json on stdout.")
def export_vnnlib_cmd(certificate: str, model: str, out: str, dataset: str | None, data_dir: str | None,
                      samples: str, timeout: float, force: bool, device: str, as_json: bool) -> None:
    """Export each certified sample as a VNN-COMP instance (ONNX on the coefficients + VNN-LIB), checked."""
    from robnet_svc.progress import console_reporter
    from robnet_svc.vnnlib_export import export_vnnlib

    _tune_allocator()
    with console_reporter() as reporter:
        summary = export_vnnlib(certificate, model, out, dataset=dataset, data_dir=data_dir, samples=samples,
                                timeout=timeout, force=force, device=device, reporter=reporter)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    checks = summary["checks"]
    click.echo(f"wrote {summary['num_instances']} instance(s) ({summary['num_certified']} certified) to {out}; "
               f"checks passed: onnxruntime = model at nominal and {checks['random_coefficients_per_sample']} "
               f"random coefficient vectors per sample, {summary['method']} re-certifies every exported instance "
               f"with the certificate's verdict (max margin difference {checks['max_margin_difference']:.2g})")


@cli.command("verify-vnnlib")
@click.argument("files", nargs=-1, type=click.Path(path_type=str))
@click.option("--instances", default=None, type=click.Path(path_type=str),
              help="A VNN-COMP instances.csv (onnx,vnnlib,timeout rows) instead of NET.onnx PROP.vnnlib.")
@click.option("--method", "methods", multiple=True, default=("rsip-ssip",), show_default=True,
              help="Bound method, repeatable; 'all' for every registered one.")
@click_option("attack_steps")
@click_option("attack_restarts")
@click_option("seed")
@click_option("device", default="cpu", help="cpu or cuda[:N].")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def verify_vnnlib_cmd(files: tuple[str, ...], instances: str | None, methods: tuple[str, ...], attack_steps: int,
                      attack_restarts: int, seed: int, device: str, as_json: bool) -> None:
    """Bound VNN-COMP instances: verify-vnnlib NET.onnx PROP.vnnlib, or --instances instances.csv."""
    from robnet_svc.certify import AttackSettings
    from robnet_svc.errors import RobnetError
    from robnet_svc.plugins import load_registry
    from robnet_svc.progress import console_reporter
    from robnet_svc.vnnlib import read_instances
    from robnet_svc.vnnlib_verify import verify_instance

    if instances is not None and files:
        raise RobnetError("give NET.onnx PROP.vnnlib or --instances CSV, not both")
    if instances is None and len(files) != 2:
        raise RobnetError("give NET.onnx PROP.vnnlib (two files) or --instances instances.csv")
    pairs = [(i.onnx, i.vnnlib) for i in read_instances(instances)] if instances else [tuple(files)]
    names = list(methods)
    if "all" in names:
        order = ["ibp", "ssip", "rsip-ibp", "rsip-ssip", "rsip"]  # built-ins cheapest first, then plugins'
        names = sorted((row["name"] for row in load_registry().listing()["bound_methods"]),
                       key=lambda n: (order.index(n) if n in order else len(order), n))
    settings = AttackSettings(steps=attack_steps, restarts=attack_restarts, seed=seed)
    _tune_allocator()
    with console_reporter() as reporter:
        results = [verify_instance(net, prop, names, attack=settings, device=device, reporter=reporter)
                   for net, prop in pairs]
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results], indent=2))
        return
    for r in results:
        click.echo(f"{r.vnnlib} on {r.onnx}: label {r.label}, attack margin {r.attack_margin:.4g}")
        for m in r.methods:
            proven = sum(v > 0 for v in m.margin_lower)
            bounds = ", ".join(f"{j}: {v:.4g}" for j, v in zip(r.targets, m.margin_lower))
            click.echo(f"  {m.method:<10} {m.verdict:<20} {proven}/{len(m.margin_lower)} margins > 0 "
                       f"({m.seconds:.1f} s); lower bounds of Y_{r.label} - Y_j: {bounds}")

@report_group.command("plot")
@click.argument("file", type=click.Path(path_type=str))
@click.option("--out", required=True, help="Folder for the PNG figures and report.html (created; files replaced).")
@click.option("--samples", default=None, metavar="I,J,...",
              help="Test samples to draw (positions in the test split, as in the certificate's index); "
                   "default: the worst ones.")
@click.option("--num-samples", type=click.IntRange(min=0), default=6, show_default=True,
              help="How many worst samples to draw when --samples is not given (0: none).")
@click.option("--model", "models", multiple=True, metavar="[SECTION=]PATH",
              help="The ONNX model of a section (before, after, model) when it is no longer where the "
                   "certificate says; must be the same file (sha256). Repeatable.")
@click.option("--dataset", default=None, help="Dataset plugin (default: the certificate's).")
@click.option("--data-dir", default=None, help="Dataset folder (default: the certificate's).")
@click.option("--no-samples", is_flag=True, help="Skip the sample pictures (no model or dataset needed).")
def report_plot_cmd(file: str, out: str, samples: str | None, num_samples: int, models: tuple[str, ...],
                    dataset: str | None, data_dir: str | None, no_samples: bool) -> None:
    """Draw a certificate.h5: PNG figures and one self-contained report.html in --out.

    The sample pictures re-compute the attack's worst images: they need the test split and each
    section's model, read from the settings recorded in the certificate unless given here."""
    from robnet_svc.report import read_report

    report = read_report(file)
    chosen = _sample_list(samples)
    model_paths = _model_paths(models, list(report.sections))
    from robnet_svc import report_plot

    source = None
    report_plot.choose_samples(report, chosen, num_samples)  # a bad --samples fails before any loading
    if not no_samples and (chosen or num_samples):
        from robnet_svc.progress import console_reporter

        with console_reporter() as reporter:
            source = report_plot.load_source(report, models=model_paths, dataset=dataset, data_dir=data_dir,
                                             reporter=reporter)
    page = report_plot.write_page(report, out, source=source, samples=chosen, num_worst=num_samples,
                                  note="Sample pictures skipped (--no-samples)." if no_samples else "")
    click.echo(f"wrote {page}")


def _sample_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of sample positions",
                                 param_hint="--samples") from None
    if not values or min(values) < 0:
        raise click.BadParameter(f"{text!r}: give sample positions >= 0", param_hint="--samples")
    return values


def _model_paths(values: tuple[str, ...], sections: list[str]) -> dict[str, str]:
    """``--model [SECTION=]PATH`` values -> {section: path}; a bare PATH needs a one-section certificate."""
    out = {}
    for value in values:
        section, sep, path = value.partition("=")
        if not sep:
            if len(sections) != 1:
                raise click.BadParameter(f"this certificate has sections {', '.join(sections)}: "
                                         "write --model SECTION=PATH", param_hint="--model")
            section, path = sections[0], value
        if section not in sections:
            raise click.BadParameter(f"no section {section!r} (the certificate has {', '.join(sections)})",
                                     param_hint="--model")
        out[section] = path
    return out


@cli.command("demo")
@click.option("--out", default="robnet-demo", show_default=True, help="Output folder.")
@click.option("--fast", is_flag=True, help="Fewer samples and epochs (a smoke test, ~20 s).")
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out.")
@click_option("device")
@click_option("threads")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def demo_cmd(out: str, fast: bool, force: bool, device: str, threads: int | None, as_json: bool) -> None:
    """Train a small classifier on the embedded digits, export it, harden it, certify before/after."""
    from robnet_svc import threads as thread_pools
    from robnet_svc.demo import run_demo
    from robnet_svc.progress import console_reporter

    thread_pools.configure(threads)
    _tune_allocator()
    with console_reporter() as reporter:
        report = run_demo(out, fast=fast, force=force, device=device, reporter=reporter)
    _print_summary(report, as_json)


# --------------------------------------------------------------------------- the service

@cli.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (other than loopback only with --tokens).")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--state-dir", default="robnet-state", show_default=True,
              help="Folder of the job store (jobs.sqlite) and the jobs' files.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Jobs run at once (default: one per GPU, else 1).")
@click.option("--data-root", "data_roots", multiple=True, metavar="NAME=PATH",
              help="Serve dataset NAME from folder PATH, repeatable (digits needs none).")
@click.option("--tokens", default=None, type=click.Path(dir_okay=False),
              help="File of bearer tokens, one a line (default: no authentication, loopback only).")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=256.0, show_default=True,
              help="Largest model upload accepted.")
def serve_cmd(host, port, state_dir, workers, data_roots, tokens, max_upload_mb) -> None:
    """Run the HTTP job API (docs/service.md): harden and certify jobs for pipelines and teams."""
    try:
        from robnet_svc.service.app import serve
    except ImportError as exc:
        raise RobnetError(f"robnet-svc serve needs the service extra ({exc.name} is missing): "
                          "pip install 'robnet-svc[service]'") from None
    serve(host, port, state_dir, workers, data_roots, tokens, max_upload_mb)


@cli.command("submit")
@click.option("--server", required=True, envvar="ROBNET_SERVER", help="URL of robnet-svc serve (env ROBNET_SERVER).")
@click.option("--token-file", default=None, envvar="ROBNET_TOKEN_FILE", type=click.Path(dir_okay=False),
              help="File whose first line is the bearer token (env ROBNET_TOKEN_FILE).")
@click.option("--certify", "certify_only", is_flag=True, help="Submit a certify job (no training) instead.")
@click.option("--wait", is_flag=True, help="Wait for the job, showing its progress (implied by --fail-under, "
                                           "--download).")
@click.option("--download", default=None, metavar="DIR", help="Download the artifacts into DIR (sha256-checked).")
@click.pass_context
def submit_cmd(ctx: click.Context, server, token_file, certify_only, wait, download, **params) -> None:
    """Send MODEL (ONNX) to a robnet-svc server as a harden (or certify) job; with --wait, exit like harden."""
    from robnet_svc.service.client import run_submit

    command = "certify" if certify_only else "harden"
    client_side = {"model", "fail_under", "as_json", "config"}
    settings = {name: list(value) if isinstance(value, tuple) else value for name, value in params.items()
                if name not in client_side
                and ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)}
    sys.exit(run_submit(params["model"], server, token_file, command, settings, wait=wait,
                        fail_under=params["fail_under"], download=download, as_json=params["as_json"]))


#: harden's options that name server paths (the server owns them): not options of ``submit``.
_SERVER_SIDE = {"data_dir", "out", "force", "resume", "strict"}
submit_cmd.params.extend(p for p in harden_cmd.params if p.name not in _SERVER_SIDE)


def _tune_allocator() -> None:
    """The opt-in to the allocator tuning of the bound passes (robnet_svc/bounds/alloc.py), made by
    every command that computes bounds: its process is robnet-svc's own, the library never tunes."""
    from robnet_svc.bounds.alloc import keep_freed_memory

    keep_freed_memory()


def _run(ctx: click.Context, story, params: dict):
    """Build pipeline options from the resolved parameters and run ``story`` with progress on stderr
    (in this process's place of a torchrun job, if any); return (report, whether this is rank 0)."""
    import shlex

    from robnet_svc import distributed, threads
    from robnet_svc.config import effective_config
    from robnet_svc.options import Options
    from robnet_svc.progress import console_reporter

    options = Options.from_params(params)
    options.threads = threads.configure(options.threads)
    args = sys.argv[1:] if ctx.obj.get("argv") is None else ctx.obj["argv"]
    command_line = " ".join(shlex.quote(a) for a in ["robnet-svc", *args])
    dist = distributed.from_env()
    _tune_allocator()
    try:
        with console_reporter(quiet=not dist.is_main) as reporter:
            report = story(options, effective_config(ctx), command_line, reporter, dist=dist)
    except KeyboardInterrupt as exc:
        hint = _resume_command(args, options) if story.__name__ == "harden" else None
        raise KeyboardInterrupt(hint) if hint else exc
    dist.stop()
    return report, dist.is_main


def _resume_command(args: list[str], options) -> str | None:
    """The command that continues an interrupted ``harden`` (its arguments, ``--force`` dropped,
    ``--resume`` added), when its checkpoint exists."""
    import shlex
    from pathlib import Path

    from robnet_svc.pipeline import CHECKPOINT_FILE

    if not options.out or not (Path(options.out) / CHECKPOINT_FILE).is_file():
        return None
    kept = [a for a in args if a != "--force"]
    return " ".join(shlex.quote(a) for a in ["robnet-svc", *kept, *([] if "--resume" in kept else ["--resume"])])


def _finish(report, section: str, params: dict, is_main: bool) -> None:
    """Print the summary (rank 0) and apply ``--fail-under`` (every rank exits with the same code)."""
    if is_main:
        _print_summary(report, params.get("as_json", False))
    threshold = params.get("fail_under")
    certified = report.sections[section].summary()["certified_accuracy"]
    if threshold is not None and certified < threshold:
        if is_main:
            click.echo(f"robnet-svc: certified accuracy {certified:.4f} is under --fail-under {threshold}",
                       err=True)
        sys.exit(1)


def _print_summary(report, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.summary(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"robnet-svc {report.kind}: {_describe_perturbation(report.provenance)}", soft_wrap=True)
    table = Table()
    for col in ("", "clean acc", "certified acc", "empirical robust acc", "n"):
        table.add_column(col, justify="right" if col else "left")
    for name, certs in report.sections.items():
        s = certs.summary()
        table.add_row(name, f"{100 * s['clean_accuracy']:.1f}%", f"{100 * s['certified_accuracy']:.1f}%",
                      f"{100 * s['empirical_robust_accuracy']:.1f}%", str(s["num_samples"]))
    console.print(table)
    if report.provenance.output_model:
        click.echo(f"wrote {report.provenance.output_model} (sha256 {report.provenance.output_model_sha256})")


def _describe_perturbation(provenance) -> str:
    """``bias-field eps=0.3 (order=2, mode=mult)`` from the certificate's ``Provenance``."""
    spec = dict(provenance.perturbation)
    name, eps = spec.pop("name", "?"), spec.pop("eps", "?")
    spec.pop("clip", None)
    options = ", ".join(f"{k}={v}" for k, v in spec.items() if v is not None)
    methods = ", ".join(f"{k.replace('_', ' ')} {getattr(provenance, k)}" for k in ("train_method", "cert_method")
                        if getattr(provenance, k))
    return f"{name} eps={eps}" + (f" ({options})" if options else "") + (f"; {methods}" if methods else "")


#: Exit code of an internal error (a bug other than a soundness error). Not 1: that one means
#: "certified accuracy under --fail-under", which a pipeline may treat as a verdict.
INTERNAL_ERROR = 4


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI, turning errors into one line and an exit code.

    The exit code never depends on ``--debug``, which only adds the traceback."""
    import signal

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    interrupted = {"signal": signal.SIGINT}

    def on_sigterm(signum, _frame):  # SIGTERM (kill, a scheduler, a container stop) ends like Ctrl-C
        interrupted["signal"] = signum
        raise KeyboardInterrupt

    previous = _install(signal.SIGTERM, on_sigterm)
    try:
        cli.main(args=args, prog_name="robnet-svc", standalone_mode=False, obj={"argv": args})
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors: click's own message, exit 2
        exc.show()
        sys.exit(2 if exc.exit_code not in (0, 1) else exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:  # click turns Ctrl-C into Abort
        cause = exc.__cause__ if isinstance(exc, click.exceptions.Abort) else exc
        hint = cause.args[0] if isinstance(cause, KeyboardInterrupt) and cause.args else None
        what = "terminated" if interrupted["signal"] == signal.SIGTERM else "interrupted"
        click.echo(f"robnet-svc: {_rank()}{what}" + (f"; continue with: {hint}" if hint else ""), err=True)
        _exit(128 + int(interrupted["signal"]))
    except (RobnetError, SoundnessError) as exc:
        if debug:
            _traceback()
        label = "soundness error" if isinstance(exc, SoundnessError) else "error"
        click.echo(f"robnet-svc: {_rank()}{label}: {_one_line(str(exc))}", err=True)
        _exit(exc.exit_code)
    except Exception as exc:  # a bug in robnet-svc: still one line; --debug adds the traceback
        if debug:
            _traceback()
        oom = out_of_memory(exc)  # not a bug: the run does not fit at these batch sizes
        if oom is not None:
            click.echo(f"robnet-svc: {_rank()}error: {oom}", err=True)
            _exit(oom.exit_code)
        click.echo(f"robnet-svc: {_rank()}internal error: {type(exc).__name__}: {_one_line(str(exc))}"
                   + ("" if debug else " (re-run with --debug for the traceback)"), err=True)
        _exit(INTERNAL_ERROR)
    finally:
        _install(signal.SIGTERM, previous)


def _install(signum, handler):
    """Install a signal handler where Python allows it (main thread); returns the previous one."""
    import signal

    if handler is None:
        return None
    try:
        return signal.signal(signum, handler)
    except ValueError:  # not the main thread (e.g. the command line called from a worker thread)
        return None


def _traceback() -> None:
    import traceback

    traceback.print_exc(file=sys.stderr)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _rank() -> str:
    """``"rank R/N: "`` under a torchrun job of several processes (from its environment), else ``""``."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f"rank {os.environ.get('RANK', '?')}/{world}: " if world not in ("", "1") else ""


def _exit(code: int) -> None:
    """Exit with ``code``; a rank of a running process group leaves at once (no waiting on peers)."""
    if "robnet_svc.distributed" in sys.modules:  # imported only by commands that may start a process group
        sys.modules["robnet_svc.distributed"].abort(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
