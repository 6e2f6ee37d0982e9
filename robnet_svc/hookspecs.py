"""The robnet_svc hook specifications (pluggy project name and entry-point group: ``robnet_svc``).

Every hook receives a ``register`` callback and calls it once per thing it provides; it
returns nothing. robnet-svc validates each registration (a concrete subclass of the right
base class, a valid ``name``) and records which distribution it came from; a plugin that
breaks this contract is reported by name and skipped. Built-in methods, perturbations,
datasets and op rules are registered through these same hooks (see
``robnet_svc.plugins.DEFAULT_PLUGINS``). ``docs/plugins.md`` documents each hook; a test
fails when one is missing there.

A plugin module implements any subset of these, decorated with ``hookimpl``::

    from robnet_svc.hookspecs import hookimpl

    @hookimpl
    def robnet_register_perturbations(register):
        register(MyPerturbation)
"""

import pluggy

hookspec = pluggy.HookspecMarker("robnet_svc")
hookimpl = pluggy.HookimplMarker("robnet_svc")


@hookspec
def robnet_register_bound_methods(register):
    """Register bound methods: call ``register(cls)`` with a ``robnet_svc.bounds.methods.BoundMethod`` subclass."""


@hookspec
def robnet_register_perturbations(register):
    """Register perturbations: call ``register(cls)`` with a ``robnet_svc.perturbations.Perturbation`` subclass."""


@hookspec
def robnet_register_datasets(register):
    """Register datasets: call ``register(cls)`` with a ``robnet_svc.datasets.Dataset`` subclass."""


@hookspec
def robnet_register_op_rules(register):
    """Register bound rules for graph operations: call ``register(target, rule_cls)`` where
    ``target`` is an ``nn.Module`` subclass (matched by exact type) or a callable used in a
    ``call_function`` node, and ``rule_cls`` a ``robnet_svc.bounds.ops.OpRule`` subclass."""
