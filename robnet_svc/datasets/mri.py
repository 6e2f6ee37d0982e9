"""``mri``: the public Brain Tumor MRI layout (SPEC §8).

``--data-dir`` holds ``Training/`` and ``Testing/``, each with one folder per class (glioma,
meningioma, notumor, pituitary; labels in sorted folder order). Every ``.jpg``/``.jpeg``/``.png``
image, whatever its name, size and mode, is read as one grey channel (the scans are grey, often
stored as RGB), resized to the model input and repeated to 3 channels for RGB models; pixels
float32 in ``[0, 1]``. This is ``image-folder`` with the layout fixed (see ``image_folder.py``
for hidden files, skipped files, the cache and the progress bar).
"""

from robnet_svc.datasets.image_folder import ImageFolder


class BrainTumorMri(ImageFolder):
    """Brain Tumor MRI folders (Training/ and Testing/, one folder per class), read as grey."""

    name = "mri"
    description = "Brain Tumor MRI layout: Training/ and Testing/ with one folder per class, read as grey"
    options = {"cache": ImageFolder.options["cache"]}
    split_folders = (("Training", "Testing"),)
    single_tree = False
    grey_source = True
