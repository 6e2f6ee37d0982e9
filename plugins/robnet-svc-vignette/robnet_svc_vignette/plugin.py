"""The entry point of group ``robnet_svc``: registers this distribution's perturbations."""

from robnet_svc.hookspecs import hookimpl

from robnet_svc_vignette.perturbations import ColourGain, Vignette


@hookimpl
def robnet_register_perturbations(register):
    register(Vignette)
    register(ColourGain)
