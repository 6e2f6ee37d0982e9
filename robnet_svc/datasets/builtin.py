"""Built-in datasets, registered through the public hook."""

from robnet_svc.datasets.cifar10 import Cifar10
from robnet_svc.datasets.digits import Digits
from robnet_svc.datasets.image_folder import ImageFolder
from robnet_svc.datasets.mri import BrainTumorMri
from robnet_svc.hookspecs import hookimpl


@hookimpl
def robnet_register_datasets(register):
    for cls in (Digits, Cifar10, BrainTumorMri, ImageFolder):
        register(cls)
