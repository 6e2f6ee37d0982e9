"""Built-in bound methods and op rules, registered through the public hooks."""

from robnet_svc.hookspecs import hookimpl


@hookimpl
def robnet_register_bound_methods(register):
    pass


@hookimpl
def robnet_register_op_rules(register):
    pass
