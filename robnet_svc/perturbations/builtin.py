"""Built-in perturbations, registered through the public hook."""

from robnet_svc.hookspecs import hookimpl


@hookimpl
def robnet_register_perturbations(register):
    pass
