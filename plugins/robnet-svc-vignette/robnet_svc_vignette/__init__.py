"""robnet-svc plugin: radial vignetting and per-channel colour-gain perturbations."""

__version__ = "0.1.0"
