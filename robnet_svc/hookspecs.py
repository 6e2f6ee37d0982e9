"""The robnet_svc hook specifications (pluggy project name and entry-point group: ``robnet_svc``).

Every hook receives a ``register`` callback and calls it once per thing it provides;
robnet-svc validates what is registered and records which distribution it came from.
Built-in methods, perturbations, datasets and op rules are registered through these
same hooks (see ``robnet_svc.plugins.DEFAULT_PLUGINS``). ``docs/plugins.md`` documents
each hook; a test fails when one is missing there.
"""

import pluggy

hookspec = pluggy.HookspecMarker("robnet_svc")
hookimpl = pluggy.HookimplMarker("robnet_svc")


@hookspec
def robnet_register_bound_methods(register):
    """Register bound methods: call ``register(cls)`` with a ``robnet_svc.bounds.BoundMethod`` subclass."""


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
