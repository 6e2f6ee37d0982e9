"""Step 3: how the ONNX input holds an image, and the adapter module that maps the user's
image batch ``[N, C, H, W]`` to that input.

* image input ``[N, C, H, W]``: nothing to do;
* flat input (``[N, D]``, or any per-sample shape that is not 3-D, e.g. ``[N, 784, 1]``):
  the user must say how to view it as an image (``image_shape``, product = D); the module
  starts with ``BatchReshape(input_shape)``;
* NHWC input ``[N, H, W, C]`` whose first node is ``Transpose(perm=[0, 3, 1, 2])``
  (tf2onnx/keras2onnx): ``image_shape`` is ``(C, H, W)`` and the module starts with
  ``OnnxTranspose(perm=[0, 2, 3, 1])``, so the user's images are CHW like everyone else's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from torch import fx, nn

from robnet_svc.errors import RobnetError
from robnet_svc.onnx_io.base import ADAPTER_NAME, LAYOUT_KEYS, dims, fail
from robnet_svc.onnx_io.normalize import BatchReshape


def parse_image_shape(text: str | tuple | list | None) -> tuple[int, int, int] | None:
    """``"1x28x28"`` (or a 3-tuple) -> ``(1, 28, 28)``; ``None`` stays ``None``."""
    if text is None:
        return None
    try:
        parts = tuple(int(p) for p in (text.lower().split("x") if isinstance(text, str) else text))
    except (TypeError, ValueError):
        parts = ()
    if len(parts) != 3 or min(parts) <= 0:
        raise RobnetError(f"--image-shape {text!r}: expected CxHxW with three positive integers, e.g. 1x28x28")
    return parts  # type: ignore[return-value]


def _is_nhwc(model: onnx.ModelProto, input_name: str, per_sample: tuple[int, ...]) -> bool:
    """True when the input ``[N, H, W, C]`` feeds only a Transpose to NCHW (tf2onnx/keras2onnx),
    or, for one channel, only a Reshape to ``[N, 1, H, W]`` (tf2onnx's form of that Transpose)."""
    consumers = [n for n in model.graph.node if input_name in n.input]
    if len(consumers) != 1:
        return False
    node = consumers[0]
    if node.op_type == "Transpose":
        return next((list(a.ints) for a in node.attribute if a.name == "perm"), None) == [0, 3, 1, 2]
    height, width, channels = per_sample
    if node.op_type == "Reshape" and channels == 1 and len(node.input) > 1:
        shape = next((numpy_helper.to_array(t) for t in model.graph.initializer if t.name == node.input[1]), None)
        return shape is not None and shape.shape == (4,) and tuple(int(s) for s in shape[1:]) == (1, height, width)
    return False


def _square_guess(size: int) -> str:
    """An ``--image-shape`` example for ``size`` values: one channel, as square as possible."""
    height = max(h for h in range(1, int(size ** 0.5) + 1) if size % h == 0)
    return f"1x{height}x{size // height}"


def input_layout(model: onnx.ModelProto, path: Path, value_info: onnx.ValueInfoProto,
                 image_shape) -> tuple[str, tuple[int, int, int], tuple[int, ...], nn.Module | None]:
    """(layout, image_shape, per-sample input shape, adapter image -> input or None)."""
    shape = dims(value_info)
    name = value_info.name
    per_sample = shape[1:]
    if not shape or any(not isinstance(d, int) or d <= 0 for d in per_sample):
        shown = "x".join(str(d) if d is not None else "?" for d in shape) or "unknown"
        raise fail(path, f"input {name!r} has shape [{shown}]; robnet-svc needs a batch axis "
                         "followed by fixed per-sample dimensions, e.g. [N,C,H,W]")
    per_sample = tuple(per_sample)
    # Files we exported say how their input holds the image (the exporter may have fused
    # the NHWC Transpose away, and a flat model's image shape is otherwise unknown).
    hints = {p.key: p.value for p in model.metadata_props}
    wanted = parse_image_shape(image_shape if image_shape is not None else hints.get(LAYOUT_KEYS["image_shape"]))
    shown = "x".join(map(str, per_sample))
    if len(per_sample) == 3:
        if _is_nhwc(model, name, per_sample) or hints.get(LAYOUT_KEYS["layout"]) == "NHWC":
            from onnx2torch.node_converters.transpose import OnnxTranspose

            height, width, channels = per_sample
            image = (channels, height, width)
            layout, adapter = "NHWC", OnnxTranspose(perm=[0, 2, 3, 1])
        else:
            image, layout, adapter = per_sample, "NCHW", None
        if wanted is not None and wanted != image:
            raise fail(path, f"--image-shape {'x'.join(map(str, wanted))} does not match the model's "
                             f"image input {name!r} ({'x'.join(map(str, image))} as CxHxW); leave it out")
        return layout, image, per_sample, adapter
    size = int(np.prod(per_sample))
    if wanted is None:
        raise fail(path, f"input {name!r} is [N,{shown}] ({size} values per sample), which does not look like "
                         f"an image [N,C,H,W]; robnet-svc perturbs images, so it must be told how to view "
                         f"those {size} values as one: --image-shape CxHxW (product {size}, e.g. "
                         f"{_square_guess(size)}, read row by row). Only do so if the values are pixels")
    if int(np.prod(wanted)) != size:
        raise fail(path, f"--image-shape {'x'.join(map(str, wanted))} has {int(np.prod(wanted))} values but "
                         f"input {name!r} [N,{shown}] has {size} per sample")
    return "flat", wanted, per_sample, BatchReshape(per_sample)


def layout_note(layout: str, image_shape: tuple[int, int, int], input_shape: tuple[int, ...]) -> str | None:
    """For ``inspect``: a plain sentence when the input is not an image, else None."""
    if layout != "flat":
        return None
    c, h, w = image_shape
    size = int(np.prod(input_shape))
    note = (f"the input is not an image: [N,{'x'.join(map(str, input_shape))}] holds {size} values per sample; "
            f"--image-shape {c}x{h}x{w} views them, row by row, as {c} channel(s) of {h}x{w} pixels, "
            "and bias fields perturb them as such")
    if h == 1 or w == 1:
        note += " (a 1-pixel-high or -wide image: a smooth bias field over it is a curve, not a surface)"
    return note


def prepend(gm: fx.GraphModule, adapter: nn.Module) -> None:
    """Make ``adapter`` the first node after the placeholder."""
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    gm.add_submodule(ADAPTER_NAME, adapter)
    with gm.graph.inserting_after(placeholder):
        first = gm.graph.call_module(ADAPTER_NAME, (placeholder,))
    placeholder.replace_all_uses_with(first, delete_user_cb=lambda user: user is not first)
    gm.recompile()
