"""Run configuration: ``--config run.toml`` for every command-line option, and the
effective config stored with the results.

A config file is plain TOML whose keys are option names (``eps = 0.2``, ``cert-method =
"rsip-ibp"``; dashes and underscores are the same). Keys may sit at the top level or in a
table named after the command (``[harden]``, ``[certify]``); the command's table wins over
the top level. Command-line flags win over both: the file only fills click's
``default_map``, so click's own precedence (flag > config > built-in default) applies.

Plugin options go in a table of their own, ``[perturbation_options]`` or ``[dataset_options]``
(also inside a command's table: ``[harden.perturbation_options]``), with typed values
(``order = 2``, ``cache = false``); they are read as ``--perturbation-option order=2`` ... given
before any on the command line, so a flag overrides its own key and keeps the others.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import click

from robnet_svc.errors import RobnetError
from robnet_svc.plugin_options import pair

#: Options that steer how a command runs but not what it computes; left out of the
#: effective config so that the certificate records the science, not the plumbing.
NOT_RECORDED = frozenset({"config", "as_json", "force", "resume", "debug"})

#: Commands that take ``--config``: tables named after them hold that command's options.
COMMAND_TABLES = frozenset({"harden", "certify", "demo"})

#: Tables of plugin options -> the repeatable ``KEY=VALUE`` option they feed.
OPTION_TABLES = {"perturbation_options": "perturbation_option", "dataset_options": "dataset_option"}


def read_config(path: str | Path, command: str, known: set[str]) -> dict[str, Any]:
    """The option values in TOML file ``path`` for ``command``, keyed by click parameter name.

    ``known``: the command's parameter names (underscore form). Unknown keys, a missing file
    or bad TOML raise RobnetError naming the file and key.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            doc = tomllib.load(handle)
    except FileNotFoundError:
        raise RobnetError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise RobnetError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RobnetError(f"config file {path} is not valid TOML: {exc}") from None

    values: dict[str, Any] = {}
    tables = {_param_name(key): val for key, val in doc.items() if isinstance(val, dict)}
    stray = sorted(set(tables) - COMMAND_TABLES - set(OPTION_TABLES))
    if stray:
        raise RobnetError(f"config file {path}: unknown table [{stray[0]}]; tables are named after a command "
                          f"({', '.join(sorted(COMMAND_TABLES))}) or hold plugin options "
                          f"({', '.join(sorted(OPTION_TABLES))}); other keys go at the top level")
    _read_level(path, {k: v for k, v in doc.items() if _param_name(k) not in COMMAND_TABLES}, values)
    _read_level(path, tables.get(command, {}), values)
    unknown = sorted(set(values) - known)
    if unknown:
        names = ", ".join(sorted(k.replace("_", "-") for k in known - NOT_RECORDED))
        raise RobnetError(f"config file {path}: unknown option {unknown[0].replace('_', '-')!r} "
                          f"for `{command}`; known: {names}")
    return values


def _read_level(path: Path, level: dict[str, Any], values: dict[str, Any]) -> None:
    """Add the keys of one level of the file (the top level or a command's table) to ``values``;
    its plugin-option tables become ``KEY=VALUE`` entries after the level's own list, if any."""
    pairs: dict[str, list[str]] = {}
    for key, val in level.items():
        name = _param_name(key)
        if name in OPTION_TABLES and isinstance(val, dict):
            for opt, opt_val in val.items():
                if isinstance(opt_val, (dict, list)):
                    raise RobnetError(f"config file {path}: [{name}] {opt} must be a single value, not "
                                      f"{type(opt_val).__name__} {opt_val!r}")
                pairs.setdefault(OPTION_TABLES[name], []).append(pair(str(opt).strip(), opt_val))
        elif isinstance(val, dict):
            raise RobnetError(f"config file {path}: unknown table [{name}] in a command's table; only "
                              f"{', '.join(sorted(OPTION_TABLES))} may be nested there")
        else:
            values[name] = val
    for name, entries in pairs.items():
        given = values.get(name, [])
        values[name] = [*([given] if isinstance(given, str) else given), *entries]


def _param_name(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_")


def config_option(func):
    """Decorator adding ``--config FILE`` to a click command; it fills ``ctx.default_map``.

    The option is eager, so the file is read before any other option is resolved, and
    command-line flags still override it (click looks ``default_map`` up only for options
    not given on the command line).
    """

    def load(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
        if value:
            known = {p.name for p in ctx.command.params if p.name}
            values = read_config(value, ctx.info_name or "", known)
            for param in ctx.command.params:
                # click would fail with "Value must be an iterable" on a bare string.
                if param.multiple and param.name in values and not isinstance(values[param.name], list):
                    key = param.name.replace("_", "-")
                    raise RobnetError(f"config file {value}: {key} is repeatable and takes a list, "
                                      f"e.g. {key} = [{json.dumps(str(values[param.name]))}]")
            ctx.default_map = {**(ctx.default_map or {}), **values}
        return value

    return click.option("--config", type=click.Path(dir_okay=False), is_eager=True, callback=load,
                        help="TOML file with option values (command-line flags win).")(func)


def effective_config(ctx: click.Context) -> dict[str, Any]:
    """Every resolved option of the running command (built-in default, config file or flag),
    JSON-ready, without the plumbing options in ``NOT_RECORDED``."""
    return {name: value for name, value in sorted(ctx.params.items()) if name not in NOT_RECORDED}
