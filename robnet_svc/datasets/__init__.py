"""Dataset plugins (SPEC §8)."""

from robnet_svc.datasets.base import Dataset, Splits
from robnet_svc.plugin_options import Option

__all__ = ["Dataset", "Option", "Splits"]
