"""Bound a VNN-COMP instance (ONNX network + VNN-LIB property) with robnet-svc's engine.

The property's input box is the perturbation set itself: an affine set whose map is the
identity on the network input (``W = I``, no clipping), so every bound method applies as
it does to images (the bias-field benchmark's networks take the 16 field coefficients as
their input; robnet-svc's own exports take the coefficients too). Networks with a flat
input are viewed as images ``n x 1 x 1``; image inputs keep their ``C x H x W`` (NHWC inputs
are permuted like ``load_model`` does, so ``X_i`` still indexes the ONNX input in row-major
order).

Per method the verdict is

- ``verified``: every margin lower bound ``Y_label - Y_j`` (``j`` in the property's
  disjunction) exceeds its rounding allowance over the whole box (the unsafe region is empty:
  VNN-COMP "unsat"). The bounds are computed exactly as certification computes them: in float64
  under ``full_precision()``, with the allowance of ``robnet_svc.rounding`` for a network run in
  its own (float32) precision, so a verdict here and a certificate's flag follow one rule;
- ``falsified-by-attack``: the attack (``robnet_svc.certify.attack_margin``, restricted to the
  property's classes) found a point of the box where some ``Y_j >= Y_label`` ("sat");
- ``unknown``: neither.

A property both verified and falsified is a bug: SoundnessError.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from robnet_svc.certify import BOUND_DTYPE, AttackSettings, attack_margin
from robnet_svc.errors import RobnetError, SoundnessError
from robnet_svc.perturbations.base import AffineSet, DenseAffineSet, IdentityAffineSet
from robnet_svc.precision import full_precision
from robnet_svc.progress import SILENT, Reporter
from robnet_svc.rounding import margin_allowance
from robnet_svc.vnnlib import Property, read_property

#: Inputs up to this many get a dense identity map (all methods, ssip included); more: IdentityAffineSet.
MAX_DENSE_INPUTS = 256


@dataclass
class MethodResult:
    method: str
    verdict: str                      # "verified" | "falsified-by-attack" | "unknown"
    margin_lower: list[float]         # Y_label - Y_j for j in the property's targets
    seconds: float


@dataclass
class InstanceResult:
    onnx: str
    vnnlib: str
    label: int
    targets: list[int]
    attack_margin: float              # smallest Y_label - max_j Y_j found (< 0: falsified)
    methods: list[MethodResult] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"onnx": self.onnx, "vnnlib": self.vnnlib, "label": self.label, "targets": self.targets,
                "attack_margin": self.attack_margin,
                "methods": [vars(m) for m in self.methods]}


def _float_box(prop: Property, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The box in ``dtype``, rounded outwards so it contains the property's (float64) box."""
    lo = torch.from_numpy(prop.lower)
    hi = torch.from_numpy(prop.upper)
    lo_t, hi_t = lo.to(dtype), hi.to(dtype)
    lo_t = torch.where(lo_t.double() > lo, torch.nextafter(lo_t, torch.full_like(lo_t, -np.inf)), lo_t)
    hi_t = torch.where(hi_t.double() < hi, torch.nextafter(hi_t, torch.full_like(hi_t, np.inf)), hi_t)
    return lo_t, hi_t


def input_set(prop: Property, imported) -> AffineSet:
    """The property's box as an affine set on ``imported``'s image view (identity map, no clip)."""
    n = prop.num_inputs
    size = int(np.prod(imported.input_shape))
    if n != size:
        raise RobnetError(f"{prop.path} bounds {n} inputs X_i but network {imported.path} has "
                          f"{size} inputs per sample ({'x'.join(map(str, imported.input_shape))})")
    if prop.num_outputs != imported.num_classes:
        raise RobnetError(f"{prop.path} declares {prop.num_outputs} outputs Y_i but network {imported.path} "
                          f"has {imported.num_classes}")
    dtype = torch.from_numpy(np.zeros(0, imported.input_dtype)).dtype
    lower, upper = _float_box(prop, dtype)
    image = tuple(imported.image_shape)
    if imported.layout == "NHWC":  # X_i index the ONNX input [H, W, C]; the module takes CHW images
        lower, upper = (t.reshape(*imported.input_shape).permute(2, 0, 1).reshape(-1) for t in (lower, upper))
    lower, upper = lower.unsqueeze(0), upper.unsqueeze(0)
    nominal = (lower + upper) / 2
    if n <= MAX_DENSE_INPUTS:
        weights = torch.eye(n, dtype=dtype).reshape(1, n, *image)
        return DenseAffineSet(weights, torch.zeros(1, *image, dtype=dtype), lower, upper, nominal, clip=None)
    aset = IdentityAffineSet(torch.zeros(1, *image, dtype=dtype), lower, upper, clip=None)
    aset.nominal = nominal  # the attack starts here: it must lie in the box
    return aset


def load_network(path: str | Path):
    """``load_model`` of a VNN-COMP network: a flat input is viewed as an ``n x 1 x 1`` image."""
    from robnet_svc.onnx_io import load_model, read_onnx
    from robnet_svc.onnx_io.base import dims as _dims
    from robnet_svc.onnx_io.read import signature as _signature

    model, _sha = read_onnx(path)
    input_info, _output = _signature(model, Path(path))
    per_sample = _dims(input_info)[1:]
    image_shape = None
    if len(per_sample) != 3 and all(isinstance(d, int) and d > 0 for d in per_sample):
        image_shape = (int(np.prod(per_sample)), 1, 1)
    return load_model(path, image_shape=image_shape)


class _Restricted(nn.Module):
    """Logits with the classes outside the property replaced by ``logit_label - 1``, so the
    attack's margin only counts the property's classes."""

    def __init__(self, module: nn.Module, label: int, targets: list[int], num_classes: int):
        super().__init__()
        self.module, self.label = module, label
        keep = torch.zeros(num_classes, dtype=torch.bool)
        keep[targets] = True
        keep[label] = True
        self.register_buffer("keep", keep)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.module(x)
        return torch.where(self.keep, logits, logits[:, self.label:self.label + 1] - 1.0)


def verify_instance(onnx_path: str | Path, vnnlib_path: str | Path, methods: list[str], *,
                    attack: AttackSettings = AttackSettings(), device: str | torch.device = "cpu",
                    reporter: Reporter = SILENT) -> InstanceResult:
    """Bound the property with each method in ``methods`` and attack it once (see module docstring);
    ``reporter`` gets one log line per method."""
    from robnet_svc.bounder import network_copy
    from robnet_svc.bounds import compile_network
    from robnet_svc.plugins import load_registry

    prop = read_property(vnnlib_path)
    imported = load_network(onnx_path)
    registry = load_registry()
    bound_methods = [registry.bound_method(name)() for name in methods]
    aset = input_set(prop, imported)
    if not aset.supports_dense:
        for method in bound_methods:
            if getattr(method, "needs_dense", False):
                raise RobnetError(f"method {method.name!r} needs a small input box; {onnx_path} has "
                                  f"{prop.num_inputs} inputs (> {MAX_DENSE_INPUTS}): use ibp, rsip-ibp or rsip")
    from robnet_svc.pipeline import _device

    device = _device(str(device))
    aset = _to(aset, device)
    module = imported.module.to(device).eval()
    net = compile_network(module, rules=registry.rules())
    labels = torch.tensor([prop.label], device=device)
    others = [i for i in range(prop.num_outputs) if i != prop.label]
    columns = [others.index(j) for j in prop.targets]
    found, _flipped = attack_margin(_Restricted(module, prop.label, prop.targets, prop.num_outputs).to(device),
                                    aset, labels, attack, torch.zeros(1, dtype=torch.int64))
    result = InstanceResult(str(onnx_path), str(vnnlib_path), prop.label, prop.targets, float(found[0]))
    deployed = next((p.dtype for p in module.parameters() if p.is_floating_point()), aset.lower.dtype)
    aset64 = _to(aset, device, BOUND_DTYPE)
    with torch.no_grad(), full_precision():  # the same for every method: computed once
        net64 = network_copy(net, BOUND_DTYPE)
        allowance = margin_allowance(net64, aset64, labels, deployed)[0, columns].cpu().numpy()
    for method in bound_methods:
        start = time.perf_counter()
        with torch.no_grad(), full_precision():
            lower = method.margin_lower(net64, aset64, labels)[0, columns].cpu().numpy()
        verified = bool((lower > allowance).all())
        falsified = result.attack_margin <= 0
        if verified and falsified:
            raise SoundnessError(f"{vnnlib_path} on {onnx_path}: {method.name} proves every margin > 0 "
                                 f"(smallest {lower.min():.6g}) but the attack found margin "
                                 f"{result.attack_margin:.6g}: the bound method is unsound; please report this bug")
        verdict = "verified" if verified else "falsified-by-attack" if falsified else "unknown"
        result.methods.append(MethodResult(method.name, verdict, [float(v) for v in lower],
                                           time.perf_counter() - start))
        reporter.log(f"{Path(vnnlib_path).name} on {Path(onnx_path).name}: {method.name} {verdict} "
                     f"(smallest margin lower bound {lower.min():.4g}, {result.methods[-1].seconds:.1f} s)")
    return result


def _to(aset: AffineSet, device: torch.device, dtype: torch.dtype | None = None) -> AffineSet:
    """``aset`` on ``device`` (and in ``dtype``: exact, since the box is widened to float64)."""
    def move(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype or t.dtype)

    if isinstance(aset, DenseAffineSet):
        return DenseAffineSet(move(aset.weights), move(aset.offset), move(aset.lower), move(aset.upper),
                              move(aset.nominal), clip=aset.clip)
    moved = IdentityAffineSet(move(aset.offset), move(aset.lower), move(aset.upper), clip=aset.clip)
    moved.nominal = move(aset.nominal)
    return moved
