"""Options of plugins (perturbations and datasets), declared one way.

A plugin class declares ``options = {"name": Option(type, default, help, choices=None)}``.
Values reach it from ``--perturbation-option KEY=VALUE`` / ``--dataset-option KEY=VALUE``
(strings), from a config file's ``[perturbation_options]`` / ``[dataset_options]`` table
(TOML values) or from Python (any value); ``resolve`` checks the names, converts each value
with its declaration and fills in the defaults, so every source gives the same typed values
and the same one-line errors.

Torch-free: the command line imports it to parse ``KEY=VALUE`` pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from robnet_svc.errors import RobnetError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Option:
    """One option of a plugin: shown by ``robnet-svc plugins``, settable from the command line
    and the config file.

    ``type``: converts a given value (``int``, ``float``, ``str``, ``bool`` or any callable; a
    string from the command line is converted too); ``default``: used when the option is not
    given (``None`` is allowed and is passed as is: e.g. "derive it from the other options");
    ``help``: one line; ``choices``: the allowed values after conversion, or None.
    """

    type: Callable[[Any], Any]
    default: Any
    help: str
    choices: tuple | None = None

    def convert(self, value: Any) -> Any:
        """``value`` as this option's type; ValueError when it is not one."""
        if value is None:
            return None
        kind = self.type
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in _TRUE | _FALSE:
                raise ValueError(value)
            return text in _TRUE
        if kind is int and (isinstance(value, bool) or isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        if kind in (int, float) and isinstance(value, str):
            value = value.strip()
        return kind(value)

    @property
    def type_name(self) -> str:
        return getattr(self.type, "__name__", type(self.type).__name__).lstrip("_")


def resolve(kind: str, name: str, declared: dict[str, Option], given: dict[str, Any]) -> dict[str, Any]:
    """Every declared option's value: the given one converted, else the default.

    ``kind``/``name`` name the plugin in errors (``perturbation 'bias-field'``). A name not
    declared, a value the type cannot read or one outside ``choices`` is a RobnetError (one line).
    """
    unknown = sorted(set(given) - set(declared))
    if unknown:
        known = ", ".join(sorted(declared)) or "none"
        raise RobnetError(f"{kind} {name!r} has no option {unknown[0]!r}; known: {known}")
    values = {}
    for key, opt in declared.items():
        value = given.get(key)
        if value is None:
            value = opt.default
        else:
            try:
                value = opt.convert(value)
            except (TypeError, ValueError):
                raise RobnetError(f"option {key}={value!r} of {kind} {name!r} is not a valid {opt.type_name} "
                                  f"(default {opt.default!r})") from None
        if opt.choices is not None and value not in opt.choices:
            raise RobnetError(f"option {key!r} of {kind} {name!r} must be one of "
                              f"{', '.join(map(str, opt.choices))}, got {value!r}")
        values[key] = value
    return values


def check_declaration(options: Any, reserved: set[str]) -> str | None:
    """Why ``options`` is not a valid declaration (a phrase), or None.

    ``reserved``: attribute names of the plugin's base class, which an option would shadow."""
    if not isinstance(options, dict) or not all(
            isinstance(k, str) and k.isidentifier() and isinstance(v, Option) for k, v in options.items()):
        return "its `options` must map identifier names to robnet_svc.plugin_options.Option values"
    clash = sorted(set(options) & reserved)
    if clash:
        return f"its option {clash[0]!r} would shadow the attribute of that name of the base class; rename it"
    return None


def listing(options: dict[str, Option]) -> dict[str, dict]:
    """JSON-ready rows of ``robnet-svc plugins``: name -> type, default, help, choices."""
    return {key: {"type": opt.type_name, "default": json_value(opt.default), "help": opt.help,
                  "choices": [json_value(c) for c in opt.choices] if opt.choices is not None else None}
            for key, opt in options.items()}


def json_value(value: Any) -> Any:
    """``value`` when JSON can hold it, else its repr (a default may be anything)."""
    return value if value is None or isinstance(value, (str, int, float, bool)) else repr(value)


def parse_pairs(values) -> dict[str, str]:
    """``("k=v", ...)`` -> ``{"k": "v"}`` (a later key wins); the plugin's options convert the strings."""
    pairs = (str(value).split("=", 1) for value in values)
    return {key.strip(): val.strip() for key, val in pairs}


def pair(key: str, value: Any) -> str:
    """``KEY=VALUE`` for a typed value (a config file's table): booleans as ``true``/``false``."""
    return f"{key}={str(value).lower() if isinstance(value, bool) else value}"
