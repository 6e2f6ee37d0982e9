"""The options of ``harden`` and ``certify``, each declared once.

Every field of ``Options`` carries its default and, in its metadata, its command-line form
(flag, click type, help, the commands that have it). From these declarations come the click
options of ``harden``, ``certify`` and ``submit`` (``robnet_svc.cli``), the keys a config file
may hold (``robnet_svc.config`` reads them off the click command) and the effective config
stored in the certificate (the resolved click parameters); ``Options.from_params`` turns the
resolved parameters back into ``Options`` for the command line and the service alike. Help
texts never repeat a default: click shows it from the declaration (``show_default``).

Kept apart from ``pipeline`` (which needs torch) so that the command line can read the
declarations without importing torch: ``robnet-svc --help`` starts in a fraction of a second.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import click

from robnet_svc.errors import RobnetError
from robnet_svc.plugin_options import parse_pairs
from robnet_svc.threads import MAX_DEFAULT as MAX_DEFAULT_THREADS

BOTH = ("harden", "certify")
HARDEN = ("harden",)

#: Exit code of ``harden --strict`` when no epoch reached the target eps within ``--max-clean-drop``.
BUDGET_MISSED = 5

#: Options with a flag of their own (``--order`` ...) that set the perturbation option of that name.
SHORTHANDS = ("order", "mode", "coef_scale")


def _fraction_or_none(_ctx, param, value) -> float | None:
    """``none`` (any case) or a fraction in [0, 1] (a string from the command line, a number from a config)."""
    if value is None or str(value).strip().lower() == "none":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise click.BadParameter(f"{value!r} is not a fraction in [0, 1] or 'none'", param=param) from None
    if not 0 <= number <= 1:
        raise click.BadParameter(f"{value!r} is not a fraction in [0, 1] or 'none'", param=param)
    return number


def _check_pairs(ctx, param, values):
    """``--dataset-option`` / ``--perturbation-option`` values (flags, or a TOML list of strings) must
    read ``KEY=VALUE``. Given on the command line, they come after the config file's (a later key
    wins), so a flag overrides the file's value of its key and keeps the others."""
    values = [values] if isinstance(values, str) else list(values or ())
    for value in values:
        if not isinstance(value, str) or "=" not in value or not value.split("=", 1)[0].strip():
            raise click.BadParameter(f"{value!r} is not KEY=VALUE (e.g. cache=false)", param=param)
    from_file = (ctx.default_map or {}).get(param.name) if ctx is not None else None
    if from_file and ctx.get_parameter_source(param.name) == click.core.ParameterSource.COMMANDLINE:
        values = [*from_file, *values]
    return tuple(values)


#: ``--preset NAME``: option values that replace the built-in defaults (a config file and flags still win).
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's schedule (§6): 175 robust epochs, eps ramped linearly over the first 100, learning
    # rate 5e-4 then /10 after 100 epochs and /100 after 150, alpha 1, RSIP-SSIP, no accuracy budget.
    "paper": {"epochs": 175, "ramp_epochs": 100.0, "ramp_shape": "linear", "lr": 5e-4, "alpha": 1.0,
              "method": "rsip-ssip", "cert_method": "rsip-ssip", "max_clean_drop": "none"},
}


def _apply_preset(ctx, _param, value):
    """Eager: put the preset's values under the config file's and the flags (``ctx.default_map``)."""
    if value is not None and ctx is not None:
        preset = {k: v for k, v in PRESETS[value].items() if any(p.name == k for p in ctx.command.params)}
        ctx.default_map = {**preset, **(ctx.default_map or {})}
    return value


def opt(default: Any, flag: str | None = None, *, help: str | dict[str, str], commands: tuple[str, ...] = BOTH,
        param: str | None = None, convert=None, factory=None, **click_kwargs: Any):
    """A field of ``Options`` with its command-line form.

    ``flag``: the option's flag (``--eps``; default from the field name); ``help``: its help, or
    one per command; ``commands``: which commands have it; ``param``: the click parameter name
    when it differs from the field (``dataset_option`` feeds ``dataset_options``) and
    ``convert`` what turns that parameter's value into the field's; the rest goes to
    ``click.option`` (type, metavar, is_flag, callback, ...)."""
    cli = {"flag": flag, "help": help, "commands": commands, "param": param, "convert": convert, **click_kwargs}
    if factory is not None:
        return field(default_factory=factory, metadata={"cli": cli})
    return field(default=default, metadata={"cli": cli})


class _Scalar(click.ParamType):
    """A number when the text reads as one (``3``, ``2.5``), else the text: the value of a
    shorthand flag, which the perturbation's own option declaration then converts and checks."""

    name = "value"

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        return value


def _shorthand(key: str):
    return opt(None, type=_Scalar(), metavar="VALUE",
               help=f"Same as --perturbation-option {key}=VALUE (an option of bias-field; robnet-svc plugins "
                    "lists its type and default).")


@dataclass
class Options:
    """Every option of ``harden`` and ``certify`` (``certify`` ignores the training ones).
    The command line's defaults are these."""

    model: str = ""  # the MODEL argument
    dataset: str = opt("digits", help="Dataset plugin (robnet-svc plugins lists them).")
    data_dir: str | None = opt(None, help="Folder of the dataset (not needed for digits).")
    dataset_options: dict[str, object] = opt(
        None, "--dataset-option", factory=dict, param="dataset_option", convert=parse_pairs, multiple=True,
        metavar="KEY=VALUE", callback=_check_pairs,
        help="Option of the dataset plugin, repeatable (e.g. cache=false; robnet-svc plugins lists them).")
    image_shape: str | None = opt(None, metavar="CxHxW",
                                  help="How to view a flat [N,D] model input as an image, e.g. 1x28x28.")
    perturbation: str = opt("bias-field", help="Perturbation plugin.")
    perturbation_options: dict[str, object] = opt(
        None, "--perturbation-option", factory=dict, param="perturbation_option", convert=parse_pairs,
        multiple=True, metavar="KEY=VALUE", callback=_check_pairs,
        help="Option of the perturbation plugin, repeatable (e.g. order=2; robnet-svc plugins lists them).")
    eps: float = opt(0.1, type=float, help="Perturbation radius (a fraction: 0.2 is the paper's 20).")
    order: object = _shorthand("order")  # shorthands of perturbation_options[...] (None: not given)
    mode: object = _shorthand("mode")
    coef_scale: object = _shorthand("coef_scale")
    cert_method: str = opt("rsip-ssip", help="Bound method that certifies.")
    cert_batch_size: int = opt(128, type=click.IntRange(min=1),
                               help="Samples per certification batch (per process).")
    max_test: int | None = opt(None, type=click.IntRange(min=1),
                               help="Certify only this many test samples (evenly spaced).")
    attack_steps: int = opt(10, type=click.IntRange(min=0), help="Projected-gradient steps of the coefficient attack.")
    attack_restarts: int = opt(8, type=click.IntRange(min=0),
                               help="Random starts per sample of the attack (besides the clean point).")
    radius: bool = opt(False, is_flag=True,
                       help="Also find each sample's certified radius (largest certified eps, by bisection) and "
                            "the attack's smallest successful eps; costs about 2 + log2(max/precision) "
                            "certifications and attacks.")
    radius_max: float | None = opt(None, type=click.FloatRange(min=0, min_open=True),
                                   help="Largest eps the radius search tries (default: 2 x --eps).")
    radius_precision: float | None = opt(None, type=click.FloatRange(min=0, min_open=True),
                                         help="Precision of the radii, in eps (default: --radius-max / 50).")
    device: str = opt("auto", help="auto, cpu or cuda[:N].")
    threads: int | None = opt(None, type=click.IntRange(min=1),
                              help=f"Threads of every compute pool (torch, onnxruntime, image decoding); default: "
                                   f"half the cores, at most {MAX_DEFAULT_THREADS} (docs/cli.md, Threads).")
    seed: int = opt(0, type=int, help="Seed of every random choice.")
    preset: str | None = opt(None, type=click.Choice(sorted(PRESETS)), commands=HARDEN, is_eager=True,
                             callback=_apply_preset,
                             help="Start from a named set of training settings; paper: the paper's 175-epoch "
                                  "schedule (docs/cli.md, Presets). A config file and flags override it.")
    method: str = opt("rsip-ssip", commands=HARDEN, help="Bound method used in training.")
    compile: bool = opt(False, is_flag=True, commands=HARDEN,
                        help="Run training's SSIP step at each ReLU (ssip, rsip-ssip) with its fused kernels "
                             "compiled by torch.compile instead of the eager chunked ones: on a CPU 0.8-1.1x the "
                             "default's step time, after 10-30 s of compilation (cached on disk); needs a C++ "
                             "compiler on the CPU (docs/cli.md, Compiled kernels).")
    epochs: int = opt(10, type=click.IntRange(min=1), commands=HARDEN, help="Training epochs.")
    ramp_epochs: float | None = opt(None, type=click.FloatRange(min=0), commands=HARDEN,
                                    help="Epochs over which eps grows from 0 (default: 4/7 of --epochs, as in "
                                         "the paper).")
    ramp_shape: str = opt("linear", type=click.Choice(["linear", "smooth"]), commands=HARDEN,
                          help="How eps grows over the ramp: linear (the paper's) or smooth (a quadratic start "
                               "joined to a line: far smaller radii in the first steps; use it with rsip-ibp or "
                               "ibp; docs/method.md).")
    alpha: float = opt(1.0, type=click.FloatRange(min=0), commands=HARDEN, help="Weight of the robust loss.")
    lr: float = opt(5e-4, type=click.FloatRange(min=0, min_open=True), commands=HARDEN,
                    help="Initial learning rate (then /10 and /100).")
    batch_size: int = opt(64, type=click.IntRange(min=1), commands=HARDEN,
                          help="Training batch: the GLOBAL batch, shared by every process of a distributed run.")
    val_fraction: float = opt(0.1, type=click.FloatRange(0, 1, max_open=True), commands=HARDEN,
                              help="Share of the training split held out for validation.")
    max_train: int | None = opt(None, type=click.IntRange(min=1), commands=HARDEN,
                                help="Use only this many training samples.")
    out: str | None = opt(None, help={"harden": "Output folder (refused if it exists and is not empty).",
                                      "certify": "Folder for certificate.h5 and summary.json (default: print only)."})
    force: bool = opt(False, is_flag=True, help="Overwrite a non-empty --out.")
    resume: bool = opt(False, is_flag=True, commands=HARDEN, help="Continue the run whose checkpoint is in --out.")
    report_page: bool = opt(True, "--report-page/--no-report-page", commands=HARDEN,
                            help="Write the figures and report.html (robnet-svc report plot) into --out/report.")
    checkpoint_every: float = opt(60.0, type=click.FloatRange(min=0), commands=HARDEN, metavar="SECONDS",
                                  help="Also write the checkpoint within an epoch at this interval.")
    max_clean_drop: float | None = opt(0.02, commands=HARDEN, type=str, metavar="FRACTION|none",
                                       callback=_fraction_or_none,
                                       help="Validation clean accuracy may fall at most this much below the input "
                                            "model's; the exported model is the best epoch within it (none: no "
                                            "budget).")
    max_class_drop: float | None = opt(0.1, commands=HARDEN, type=str, metavar="FRACTION|none",
                                       callback=_fraction_or_none,
                                       help="Warn when a class's validation accuracy falls more than this (none: "
                                            "never).")
    strict: bool = opt(False, is_flag=True, commands=HARDEN,
                       help=f"Exit {BUDGET_MISSED} when no epoch reached --eps within --max-clean-drop "
                            "(the outputs are still written).")

    @classmethod
    def from_params(cls, params: dict[str, Any], **given: Any) -> "Options":
        """``Options`` from a command's resolved click parameters (the command line's or a service
        job's); ``given``: fields set by the caller instead (the service's paths)."""
        values = {"model": params.get("model", "")}
        for f in fields(cls):
            cli = f.metadata.get("cli")
            if cli is None or f.name in given:
                continue
            name = cli["param"] or f.name
            if name in params:
                values[f.name] = cli["convert"](params[name]) if cli["convert"] else params[name]
        return cls(**{**values, **given})

    def perturbation_settings(self) -> dict[str, object]:
        """The options given to the perturbation: ``perturbation_options`` with the shorthands
        ``order``, ``mode``, ``coef_scale`` (``--order`` ...) added; a shorthand and an entry of
        ``perturbation_options`` that disagree are a RobnetError (which one was meant is a guess)."""
        given = dict(self.perturbation_options)
        for key in SHORTHANDS:
            value = getattr(self, key)
            if value is None:
                continue
            if key in given and not _same(given[key], value):
                flag = "--" + key.replace("_", "-")
                raise RobnetError(f"{flag} {value} and --perturbation-option {key}={given[key]} set the same "
                                  "option to different values; give one of them")
            given[key] = value
        return given


def default(name: str) -> Any:
    """The declared default of option ``name``: what the settings classes of the subsystems
    (``training.TrainSettings``, ``certify.AttackSettings``) take as theirs, never a copy."""
    f = Options.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _same(a: Any, b: Any) -> bool:
    """Whether two given values of an option are the same (``3`` and ``"3.0"`` are)."""
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a).strip() == str(b).strip()


def click_option(name: str, command: str = "harden", **overrides: Any):
    """The ``click.option`` decorator of field ``name`` as ``command`` has it; ``overrides``
    replace its click arguments (another command's default, for one)."""
    f = Options.__dataclass_fields__[name]
    cli = dict(f.metadata["cli"])
    help_text = cli.pop("help")
    help_text = help_text[command] if isinstance(help_text, dict) else help_text
    flag = cli.pop("flag") or "--" + name.replace("_", "-")
    param = cli.pop("param") or name
    for key in ("commands", "convert"):
        cli.pop(key)
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    kwargs = {"default": None if cli.get("multiple") else default, "help": help_text,
              "show_default": default is not None and not cli.get("is_flag") and not cli.get("multiple"), **cli,
              **overrides}
    return click.option(flag, param, **kwargs)


def command_options(command: str) -> list:
    """The ``click.option`` decorators of every field ``command`` has, in declaration order."""
    return [click_option(f.name, command) for f in fields(Options)
            if "cli" in f.metadata and command in f.metadata["cli"]["commands"]]
