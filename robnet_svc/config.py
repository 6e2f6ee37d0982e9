"""Run configuration: ``--config run.toml`` for every command-line option, and the
effective config stored with the results.

A config file is plain TOML whose keys are option names (``eps = 0.2``, ``cert-method =
"rsip-ibp"``; dashes and underscores are the same). Keys may sit at the top level or in a
table named after the command (``[harden]``, ``[certify]``); the command's table wins over
the top level. Command-line flags win over both: the file only fills click's
``default_map``, so click's own precedence (flag > config > built-in default) applies.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import click

from robnet_svc.errors import RobnetError

#: Options that steer how a command runs but not what it computes; left out of the
#: effective config so that the certificate records the science, not the plumbing.
NOT_RECORDED = frozenset({"config", "as_json", "force", "resume", "debug"})

#: Commands that take ``--config``: the only table names a config file may have.
COMMAND_TABLES = frozenset({"harden", "certify", "demo"})


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
    sections = {key: val for key, val in doc.items() if isinstance(val, dict)}
    stray = sorted(set(sections) - COMMAND_TABLES)
    if stray:
        raise RobnetError(f"config file {path}: unknown table [{stray[0]}]; tables are named after a command "
                          f"({', '.join(sorted(COMMAND_TABLES))}); other keys go at the top level")
    for key, val in doc.items():
        if not isinstance(val, dict):
            values[_param_name(key)] = val
    for key, val in sections.get(command, {}).items():
        values[_param_name(key)] = val

    unknown = sorted(set(values) - known)
    if unknown:
        names = ", ".join(sorted(k.replace("_", "-") for k in known - NOT_RECORDED))
        raise RobnetError(f"config file {path}: unknown option {unknown[0].replace('_', '-')!r} "
                          f"for `{command}`; known: {names}")
    return values


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
