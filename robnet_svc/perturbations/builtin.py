"""Built-in perturbations, registered through the public hook."""

from robnet_svc.hookspecs import hookimpl
from robnet_svc.perturbations.bias_field import BiasField, Brightness, Contrast
from robnet_svc.perturbations.linf import Linf


@hookimpl
def robnet_register_perturbations(register):
    for cls in (BiasField, Brightness, Contrast, Linf):
        register(cls)
