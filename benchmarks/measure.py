"""One measurement of one configuration (network × method × batch) on one device.

Three kinds, each returning a small dict of numbers:

- ``train``: median seconds of a training step after warm-up, and the peak memory. The step
  is the product's (``robnet_svc.training.train_step`` on a ``RobustObjective``): forward,
  cross-entropy, for a bound method ``margin_lower`` over the order-3 multiplicative bias
  field (k = 16, clipping on) and the hinge loss of paper Eq. 6-7 / SPEC §4
  (``CE + α · mean_b(1[correct_b] · Σ_{i≠y} max(0, −margin_lower_{b,i}))``), backward, Adam;
  ``standard`` is the same step with ``α = 0``.
- ``floor``: one SSIP bound pass vs one plain forward pass on ``2(k+1)·B`` images (the faster
  of NCHW and channels-last), both under ``no_grad`` — paper Theorem 3: the centre–radius symbolic form propagates ``k+1`` centre and
  ``k+1`` radius columns per sample, so it cannot cost less than that forward pass.
- ``cert``: certification throughput, samples/s of a clean forward + ``margin_lower`` under
  ``no_grad`` (what ``certify`` does per batch, minus the attack).
- ``peer-train`` / ``peer-cert``: the same with auto_LiRPA's analogue (``benchmarks.peer``).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` since the configuration started;
on CPU the process's RSS high-water mark (``ru_maxrss``), which is per configuration only
when each measurement runs in a fresh process (``benchmarks.worker``).
"""

from __future__ import annotations

import copy
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from benchmarks.networks import NETWORKS

STANDARD = "standard"  # plain training, no bounds
TRAIN_METHODS = (STANDARD, "ibp", "ssip", "rsip-ibp", "rsip-ssip")
#: a method name with this suffix: the same method's step with ``harden --compile``'s fused kernels
COMPILED = " --compile"
#: the methods whose training step the fused kernels change (those with an SSIP pass)
COMPILABLE = ("ssip", "rsip-ssip")
CERT_METHODS = ("rsip-ssip", "rsip")

EPS = 0.2  # the paper's MRI radius "ε = 20"; timings barely depend on it
ORDER = 3  # order-3 bias field: (3+1)^2 = 16 coefficients
MODE = "mult"
ALPHA = 1.0  # weight of the robust loss; irrelevant to the cost


@dataclass
class Setup:
    """Everything one measurement needs, built once: model, compiled net, data, perturbation."""

    model: nn.Module
    images: Tensor  # [B, C, H, W] in [0, 1]
    labels: Tensor  # [B]
    perturbation: object
    device: torch.device

    @property
    def num_coeffs(self) -> int:
        return self.perturbation.num_coeffs(tuple(self.images.shape[1:]))


def build(network: str, batch: int, device: torch.device, seed: int = 0) -> Setup:
    """Seeded random weights and images for ``network`` at ``batch`` on ``device``; the labels
    are the network's own predictions, so every sample is classified correctly and the
    training step bounds the whole batch (training bounds only correctly classified samples:
    with random labels it would bound a tenth of them and time nothing like a real epoch)."""
    from robnet_svc.plugins import load_registry

    torch.manual_seed(seed)
    spec = NETWORKS[network]
    model = spec.build().to(device).eval()
    images = torch.rand(batch, *spec.input_shape, device=device)
    with torch.no_grad():
        labels = model(images).argmax(1)
    perturbation = load_registry().perturbation("bias-field")(EPS, order=ORDER, mode=MODE)
    return Setup(model, images, labels, perturbation, device)


def bound_method(name: str, ordered: bool = True):
    """A fresh instance of the registered bound method ``name``. ``ordered=False`` is what
    training uses (robnet_svc.pipeline): sound bounds without the extra passes that only
    guarantee the cross-method ordering; certification keeps ``ordered=True``."""
    from robnet_svc.plugins import load_registry

    return load_registry().bound_method(name)(ordered=ordered)


def compiled(model: nn.Module):
    from robnet_svc.bounds import compile_network

    return compile_network(model)


def train_step(setup: Setup, method_name: str, kernels=None) -> Callable[[], None]:
    """A closure running one step of the product's training loop (``robnet_svc.training``:
    ``RobustObjective`` and ``train_step``): forward in train mode, cross-entropy, for a bound
    method the margin bounds of the correctly classified samples in eval mode and the hinge
    loss of paper Eq. 6-7, backward, Adam. ``standard`` is the same step with ``alpha = 0``.
    ``kernels``: the bounder's fused activation kernels (``harden --compile``; None: what training
    uses without it, ``kernels.training_kernels``)."""
    from robnet_svc.bounder import Bounder
    from robnet_svc.bounds.kernels import training_kernels
    from robnet_svc.training import RobustObjective
    from robnet_svc.training import train_step as product_step

    model, images, labels = setup.model, setup.images, setup.labels
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-4)
    alpha = 0.0 if method_name == STANDARD else ALPHA
    # ``standard``: alpha 0 never asks the bounder (any method will do)
    method = bound_method("ibp" if method_name == STANDARD else method_name, ordered=False)
    if kernels is None:
        kernels = training_kernels(images.device)
    bounder = Bounder(model, method, setup.perturbation, tuple(images.shape[1:]), kernels=kernels)
    objective = RobustObjective(bounder, alpha)

    def step() -> None:
        product_step(objective, optimiser, images, labels, eps=EPS, alpha=alpha, global_size=len(labels))
    return step


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MIN_REPEATS = 3  # a median of fewer is no median
BUDGET_S = 30.0  # timed seconds per configuration after which slow ones stop at MIN_REPEATS


class Timing(NamedTuple):
    """Median seconds of one call: wall clock, and CPU time of this process (all threads)."""

    wall_s: float
    cpu_s: float


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int,
                   budget_s: float = BUDGET_S) -> Timing:
    """Median wall and CPU time of ``fn`` over ``repeats`` calls after ``warmup`` untimed calls; a
    slow configuration stops early once ``budget_s`` is spent and ``min(repeats, MIN_REPEATS)`` are done.

    CPU time is reported beside wall time because on a shared machine other processes inflate
    wall time (waiting for a core) far more than the CPU time the work itself needs.
    """
    return interleaved_seconds({"fn": fn}, device, warmup, repeats, budget_s)["fn"]


#: rounds of the floor measurement (at least): its pass and forwards are short and the ratio of
#: two medians taken apart drifts with the machine; interleaved rounds cancel that drift
FLOOR_ROUNDS = 15


def interleaved_seconds(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
                        budget_s: float = BUDGET_S) -> dict[str, Timing]:
    """Median wall and CPU time of each of ``fns``, timed in alternation (``median_seconds``'s
    warm-up, repeats and budget, counted in rounds): each round calls every one once, the order
    rotating from round to round, so that a change in the machine's speed during the measurement
    reaches all of them alike."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronise(device)
    walls: dict[str, list[float]] = {name: [] for name in names}
    cpus: dict[str, list[float]] = {name: [] for name in names}
    rounds = 0
    while rounds < max(repeats, 1):
        for name in names[rounds % len(names):] + names[:rounds % len(names)]:
            start, cpu_start = time.perf_counter(), time.process_time()
            fns[name]()
            synchronise(device)
            walls[name].append(time.perf_counter() - start)
            cpus[name].append(time.process_time() - cpu_start)
        rounds += 1
        if sum(map(sum, walls.values())) > budget_s and rounds >= min(repeats, MIN_REPEATS):
            break
    return {name: Timing(statistics.median(walls[name]), statistics.median(cpus[name])) for name in names}


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated bytes; CPU: this process's RSS high-water mark (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def compiled_kernels(method: str, device: torch.device) -> tuple[str, object, dict]:
    """``(method without COMPILED, its kernels or None, {"compile_s"} or {})``: a name ending in
    ``COMPILED`` gets the fused kernels, compiled (or loaded from torch's cache) here, untimed."""
    if not method.endswith(COMPILED):
        return method, None, {}
    from robnet_svc.bounds.kernels import check_compiled_kernels

    started = time.perf_counter()
    kernels = check_compiled_kernels(device)
    return method[:-len(COMPILED)], kernels, {"compile_s": time.perf_counter() - started}


def measure_train(network: str, method: str, batch: int, device: torch.device,
                  warmup: int, repeats: int) -> dict:
    """``{"step_s", "cpu_s", "peak_mem_mb"}`` of one training configuration (median wall and CPU s;
    ``method`` may end in ``COMPILED``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    method, kernels, extra = compiled_kernels(method, device)
    setup = build(network, batch, device)
    timing = median_seconds(train_step(setup, method, kernels), device, warmup, repeats)
    return {"step_s": timing.wall_s, "cpu_s": timing.cpu_s, "peak_mem_mb": peak_memory_mb(device), **extra}


def measure_floor(network: str, batch: int, device: torch.device, warmup: int, repeats: int,
                  method: str = "ssip") -> dict:
    """``{"ssip_pass_s", "floor_s", "ratio", "cpu_ratio", "floor_layout", "floor_<layout>_s"}``:
    SSIP bound pass ÷ forward of ``2(k+1)·B`` images, in wall time (``ratio``) and in CPU time
    (``cpu_ratio``). The forward is timed with NCHW and with channels-last tensors and weights
    (the bound pass picks its layout, ``propagate._layout``); the floor is the faster of them.
    The pass and the forwards are timed in alternation, at least ``FLOOR_ROUNDS`` rounds
    (``interleaved_seconds``).
    ``method`` ``"ssip" + COMPILED``: the pass with the fused kernels."""
    from robnet_svc.bounds.kernels import fused_activations

    _, kernels, extra = compiled_kernels(method, device)
    setup = build(network, batch, device)
    bounds, net = bound_method("ssip", ordered=False), compiled(setup.model)
    big = setup.images.repeat(2 * (setup.num_coeffs + 1), 1, 1, 1)  # [2(k+1)B, C, H, W]

    def ssip_pass() -> Tensor:
        with fused_activations(kernels):
            return bounds.margin_lower(net, setup.perturbation.affine_set(setup.images), setup.labels)

    fns = {"ssip": ssip_pass, "nchw": lambda: setup.model(big)}
    if big.dim() == 4:  # the forward in the other layout too; the floor is the faster one
        model_cl = copy.deepcopy(setup.model).to(memory_format=torch.channels_last)
        big_cl = big.contiguous(memory_format=torch.channels_last)
        fns["channels_last"] = lambda: model_cl(big_cl)
    with torch.no_grad():
        floors = interleaved_seconds(fns, device, warmup, max(repeats, FLOOR_ROUNDS), budget_s=2 * BUDGET_S)
    ssip_s = floors.pop("ssip")
    layout = min(floors, key=lambda name: floors[name].wall_s)
    floor_s = floors[layout]
    return {"ssip_pass_s": ssip_s.wall_s, "floor_s": floor_s.wall_s, "ratio": ssip_s.wall_s / floor_s.wall_s,
            "cpu_ratio": ssip_s.cpu_s / floor_s.cpu_s, "floor_layout": layout,
            **{f"floor_{name}_s": t.wall_s for name, t in floors.items()}, **extra}


def measure_cert(network: str, method: str, batch: int, device: torch.device,
                 warmup: int, repeats: int) -> dict:
    """``{"samples_per_s", "batch", "peak_mem_mb"}`` of certifying with ``method``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    setup = build(network, batch, device)
    bounds, net = bound_method(method), compiled(setup.model)

    def certify_batch() -> Tensor:
        predicted = setup.model(setup.images).argmax(1)
        margins = bounds.margin_lower(net, setup.perturbation.affine_set(setup.images), setup.labels)
        return (predicted == setup.labels) & (margins > 0).all(1)

    with torch.no_grad():
        timing = median_seconds(certify_batch, device, warmup, repeats)
    return {"samples_per_s": batch / timing.wall_s, "cpu_s": timing.cpu_s, "batch": batch,
            "peak_mem_mb": peak_memory_mb(device)}


def measure_peer_train(network: str, method: str, batch: int, device: torch.device,
                       warmup: int, repeats: int) -> dict:
    """``measure_train`` of auto_LiRPA's analogue of our ``method`` (``benchmarks.peer``)."""
    from benchmarks import peer

    setup = build(network, batch, device)
    timing = median_seconds(peer.train_step(setup, peer.ANALOGUES[method][0]), device, warmup, repeats)
    return {"step_s": timing.wall_s, "cpu_s": timing.cpu_s, "peak_mem_mb": peak_memory_mb(device)}


def measure_peer_cert(network: str, method: str, batch: int, device: torch.device,
                      warmup: int, repeats: int) -> dict:
    """``measure_cert`` of auto_LiRPA's analogue of our ``method`` (bounds only, no_grad)."""
    from benchmarks import peer

    setup = build(network, batch, device)
    with torch.no_grad():
        bounds = peer.margin_bounds(setup, peer.ANALOGUES[method][0])
        timing = median_seconds(bounds, device, warmup, repeats)
        theirs = bounds()
        ours = bound_method(method, ordered=False).margin_lower(
            compiled(setup.model), setup.perturbation.affine_set(setup.images), setup.labels)
    # the same bound computed by both sides: how far apart (a check that the pair is fair)
    return {"samples_per_s": batch / timing.wall_s, "cpu_s": timing.cpu_s, "batch": batch,
            "peak_mem_mb": peak_memory_mb(device), "max_abs_diff": float((ours - theirs).abs().max()),
            "mean_margin_ours": float(ours.mean()), "mean_margin_peer": float(theirs.mean())}


KINDS = {"train": measure_train, "floor": measure_floor, "cert": measure_cert,
         "peer-train": measure_peer_train, "peer-cert": measure_peer_cert}
