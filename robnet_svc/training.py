"""Robust fine-tuning (SPEC §4; paper Algorithm 1, Eq. 6-7): the loss, the schedules, the
loop and its checkpoints.

Loss of a batch of B samples (Eq. 7, with the hinge of Eq. 6 on the margin bounds)::

    L = CE(N(x), y) + alpha * (1/B) * sum_b 1[N(x_b) correct] * sum_{i != y_b} relu(-margin_lower_{b,i})

``margin_lower`` are the bound method's lower bounds of ``y_label - y_i`` over the
perturbation set at the current radius, so ``relu(-margin_lower)`` is the upper bound of
``max(0, y_i - y_label)``. Misclassified samples get no robust loss (paper §5), and their
bounds are not even computed.

Schedules: the radius grows linearly from 0 to ``eps`` over the first ``ramp_epochs`` (per
step, not per epoch); the learning rate is ``lr`` for the first 100/175 of the steps, then
``lr/10`` until 150/175, then ``lr/100`` (the paper's 100 + 50 + 25 epochs, scaled).

BatchNorm: the cross-entropy forward runs in train mode (batch statistics, running stats
updated); bounds are computed in eval mode (running statistics), which is what the
exported model and the certificate use.

Reproducibility: the data order of epoch ``e`` comes from a generator seeded with
``(seed, e)``; the global torch RNG (dropout) is seeded once and its state checkpointed. A
run resumed from the checkpoint of epoch ``e`` ends with the same weights as an
uninterrupted run. Distributed training fits in two places: ``epoch_batches`` (this
rank's share of the epoch) and ``is_main`` (only rank 0 writes).
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robnet_svc.errors import RobnetError

CHECKPOINT_FORMAT = 1
LR_STEPS = ((100 / 175, 1.0), (150 / 175, 0.1), (1.0, 0.01))  # (until progress, lr factor)


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of robust fine-tuning (the checkpoint refuses to resume if they differ)."""

    eps: float
    epochs: int = 10
    ramp_epochs: float | None = None  # None: the first 100/175 of the epochs, as in the paper
    alpha: float = 1.0
    lr: float = 5e-4
    batch_size: int = 64
    seed: int = 0

    @property
    def ramp(self) -> float:
        return self.epochs * LR_STEPS[0][0] if self.ramp_epochs is None else float(self.ramp_epochs)


@dataclass
class TrainData:
    """Training and held-out validation split, images ``[N, C, H, W]`` in [0, 1], labels ``[N]``."""

    images: Tensor
    labels: Tensor
    val_images: Tensor
    val_labels: Tensor


def lr_at(progress: float, lr: float) -> float:
    """Learning rate at ``progress`` (fraction of all training steps done, in [0, 1))."""
    for until, factor in LR_STEPS:
        if progress < until:
            return lr * factor
    return lr * LR_STEPS[-1][1]


def eps_at(step: int, steps_per_epoch: int, settings: TrainSettings) -> float:
    """Radius at global ``step``: linear from 0 over ``settings.ramp`` epochs, then ``settings.eps``."""
    ramp_steps = settings.ramp * steps_per_epoch
    if ramp_steps <= 0:
        return settings.eps
    return settings.eps * min(1.0, step / ramp_steps)


def robust_loss(margin_lower: Tensor) -> Tensor:
    """Eq. 6 bounded: ``sum_i relu(-margin_lower_i)``: ``[B, K-1] -> [B]``."""
    return F.relu(-margin_lower).sum(-1)


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int,
                  rank: int = 0, world_size: int = 1) -> list[Tensor]:
    """Index batches of this rank for ``epoch``: a seeded permutation, strided by rank
    (every rank draws the same permutation), cut into batches of ``batch_size``."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_samples, generator=generator)[rank::world_size]
    return list(order.split(batch_size))


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run the block with ``module`` in eval mode (BatchNorm running stats, no dropout), then restore."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def certified_mask(margin_lower: Tensor) -> Tensor:
    """``[B, K-1] -> [B]`` bool: every margin lower bound is positive."""
    return (margin_lower > 0).all(-1)


@torch.no_grad()
def evaluate(module: nn.Module, net, method, perturbation, images: Tensor, labels: Tensor,
             batch_size: int) -> tuple[float, float]:
    """Clean and certified accuracy (eval mode, the perturbation's own radius); (nan, nan) when empty."""
    if images.shape[0] == 0:
        return math.nan, math.nan
    correct = certified = 0
    with eval_mode(module):
        for start in range(0, images.shape[0], batch_size):
            x, y = images[start:start + batch_size], labels[start:start + batch_size]
            ok = module(x).argmax(-1) == y
            correct += int(ok.sum())
            if ok.any():
                margin = method.margin_lower(net, perturbation.affine_set(x[ok]), y[ok])
                certified += int(certified_mask(margin).sum())
    return correct / images.shape[0], certified / images.shape[0]


def train(module: nn.Module, net, method, perturbation, data: TrainData, settings: TrainSettings, *,
          checkpoint: Path | None = None, resume: bool = False, fingerprint: str = "",
          progress=None, log: Callable[[str], None] = lambda _msg: None,
          is_main: bool = True) -> list[dict[str, float]]:
    """Fine-tune ``module`` in place; return the per-epoch history (see ``report.HISTORY_FIELDS``).

    ``net``: the compiled form of ``module`` for ``method`` (it reads the live parameters);
    ``perturbation``: at the target radius (``settings.eps``); all tensors in ``data`` on the
    training device. ``checkpoint``: file written after every epoch (rank 0 only); with
    ``resume`` the run continues from it (same settings and ``fingerprint`` required).
    ``progress``: a rich ``Progress`` or None.
    """
    optimizer = torch.optim.Adam(module.parameters(), lr=settings.lr)
    history: list[dict[str, float]] = []
    start_epoch = 0
    torch.manual_seed(settings.seed)
    if resume and checkpoint is not None and checkpoint.exists():
        start_epoch, history = load_checkpoint(checkpoint, module, optimizer, settings, fingerprint)
        log(f"resuming from {checkpoint} after epoch {start_epoch}")

    steps_per_epoch = math.ceil(data.images.shape[0] / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    for epoch in range(start_epoch, settings.epochs):
        began = time.perf_counter()
        batches = epoch_batches(data.images.shape[0], settings.batch_size, settings.seed, epoch)
        task = progress.add_task(f"epoch {epoch + 1}/{settings.epochs}", total=len(batches),
                                 stats="") if progress is not None else None
        sums = {"loss": 0.0, "ce_loss": 0.0, "robust_loss": 0.0, "correct": 0, "certified": 0, "seen": 0}
        for i, idx in enumerate(batches):
            step = epoch * steps_per_epoch + i
            eps = eps_at(step, steps_per_epoch, settings)
            lr = lr_at(step / total_steps, settings.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            stats = train_step(module, net, method, perturbation, optimizer,
                               data.images[idx.to(data.images.device)], data.labels[idx.to(data.labels.device)],
                               eps=eps, alpha=settings.alpha)
            for key, value in stats.items():
                sums[key] += value
            if task is not None:
                seen = sums["seen"]
                progress.update(task, advance=1, stats=(
                    f"loss {sums['loss'] / (i + 1):.3f}  acc {sums['correct'] / seen:.3f}  "
                    f"cert {sums['certified'] / seen:.3f}  eps {eps:.3g}"))
        val_clean, val_cert = evaluate(module, net, method, perturbation, data.val_images, data.val_labels,
                                       settings.batch_size)
        n = max(len(batches), 1)
        history.append({
            "epoch": epoch + 1, "eps": eps, "lr": lr,
            "loss": sums["loss"] / n, "ce_loss": sums["ce_loss"] / n, "robust_loss": sums["robust_loss"] / n,
            "train_clean_accuracy": sums["correct"] / max(sums["seen"], 1),
            "train_certified_accuracy": sums["certified"] / max(sums["seen"], 1),
            "val_clean_accuracy": val_clean, "val_certified_accuracy": val_cert,
            "seconds": time.perf_counter() - began,
        })
        if task is not None:
            progress.remove_task(task)
        if is_main and checkpoint is not None:
            save_checkpoint(checkpoint, module, optimizer, epoch + 1, history, settings, fingerprint)
        log(_epoch_line(history[-1], settings.epochs))
    return history


def train_step(module: nn.Module, net, method, perturbation, optimizer: torch.optim.Optimizer,
               x: Tensor, y: Tensor, *, eps: float, alpha: float) -> dict[str, float]:
    """One optimisation step on the batch ``x [B, C, H, W]``, ``y [B]``; returns batch statistics
    (loss terms, number correct, number certified at radius ``eps``, number seen)."""
    module.train()
    logits = module(x)
    ce = F.cross_entropy(logits, y)
    correct = logits.argmax(-1) == y
    rob = torch.zeros((), device=x.device)
    certified = 0
    if alpha > 0 and bool(correct.any()):
        with eval_mode(module):  # bounds use running statistics (what is exported and certified)
            margin = method.margin_lower(net, perturbation.affine_set(x[correct], eps=eps), y[correct])
        rob = robust_loss(margin).sum() / x.shape[0]
        certified = int(certified_mask(margin.detach()).sum())
    loss = ce + alpha * rob
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": float(loss.detach()), "ce_loss": float(ce.detach()), "robust_loss": float(rob.detach()),
            "correct": int(correct.sum()), "certified": certified, "seen": int(x.shape[0])}


def _epoch_line(row: dict[str, float], epochs: int) -> str:
    return (f"epoch {int(row['epoch'])}/{epochs}: loss {row['loss']:.4f} (ce {row['ce_loss']:.4f}, robust "
            f"{row['robust_loss']:.4f}), train acc {row['train_clean_accuracy']:.3f} cert "
            f"{row['train_certified_accuracy']:.3f} at eps {row['eps']:.3g}; val acc "
            f"{row['val_clean_accuracy']:.3f} cert {row['val_certified_accuracy']:.3f}; {row['seconds']:.1f}s")


def train_standard(module: nn.Module, images: Tensor, labels: Tensor, *, epochs: int, lr: float = 1e-3,
                   batch_size: int = 64, seed: int = 0) -> None:
    """Plain cross-entropy training with Adam (the normally trained model the demo starts from)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    module.train()
    for epoch in range(epochs):
        for idx in epoch_batches(images.shape[0], batch_size, seed, epoch):
            loss = F.cross_entropy(module(images[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    module.eval()


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                    history: list[dict[str, float]], settings: TrainSettings, fingerprint: str) -> None:
    """Write the state after ``epoch`` completed epochs atomically (temporary file, then rename).

    Plain tensors, numbers, strings, lists and dicts only: ``torch.load(path, weights_only=True)`` reads it.
    """
    state = {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "history": history,
        "settings": asdict(settings),
        "fingerprint": fingerprint,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_checkpoint(path: Path, settings: TrainSettings, fingerprint: str) -> dict[str, Any]:
    """The checkpoint at ``path`` (``torch.load(weights_only=True)``), checked against this run.

    RobnetError when the file is unreadable or was written for other settings or another input.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RobnetError(f"cannot read checkpoint {path} ({type(exc).__name__}); drop --resume to start over") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RobnetError(f"{path} is not a robnet-svc checkpoint of format {CHECKPOINT_FORMAT}; use --force to start over")
    saved = state["settings"]
    for key, value in asdict(settings).items():
        if saved.get(key) != value:
            raise RobnetError(f"checkpoint {path} was written with {key}={saved.get(key)!r}, this run has "
                              f"{value!r}; use the same settings to --resume, or --force to start over")
    if state["fingerprint"] != fingerprint:
        raise RobnetError(f"checkpoint {path} belongs to another model, dataset, perturbation or method; "
                          "use the same settings to --resume, or --force to start over")
    return state


def load_checkpoint(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer, settings: TrainSettings,
                    fingerprint: str) -> tuple[int, list[dict[str, float]]]:
    """Restore weights, optimizer and RNG states from ``path``; return (completed epochs, history)."""
    state = read_checkpoint(path, settings, fingerprint)
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["epoch"]), list(state["history"])
