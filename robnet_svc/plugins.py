"""Plugin host: a manager *factory* (no import-time global), loading and the registry.

``load_registry()`` builds a fresh ``pluggy.PluginManager``, registers the built-in plugin
modules (``DEFAULT_PLUGINS``) and then the entry points of group ``robnet_svc``, and calls
every registration hook once per plugin so each registered thing is recorded with the
distribution (and version) it comes from.

Environment:
  ``ROBNET_SVC_PLUGINS``  unset: load every installed plugin; a comma-separated list of
                          entry-point or distribution names: only those; empty: built-ins only.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from robnet_svc import __version__, hookspecs
from robnet_svc.errors import RobnetError

GROUP = "robnet_svc"
ENV_ALLOW = "ROBNET_SVC_PLUGINS"
BUILTIN_DIST = "robnet-svc"

DEFAULT_PLUGINS = (
    "robnet_svc.perturbations.builtin",
    "robnet_svc.bounds.builtin",
    "robnet_svc.datasets.builtin",
)

# hook name -> registry kind
KINDS = {
    "robnet_register_bound_methods": "bound_methods",
    "robnet_register_perturbations": "perturbations",
    "robnet_register_datasets": "datasets",
    "robnet_register_op_rules": "op_rules",
}


@dataclass(frozen=True)
class Entry:
    """One registered thing and where it comes from."""

    name: str
    obj: Any
    dist: str
    version: str
    plugin: str  # module or entry-point name


@dataclass
class Registry:
    """Everything the loaded plugins registered, by kind and name."""

    bound_methods: dict[str, Entry] = field(default_factory=dict)
    perturbations: dict[str, Entry] = field(default_factory=dict)
    datasets: dict[str, Entry] = field(default_factory=dict)
    op_rules: dict[Any, Entry] = field(default_factory=dict)
    broken: list[str] = field(default_factory=list)  # one line per plugin that failed to load

    def get(self, kind: str, name: str) -> Any:
        """The registered object, or a RobnetError listing the known names."""
        table: dict = getattr(self, kind)
        if name in table:
            return table[name].obj
        label = kind.replace("_", " ").rstrip("s")
        known = ", ".join(sorted(table)) or "none"
        hint = f" ({len(self.broken)} plugin(s) failed to load: {'; '.join(self.broken)})" if self.broken else ""
        raise RobnetError(f"unknown {label} {name!r}; known: {known}{hint}")

    def bound_method(self, name: str):
        return self.get("bound_methods", name)

    def perturbation(self, name: str):
        return self.get("perturbations", name)

    def dataset(self, name: str):
        return self.get("datasets", name)

    def rules(self) -> dict[Any, type]:
        """Op-rule table for the bound engine: target -> rule class."""
        return {target: entry.obj for target, entry in self.op_rules.items()}

    def listing(self) -> dict[str, list[dict]]:
        """JSON-ready listing for ``robnet-svc plugins``."""
        out: dict[str, list[dict]] = {}
        for kind in ("bound_methods", "perturbations", "datasets"):
            out[kind] = [
                {
                    "name": e.name,
                    "description": _first_line(getattr(e.obj, "description", None) or e.obj.__doc__),
                    "distribution": e.dist,
                    "version": e.version,
                    "plugin": e.plugin,
                }
                for e in sorted(getattr(self, kind).values(), key=lambda e: e.name)
            ]
        out["op_rules"] = [
            {"target": _target_name(t), "rule": e.obj.__name__, "distribution": e.dist, "version": e.version}
            for t, e in sorted(self.op_rules.items(), key=lambda kv: _target_name(kv[0]))
        ]
        out["broken"] = list(self.broken)
        return out


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def _target_name(target: Any) -> str:
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)


def make_manager() -> tuple[pluggy.PluginManager, dict[str, tuple[str, str]], list[str]]:
    """A fresh plugin manager with the built-ins and the allowed entry points registered.

    Returns the manager, a map plugin-name -> (distribution, version) and a list of one-line
    errors for plugins that failed to import (those are skipped, the rest still load).
    """
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    origin: dict[str, tuple[str, str]] = {}
    broken: list[str] = []
    for modname in DEFAULT_PLUGINS:
        module = importlib.import_module(modname)
        pm.register(module, name=modname)
        origin[modname] = (BUILTIN_DIST, __version__)

    allow = os.environ.get(ENV_ALLOW)
    allowed = None if allow is None else {s.strip() for s in allow.split(",") if s.strip()}
    for ep in metadata.entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        version = ep.dist.version if ep.dist is not None else "?"
        if allowed is not None and ep.name not in allowed and dist not in allowed:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must not take the tool down
            broken.append(f"plugin {ep.name!r} from {dist} {version} failed to load: {type(exc).__name__}: {exc}")
            continue
        pm.register(plugin, name=ep.name)
        origin[ep.name] = (dist, version)
    pm.check_pending()
    return pm, origin, broken


def load_registry() -> Registry:
    """Load all plugins and collect what they register (fresh each call; cheap)."""
    pm, origin, broken = make_manager()
    registry = Registry(broken=broken)
    for hook_name, kind in KINDS.items():
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            plugin_name = pm.get_name(impl.plugin)
            dist, version = origin.get(plugin_name, ("unknown", "?"))
            register = _registrar(registry, kind, plugin_name, dist, version)
            try:
                impl.function(register=register)
            except RobnetError:
                raise
            except Exception as exc:
                raise RobnetError(
                    f"plugin {plugin_name!r} from {dist} {version} failed in {hook_name}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
    return registry


def _registrar(registry: Registry, kind: str, plugin: str, dist: str, version: str) -> Callable:
    table: dict = getattr(registry, kind)

    def where(e: Entry) -> str:
        return f"{e.dist} {e.version} (plugin {e.plugin!r})"

    if kind == "op_rules":

        def register_rule(target, rule_cls):
            from robnet_svc.bounds.ops.base import OpRule

            if not (inspect.isclass(rule_cls) and issubclass(rule_cls, OpRule)):
                raise RobnetError(
                    f"plugin {plugin!r} from {dist} registered {rule_cls!r} for {_target_name(target)}, "
                    "which is not an OpRule subclass"
                )
            entry = Entry(_target_name(target), rule_cls, dist, version, plugin)
            if target in table and table[target].dist != dist:
                raise RobnetError(
                    f"op rule for {_target_name(target)} registered twice: by {where(table[target])} "
                    f"and by {where(entry)}"
                )
            table[target] = entry

        return register_rule

    base = _base_class(kind)

    def register(cls):
        name = getattr(cls, "name", None)
        if not (inspect.isclass(cls) and issubclass(cls, base)) or not isinstance(name, str) or not name:
            raise RobnetError(
                f"plugin {plugin!r} from {dist} {version} registered {cls!r} as a {kind[:-1].replace('_', ' ')}; "
                f"expected a {base.__module__}.{base.__name__} subclass with a non-empty `name`"
            )
        entry = Entry(name, cls, dist, version, plugin)
        if name in table:
            raise RobnetError(
                f"{kind[:-1].replace('_', ' ')} {name!r} is registered twice: by {where(table[name])} "
                f"and by {where(entry)}; uninstall one of them or limit plugins with {ENV_ALLOW}"
            )
        table[name] = entry

    return register


def _base_class(kind: str) -> type:
    if kind == "bound_methods":
        from robnet_svc.bounds.methods import BoundMethod

        return BoundMethod
    if kind == "perturbations":
        from robnet_svc.perturbations.base import Perturbation

        return Perturbation
    from robnet_svc.datasets.base import Dataset

    return Dataset
