"""Dataset plugins (SPEC §8)."""

from robnet_svc.datasets.base import Dataset, Splits

__all__ = ["Dataset", "Splits"]
