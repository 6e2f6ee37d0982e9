"""Step 5: write a torch model back to ONNX with the source's input layout, head, names,
dtypes and a dynamic batch axis, checked against onnxruntime before the file appears under
its final name.

The file is a function of its inputs only: ``metadata_props`` hold the robnet-svc version, the
source file's sha256, the input layout and the caller's (path-free) settings; no paths, host
names or times (those belong in the certificate's provenance), so the same weights and
settings give the same bytes in any folder.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path

import onnx
import torch
from onnx import helper
from torch import nn

from robnet_svc import __version__
from robnet_svc.atomic import atomic_path
from robnet_svc.errors import RobnetError
from robnet_svc.onnx_io.base import (EXPORT_OPSET, EXPORT_PARITY_BATCHES, LAYOUT_KEYS, ImportedModel, fail,
                                     first_line, head_module, random_images, torch_dtype)
from robnet_svc.onnx_io.normalize import BatchReshape
from robnet_svc.onnx_io.parity import max_abs_diff, ort_session, tolerance

_EXPORT_INPUT, _EXPORT_OUTPUT = "robnet_svc_input", "robnet_svc_output"


class _ExportWrapper(nn.Module):
    """ONNX input layout -> image -> logits module -> head, in the source's dtypes."""

    def __init__(self, module: nn.Module, source: ImportedModel):
        super().__init__()
        self.module = module
        self.to_image = BatchReshape(source.image_shape) if source.layout == "flat" else (
            _Permute((0, 3, 1, 2)) if source.layout == "NHWC" else nn.Identity())
        self.head = head_module(source.head)
        self.output_dtype = torch_dtype(source.output_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Casts only where the dtypes differ (the checks are Python-level: no Cast node otherwise).
        param = next(self.module.parameters(), None)
        image = self.to_image(x)
        if param is not None and image.dtype != param.dtype:
            image = image.to(param.dtype)
        out = self.head(self.module(image))
        return out if out.dtype == self.output_dtype else out.to(self.output_dtype)


class _Permute(nn.Module):
    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


@contextlib.contextmanager
def _opset_visible_to_onnx2torch(opset: int):
    """onnx2torch's modules (Squeeze, Shape, Gather, Reduce) ask ``onnx2torch.utils.common.
    get_onnx_version()`` for the opset while being exported; it reads
    ``torch.onnx.symbolic_helper.GLOBALS`` or, failing that, ``_export_onnx_opset_version``.
    Depending on which of torch's exporter modules were imported before (torch >= 2.9 moved
    them), neither may be there; then give it the opset of this export for its duration."""
    import torch.onnx.symbolic_helper as symbolic_helper

    if hasattr(symbolic_helper, "GLOBALS") or hasattr(symbolic_helper, "_export_onnx_opset_version"):
        yield
        return
    symbolic_helper._export_onnx_opset_version = opset
    try:
        yield
    finally:
        del symbolic_helper._export_onnx_opset_version


def export_model(module: nn.Module, source: ImportedModel, out_path: str | Path, metadata: dict[str, str]) -> None:
    """Write ``module`` (image ``[N, *source.image_shape]`` -> logits ``[N, K]``) as ONNX.

    The file has the source's input layout, head, input/output names and dtypes, a dynamic
    batch axis, opset ``max(17, source opset)``, ``metadata`` plus robnet-svc's version, the
    source's sha256 and the input layout in ``metadata_props``; it passes ``onnx.checker``
    and matches the torch model in onnxruntime at batch 1 and 7 before it appears at
    ``out_path`` (written to a temporary name in the same directory, then renamed).
    """
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise fail(out_path.parent, "output directory does not exist")
    wrapper = _ExportWrapper(copy.deepcopy(module).cpu().eval(), source).eval()
    example = torch.zeros(2, *source.input_shape, dtype=torch_dtype(source.input_dtype))
    opset = max(EXPORT_OPSET, source.opset)
    try:
        with atomic_path(out_path) as tmp:
            with warnings.catch_warnings():
                # The TorchScript-based exporter is deprecated in favour of dynamo, which cannot
                # export onnx2torch's Reshape modules; its warnings are expected here.
                warnings.simplefilter("ignore")
                with _opset_visible_to_onnx2torch(opset):
                    torch.onnx.export(
                        wrapper, (example,), str(tmp), dynamo=False, opset_version=opset,
                        input_names=[_EXPORT_INPUT], output_names=[_EXPORT_OUTPUT],
                        dynamic_axes={_EXPORT_INPUT: {0: "batch"}, _EXPORT_OUTPUT: {0: "batch"}},
                        do_constant_folding=True,
                    )
            exported = onnx.load(str(tmp))
            # TorchScript refuses names such as '12' (common in old exports): rename afterwards.
            _rename_value(exported.graph, _EXPORT_INPUT, source.input_name)
            _rename_value(exported.graph, _EXPORT_OUTPUT, source.output_name)
            exported.producer_name, exported.producer_version = "robnet-svc", __version__
            props = {"robnet_svc.version": __version__, "robnet_svc.source_sha256": source.sha256,
                     LAYOUT_KEYS["layout"]: source.layout, LAYOUT_KEYS["image_shape"]: "x".join(map(str, source.image_shape)),
                     **{str(k): str(v) for k, v in metadata.items()}}
            helper.set_model_props(exported, props)
            onnx.checker.check_model(exported)
            onnx.save(exported, str(tmp))
            _export_parity(tmp, wrapper, source)
    except RobnetError:
        raise
    except Exception as exc:
        raise fail(out_path, f"ONNX export failed ({type(exc).__name__}: {first_line(exc)})") from exc


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename the value ``old`` to ``new`` everywhere in ``graph`` (moving a clash out of the way)."""
    if old == new:
        return
    names = {v for n in graph.node for v in (*n.input, *n.output)} | {t.name for t in graph.initializer}
    if new in names:
        _rename_value(graph, new, f"{new}__renamed")
    for node in graph.node:
        node.input[:] = [new if v == old else v for v in node.input]
        node.output[:] = [new if v == old else v for v in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        if value.name == old:
            value.name = new


def _export_parity(tmp: Path, wrapper: nn.Module, source: ImportedModel) -> None:
    session = ort_session(tmp)
    dtype = torch_dtype(source.input_dtype)
    for i, batch in enumerate(EXPORT_PARITY_BATCHES):
        x = random_images(batch, source.input_shape, dtype, seed=100 + i)
        with torch.no_grad():
            expected = wrapper(x).numpy()
        got = session.run(None, {source.input_name: x.numpy()})[0]
        diff, allowed = max_abs_diff(got, expected), tolerance([expected])
        if not diff <= allowed:
            raise RobnetError(f"{tmp.name}: exported model differs from the torch model by {diff:.3g} in "
                              f"onnxruntime at batch {batch} (allowed {allowed:.3g}); nothing written")
