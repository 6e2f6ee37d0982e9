"""normalize_graph on real onnx2torch conversions of ONNX files exported from torch."""

from __future__ import annotations

import warnings

import onnx
import pytest
import torch
from onnx2torch import convert
from torch import nn

import onnx_factory
from robnet_svc.onnx_io.normalize import BatchReshape, normalize_graph

SHAPE_ONLY = {"OnnxShape", "OnnxGather", "OnnxConcat", "OnnxConstant", "OnnxUnsqueezeStaticAxes",
              "OnnxUnsqueezeDynamicAxes", "OnnxConstantOfShape", "OnnxReshape", "OnnxCast"}


def _converted(name: str, tmp_path) -> tuple[torch.fx.GraphModule, nn.Module]:
    path = onnx_factory.build(name, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(onnx.load(str(path))), onnx_factory.make_model(name)


def _module_kinds(gm: torch.fx.GraphModule) -> set[str]:
    return {type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"}


def test_shape_computed_flatten_is_folded(tmp_path):
    gm, reference = _converted("shape_flatten", tmp_path)
    assert "OnnxShape" in _module_kinds(gm)  # x.view(x.size(0), -1): Shape/Gather/Concat/Reshape
    normalize_graph(gm, torch.rand(2, 1, 8, 8))
    kinds = _module_kinds(gm)
    assert "BatchReshape" in kinds and not kinds & SHAPE_ONLY
    reshape = next(m for m in gm.modules() if isinstance(m, BatchReshape))
    assert reshape.shape == (4 * 6 * 6,)
    for batch in (1, 3, 5):
        x = torch.rand(batch, 1, 8, 8)
        torch.testing.assert_close(gm(x), reference(x), atol=1e-5, rtol=0)


def test_fixed_batch_reshape_runs_at_any_batch(tmp_path):
    gm, reference = _converted("fixed_batch", tmp_path)
    with pytest.raises(RuntimeError):
        gm(torch.rand(3, 1, 8, 8))  # as imported: batch 10 only
    normalize_graph(gm, torch.rand(10, 1, 8, 8))
    assert not _module_kinds(gm) & SHAPE_ONLY
    reference.batch = None  # same weights, per-sample flatten
    for batch in (1, 3, 10, 11):
        x = torch.rand(batch, 1, 8, 8)
        torch.testing.assert_close(gm(x), reference(x), atol=1e-5, rtol=0)


def test_normalisation_constants_are_get_attr(tmp_path):
    gm, reference = _converted("normalized", tmp_path)
    normalize_graph(gm, torch.rand(2, 1, 8, 8))
    binary = [n for n in gm.graph.nodes
              if n.op == "call_module" and type(gm.get_submodule(n.target)).__name__ == "OnnxBinaryMathOperation"]
    assert len(binary) == 2  # Sub, Div
    buffers = dict(gm.named_buffers())
    for node in binary:
        constants = [a for a in node.args if isinstance(a, torch.fx.Node) and a.op == "get_attr"]
        assert len(constants) == 1 and constants[0].target in buffers
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(gm(x), reference(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, head", [("softmax", "Softmax"), ("logsoftmax", "LogSoftmax"), ("mlp", None)])
def test_trailing_softmax_is_stripped(name, head, tmp_path):
    gm, reference = _converted(name, tmp_path)
    normalize_graph(gm, torch.rand(2, 1, 8, 8))
    assert gm.meta["head"] == head
    assert not {"Softmax", "LogSoftmax", "OnnxSoftmaxV1V11"} & _module_kinds(gm)
    logits_model = reference[0] if head else reference
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(gm(x), logits_model(x), atol=1e-5, rtol=0)


def test_layers_and_their_buffers_are_kept(tmp_path):
    gm, reference = _converted("cnn_bn", tmp_path)
    normalize_graph(gm, torch.rand(2, 1, 8, 8))
    assert {"Conv2d", "BatchNorm2d", "ReLU", "Flatten", "Linear"} <= _module_kinds(gm)
    bn = next(m for m in gm.modules() if isinstance(m, nn.BatchNorm2d))
    torch.testing.assert_close(bn.running_var, reference[2].running_var)
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(gm(x), reference(x), atol=1e-5, rtol=0)


class _ClassToken(nn.Module):
    """ViT-style: a class token expanded to the batch size (a batch-dependent shape)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.token = nn.Parameter(torch.randn(1, 1, 4))
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)                     # [N, 64, 4]
        tokens = torch.cat([self.token.expand(x.shape[0], -1, -1), tokens], 1)  # [N, 65, 4]
        return self.fc(tokens.mean(1))


def test_batch_dependent_shape_computation_is_kept(tmp_path):
    torch.manual_seed(0)
    reference = _ClassToken().eval()
    path = onnx_factory.export(reference, tmp_path / "token.onnx", (1, 8, 8))
    gm = convert(onnx.load(str(path)))
    normalize_graph(gm, torch.rand(2, 1, 8, 8))
    assert "OnnxShape" in _module_kinds(gm)  # the Expand's shape depends on N: not folded
    for batch in (1, 2, 5):
        x = torch.rand(batch, 1, 8, 8)
        torch.testing.assert_close(gm(x), reference(x), atol=1e-5, rtol=0)


def test_unused_constants_are_dropped(tmp_path):
    gm, _ = _converted("shape_flatten", tmp_path)
    normalize_graph(gm, torch.rand(2, 1, 8, 8))
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    holders = {name for name, _ in gm.named_buffers() if "." not in name or name.startswith("initializers.")}
    assert holders <= read
