"""Certification (SPEC §5): bound method + coefficient attack -> per-sample certificates.

For each test sample ``x`` with label ``y`` and its perturbation set
``{clip(W_x a + c_x) : a in box}``:

- ``margin_lower [K-1]``: the bound method's lower bounds of ``logit_y - logit_i``
  (``i != y``, increasing ``i``) over the whole set, computed in float64 (network and set
  converted exactly from the model's float32) under ``full_precision()`` (no TF32);
- ``rounding_allowance [K-1]``: how far the deployed model's floating-point margins may be
  from the exact ones anywhere in the set (``robnet_svc.rounding``, from the magnitudes of
  the values the network computes);
- ``certified``: the clean prediction is ``y`` and every margin lower bound exceeds its
  rounding allowance (``margin_lower > rounding_allowance``, strictly): the deployed model's
  own margins are then ``> 0`` everywhere, so argmax is ``y`` whatever its tie-breaking;
- ``attack_margin``: the smallest ``logit_y - max_{i != y} logit_i`` the attack found
  (projected sign-gradient steps on the coefficients from the nominal point, random
  starts and random corners, plus every box corner when ``k`` is small); the attack's
  images go through the same clipping as the bounds and the model runs in its own precision;
- ``attack_success``: some point the attack evaluated is predicted as another class than
  ``y`` by argmax with the prediction's tie rule (the lowest index among equal logits), so a
  tie with a lower class counts as a success although its margin is 0 (a clean
  misclassification is one too: the nominal point is always tried).

A sample that is certified and successfully attacked contradicts its own certificate:
``check_soundness`` raises ``SoundnessError`` naming it. Never reported, always raised.

Also stored: ``attack_coeffs``, the coefficients of the attack's best point (pictures).
With ``RadiusSettings`` (``--radius``), per sample: ``radius``, the largest ε up to a
maximum at which the sample is certified, and ``attack_radius``, the smallest ε at which
the attack broke it, both by batched bisection over ε (``radii``); an attack radius at or
below the certified radius is a ``SoundnessError`` too (``check_radius_soundness``).

Determinism: the network is in eval mode and the attack's random starts of a sample come
from a generator seeded with ``(seed, sample id)`` (its position in the test split), so a
sample gets the same attack however the test set is batched or sharded across processes;
the same settings give the same flags, bit for bit, on the same device and batching, and
the same flags up to floating-point noise otherwise.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from robnet_svc.certificates import Certificates
from robnet_svc.errors import RobnetError, SoundnessError
from robnet_svc.options import default
from robnet_svc.precision import full_precision
from robnet_svc.progress import SILENT, Reporter
from robnet_svc.rounding import margin_allowance

#: The dtype of every bound pass of certification (the deployed model's float32 converts exactly).
BOUND_DTYPE = torch.float64
#: The decision rule, as recorded in the certificate's provenance.
CERTIFIED_RULE = ("prediction == label and margin_lower > rounding_allowance for every other class "
                  "(bounds in float64, no TF32; allowance: float forward error bound from the set's magnitudes, "
                  "SSIP-tightened for ssip, rsip-ssip and rsip, docs/method.md)")

#: Every box corner is tried as an attack start when the perturbation has at most this many coefficients.
MAX_CORNER_COEFFS = 6


@dataclass(frozen=True)
class AttackSettings:
    """Projected-gradient attack on the perturbation coefficients."""

    steps: int = default("attack_steps")
    restarts: int = default("attack_restarts")  # random starts per sample (a quarter random corners), besides the nominal point
    seed: int = default("seed")


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
                  sample_ids: Tensor, return_point: bool = False) -> tuple[Tensor, ...]:
    """Smallest margin the attack finds for each sample and whether it changed the prediction:
    ``([B] margins, [B] bool)``; with ``return_point`` also the coefficients ``[B, k]`` of the
    point where it found the smallest margin. Success means that at some evaluated point
    ``argmax`` (ties to the lowest index, as the prediction) is not the label: a tie with a
    lower class is one.

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
    flipped = torch.zeros(b, dtype=torch.bool, device=lower.device)
    best_point = aset.nominal.detach().clone()
    rows = torch.arange(b, device=lower.device)

    def keep(found: Tensor, points: Tensor) -> Tensor:
        """``best`` lowered by the margins ``found [B, R]`` of ``points [B, R, k]``; ``best_point`` follows."""
        nonlocal best_point
        low, where = found.min(1)
        better = low < best
        best_point = torch.where(better.unsqueeze(1), points[rows, where], best_point)
        return torch.where(better, low, best)

    def evaluate(c: Tensor) -> tuple[Tensor, Tensor]:
        images = aset.clipped(aset.images(c))  # [B, R, C, H, W]
        logits = module(images.reshape(-1, *images.shape[2:])).reshape(b, c.shape[1], -1)
        changed = (logits.detach().argmax(-1) != labels.unsqueeze(1)).any(1)  # argmax: first maximal index
        return margins(logits, labels.unsqueeze(1)), changed  # [B, R], [B]

    for _ in range(settings.steps):
        coeffs = coeffs.detach().requires_grad_(True)
        with torch.enable_grad():
            found, changed = evaluate(coeffs)
            (grad,) = torch.autograd.grad(found.sum(), coeffs)
        best = keep(found.detach(), coeffs.detach())
        flipped |= changed
        coeffs = torch.maximum(torch.minimum(coeffs.detach() - step * grad.sign(), hi), lo)
    with torch.no_grad():
        found, changed = evaluate(coeffs)
        best = keep(found, coeffs)
    flipped |= changed
    return (best, flipped, best_point) if return_point else (best, flipped)


def _symbolic(bounder) -> bool:
    """Whether the allowance takes its magnitudes from SSIP ∩ IBP intervals rather than IBP alone:
    for the methods that run the symbolic pass anyway (``needs_dense``: ``ssip``, ``rsip-ssip``),
    at most doubling their cost, and for full CROWN (``rsip``), next to which the pass is cheap.
    IBP magnitudes of a network trained with symbolic bounds can be an order of magnitude above
    its real ranges, and the allowance with them (docs/method.md §5, docs/results.md). ``ibp``
    and ``rsip-ibp``, chosen for speed, keep the interval magnitudes."""
    method = bounder.method
    return bool(getattr(method, "needs_dense", False) or getattr(method, "intermediate", None) == "backward")


def is_certified(prediction: Tensor, labels: Tensor, margin_lower: Tensor, allowance: Tensor) -> Tensor:
    """The certified decision ``[B]`` (``CERTIFIED_RULE``): the clean prediction is the label and
    every margin lower bound exceeds its rounding allowance."""
    return (prediction == labels) & (margin_lower > allowance).all(-1)


# --------------------------------------------------------------------------- certified radius


@dataclass(frozen=True)
class RadiusSettings:
    """Per-sample radius search on ``[0, max]`` by bisection to ``precision`` (absolute, in ε)."""

    max: float
    precision: float

    @property
    def rounds(self) -> int:
        """Bisection rounds that shrink an interval of width ``max`` to ``precision`` or less."""
        return max(0, math.ceil(math.log2(self.max / self.precision)))


def scaled_set(aset, scale: Tensor):
    """The same set with each sample's coefficient box scaled about its nominal point by
    ``scale [B]``: ``nominal + scale_b * (box_b - nominal)``; the transform is shared.

    For a perturbation whose box grows linearly with ε about its nominal point and whose
    transform does not depend on ε (every built-in one; ``check_radius_support`` checks it),
    this is the perturbation's own set at ``ε_b = scale_b * ε`` of ``aset``, widened by a few
    ulps so that float rounding cannot make it the smaller one.
    """
    out = copy.copy(aset)
    s = scale.to(aset.lower.dtype).unsqueeze(1)
    low, high = (aset.lower - aset.nominal) * s, (aset.upper - aset.nominal) * s
    # Scaling rounds differently from the perturbation's own arithmetic at that ε (a few ulps):
    # widen by a few ulps so the searched box contains the perturbation's own one.
    slack = 4 * torch.finfo(aset.lower.dtype).eps * (aset.nominal.abs() + torch.maximum(low.abs(), high.abs()))
    out.lower = aset.nominal + low - slack
    out.upper = aset.nominal + high + slack
    return out


def check_radius_support(perturbation, probe: Tensor, settings: RadiusSettings) -> None:
    """RobnetError unless ``scaled_set`` reproduces ``perturbation``'s own sets on ``probe``
    ``[B, C, H, W]`` at a few ε in ``(0, max)``: the per-sample radius search relies on it."""
    reference = perturbation.affine_set(probe, eps=settings.max)
    points = reference.sample(4, generator=torch.Generator().manual_seed(0)).to(probe.device)
    for fraction in (0.125, 0.5, 0.75):
        own = perturbation.affine_set(probe, eps=settings.max * fraction)
        mine = scaled_set(reference, torch.full((probe.shape[0],), fraction, dtype=torch.float64))
        same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in (
            (own.lower, mine.lower), (own.upper, mine.upper), (own.nominal, mine.nominal),
            (own.images(points), reference.images(points))))
        if not same:
            raise RobnetError(f"--radius: the box of perturbation {getattr(perturbation, 'name', '?')!r} does not "
                              "grow linearly with eps about its nominal point (or its transform depends on eps), "
                              "so per-sample radii cannot be searched in one batch; certify at fixed --eps values")


def certified_radius(bounder, aset, labels: Tensor, prediction: Tensor, known: Tensor,
                     settings: RadiusSettings, deployed: torch.dtype) -> Tensor:
    """Largest ε ≤ ``settings.max`` at which each sample is certified, to ``settings.precision``: ``[B]`` float64.

    ``bounder``/``aset``: the ``Bounder`` on the network in the bound dtype and the samples' set
    at ε = ``settings.max`` in that dtype (``deployed``: the model's own dtype, for the rounding
    allowance); ``prediction [B]``: the clean prediction
    (the radius of a misclassified sample is 0); ``known [B]``: an ε already certified (0 if none).
    Each round takes the certified decision of fixed-ε certification (``is_certified``).
    Bisection, batched: the set at ``max`` first, then ``settings.rounds`` rounds, each one
    bound pass over the whole batch at per-sample ε (``scaled_set``). The result is always an
    ε at which the sample was certified (or ``known``, or 0); the sets are nested, so the
    sample is certified robust for every ε up to it. The bound methods are not all monotone
    in ε (CROWN's relaxations change with the box), so a sample may in rare cases certify
    above the bracket it was not certified in.
    """
    top = torch.full_like(known, settings.max)
    correct = prediction == labels

    def certified_at(eps: Tensor) -> Tensor:
        scaled = scaled_set(aset, eps / settings.max)
        with torch.no_grad():
            margin = bounder.margin_lower_over(scaled, labels)
            allowance = margin_allowance(bounder.net, scaled, labels, deployed, symbolic=_symbolic(bounder))
        return is_certified(prediction, labels, margin, allowance)

    at_max = certified_at(top)
    lo, hi = torch.where(at_max, top, known), top
    for _ in range(settings.rounds):
        mid = (lo + hi) / 2
        ok = certified_at(mid) | at_max
        lo, hi = torch.where(ok, torch.maximum(lo, mid), lo), torch.where(ok, hi, mid)
    return torch.where(correct, lo, torch.zeros_like(lo))


def attack_radius(module: nn.Module, aset, labels: Tensor, known: Tensor, settings: RadiusSettings,
                  attack: AttackSettings, sample_ids: Tensor) -> Tensor:
    """Smallest ε ≤ ``settings.max`` at which the attack changed each sample's prediction: ``[B]``
    float64, ``inf`` where it succeeded nowhere up to ``max``; 0 for a clean misclassification.

    An empirical upper estimate of the true robust radius (the sets are nested, so the
    perturbation found at that ε breaks every larger one). ``known [B]``: an ε ≤ ``max``
    where the attack already succeeded (``inf`` if none). Bisection like ``certified_radius``,
    one attack over the whole batch per round.
    """
    top = torch.full_like(known, settings.max)

    def succeeded_at(eps: Tensor) -> Tensor:
        return attack_margin(module, scaled_set(aset, eps / settings.max), labels, attack, sample_ids)[1]

    broken = torch.isfinite(known)
    hi = torch.where(broken, known, top)
    broken = broken | succeeded_at(top)
    lo = torch.zeros_like(known)
    for _ in range(settings.rounds):
        mid = (lo + hi) / 2
        ok = succeeded_at(mid) & broken
        lo, hi = torch.where(ok, lo, mid), torch.where(ok, mid, hi)
    return torch.where(broken, hi, torch.full_like(hi, float("inf")))


def radii(module: nn.Module, bounder, x: Tensor, y: Tensor, prediction: Tensor,
          certified: Tensor, broken: Tensor, settings: RadiusSettings, attack: AttackSettings,
          sample_ids: Tensor, deployed: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(certified_radius, attack_radius)`` ``[B]`` of one batch, seeded with what certification at
    the fixed ε (``perturbation.eps``) found (``certified``, ``broken`` [B] bool): certified there ->
    radius ≥ min(ε, max); broken there and ε ≤ max -> attack radius ≤ ε. ``bounder``: on the
    network in the bound dtype (the set is built in it); ``module``: the model as deployed."""
    perturbation = bounder.perturbation
    eps = float(perturbation.eps)
    aset = perturbation.affine_set(x, eps=settings.max)
    aset_bound = perturbation.affine_set(x.to(BOUND_DTYPE), eps=settings.max)
    correct = prediction == y
    zeros = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    known_cert = torch.where(certified, zeros + min(eps, settings.max), zeros)
    known_attack = torch.where(broken & (eps <= settings.max), zeros + eps, zeros + float("inf"))
    radius = certified_radius(bounder, aset_bound, y, prediction, known_cert, settings, deployed)
    upper = attack_radius(module, aset, y, torch.where(correct, known_attack, zeros), settings, attack, sample_ids)
    return radius, upper


def certify_model(bounder, images: Tensor, labels: Tensor, *,
                  batch_size: int, attack: AttackSettings, device: torch.device,
                  sample_ids: Tensor | None = None, radius: "RadiusSettings | None" = None,
                  reporter: Reporter = SILENT, description: str = "certify") -> Certificates:
    """Certify ``images [N, C, H, W]`` with labels ``[N]`` and attack them.

    ``sample_ids [N]`` int64: the samples' ids (seeds of their attacks; default ``0..N-1``),
    also the returned ``index``.
    ``bounder``: a ``robnet_svc.bounder.Bounder`` of the classifier, the certification method
    and the perturbation at the certification radius. The classifier (``bounder.module``) is
    put in eval mode here; it and the images keep their dtype for the prediction and the
    attack (the deployed precision); the bounds are computed on a float64 copy
    (``bounder.bound_copy``). Everything runs under ``full_precision()`` (no TF32).
    ``radius``: also compute each sample's certified radius and the attack's smallest
    successful radius (``radii``; about ``2 + radius.rounds`` times the work of one radius).
    ``reporter``: the progress of a task ``description`` (samples done, the share certified).
    Raises SoundnessError when a certified sample is successfully attacked (at the fixed
    radius, or at a radius below its certified radius).
    """
    module, perturbation, method = bounder.module, bounder.perturbation, bounder.method
    module.eval()
    deployed = next((p.dtype for p in module.parameters() if p.is_floating_point()), images.dtype)
    ids = torch.arange(images.shape[0]) if sample_ids is None else torch.as_tensor(sample_ids).cpu()
    out: dict[str, list[Tensor]] = {f: [] for f in Certificates.FIELDS + Certificates.OPTIONAL_FIELDS
                                    if f != "index"}
    done = {"samples": 0, "certified": 0}
    with full_precision(), reporter.task(description, total=images.shape[0]) as task:
        bounder64 = bounder.bound_copy(BOUND_DTYPE)
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device)
            y = labels[start:start + batch_size].to(device)
            batch_ids = ids[start:start + batch_size]
            aset = perturbation.affine_set(x)
            aset64 = perturbation.affine_set(x.to(BOUND_DTYPE))
            with torch.no_grad():
                prediction = module(x).argmax(-1)
                margin_lower = bounder64.margin_lower_over(aset64, y)
                allowance = margin_allowance(bounder64.net, aset64, y, deployed, symbolic=_symbolic(bounder64))
            found, success, point = attack_margin(module, aset, y, attack, batch_ids, return_point=True)
            certified = is_certified(prediction, y, margin_lower, allowance)
            if radius is not None:
                r, a = radii(module, bounder64, x, y, prediction, certified, success, radius, attack, batch_ids,
                             deployed)
                out["radius"].append(r)
                out["attack_radius"].append(a)
            out["label"].append(y)
            out["prediction"].append(prediction)
            out["certified"].append(certified)
            out["margin_lower"].append(margin_lower)
            out["rounding_allowance"].append(allowance)
            out["attack_success"].append(success)
            out["attack_margin"].append(found)
            out["attack_coeffs"].append(point)
            done["samples"] += x.shape[0]
            done["certified"] += int(certified.sum())
            task.advance(x.shape[0], stats=f"cert {done['certified'] / done['samples']:.3f}")
    if not out["label"]:  # an empty shard of a distributed run (margin_lower's width unknown: 0)
        return Certificates(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool),
                            np.zeros((0, 0), np.float64), np.zeros(0, bool), np.zeros(0, np.float32),
                            np.zeros((0, 0), np.float64))
    arrays = {f: torch.cat(v).detach().cpu().numpy() for f, v in out.items() if v}
    certs = Certificates(
        index=ids.numpy().astype(np.int64),
        label=arrays["label"].astype(np.int64),
        prediction=arrays["prediction"].astype(np.int64),
        certified=arrays["certified"].astype(bool),
        margin_lower=arrays["margin_lower"].astype(np.float64).reshape(images.shape[0], -1),
        attack_success=arrays["attack_success"].astype(bool),
        attack_margin=arrays["attack_margin"].astype(np.float32),
        rounding_allowance=arrays["rounding_allowance"].astype(np.float64).reshape(images.shape[0], -1),
        attack_coeffs=arrays["attack_coeffs"].astype(np.float32),
        radius=arrays["radius"].astype(np.float64) if radius is not None else None,
        attack_radius=arrays["attack_radius"].astype(np.float64) if radius is not None else None,
    )
    check_soundness(certs, method_name=getattr(method, "name", "?"))
    check_radius_soundness(certs, method_name=getattr(method, "name", "?"))
    return certs


def check_soundness(certs: Certificates, method_name: str) -> None:
    """Raise SoundnessError if any sample is both certified and successfully attacked."""
    broken = np.flatnonzero(certs.certified & certs.attack_success)
    if broken.size:
        i = int(broken[0])
        raise SoundnessError(
            f"sample {int(certs.index[i])} (label {int(certs.label[i])}) is certified by {method_name} "
            f"(smallest margin lower bound {float(certs.margin_lower[i].min()):.6g}, rounding allowance "
            f"{float(certs.rounding_allowance[i].max()):.3g}) but the attack found a perturbation that changes "
            f"its prediction (margin {float(certs.attack_margin[i]):.6g}; {broken.size} such sample(s)): "
            "the bound method is unsound; please report this as a bug"
        )


def check_radius_soundness(certs: Certificates, method_name: str) -> None:
    """Raise SoundnessError if the attack broke a sample at or below its certified radius."""
    if certs.radius is None or certs.attack_radius is None:
        return
    broken = np.flatnonzero((certs.radius > 0) & (certs.attack_radius <= certs.radius))
    if broken.size:
        i = int(broken[0])
        raise SoundnessError(
            f"sample {int(certs.index[i])} (label {int(certs.label[i])}) is certified by {method_name} up to "
            f"radius {float(certs.radius[i]):.6g} but the attack changed its prediction at radius "
            f"{float(certs.attack_radius[i]):.6g} ({broken.size} such sample(s)): the bound method is unsound; "
            "please report this as a bug"
        )
