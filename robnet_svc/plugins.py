"""Plugin host: a manager *factory* (no import-time global), loading and the registry.

``load_registry()`` builds a fresh ``pluggy.PluginManager`` (``make_manager``): the built-in
plugin modules (``DEFAULT_PLUGINS``) first, then the entry points of group ``robnet_svc``.
It then calls every registration hook of each plugin, one plugin at a time, with a
``register`` callback that validates what the plugin hands over and records the
distribution (and version) it comes from.

What plugins can register comes in *kinds* (bound methods, perturbations, datasets, op
rules). Each kind is one ``PluginKind`` declaration next to its subsystem (its hook, base
class, registry key, validation and listing row; ``KIND_DECLARATIONS`` says where): loading,
checking, the clash check and the listing know no kind by name, so a new kind is a hook
specification and one declaration (``Registry`` adds look-ups by kind for the pipeline).

Failure policy (each message is one line naming the plugin and its distribution):

- a plugin that fails to import, cannot be registered with pluggy (a hook with wrong
  argument names, a misspelled hook name), raises in a hook, returns a value from a hook,
  or registers something invalid (not a proper subclass, abstract, bad ``name``) is
  *broken*: everything it registered is dropped, the line goes to ``Registry.broken``
  and the rest of the plugins still load;
- two plugins registering the same name (or an op rule for the same target) is a
  ``RobnetError`` naming both distributions: which one wins would be a guess.

Environment:
  ``ROBNET_SVC_PLUGINS``        unset: load every installed plugin; a comma-separated list
                                of entry-point or distribution names: only those; empty:
                                built-ins only.
  ``ROBNET_SVC_TRACE_PLUGINS``  set (and not ``0``): print one line per loaded plugin, hook
                                call and registration on stderr.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import inspect
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from robnet_svc import __version__, hookspecs, plugin_options
from robnet_svc.errors import RobnetError

GROUP = "robnet_svc"
ENV_ALLOW = "ROBNET_SVC_PLUGINS"
ENV_TRACE = "ROBNET_SVC_TRACE_PLUGINS"
BUILTIN_DIST = "robnet-svc"

DEFAULT_PLUGINS = (
    "robnet_svc.perturbations.builtin",
    "robnet_svc.bounds.builtin",
    "robnet_svc.datasets.builtin",
)

#: Where each kind's ``PluginKind`` is declared (``module:NAME``), in registration order.
KIND_DECLARATIONS = (
    "robnet_svc.plugins:BOUND_METHODS",
    "robnet_svc.perturbations.base:PLUGIN_KIND",
    "robnet_svc.datasets.base:PLUGIN_KIND",
    "robnet_svc.plugins:OP_RULES",
)

# What a ``name`` may look like: it is typed on the command line and stored in reports.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Entry:
    """One registered thing and where it comes from."""

    name: str
    obj: Any
    dist: str
    version: str
    plugin: str  # module or entry-point name


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin: its pluggy name, distribution, version and implemented hooks."""

    name: str
    dist: str
    version: str
    hooks: tuple[str, ...]


@dataclass
class Registry:
    """Everything the loaded plugins registered, by kind and name: ``registry.perturbations``
    (or ``registry.tables["perturbations"]``) maps each name to its ``Entry``."""

    tables: dict[str, dict[Any, Entry]] = field(default_factory=lambda: {k.key: {} for k in kinds()})
    broken: list[str] = field(default_factory=list)  # one line per plugin that failed to load
    plugins: list[PluginInfo] = field(default_factory=list)  # loaded (not broken), in load order

    def __getattr__(self, name: str) -> dict[Any, Entry]:
        tables = self.__dict__.get("tables", {})
        if name in tables:
            return tables[name]
        raise AttributeError(name)

    def get(self, key: str, name: str) -> Any:
        """The registered object of kind ``key``, or a RobnetError listing the known names."""
        table = self.tables[key]
        if name in table:
            return table[name].obj
        known = ", ".join(sorted(table)) or "none"
        hint = f" ({len(self.broken)} plugin(s) failed to load: {'; '.join(self.broken)})" if self.broken else ""
        raise RobnetError(f"unknown {kind(key).label} {name!r}; known: {known}{hint}")

    def bound_method(self, name: str):
        return self.get("bound_methods", name)

    def perturbation(self, name: str):
        return self.get("perturbations", name)

    def dataset(self, name: str):
        return self.get("datasets", name)

    def rules(self) -> dict[Any, type]:
        """Op-rule table for the bound engine: target -> rule class.

        Targets registered as an import path (``"package.module:Class"``) are imported now, not
        when the plugins load (``robnet-svc plugins`` need not import onnx2torch); a path whose
        module is not installed is left out (no model can contain its classes)."""
        table: dict[Any, type] = {}
        owner: dict[Any, Entry] = {}
        for target, entry in self.tables[OP_RULES.key].items():
            if isinstance(target, str) and ":" in target:
                try:
                    target = import_target(target)
                except ModuleNotFoundError:
                    continue
                except (ImportError, AttributeError) as exc:
                    raise RobnetError(f"op rule {entry.obj.__name__} of plugin {entry.plugin!r} from {entry.dist} "
                                      f"names {entry.name}, which cannot be imported: {_exc_line(exc)}") from None
            if target in owner:
                raise RobnetError(f"two plugins register an op rule for {entry.name}: {owner[target].plugin!r} from "
                                  f"{owner[target].dist} and {entry.plugin!r} from {entry.dist}; uninstall one")
            table[target], owner[target] = entry.obj, entry
        return table

    def listing(self) -> dict[str, list[dict]]:
        """JSON-ready listing for ``robnet-svc plugins``.

        Keys: ``bound_methods``, ``perturbations``, ``datasets`` (rows of name, description,
        distribution, version, plugin; perturbations and datasets add ``options``: name -> type,
        default, help, choices), ``op_rules`` (target,
        rule, distribution, version, plugin), ``plugins`` (name, distribution, version,
        hooks) and ``broken`` (one line per plugin that failed to load).
        """
        out: dict[str, list] = {
            k.key: [k.row(e) for e in sorted(self.tables[k.key].values(), key=lambda e: e.name)] for k in kinds()}
        out["plugins"] = [
            {"name": p.name, "distribution": p.dist, "version": p.version, "hooks": list(p.hooks)}
            for p in self.plugins
        ]
        out["broken"] = list(self.broken)
        return out


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


#: An op-rule target named by import path: ``package.module:Class`` (imported by ``Registry.rules``).
IMPORT_PATH_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def import_target(path: str) -> Any:
    """The object an import path ``package.module:Qual.Name`` names."""
    module_name, qualname = path.split(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _target_name(target: Any) -> str:
    """``torch.nn.modules.linear.Linear``, ``_operator.add`` or ``torch.Tensor.view`` (a method)."""
    if isinstance(target, str) and IMPORT_PATH_RE.match(target):
        return target.replace(":", ".")
    if isinstance(target, str):
        return f"Tensor.{target}"
    method = getattr(target, "__name__", None)
    if method and getattr(sys.modules.get("torch"), "Tensor", None) is not None \
            and getattr(sys.modules["torch"].Tensor, method, None) is target:
        return f"torch.Tensor.{method}"
    module = getattr(target, "__module__", None)
    if method and module and getattr(sys.modules.get(module), method, None) is target:
        return f"{module.lstrip('_')}.{method}"  # torch.add, not torch._VariableFunctionsClass.add
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if name is None:
        return repr(target)
    return f"{module}.{name}" if module else name


def _normalise(name: str) -> str:
    """PEP 503 normalisation, so ``robnet_svc_vignette`` matches ``robnet-svc-vignette``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _tracer() -> Callable[[str], None] | None:
    flag = os.environ.get(ENV_TRACE, "")
    if flag in ("", "0"):
        return None
    return lambda line: print(f"robnet-svc: trace: {line}", file=sys.stderr, flush=True)


def _allowed_names() -> set[str] | None:
    """Normalised names from ``ROBNET_SVC_PLUGINS`` (None: unset, load everything)."""
    allow = os.environ.get(ENV_ALLOW)
    if allow is None:
        return None
    return {_normalise(s.strip()) for s in allow.split(",") if s.strip()}


def make_manager() -> tuple[pluggy.PluginManager, dict[str, tuple[str, str]], list[str]]:
    """A fresh plugin manager with the built-ins and the allowed entry points registered.

    Returns the manager, a map plugin-name -> (distribution, version) and a list of one-line
    errors for plugins that failed to load (those are not registered; the rest are).
    A built-in that fails to import is a bug in robnet-svc and raises.
    """
    trace = _tracer()
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    origin: dict[str, tuple[str, str]] = {}
    broken: list[str] = []
    for modname in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(modname), name=modname)
        origin[modname] = (BUILTIN_DIST, __version__)
        if trace:
            trace(f"loaded built-in plugin {modname!r} ({BUILTIN_DIST} {__version__})")

    allowed = _allowed_names()
    seen: set[str] = set()
    entry_points = sorted(metadata.entry_points(group=GROUP), key=lambda ep: (_dist_of(ep), ep.name))
    for ep in entry_points:
        dist, version = _dist_of(ep), _version_of(ep)
        if allowed is not None and _normalise(ep.name) not in allowed and _normalise(dist) not in allowed:
            if trace:
                trace(f"skipped plugin {ep.name!r} from {dist} {version} (not in {ENV_ALLOW})")
            continue
        seen.update({_normalise(ep.name), _normalise(dist)})
        # Two distributions may pick the same entry-point name: both load, the second one
        # under a name that says where it comes from.
        name = ep.name if pm.get_plugin(ep.name) is None else f"{ep.name}@{dist}"
        problem = _register_entry_point(pm, ep, name)
        if problem:
            broken.append(f"plugin {ep.name!r} from {dist} {version} {problem}")
            if trace:
                trace(broken[-1])
            continue
        origin[name] = (dist, version)
        if trace:
            hooks = ", ".join(sorted(h.name for h in pm.get_hookcallers(pm.get_plugin(name)) or []))
            trace(f"loaded plugin {name!r} from {dist} {version} ({ep.value}); hooks: {hooks or 'none'}")

    if allowed:
        installed = sorted({ep.name for ep in entry_points} | {_dist_of(ep) for ep in entry_points})
        for missing in sorted(allowed - seen):
            broken.append(f"{ENV_ALLOW} names {missing!r}, which matches no installed plugin entry point or "
                          f"distribution (installed: {', '.join(installed) or 'none'})")
    pm.check_pending()  # every remaining implementation matches a spec (broken ones were removed)
    return pm, origin, broken


def _dist_of(ep: metadata.EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "unknown distribution"


def _version_of(ep: metadata.EntryPoint) -> str:
    return ep.dist.version if ep.dist is not None else "?"


def _register_entry_point(pm: pluggy.PluginManager, ep: metadata.EntryPoint, name: str) -> str | None:
    """Import and register one entry point; the problem as a phrase, or None when it loaded."""
    try:
        plugin = ep.load()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - even a plugin calling sys.exit() must not take the tool down
        return f"failed to import ({ep.value}): {_exc_line(exc)}"
    try:
        pm.register(plugin, name=name)
    except (pluggy.PluginValidationError, ValueError) as exc:
        return f"cannot be registered ({ep.value}): {_exc_line(exc)}"
    hookcallers = pm.get_hookcallers(plugin) or []
    unknown = sorted(h.name for h in hookcallers if h.spec is None)
    if unknown:
        pm.unregister(plugin)
        known = ", ".join(k.hook for k in kinds())
        return f"implements unknown hook(s) {', '.join(unknown)} (known: {known})"
    if not hookcallers:
        pm.unregister(plugin)
        return (f"({ep.value}) implements no robnet_svc hook; decorate its functions with "
                "robnet_svc.hookspecs.hookimpl")
    return None


def _exc_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_registry() -> Registry:
    """Load all plugins and collect what they register (fresh each call; cheap).

    Each plugin's hooks run with a staging ``register``; only a plugin whose every hook
    succeeded is committed, so a broken plugin leaves nothing half-registered.
    """
    pm, origin, broken = make_manager()
    trace = _tracer()
    registry = Registry(broken=broken)
    for plugin_name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked
            continue
        dist, version = origin.get(plugin_name, ("unknown distribution", "?"))
        staged: list[tuple[PluginKind, Any, Entry]] = []  # (kind, key, entry)
        hooks: list[str] = []
        try:
            for k in kinds():
                impls = [i for i in getattr(pm.hook, k.hook).get_hookimpls() if i.plugin is plugin]
                for impl in impls:
                    hooks.append(k.hook)
                    _call_hook(impl, k.hook, k.registrar(staged, plugin_name, dist, version, trace))
        except _Broken as exc:
            if plugin_name in DEFAULT_PLUGINS:  # a bug in robnet-svc itself: do not hide it
                raise RuntimeError(f"built-in plugin {plugin_name!r}: {exc}") from exc.__cause__
            line = f"plugin {plugin_name!r} from {dist} {version} {exc}"
            registry.broken.append(line)
            if trace:
                trace(line)
            continue
        for k, key, entry in staged:
            _commit(registry.tables[k.key], k, key, entry)
        registry.plugins.append(PluginInfo(plugin_name, dist, version, tuple(hooks)))
    return registry


class _Broken(Exception):
    """A plugin broke its contract; the message is a phrase completing 'plugin X from D V ...'."""


def _call_hook(impl: pluggy.HookImpl, hook_name: str, register: Callable) -> None:
    """Call one hook implementation like pluggy does (only the arguments it asks for)."""
    if impl.hookwrapper or impl.wrapper:
        raise _Broken(f"declares {hook_name} as a wrapper; registration hooks must be plain hookimpls")
    kwargs = {"register": register}
    try:
        result = impl.function(*[kwargs[a] for a in impl.argnames])
    except _Broken:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure in plugin code names the plugin
        raise _Broken(f"failed in {hook_name}: {_exc_line(exc)}") from exc
    if result is not None:
        raise _Broken(f"returned {_short_repr(result)} from {hook_name}; call register(...) for each "
                      "thing instead of returning it")


def _short_repr(obj: Any, limit: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class PluginKind:
    """One kind of thing plugins register, described once (declared next to its subsystem).

    ``key``: the registry table and the ``robnet-svc plugins --json`` key (``perturbations``);
    ``hook``: the hook specification (``robnet_svc.hookspecs``) whose ``register(cls)`` adds one;
    ``label``: the singular in messages (``perturbation``); ``base``: the base class every
    registered class must concretely subclass (or its import path, imported when checked);
    ``options``: whether the classes declare ``options`` (``robnet_svc.plugin_options``), listed
    with each row and checked not to shadow the base class's attributes or ``reserved`` (instance
    attributes the base constructor sets); ``table``: shown as a table by ``robnet-svc plugins``.
    """

    key: str
    hook: str
    label: str
    base: type | str
    options: bool = False
    reserved: frozenset[str] = frozenset()
    table: bool = True

    def base_class(self) -> type:
        return import_target(self.base) if isinstance(self.base, str) else self.base

    def registrar(self, staged: list, plugin: str, dist: str, version: str,
                  trace: Callable[[str], None] | None) -> Callable:
        """The ``register`` callback handed to this kind's hook of one plugin: validates and stages."""

        def register(cls):
            self.check(cls)
            staged.append((self, cls.name, Entry(cls.name, cls, dist, version, plugin)))
            if trace:
                trace(f"{self.hook} in {plugin!r}: {self.label} {cls.name!r} ({cls.__module__}.{cls.__qualname__})")

        return register

    def check(self, cls: Any) -> None:
        """Raise ``_Broken`` unless ``cls`` is a concrete subclass of the base with a valid name (and options)."""
        base = self.base_class()
        expected = f"a concrete {base.__module__}.{base.__name__} subclass"
        what = f"registered {_short_repr(cls)} in {self.hook}"
        if not inspect.isclass(cls):
            hint = "; register the class, not an instance" if isinstance(cls, base) else ""
            raise _Broken(f"{what}: expected {expected}{hint}")
        if not issubclass(cls, base) or cls is base:
            raise _Broken(f"{what}: expected {expected}")
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(cls.__abstractmethods__))
            raise _Broken(f"{what}: it is abstract (does not implement {missing})")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise _Broken(f"{what}: its `name` must be a non-empty string of letters, digits, '.', '_' or '-', "
                          f"got {name!r}")
        if self.options:
            taken = {n for n in dir(base) if not n.startswith("__")} | self.reserved
            problem = plugin_options.check_declaration(getattr(cls, "options", None), taken)
            if problem:
                raise _Broken(f"{what}: {problem}")

    def row(self, e: Entry) -> dict:
        """The entry's row of ``robnet-svc plugins --json``."""
        row = {"name": e.name, "description": _first_line(getattr(e.obj, "description", None) or e.obj.__doc__),
               "distribution": e.dist, "version": e.version, "plugin": e.plugin}
        if self.options:
            row["options"] = plugin_options.listing(e.obj.options)
        return row


class OpRuleKind(PluginKind):
    """Op rules: ``register(target, rule_cls)``, keyed by the graph target, not by a name."""

    def registrar(self, staged: list, plugin: str, dist: str, version: str,
                  trace: Callable[[str], None] | None) -> Callable:
        def register_rule(target, rule_cls):
            _check_rule(target, rule_cls, self.hook)
            target = _rule_target(target)
            entry = Entry(_target_name(target), rule_cls, dist, version, plugin)
            staged.append((self, target, entry))
            if trace:
                trace(f"{self.hook} in {plugin!r}: op rule {rule_cls.__name__} for {entry.name}")

        return register_rule

    def row(self, e: Entry) -> dict:
        return {"target": e.name, "rule": e.obj.__name__, "distribution": e.dist, "version": e.version,
                "plugin": e.plugin}


#: Bound methods (``--method``, ``--cert-method``). Declared here rather than in
#: ``robnet_svc.bounds`` only because that package imports torch on import.
BOUND_METHODS = PluginKind("bound_methods", "robnet_register_bound_methods", "bound method",
                           "robnet_svc.bounds.methods:BoundMethod")

#: Op rules of the bound engine (``robnet_svc.bounds.ops``); checked by ``_check_rule``.
OP_RULES = OpRuleKind("op_rules", "robnet_register_op_rules", "op rule for", "robnet_svc.bounds.ops.base:OpRule",
                      table=False)


def kinds() -> tuple[PluginKind, ...]:
    """Every kind, from ``KIND_DECLARATIONS`` (imported on first use)."""
    return tuple(import_target(path) for path in KIND_DECLARATIONS)


def kind(key: str) -> PluginKind:
    """The kind whose registry key is ``key`` (``perturbations``)."""
    return next(k for k in kinds() if k.key == key)


def _rule_target(target: Any) -> Any:
    """The engine keys ``call_method`` nodes by ``torch.Tensor.<name>``: a bare name maps there."""
    if isinstance(target, str) and target.isidentifier():
        import torch

        return getattr(torch.Tensor, target, target)
    return target


def _check_rule(target: Any, rule_cls: Any, hook_name: str) -> None:
    """Raise ``_Broken`` unless ``rule_cls`` is a complete rule of a known family for ``target``."""
    from robnet_svc.bounds.ops.base import ActivationRule, AffineRule, OpRule, RelaxedRule

    what = f"registered {_short_repr(rule_cls)} for {_target_name(target)} in {hook_name}"
    if not (callable(target) or (isinstance(target, str) and (target.isidentifier()
                                                               or IMPORT_PATH_RE.match(target)))):
        raise _Broken(f"{what}: the target must be an nn.Module subclass, a function, a tensor method "
                      f"name or an import path 'package.module:Class', got {_short_repr(target)}")
    families = (AffineRule, ActivationRule, RelaxedRule)
    if not inspect.isclass(rule_cls) or not issubclass(rule_cls, families) or rule_cls in (OpRule, *families):
        raise _Broken(f"{what}: expected a subclass of robnet_svc.bounds.ops.base.AffineRule, ActivationRule "
                      "or RelaxedRule")
    # The base classes raise NotImplementedError for what each family must define.
    required = ("abs_linear",) if issubclass(rule_cls, AffineRule) else ("interval", "relax")
    base = next(f for f in families if issubclass(rule_cls, f))
    missing = [m for m in required if getattr(rule_cls, m) is getattr(base, m)]
    if inspect.isabstract(rule_cls) or missing:
        missing = sorted(set(missing) | set(getattr(rule_cls, "__abstractmethods__", ())))
        raise _Broken(f"{what}: it does not implement {', '.join(missing)}")


def _commit(table: dict, k: PluginKind, key: Any, entry: Entry) -> None:
    """Add one validated entry; a second registration of the same key is an error naming both."""
    if key in table:
        first = table[key]
        raise RobnetError(
            f"{k.label} {entry.name!r} is registered twice: by {_where(first)} and by {_where(entry)}; "
            f"uninstall one of them or choose plugins with {ENV_ALLOW}=<entry point or distribution names>"
        )
    table[key] = entry


def _where(e: Entry) -> str:
    return f"{e.dist} {e.version} (plugin {e.plugin!r})"
