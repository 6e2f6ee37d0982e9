"""Step 4: onnxruntime vs torch. A conversion is accepted only when both agree within
``PARITY_ATOL + PARITY_RTOL * max|output|`` (a tolerance relative to the output's scale)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn

from robnet_svc.onnx_io.base import (ADAPTER_NAME, IMPORT_PARITY_BATCHES, PARITY_ATOL, PARITY_RTOL, ImportedModel,
                                     fail, first_line, head_module, random_images, torch_dtype)


def ort_session(path_or_bytes: str | Path | bytes):
    """An onnxruntime session with an explicit provider list: CUDA only when torch sees a GPU."""
    import onnxruntime as ort

    from robnet_svc import threads

    options = ort.SessionOptions()
    options.log_severity_level = 3
    threads.apply_to_ort(options)  # the run's --threads, no spin-waiting
    providers: list = ["CPUExecutionProvider"]
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        # TF32 would cost ~1e-3 of accuracy: parity checks need full float32.
        providers.insert(0, ("CUDAExecutionProvider", {"use_tf32": "0"}))
    source = str(path_or_bytes) if isinstance(path_or_bytes, (str, Path)) else path_or_bytes
    return ort.InferenceSession(source, sess_options=options, providers=providers)


def tolerance(expected: list[np.ndarray]) -> float:
    """The allowed max abs difference for outputs ``expected``."""
    scale = max((float(np.max(np.abs(e))) if e.size else 0.0) for e in expected)
    return PARITY_ATOL + PARITY_RTOL * scale


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def _ort_runner(session, fixed_batch: int | None) -> Callable[[np.ndarray], list[np.ndarray]]:
    """``x [N, ...] -> [output [N, ...], ...]``; a model with a fixed batch size B is fed in
    zero-padded chunks of B."""
    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> list[np.ndarray]:
        if fixed_batch is None:
            return session.run(None, {input_name: x})
        n = x.shape[0]
        padded = np.concatenate([x, np.zeros((-n % fixed_batch, *x.shape[1:]), x.dtype)])
        chunks = [session.run(None, {input_name: padded[i:i + fixed_batch]})
                  for i in range(0, len(padded), fixed_batch)]
        return [np.concatenate(outputs)[:n] for outputs in zip(*chunks)]

    return run


def import_parity(imported: ImportedModel, reference: onnx.ModelProto, fixed_batch: int | None) -> float:
    """Compare the module with onnxruntime on ``reference`` (the file as read, its IR version
    lowered at most); RobnetError beyond the tolerance. Returns the worst max abs difference.

    Both the model's output (module + head) and, when a head was stripped, the logits
    before it are compared: a saturated Softmax would hide differences in the logits.
    """
    path = imported.path
    logits_value = _logits_value(reference) if imported.head else None
    if logits_value is not None:
        reference = copy.deepcopy(reference)
        reference.graph.output.append(helper.make_tensor_value_info(
            logits_value, reference.graph.output[0].type.tensor_type.elem_type, None))
    try:
        session = ort_session(reference.SerializeToString())
    except Exception as exc:
        raise fail(path, f"onnxruntime cannot load the model ({first_line(exc)})") from exc
    run = _ort_runner(session, fixed_batch)
    head = head_module(imported.head)
    adapter = dict(imported.module.named_children()).get(ADAPTER_NAME, nn.Identity())
    worst = 0.0
    for i, batch in enumerate(IMPORT_PARITY_BATCHES):
        images = random_images(batch, imported.image_shape, torch_dtype(imported.input_dtype), seed=1 + i)
        with torch.no_grad():
            logits = imported.module(images)
            expected = [head(logits).numpy(), logits.numpy()]
            onnx_input = adapter(images).numpy().astype(imported.input_dtype)
        try:
            got = run(onnx_input)
        except Exception as exc:
            raise fail(path, f"onnxruntime cannot run the model at batch {batch} ({first_line(exc)})") from exc
        if any(g.shape != e.shape for g, e in zip(got, expected)):
            fixed = (f"; the file was exported at a fixed batch size of {fixed_batch} and some op computes "
                     "with that size: export it with a dynamic batch axis (dynamic_axes, or dynamic_shapes "
                     "with dynamo=True)") if fixed_batch else ""
            raise fail(path, f"the torch conversion gives logits {list(expected[-1].shape)} for a batch of "
                             f"{batch}, onnxruntime {list(got[-1].shape)}{fixed}")
        diff = max(max_abs_diff(g, e) for g, e in zip(got, expected))
        worst = max(worst, diff)
        allowed = tolerance(expected)
        if not diff <= allowed:
            raise fail(path, f"the torch conversion differs from onnxruntime by {diff:.3g} at batch {batch} "
                             f"(allowed {allowed:.3g}); the model uses an op that onnx2torch converts wrongly")
    return worst


def _logits_value(model: onnx.ModelProto) -> str | None:
    """Name of the value that enters the final Softmax/LogSoftmax (through Identity/Dropout)."""
    producers = {out: n for n in model.graph.node for out in n.output}
    node = producers.get(model.graph.output[0].name)
    while node is not None and node.op_type in ("Identity", "Dropout"):
        node = producers.get(node.input[0])
    if node is None or node.op_type not in ("Softmax", "LogSoftmax"):
        return None
    return node.input[0]
