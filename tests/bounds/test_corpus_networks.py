"""Bounds on real networks from the corpus (issue 3): sound by sampling, ordered by method.

- VNN-COMP 2022 ``cifar_biasfield``: the network's input *is* the 16 bias-field
  coefficients (its first Gemm encodes ``x ⊙ basis`` and the normalisation); the box and
  the label come from the matching ``prop_*.vnnlib``; the affine set is the identity map
  on those 16 inputs, without clipping.
- Corpus CIFAR CNNs (plain, residual, all-conv, ResNet-20 with BatchNorm and
  GlobalAveragePool) under a multiplicative order-3 bias field on random images.

Graphs are imported with onnx2torch and normalised with ``robnet_svc.graph.normalize_graph``
(shape arithmetic folded, baked batch sizes generalised) - the path every import takes.
``rsip`` (full backward intermediate bounds, i.e. CROWN) is skipped on the deep all-conv
networks (VNN-COMP bias-field, cifar_biasfield_base) and ResNet-20: its cost there (one
backward pass per layer over every neuron; ~70 s of CPU on cifar_bias_field_0) is far
beyond a unit test. It runs on the two smaller CNNs.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest
import torch

from robnet_svc.bounds import compile_network
from robnet_svc.graph import normalize_graph
from robnet_svc.perturbations import DenseAffineSet
from robnet_svc.perturbations.bias_field import BiasField
from robnet_svc.plugins import load_registry

from .strategies import check_order, check_sound, sampled_margins

CORPUS = Path(__file__).resolve().parents[2] / ".." / "shared" / "corpus"
if not CORPUS.is_dir():
    pytest.skip(f"shared corpus not found at {CORPUS}", allow_module_level=True)

onnx = pytest.importorskip("onnx")
onnx2torch = pytest.importorskip("onnx2torch")

ALL_METHODS = ("ibp", "ssip", "rsip-ibp", "rsip-ssip", "rsip")
CHEAP_METHODS = ("ibp", "ssip", "rsip-ibp", "rsip-ssip")


def load_graph(path: Path, example: torch.Tensor) -> torch.fx.GraphModule:
    """onnx2torch import of a (possibly gzipped) corpus ONNX file, normalised, eval mode."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    gm = onnx2torch.convert(onnx.load_from_string(data))
    return normalize_graph(gm, example).eval()


def read_vnnlib(path: Path) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Input box (lower ``[n]``, upper ``[n]``) and label of a simple VNN-COMP property:
    ``(assert (<= X_i v))`` / ``(assert (>= X_i v))`` lines; unsafe if ``Y_j >= Y_label``."""
    text = path.read_text()
    bounds: dict[str, dict[int, float]] = {"<=": {}, ">=": {}}
    for op, index, value in re.findall(r"\(assert \((<=|>=) X_(\d+) ([-+0-9.eE]+)\)\)", text):
        bounds[op][int(index)] = float(value)
    n = len(bounds["<="])
    assert sorted(bounds["<="]) == sorted(bounds[">="]) == list(range(n)), f"{path}: incomplete input box"
    labels = {int(y) for y in re.findall(r"\(>= Y_\d+ Y_(\d+)\)", text)}
    assert len(labels) == 1, f"{path}: expected one label, got {labels}"
    lower = torch.tensor([bounds[">="][i] for i in range(n)])
    upper = torch.tensor([bounds["<="][i] for i in range(n)])
    return lower, upper, labels.pop()


def _bounds(net, aset, labels, methods) -> dict[str, torch.Tensor]:
    registry = load_registry()
    out = {}
    for name in methods:
        with torch.no_grad():
            lower = registry.bound_method(name)().margin_lower(net, aset, labels)
        assert lower.shape == (aset.batch_size, 9) and torch.isfinite(lower).all(), f"{name}: {lower}"
        out[name] = lower
    return out


@pytest.mark.parametrize("index, expected_label", [(0, 0), (1, 6)])
def test_vnncomp_bias_field_network(index, expected_label):
    folder = CORPUS / "vnncomp_biasfield"
    lower, upper, label = read_vnnlib(folder / f"prop_{index}.vnnlib")
    assert label == expected_label and lower.shape == (16,)
    assert torch.allclose(upper[15] - lower[15], torch.tensor(0.12)) and (upper[:15] - lower[:15] < 0.01).all()
    gm = load_graph(folder / f"cifar_bias_field_{index}.onnx", torch.zeros(1, 16))
    # the network's input is the coefficient vector itself: W = I, c = 0, no clipping
    nominal = torch.zeros(1, 16)
    nominal[0, 15] = 1.0
    aset = DenseAffineSet(torch.eye(16).unsqueeze(0), torch.zeros(1, 16), lower.unsqueeze(0),
                          upper.unsqueeze(0), nominal, clip=None)
    labels = torch.tensor([label])
    clean = gm(nominal)
    assert clean.argmax(1).item() == label, "the property is stated for a correctly classified image"
    bounds = _bounds(compile_network(gm), aset, labels, CHEAP_METHODS)
    context = f"cifar_bias_field_{index} / prop_{index}"
    check_sound(bounds, sampled_margins(gm, aset, labels, 1000), context)
    check_order(bounds, context)


# file, sampled coefficient vectors per image, methods
CNNS = [
    ("onnx/vnn21_oval21_cifar_base_kw.onnx", 1000, ALL_METHODS),
    ("onnx/vnn21_cifar10_resnet_2b.onnx", 1000, ALL_METHODS),
    ("onnx/vnn22_cifar_biasfield_base.onnx.gz", 300, CHEAP_METHODS),
    ("onnx/ext_onnc_resnet20_cifar.onnx", 300, CHEAP_METHODS),
]


@pytest.mark.parametrize("name, samples, methods", CNNS, ids=[c[0].split("/")[1].split(".")[0] for c in CNNS])
def test_corpus_cnn_under_bias_field(name, samples, methods):
    gm = load_graph(CORPUS / name, torch.zeros(1, 3, 32, 32))
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        labels = gm(images).argmax(1)  # bound the predicted class: the margins of interest
    aset = BiasField(0.02, order=3, mode="mult").affine_set(images)
    bounds = _bounds(compile_network(gm), aset, labels, methods)
    context = f"{name}, bias-field mult order 3, eps 0.02"
    check_sound(bounds, sampled_margins(gm, aset, labels, samples), context)
    check_order(bounds, context)


def test_corpus_sigmoid_mlp_under_bias_field():
    """ERAN's 6x200 Sigmoid MLP (flat 784 input, viewed as 1x28x28): every method, sound by sampling."""
    from robnet_svc.onnx_io import load_model

    module = load_model(CORPUS / "onnx/vnn21_eran_ffnnSIGMOID__Point_6x200.onnx", image_shape="1x28x28").module
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 1, 28, 28, generator=gen)
    with torch.no_grad():
        labels = module(images).argmax(1)
    aset = BiasField(0.05, order=3, mode="mult").affine_set(images)
    bounds = _bounds(compile_network(module), aset, labels, ALL_METHODS)
    context = "vnn21_eran_ffnnSIGMOID__Point_6x200, bias-field mult order 3, eps 0.05"
    check_sound(bounds, sampled_margins(module, aset, labels, 1000), context)
    check_order(bounds, context)
    assert (bounds["rsip"] > 0).any(), "nothing certified at eps 0.05"
