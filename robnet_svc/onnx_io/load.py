"""The import pipeline: read -> input layout -> lower + convert -> normalise -> checks -> parity.

``load_model`` returns an ``ImportedModel`` whose ``module`` is a NORMALISED
``torch.fx.GraphModule`` (see ``normalize.py``) that maps an image batch ``[N, C, H, W]`` to
logits ``[N, K]`` at any batch size N, every weight of the user's network a trainable
``nn.Parameter``. Before it returns, the module (plus the stripped Softmax head) is compared
with onnxruntime on the file as read at two batch sizes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from onnx import helper

from robnet_svc.errors import RobnetError
from robnet_svc.onnx_io.base import ImportedModel, default_opset, dims, fail, first_line, random_images, torch_dtype
from robnet_svc.onnx_io.convert import convert_model
from robnet_svc.onnx_io.layout import input_layout, prepend
from robnet_svc.onnx_io.lower import ort_loadable
from robnet_svc.onnx_io.normalize import HEAD_KEY, normalize_graph
from robnet_svc.onnx_io.parity import import_parity
from robnet_svc.onnx_io.read import read_onnx, signature


def load_model(path: str | Path, image_shape: str | tuple | None = None, check_parity: bool = True) -> ImportedModel:
    """Import an ONNX classifier (see the module docstring); RobnetError on bad input."""
    path = Path(path)
    source, sha256 = read_onnx(path)
    input_info, output_info = signature(source, path)
    layout, image, per_sample, adapter = input_layout(source, path, input_info, image_shape)
    gm, model, lowered = convert_model(source, path)
    if adapter is not None:
        prepend(gm, adapter)

    input_dtype = helper.tensor_dtype_to_np_dtype(input_info.type.tensor_type.elem_type)
    output_dtype = helper.tensor_dtype_to_np_dtype(output_info.type.tensor_type.elem_type)
    batch_dim = dims(input_info)[0]
    fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
    example = random_images(fixed_batch or 2, image, torch_dtype(input_dtype), seed=0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            normalize_graph(gm, example)
            with torch.no_grad():
                logits = gm(example)
    except RobnetError:
        raise
    except Exception as exc:
        raise fail(path, f"the converted torch model does not run on a {list(example.shape)} input "
                         f"({type(exc).__name__}: {first_line(exc)})") from exc
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != example.shape[0]:
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise fail(path, f"output {output_info.name!r} is {shape} for a batch of {example.shape[0]}; "
                         "robnet-svc needs logits [N,K]")
    if logits.shape[1] < 2:
        raise fail(path, f"output {output_info.name!r} has {logits.shape[1]} value per sample; a classifier "
                         "needs at least 2 classes (a single output is a regressor or a binary score, which "
                         "robnet-svc cannot certify)")
    producer = f"{source.producer_name} {source.producer_version}".strip()
    imported = ImportedModel(
        path=path, sha256=sha256, onnx_model=model, module=gm,
        input_name=input_info.name, output_name=output_info.name,
        input_dtype=np.dtype(input_dtype), output_dtype=np.dtype(output_dtype),
        image_shape=image, input_shape=per_sample, num_classes=int(logits.shape[1]),
        head=gm.meta.get(HEAD_KEY), opset=default_opset(model), producer=producer, layout=layout,
        source_opset=default_opset(source) if default_opset(model) != default_opset(source) else None,
        lowered=tuple(lowered),
    )
    if check_parity:
        # The file as read; only its IR version lowered when onnxruntime cannot load it otherwise.
        imported.parity_max_abs_diff = import_parity(imported, ort_loadable(source)[0], fixed_batch)
    return imported
