"""Plugin host (robnet_svc.plugins): built-ins through the public hooks, a fresh manager per
call, the listing's JSON shape, validation of what plugins register, clear errors.

Entry-point loading of real installed distributions is in test_plugin_example.py.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import re

import pluggy
import pytest

import robnet_svc
from robnet_svc import hookspecs, plugins
from robnet_svc.errors import RobnetError
from robnet_svc.perturbations import DenseAffineSet, Option, Perturbation


@pytest.fixture
def builtins_only(monkeypatch):
    """Only the built-in plugins, whatever is installed in the test environment."""
    monkeypatch.setenv(plugins.ENV_ALLOW, "")
    monkeypatch.delenv(plugins.ENV_TRACE, raising=False)


def test_builtins_register_through_the_public_hooks(builtins_only):
    pm, origin, broken = plugins.make_manager()
    assert broken == []
    version = metadata.version("robnet-svc")
    assert version == robnet_svc.__version__
    for modname in plugins.DEFAULT_PLUGINS:
        module = pm.get_plugin(modname)
        assert module is not None and module.__name__ == modname
        assert origin[modname] == ("robnet-svc", version)
    # Every hook the built-ins implement is a declared spec (no private path).
    implemented = {h.name for m in plugins.DEFAULT_PLUGINS for h in pm.get_hookcallers(pm.get_plugin(m))}
    assert implemented == {k.hook for k in plugins.kinds()}
    for name in implemented:
        assert getattr(pm.hook, name).spec is not None

    registry = plugins.load_registry()
    assert registry.broken == []
    for kind in ("bound_methods", "perturbations", "datasets", "op_rules"):
        for entry in getattr(registry, kind).values():
            assert (entry.dist, entry.version) == ("robnet-svc", version)
            assert entry.plugin in plugins.DEFAULT_PLUGINS
    assert "bias-field" in registry.perturbations
    assert registry.perturbations["bias-field"].plugin == "robnet_svc.perturbations.builtin"


def test_make_manager_is_a_fresh_factory(builtins_only):
    pm1, _, _ = plugins.make_manager()
    pm2, _, _ = plugins.make_manager()
    assert pm1 is not pm2
    # Registering into one manager does not leak into the next one.
    extra = type("Extra", (), {"robnet_register_datasets": hookspecs.hookimpl(lambda register: None)})()
    pm1.register(extra, name="extra")
    assert pm2.get_plugin("extra") is None and plugins.make_manager()[0].get_plugin("extra") is None
    # No plugin manager or registry lives at module level.
    assert not [v for v in vars(plugins).values() if isinstance(v, (pluggy.PluginManager, plugins.Registry))]
    assert plugins.load_registry() is not plugins.load_registry()


def test_listing_json_shape(builtins_only):
    listing = json.loads(json.dumps(plugins.load_registry().listing()))
    assert set(listing) == {"bound_methods", "perturbations", "datasets", "op_rules", "plugins", "broken"}
    for kind in ("bound_methods", "perturbations", "datasets"):
        for row in listing[kind]:
            assert {"name", "description", "distribution", "version", "plugin"} <= set(row)
            assert row["distribution"] == "robnet-svc" and row["version"] == robnet_svc.__version__
            assert row["description"] and "\n" not in row["description"]
        assert [r["name"] for r in listing[kind]] == sorted(r["name"] for r in listing[kind])
    bias = next(r for r in listing["perturbations"] if r["name"] == "bias-field")
    assert bias["options"]["order"]["default"] == 3
    for row in listing["op_rules"]:
        assert {"target", "rule", "distribution", "version", "plugin"} == set(row)
    assert [p["name"] for p in listing["plugins"]] == list(plugins.DEFAULT_PLUGINS)
    assert all(p["hooks"] and p["distribution"] == "robnet-svc" for p in listing["plugins"])
    assert listing["broken"] == []


def test_unknown_name_lists_the_known_ones(builtins_only):
    registry = plugins.load_registry()
    with pytest.raises(RobnetError) as err:
        registry.perturbation("no-such-thing")
    message = str(err.value)
    assert "\n" not in message and "'no-such-thing'" in message
    assert "perturbation" in message and "bias-field" in message and "linf" in message
    with pytest.raises(RobnetError, match="unknown dataset 'nope'"):
        registry.dataset("nope")
    with pytest.raises(RobnetError, match="unknown bound method 'nope'"):
        registry.bound_method("nope")


def test_unknown_name_mentions_broken_plugins(builtins_only):
    registry = plugins.load_registry()
    registry.broken.append("plugin 'x' from x-dist 1.0 failed to import: ImportError: no")
    with pytest.raises(RobnetError, match="1 plugin\\(s\\) failed to load: plugin 'x' from x-dist"):
        registry.perturbation("vignette")


def test_allow_list_naming_nothing_installed_is_reported(monkeypatch):
    monkeypatch.setenv(plugins.ENV_ALLOW, "surely-not-installed")
    registry = plugins.load_registry()
    assert "bias-field" in registry.perturbations  # built-ins always load
    assert len(registry.broken) == 1
    assert "ROBNET_SVC_PLUGINS names 'surely-not-installed'" in registry.broken[0]


def test_trace_env_prints_hook_calls(builtins_only, monkeypatch, capsys):
    monkeypatch.setenv(plugins.ENV_TRACE, "1")
    plugins.load_registry()
    err = capsys.readouterr().err.splitlines()
    assert "robnet-svc: trace: loaded built-in plugin 'robnet_svc.perturbations.builtin' (robnet-svc " \
        f"{robnet_svc.__version__})" in err
    assert any("robnet_register_perturbations in 'robnet_svc.perturbations.builtin': perturbation 'bias-field'"
               in line for line in err)
    monkeypatch.setenv(plugins.ENV_TRACE, "0")
    plugins.load_registry()
    assert capsys.readouterr().err == ""


# --- validation of what a plugin registers (the `register` callback's contract) ---------------


class _Good(Perturbation):
    name = "good"
    description = "A valid perturbation."
    options = {"level": Option(int, 1, "a level")}

    def num_coeffs(self, image_shape):
        return 1

    def affine_set(self, images, eps=None) -> DenseAffineSet:
        raise NotImplementedError


class _Abstract(Perturbation):
    name = "abstract"


class _BadName(_Good):
    name = "has space"


class _NoName(_Good):
    name = ""


class _BadOptions(_Good):
    name = "bad-options"
    options = {"level": 1}


class _Shadowing(_Good):
    name = "shadowing"
    options = {"eps": Option(float, 0.1, "a second eps")}


class _NotAPerturbation:
    name = "nope"


@pytest.mark.parametrize("obj, phrase", [
    (_NotAPerturbation, "expected a concrete robnet_svc.perturbations.base.Perturbation subclass"),
    (_Good(0.1), "register the class, not an instance"),
    (Perturbation, "expected a concrete"),
    (_Abstract, "it is abstract (does not implement affine_set, num_coeffs)"),
    (_BadName, "its `name` must be a non-empty string"),
    (_NoName, "its `name` must be a non-empty string"),
    (_BadOptions, "its `options` must map identifier names"),
    (_Shadowing, "its option 'eps' would shadow the attribute of that name of the base class"),
    ("bias-field", "expected a concrete"),
])
def test_register_rejects_what_is_not_a_proper_perturbation(obj, phrase):
    staged: list = []
    register = plugins.kind("perturbations").registrar(staged, "myplugin", "my-dist", "1.2", None)
    with pytest.raises(plugins._Broken) as err:
        register(obj)
    assert phrase in str(err.value) and "robnet_register_perturbations" in str(err.value)
    assert staged == []


def test_register_accepts_a_proper_perturbation():
    staged: list = []
    register = plugins.kind("perturbations").registrar(staged, "myplugin", "my-dist", "1.2", None)
    register(_Good)
    [(kind, key, entry)] = staged
    assert (kind.key, key, entry.obj, entry.dist, entry.version, entry.plugin) == (
        "perturbations", "good", _Good, "my-dist", "1.2", "myplugin")


def test_dataset_options_are_checked_at_registration_and_resolved_as_attributes():
    from robnet_svc.datasets import Dataset

    class Good(Dataset):
        name = "good-data"
        needs_data_dir = False
        options = {"shuffle": Option(bool, False, "shuffle"), "limit": Option(int, None, "at most this many")}

        def load(self, image_shape, progress=True):
            raise NotImplementedError

    class Shadowing(Good):
        name = "shadowing-data"
        options = {"data_dir": Option(str, "", "a folder")}

    staged: list = []
    register = plugins.kind("datasets").registrar(staged, "myplugin", "my-dist", "1.2", None)
    register(Good)
    with pytest.raises(plugins._Broken, match="its option 'data_dir' would shadow"):
        register(Shadowing)
    data = Good(None, shuffle="yes", limit="12")
    assert (data.shuffle, data.limit) == (True, 12)
    assert (Good(None).shuffle, Good(None).limit) == (False, None)
    for given, phrase in [({"shuffle": "maybe"}, "option shuffle='maybe' of dataset 'good-data' is not a valid bool"),
                          ({"limit": 1.5}, "option limit=1.5 of dataset 'good-data' is not a valid int"),
                          ({"limit": True}, "is not a valid int"),
                          ({"size": 3}, "dataset 'good-data' has no option 'size'; known: limit, shuffle")]:
        with pytest.raises(RobnetError, match=re.escape(phrase)):
            Good(None, **given)


def test_same_name_twice_is_an_error_naming_both():
    table: dict = {}
    kind = plugins.kind("perturbations")
    plugins._commit(table, kind, "good", plugins.Entry("good", _Good, "dist-a", "1.0", "a"))
    with pytest.raises(RobnetError) as err:
        plugins._commit(table, kind, "good", plugins.Entry("good", _Good, "dist-b", "2.0", "b"))
    message = str(err.value)
    assert "perturbation 'good' is registered twice" in message
    assert "dist-a 1.0 (plugin 'a')" in message and "dist-b 2.0 (plugin 'b')" in message
    assert plugins.ENV_ALLOW in message


def test_every_kind_has_a_spec_and_every_spec_a_kind():
    specs = {name for name in dir(hookspecs) if name.startswith("robnet_register_")}
    assert {k.hook for k in plugins.kinds()} == specs
    for k in plugins.kinds():
        assert getattr(hookspecs, k.hook).__doc__ and "register" in getattr(hookspecs, k.hook).__doc__
    assert [k.key for k in plugins.kinds()] == ["bound_methods", "perturbations", "datasets", "op_rules"]
    assert set(plugins.load_registry().listing()) == {"bound_methods", "perturbations", "datasets", "op_rules",
                                                      "plugins", "broken"}


# --- op rules -----------------------------------------------------------------------------------


def _rule_registrar(staged):
    return plugins.kind("op_rules").registrar(staged, "myplugin", "my-dist", "1.2", None)


def test_op_rule_registration_validates_and_maps_method_names():
    import torch

    from robnet_svc.bounds.ops.base import ActivationRule, AffineRule

    class Scale(AffineRule):
        has_bias = False

        def abs_linear(self, rad):
            return rad

    class NoAbs(AffineRule):
        pass

    class HalfActivation(ActivationRule):
        def interval(self, lower, upper):
            return lower, upper

    staged: list = []
    register = _rule_registrar(staged)
    register(torch.nn.Identity, Scale)
    register("view", Scale)  # a bare method name means torch.Tensor.view, as the engine keys it
    assert [(key, entry.obj) for _, key, entry in staged] == [(torch.nn.Identity, Scale), (torch.Tensor.view, Scale)]
    assert staged[1][2].name == "torch.Tensor.view"
    for target, rule, phrase in [
        (torch.nn.Identity, NoAbs, "does not implement abs_linear"),
        (torch.nn.Identity, HalfActivation, "does not implement relax"),
        (torch.nn.Identity, AffineRule, "expected a subclass of robnet_svc.bounds.ops.base.AffineRule"),
        (torch.nn.Identity, object, "expected a subclass"),
        (42, Scale, "the target must be"),
    ]:
        with pytest.raises(plugins._Broken, match=phrase):
            register(target, rule)
    assert len(staged) == 2


def test_builtin_op_rules_are_listed_by_readable_target(builtins_only):
    listing = plugins.load_registry().listing()
    targets = {row["target"]: row["rule"] for row in listing["op_rules"]}
    assert targets["torch.nn.modules.linear.Linear"] == "LinearRule"
    assert targets["torch.Tensor.view"] == "ReshapeRule"
    assert targets["torch.nn.modules.activation.ReLU"] == "ReluRule"
