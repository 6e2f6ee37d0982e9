"""Certification (SPEC §5): bound method + coefficient attack -> per-sample certificates.

For each test sample ``x`` with label ``y`` and its perturbation set
``{clip(W_x a + c_x) : a in box}``:

- ``margin_lower [K-1]``: the bound method's lower bounds of ``logit_y - logit_i``
  (``i != y``, increasing ``i``) over the whole set;
- ``certified``: the clean prediction is ``y`` and every margin lower bound is ``> 0``;
- ``attack_margin``: the smallest ``logit_y - max_{i != y} logit_i`` the attack found
  (projected sign-gradient steps on the coefficients from the nominal point, random
  starts and random corners, plus every box corner when ``k`` is small); the attack's
  images go through the same clipping as the bounds;
- ``attack_success``: ``attack_margin < 0`` (a perturbation that changes the prediction,
  or a clean misclassification: the nominal point is always tried).

A sample that is certified and successfully attacked contradicts its own certificate:
``check_soundness`` raises ``SoundnessError`` naming it. Never reported, always raised.

Determinism: the network is in eval mode and the attack's random starts of a sample come
from a generator seeded with ``(seed, sample id)`` (its position in the test split), so a
sample gets the same attack however the test set is batched or sharded across processes;
the same settings give the same flags, bit for bit, on the same device and batching, and
the same flags up to floating-point noise otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from robnet_svc.certificates import Certificates
from robnet_svc.errors import SoundnessError

#: Every box corner is tried as an attack start when the perturbation has at most this many coefficients.
MAX_CORNER_COEFFS = 6


@dataclass(frozen=True)
class AttackSettings:
    """Projected-gradient attack on the perturbation coefficients."""

    steps: int = 10
    restarts: int = 8  # random starts per sample (a quarter of them random corners), besides the nominal point
    seed: int = 0


def margins(logits: Tensor, labels: Tensor) -> Tensor:
    """``logit_y - max_{i != y} logit_i``: logits ``[..., K]``, labels broadcastable to ``[...]`` -> ``[...]``."""
    labels = labels.expand(logits.shape[:-1])
    true = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, labels.unsqueeze(-1), float("-inf"))
    return true - others.max(-1).values


def box_corners(lower: Tensor, upper: Tensor) -> Tensor:
    """All ``2^k`` corners of each box: lower, upper ``[B, k]`` -> ``[B, 2^k, k]``."""
    k = lower.shape[1]
    bits = (torch.arange(2 ** k, device=lower.device).unsqueeze(1) >> torch.arange(k, device=lower.device)) & 1
    bits = bits.to(lower.dtype)  # [2^k, k]
    return lower.unsqueeze(1) + bits * (upper - lower).unsqueeze(1)


def random_starts(sample_ids: Tensor, restarts: int, k: int, seed: int, dtype: torch.dtype) -> Tensor:
    """Uniform ``[B, restarts, k]`` in [0, 1): row ``b`` from a CPU generator seeded with
    ``(seed, sample_ids[b])``, so it depends on the sample, not on its batch or process."""
    rows = [torch.rand(restarts, k, dtype=dtype, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
            for i in sample_ids.tolist()]  # B tiny draws; the bounds and attack below dominate
    return torch.stack(rows) if rows else torch.zeros(0, restarts, k, dtype=dtype)


def attack_margin(module: nn.Module, aset, labels: Tensor, settings: AttackSettings,
                  sample_ids: Tensor) -> Tensor:
    """Smallest margin the attack finds for each sample: ``[B]``.

    ``aset``: the samples' ``AffineSet`` (``B`` samples, ``k`` coefficients); ``sample_ids``
    ``[B]`` int: the samples' ids, which seed their random starts (drawn on CPU, so results
    do not depend on the device).
    """
    lower, upper = aset.lower.detach(), aset.upper.detach()
    b, k = lower.shape
    u = random_starts(sample_ids, settings.restarts, k, settings.seed, lower.dtype).to(lower.device)
    u[:, : settings.restarts // 4] = (u[:, : settings.restarts // 4] > 0.5).to(u.dtype)  # random corners
    starts = [aset.nominal.detach().unsqueeze(1), lower.unsqueeze(1) + u * (upper - lower).unsqueeze(1)]
    if k <= MAX_CORNER_COEFFS:
        starts.append(box_corners(lower, upper))
    coeffs = torch.cat(starts, dim=1)  # [B, R, k]

    lo, hi = lower.unsqueeze(1), upper.unsqueeze(1)
    step = (hi - lo) * (1.25 / max(settings.steps, 1))  # PGD step: 2.5 x half-width / steps
    best = torch.full((b,), float("inf"), dtype=lower.dtype, device=lower.device)

    def evaluate(c: Tensor) -> Tensor:
        images = aset.clipped(aset.images(c))  # [B, R, C, H, W]
        logits = module(images.reshape(-1, *images.shape[2:])).reshape(b, c.shape[1], -1)
        return margins(logits, labels.unsqueeze(1))  # [B, R]

    for _ in range(settings.steps):
        coeffs = coeffs.detach().requires_grad_(True)
        with torch.enable_grad():
            found = evaluate(coeffs)
            (grad,) = torch.autograd.grad(found.sum(), coeffs)
        best = torch.minimum(best, found.detach().min(1).values)
        coeffs = torch.maximum(torch.minimum(coeffs.detach() - step * grad.sign(), hi), lo)
    with torch.no_grad():
        best = torch.minimum(best, evaluate(coeffs).min(1).values)
    return best


def certify_model(module: nn.Module, net, method, perturbation, images: Tensor, labels: Tensor, *,
                  batch_size: int, attack: AttackSettings, device: torch.device,
                  sample_ids: Tensor | None = None,
                  on_batch: Callable[[int], None] | None = None) -> Certificates:
    """Certify ``images [N, C, H, W]`` with labels ``[N]`` and attack them.

    ``sample_ids [N]`` int64: the samples' ids (seeds of their attacks; default ``0..N-1``),
    also the returned ``index``.
    ``module``: the classifier (put in eval mode here); ``net``: its compiled form for the
    bound ``method``; ``perturbation``: a ``Perturbation`` at the certification radius.
    ``on_batch(n, certified)`` is called after each batch of ``n`` samples, ``certified`` of them
    certified (progress).
    Raises SoundnessError when a certified sample is successfully attacked.
    """
    module.eval()
    ids = torch.arange(images.shape[0]) if sample_ids is None else torch.as_tensor(sample_ids).cpu()
    out: dict[str, list[Tensor]] = {f: [] for f in Certificates.FIELDS if f != "index"}
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device)
        aset = perturbation.affine_set(x)
        with torch.no_grad():
            prediction = module(x).argmax(-1)
            margin_lower = method.margin_lower(net, aset, y)
        found = attack_margin(module, aset, y, attack, ids[start:start + batch_size])
        out["label"].append(y)
        out["prediction"].append(prediction)
        out["certified"].append((prediction == y) & (margin_lower > 0).all(-1))
        out["margin_lower"].append(margin_lower)
        out["attack_success"].append(found < 0)
        out["attack_margin"].append(found)
        if on_batch is not None:
            on_batch(x.shape[0], int(out["certified"][-1].sum()))
    if not out["label"]:  # an empty shard of a distributed run (margin_lower's width unknown: 0)
        return Certificates(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool),
                            np.zeros((0, 0), np.float32), np.zeros(0, bool), np.zeros(0, np.float32))
    arrays = {f: torch.cat(v).detach().cpu().numpy() for f, v in out.items()}
    certs = Certificates(
        index=ids.numpy().astype(np.int64),
        label=arrays["label"].astype(np.int64),
        prediction=arrays["prediction"].astype(np.int64),
        certified=arrays["certified"].astype(bool),
        margin_lower=arrays["margin_lower"].astype(np.float32).reshape(images.shape[0], -1),
        attack_success=arrays["attack_success"].astype(bool),
        attack_margin=arrays["attack_margin"].astype(np.float32),
    )
    check_soundness(certs, method_name=getattr(method, "name", "?"))
    return certs


def check_soundness(certs: Certificates, method_name: str) -> None:
    """Raise SoundnessError if any sample is both certified and successfully attacked."""
    broken = np.flatnonzero(certs.certified & certs.attack_success)
    if broken.size:
        i = int(broken[0])
        raise SoundnessError(
            f"sample {int(certs.index[i])} (label {int(certs.label[i])}) is certified by {method_name} "
            f"(smallest margin lower bound {float(certs.margin_lower[i].min()):.6g}) but the attack found a "
            f"perturbation with margin {float(certs.attack_margin[i]):.6g} ({broken.size} such sample(s)): "
            "the bound method is unsound; please report this as a bug"
        )
