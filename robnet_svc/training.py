"""Robust fine-tuning (SPEC §4; paper Algorithm 1, Eq. 6-7): the loss, the schedules, the
loop and its checkpoints.

Loss of a batch of B samples (Eq. 7, with the hinge of Eq. 6 on the margin bounds)::

    L = CE(N(x), y) + alpha * (1/B) * sum_b 1[N(x_b) correct] * sum_{i != y_b} relu(-margin_lower_{b,i})

``margin_lower`` are the bound method's lower bounds of ``y_label - y_i`` over the
perturbation set at the current radius, so ``relu(-margin_lower)`` is the upper bound of
``max(0, y_i - y_label)``. Misclassified samples get no robust loss (paper §5), and their
bounds are not even computed.

Schedules: the radius grows from 0 to ``eps`` over the first ``ramp_epochs`` (per step, not
per epoch), along ``ramp_shape``: ``linear`` (the paper's, the default), or ``smooth``, a
quadratic ease-in joined to a line (``ramp_fraction``), which spends the first steps at far
smaller radii, where a normally trained network's loose IBP bounds would otherwise wreck it
(docs/results.md, issue 21); the learning rate is ``lr`` for the first 100/175 of the steps, then
``lr/10`` until 150/175, then ``lr/100`` (the paper's 100 + 50 + 25 epochs, scaled).

BatchNorm: the cross-entropy forward runs in train mode (batch statistics, running stats
updated); bounds are computed in eval mode (running statistics), which is what the
exported model and the certificate use.

Reproducibility: the data order of epoch ``e`` comes from a generator seeded with
``(seed, e)``; the global torch RNG (dropout) is re-seeded before every step from
``(seed, step, rank)``, so a run resumed from any checkpoint (end of an epoch, or one written
within an epoch) ends with the same weights as an uninterrupted run, with no RNG state to carry.

Checkpoints: at the start, after every epoch, and within an epoch whenever
``checkpoint_every`` seconds have passed since the last one (rank 0 only). A checkpoint
also carries the results of phases that finished before training (``phases``: the
"before" certification), so ``--resume`` does not redo them.

Model selection (``Selection``): the input model's validation clean and certified accuracy
are measured once before the first step; after every epoch the validation split is
evaluated (clean, certified at the target radius, per class) and the best state so far
that keeps clean accuracy within ``max_clean_drop`` of the input model's is kept (a copy of
its weights, also in the checkpoint). ``train`` ends with that state in the module. The
validation split is held out of the training split; the test split the certificate is
computed on is never seen here.

Distributed (DistributedDataParallel, docs/distributed.md): ``batch_size`` is the GLOBAL
batch. Every rank draws the same global batches and takes ``batch[rank::world_size]``
(shards differ in size by at most one; a shard may be empty), so all ranks run the same
number of steps. ``RobustObjective`` scales each rank's loss sums by
``world_size / global_batch``; DDP averages the gradients over ranks, which gives exactly
the gradient of the 1-process loss on the whole global batch (up to floating-point
summation order). Statistics are summed over ranks; only rank 0 writes checkpoints.
Not equivalent across process counts: BatchNorm batch statistics of the cross-entropy
forward (per rank) and dropout masks (drawn per rank).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robnet_svc.atomic import atomic_path
from robnet_svc.bounds.alloc import release_free_memory
from robnet_svc.distributed import Dist
from robnet_svc.errors import RobnetError
from robnet_svc.options import default
from robnet_svc.progress import SILENT, Reporter

CHECKPOINT_FORMAT = 4  # 4: carries the model selection (baseline, best state so far); 3: re-seeded per step,
#                           may be written within an epoch, carries finished phases
CHECKPOINT_EVERY = 60.0  # seconds between checkpoints within an epoch (default)
LR_STEPS = ((100 / 175, 1.0), (150 / 175, 0.1), (1.0, 0.01))  # (until progress, lr factor)


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of robust fine-tuning (the checkpoint refuses to resume if they differ)."""

    eps: float
    epochs: int = default("epochs")
    ramp_epochs: float | None = default("ramp_epochs")  # None: the first 100/175 of the epochs, as in the paper
    alpha: float = default("alpha")
    lr: float = default("lr")
    batch_size: int = default("batch_size")
    seed: int = default("seed")
    max_clean_drop: float | None = default("max_clean_drop")  # None: no budget; see ``Selection``
    ramp_shape: str = default("ramp_shape")  # "linear" (the paper's) or "smooth" (``ramp_fraction``)

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
    num_classes: int | None = None  # None: the largest label + 1


def lr_at(progress: float, lr: float) -> float:
    """Learning rate at ``progress`` (fraction of all training steps done, in [0, 1))."""
    for until, factor in LR_STEPS:
        if progress < until:
            return lr * factor
    return lr * LR_STEPS[-1][1]


RAMP_SHAPES = ("linear", "smooth")
SMOOTH_KNEE = 0.5  # where the smooth ramp's quadratic start meets its line (fraction of the ramp)


def ramp_fraction(t: float, shape: str) -> float:
    """Share of the target radius at ``t`` in [0, 1] of the ramp. ``smooth``: ``t² / (m(2-m))``
    up to the knee ``m``, then the line ``(2t - m) / (2 - m)``; value and slope are continuous
    and it ends at 1 with slope ``2 / (2-m)`` (4/3). At the first eighth of the ramp it is at
    1/48 of the target where ``linear`` is at 1/8."""
    t = min(max(t, 0.0), 1.0)
    if shape == "linear":
        return t
    if shape != "smooth":
        raise ValueError(f"unknown ramp shape {shape!r}; known: {', '.join(RAMP_SHAPES)}")
    m = SMOOTH_KNEE
    return t * t / (m * (2 - m)) if t < m else (2 * t - m) / (2 - m)


def eps_at(step: int, steps_per_epoch: int, settings: TrainSettings) -> float:
    """Radius at global ``step``: from 0 over ``settings.ramp`` epochs along ``settings.ramp_shape``,
    then ``settings.eps``."""
    ramp_steps = settings.ramp * steps_per_epoch
    if ramp_steps <= 0:
        return settings.eps
    return settings.eps * ramp_fraction(step / ramp_steps, settings.ramp_shape)


def robust_loss(margin_lower: Tensor) -> Tensor:
    """Eq. 6 bounded: ``sum_i relu(-margin_lower_i)``: ``[B, K-1] -> [B]``."""
    return F.relu(-margin_lower).sum(-1)


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int,
                  rank: int = 0, world_size: int = 1) -> list[Tensor]:
    """This rank's share of every global batch of ``epoch``: a seeded permutation (the same on
    every rank) cut into global batches of ``batch_size``; rank ``r`` takes ``batch[r::world_size]``.

    Every rank gets ``ceil(num_samples / batch_size)`` index tensors (the last ones may be
    empty on high ranks), so ranks always run the same number of steps.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_samples, generator=generator)
    return [batch[rank::world_size] for batch in order.split(batch_size)]


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
def evaluate(bounder, images: Tensor, labels: Tensor, batch_size: int, dist: Dist = Dist()) -> tuple[float, float]:
    """Clean and certified accuracy of ``bounder.module`` (eval mode; certified: every margin lower
    bound of ``bounder`` > 0 at the perturbation's own radius); (nan, nan) when empty.

    Distributed: each rank evaluates its contiguous share, the counts are summed over ranks."""
    if images.shape[0] == 0:
        return math.nan, math.nan
    module = bounder.module
    mine = dist.shard(images.shape[0])
    counts = torch.zeros(2, dtype=torch.float64, device=images.device)  # correct, certified
    with eval_mode(module):
        for start in range(mine.start, mine.stop, batch_size):
            stop = min(start + batch_size, mine.stop)
            x, y = images[start:stop], labels[start:stop]
            ok = module(x).argmax(-1) == y
            counts[0] += ok.sum()
            if ok.any():
                margin = bounder.margin_lower(x[ok], y[ok])
                counts[1] += certified_mask(margin).sum()
    correct, certified = dist.sum(counts).tolist()
    return correct / images.shape[0], certified / images.shape[0]


@torch.no_grad()
def class_accuracy(module: nn.Module, images: Tensor, labels: Tensor, num_classes: int, batch_size: int,
                   dist: Dist = Dist()) -> list[float | None]:
    """Clean accuracy of every class (eval mode); None for a class without samples.

    Distributed: each rank evaluates its contiguous share, the counts are summed over ranks."""
    mine = dist.shard(images.shape[0])
    counts = torch.zeros(2, num_classes, dtype=torch.float64, device=images.device)  # correct, total
    with eval_mode(module):
        for start in range(mine.start, mine.stop, batch_size):
            stop = min(start + batch_size, mine.stop)
            x, y = images[start:stop], labels[start:stop]
            ok = (module(x).argmax(-1) == y).double()
            counts[0].index_add_(0, y, ok)
            counts[1].index_add_(0, y, torch.ones_like(ok))
    correct, total = dist.sum(counts).tolist()
    return [c / t if t else None for c, t in zip(correct, total)]


class Selection:
    """Which state ``train`` ends with (the exported model): the best one that keeps the
    validation clean accuracy within ``max_clean_drop`` of the input model's.

    Candidates: the input model (epoch 0, radius 0) and the state after every epoch, at the
    radius of that epoch's last step. Ranking: the largest radius reached (capped at the
    target, so every epoch at the target radius ranks first), then validation certified
    accuracy at the target radius, then validation clean accuracy; a full tie takes the later
    epoch (more training at the target radius, at a lower learning rate). Without validation
    samples (``--val-fraction 0``) the last epoch is kept.
    ``best`` holds the chosen state's numbers and a copy of its weights (``"model"``).
    """

    def __init__(self, target_eps: float, max_clean_drop: float | None, baseline: dict[str, Any],
                 best: dict[str, Any]):
        self.target_eps = target_eps
        self.max_clean_drop = max_clean_drop
        self.baseline = baseline
        self.best = best

    @classmethod
    def start(cls, module: nn.Module, settings: TrainSettings, val_clean: float, val_cert: float,
              val_classes: list[float | None]) -> "Selection":
        """The selection before training: the input model's validation numbers are the baseline
        and its weights the first candidate."""
        baseline = {"val_clean_accuracy": val_clean, "val_certified_accuracy": val_cert,
                    "val_class_accuracy": val_classes}
        return cls(settings.eps, settings.max_clean_drop, baseline,
                   {"epoch": 0, "eps": 0.0, **baseline, "model": _copy_state(module)})

    def allows(self, val_clean: float) -> bool:
        """Whether a validation clean accuracy is within the budget."""
        if self.max_clean_drop is None or math.isnan(val_clean):
            return True
        return val_clean >= self.baseline["val_clean_accuracy"] - self.max_clean_drop - 1e-9

    def _rank(self, row: dict[str, Any]) -> tuple:
        if math.isnan(row["val_clean_accuracy"]):  # no validation samples: the latest state
            return (row["epoch"],)
        return (min(row["eps"], self.target_eps), row["val_certified_accuracy"], row["val_clean_accuracy"])

    def offer(self, module: nn.Module, row: dict[str, Any], val_classes: list[float | None]) -> bool:
        """Keep ``module``'s state if it is within the budget and ranks at least as high as the best so far."""
        if not self.allows(row["val_clean_accuracy"]) or self._rank(row) < self._rank(self.best):
            return False
        self.best = {key: row[key] for key in ("epoch", "eps", "val_clean_accuracy", "val_certified_accuracy")}
        self.best.update(val_class_accuracy=val_classes, model=_copy_state(module))
        return True

    @property
    def within_budget(self) -> bool:
        """Whether the chosen state reached the target radius (within the budget)."""
        return self.best["eps"] >= self.target_eps

    def to_state(self) -> dict[str, Any]:
        return {"target_eps": self.target_eps, "max_clean_drop": self.max_clean_drop, "baseline": self.baseline,
                "best": self.best}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Selection":
        return cls(state["target_eps"], state["max_clean_drop"], state["baseline"], state["best"])

    def record(self) -> dict[str, Any]:
        """The chosen state's numbers and why it was chosen (plain JSON; weights left out)."""
        best, base, budget = self.best, self.baseline["val_clean_accuracy"], self.max_clean_drop
        within = "" if budget is None else f" within {budget:g} of the input model's {base:.4f}"
        if math.isnan(best["val_clean_accuracy"]):
            reason = "no validation samples (--val-fraction 0): the last epoch"
        elif self.within_budget:
            reason = (f"the best validation certified accuracy at the target eps {self.target_eps:g} (then clean "
                      "accuracy) among the epochs" + (f" with validation clean accuracy{within}" if within else
                                                      " (no clean-accuracy budget)"))
        elif best["epoch"] > 0:
            reason = (f"no epoch reached the target eps {self.target_eps:g} with validation clean accuracy"
                      f"{within}; the largest eps reached within it")
        else:
            reason = f"no epoch kept validation clean accuracy{within}: the input model's weights"
        return {"epoch": int(best["epoch"]), "eps": float(best["eps"]), "target_eps": self.target_eps,
                "val_clean_accuracy": _number(best["val_clean_accuracy"]),
                "val_certified_accuracy": _number(best["val_certified_accuracy"]),
                "within_budget": self.within_budget, "max_clean_drop": budget, "reason": reason,
                "input_val_clean_accuracy": _number(base),
                "input_val_certified_accuracy": _number(self.baseline["val_certified_accuracy"]),
                "val_class_accuracy_before": list(self.baseline["val_class_accuracy"]),
                "val_class_accuracy_after": list(best["val_class_accuracy"])}


def _copy_state(module: nn.Module) -> dict[str, Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def _number(value: float) -> float | None:
    """``value``, or None for NaN (no validation samples): JSON has no NaN."""
    return None if math.isnan(value) else float(value)


#: Order of the statistics ``RobustObjective`` returns (summed over a shard, then over ranks).
STAT_FIELDS = ("ce_sum", "robust_sum", "correct", "certified", "seen")


class RobustObjective(nn.Module):
    """The training loss of one shard as a module, so that DistributedDataParallel sees every use
    of the parameters (the cross-entropy forward and the bound computation) inside its forward.

    ``forward(x [b, C, H, W], y [b], eps, global_size) -> (loss [], stats [5] float64)``:
    ``loss = world_size / global_size * (sum_b CE_b + alpha * sum_b 1[correct_b] * robust_b)``.
    With ``world_size = 1`` and the whole batch this is Eq. 7 (a batch mean); with DDP's
    gradient average over ranks it is the gradient of Eq. 7 on the global batch of
    ``global_size`` samples. ``stats``: sums of this shard in ``STAT_FIELDS`` order.
    ``bounder`` (a ``robnet_svc.bounder.Bounder``, not a module) is held outside the module tree:
    its compiled network reads ``bounder.module``'s live parameters, which DDP must not see twice.
    """

    def __init__(self, bounder, alpha: float, world_size: int = 1):
        super().__init__()
        self.module = bounder.module
        self.bounder = bounder
        self.alpha = alpha
        self.world_size = world_size

    def forward(self, x: Tensor, y: Tensor, eps: float, global_size: int) -> tuple[Tensor, Tensor]:
        zero = torch.zeros((), device=x.device)
        if x.shape[0] == 0:  # an empty shard (last global batch smaller than the world): zero gradients,
            # but every parameter still takes part, as DDP's reducer expects
            loss = sum(p.sum() for p in self.module.parameters()) * 0.0
            return loss, torch.zeros(len(STAT_FIELDS), dtype=torch.float64, device=x.device)
        logits = self.module(x)
        ce_sum = F.cross_entropy(logits, y, reduction="sum")
        correct = logits.argmax(-1) == y
        robust_sum, certified = zero, zero
        if self.alpha > 0 and bool(correct.any()):
            with eval_mode(self.module):  # bounds use running statistics (what is exported and certified)
                margin = self.bounder.margin_lower(x[correct], y[correct], eps=eps)
            robust_sum = robust_loss(margin).sum()
            certified = certified_mask(margin.detach()).sum()
        loss = (ce_sum + self.alpha * robust_sum) * (self.world_size / global_size)
        stats = torch.stack([ce_sum.detach(), robust_sum.detach(), correct.sum(), certified,
                             torch.tensor(x.shape[0], device=x.device)]).double()
        return loss, stats


def train(bounder, data: TrainData, settings: TrainSettings, *,
          checkpoint: Path | None = None, resume: bool = False, fingerprint: str = "",
          reporter: Reporter = SILENT, dist: Dist = Dist(), checkpoint_every: float = CHECKPOINT_EVERY,
          phases: dict[str, Any] | None = None,
          state: dict[str, Any] | None = None) -> tuple[list[dict[str, float]], Selection]:
    """Fine-tune ``bounder.module`` in place; return the per-epoch history (see ``report.HISTORY_FIELDS``)
    and the ``Selection``, whose chosen state the module holds on return.

    ``bounder``: a ``robnet_svc.bounder.Bounder`` of the module, the training method (built
    with ``ordered=False``) and the perturbation at the target radius (``settings.eps``); its
    compiled network reads the module's live parameters. All tensors in ``data`` on the
    training device (every rank holds the whole split). ``checkpoint``: file written at the
    start, after every epoch and every ``checkpoint_every`` seconds within one (rank 0 only);
    with ``resume`` the run continues from it (same settings and ``fingerprint`` required;
    rank 0 reads it and sends it to the others, any world size), or from ``state`` when the
    caller read it already. ``phases``: results of finished phases, stored in every
    checkpoint (plain tensors, numbers, strings, lists, dicts).
    ``reporter``: log lines and a progress task per epoch. ``dist``: this process's place in a
    distributed run (the default: one process, no process group).
    """
    module = bounder.module
    optimizer = torch.optim.Adam(module.parameters(), lr=settings.lr)
    history: list[dict[str, float]] = []
    start_epoch, start_step, partial = 0, 0, None
    num_classes = data.num_classes or int(torch.cat([data.labels, data.val_labels]).max()) + 1
    if resume and checkpoint is not None:
        if state is None:
            state = dist.broadcast(read_checkpoint(checkpoint, settings, fingerprint) if dist.is_main else None)
        start_epoch, history = restore_checkpoint(state, module, optimizer)
        start_step, partial = int(state.get("step", 0)), state.get("partial")
        selection = Selection.from_state(state["selection"])
        reporter.log(f"resuming from {checkpoint} after epoch {start_epoch}"
            + (f" and {start_step} step(s) of epoch {start_epoch + 1}" if start_step else ""))

    else:  # the input model's validation numbers: the budget's reference, measured once
        val_clean, val_cert = evaluate(bounder, data.val_images, data.val_labels, settings.batch_size, dist)
        selection = Selection.start(module, settings, val_clean, val_cert, class_accuracy(
            module, data.val_images, data.val_labels, num_classes, settings.batch_size, dist))
        reporter.log(f"input model on the validation split: clean {val_clean:.3f} certified {val_cert:.3f}")

    def save(epoch: int, step: int = 0, partial: dict | None = None) -> None:
        if dist.is_main and checkpoint is not None:
            save_checkpoint(checkpoint, module, optimizer, epoch, history, settings, fingerprint,
                            step=step, partial=partial, phases=phases, selection=selection.to_state())

    if not resume:
        save(0)  # the finished phases are kept even if the first epoch is interrupted
    last_saved = time.monotonic()
    device = data.images.device
    objective = dist.wrap(RobustObjective(bounder, settings.alpha, dist.world_size), device)

    steps_per_epoch = math.ceil(data.images.shape[0] / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    for epoch in range(start_epoch, settings.epochs):
        skip = start_step if epoch == start_epoch else 0
        began = time.perf_counter() - (partial["seconds"] if skip else 0.0)
        global_sizes = [min(settings.batch_size, data.images.shape[0] - i * settings.batch_size)
                        for i in range(steps_per_epoch)]
        batches = epoch_batches(data.images.shape[0], settings.batch_size, settings.seed, epoch,
                                dist.rank, dist.world_size)
        with reporter.task(f"epoch {epoch + 1}/{settings.epochs}", total=len(batches), epoch=epoch + 1,
                           epochs=settings.epochs) as task:
            if skip:
                task.update(completed=skip)
            sums = dict(partial["sums"]) if skip else {"loss": 0.0, "ce_loss": 0.0, "robust_loss": 0.0, "correct": 0,
                                                       "certified": 0, "seen": 0}
            for i, (idx, global_size) in enumerate(zip(batches, global_sizes)):
                if i < skip:
                    continue
                step = epoch * steps_per_epoch + i
                torch.manual_seed((settings.seed * 1_000_003 + step) * 1_009 + dist.rank)  # dropout: per step and rank
                eps = eps_at(step, steps_per_epoch, settings)
                lr = lr_at(step / total_steps, settings.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                idx = idx.to(device)
                stats = train_step(objective, optimizer, data.images[idx], data.labels[idx], eps=eps,
                                   alpha=settings.alpha, global_size=global_size, dist=dist)
                for key, value in stats.items():
                    sums[key] += value
                if i + 1 < len(batches) and time.monotonic() - last_saved >= checkpoint_every:
                    save(epoch, i + 1, {"sums": dict(sums), "seconds": time.perf_counter() - began})
                    last_saved = time.monotonic()
                seen = sums["seen"]
                # the numbers also go as task fields: the service's job progress reads them
                running = {"loss": sums["loss"] / (i + 1), "train_accuracy": sums["correct"] / max(seen, 1),
                           "certified_accuracy": sums["certified"] / max(seen, 1), "eps": eps}
                task.advance(1, **running, stats=(
                    f"loss {running['loss']:.3f} acc {running['train_accuracy']:.2f} "
                    f"cert {running['certified_accuracy']:.2f} eps {eps:.2g}"))
            val_clean, val_cert = evaluate(bounder, data.val_images, data.val_labels, settings.batch_size, dist)
            n = max(len(batches), 1)
            history.append({
                "epoch": epoch + 1, "eps": eps, "lr": lr,
                "loss": sums["loss"] / n, "ce_loss": sums["ce_loss"] / n, "robust_loss": sums["robust_loss"] / n,
                "train_clean_accuracy": sums["correct"] / max(sums["seen"], 1),
                "train_certified_accuracy": sums["certified"] / max(sums["seen"], 1),
                "val_clean_accuracy": val_clean, "val_certified_accuracy": val_cert,
                "seconds": time.perf_counter() - began,
            })
            selection.offer(module, history[-1], class_accuracy(module, data.val_images, data.val_labels,
                                                                num_classes, settings.batch_size, dist))
        save(epoch + 1)
        last_saved = time.monotonic()
        release_free_memory()  # the heap's fragmentation stays within one epoch (bounds/alloc.py)
        reporter.log(_epoch_line(history[-1], settings.epochs))
    module.load_state_dict(selection.best["model"])
    return history, selection


def train_step(objective: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, *,
               eps: float, alpha: float, global_size: int, dist: Dist = Dist()) -> dict[str, float]:
    """One optimisation step on this rank's shard ``x [b, C, H, W]``, ``y [b]`` of a global batch of
    ``global_size`` samples. ``objective``: a ``RobustObjective``, in DDP when distributed.
    Returns the global batch's statistics (loss terms as batch means, number correct, number
    certified at radius ``eps``, number seen), the same on every rank."""
    objective.train()
    loss, stats = objective(x, y, eps, global_size)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # DDP: gradients averaged over ranks here
    optimizer.step()
    ce_sum, robust_sum, correct, certified, seen = dist.sum(stats).tolist()
    ce, rob = ce_sum / global_size, robust_sum / global_size
    return {"loss": ce + alpha * rob, "ce_loss": ce, "robust_loss": rob,
            "correct": int(correct), "certified": int(certified), "seen": int(seen)}


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
                    history: list[dict[str, float]], settings: TrainSettings, fingerprint: str, *,
                    step: int = 0, partial: dict[str, Any] | None = None,
                    phases: dict[str, Any] | None = None, selection: dict[str, Any] | None = None) -> None:
    """Write the state after ``epoch`` completed epochs and ``step`` steps of the next one
    atomically (temporary file, then rename). ``partial``: the running sums and seconds of that
    unfinished epoch; ``phases``: finished phases' results; ``selection``: ``Selection.to_state()``.

    Plain tensors, numbers, strings, lists and dicts only: ``torch.load(path, weights_only=True)`` reads it.
    """
    state = {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "step": step,
        "partial": partial,
        "phases": phases or {},
        "selection": selection,
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "history": history,
        "settings": asdict(settings),
        "fingerprint": fingerprint,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


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


def restore_checkpoint(state: dict[str, Any], module: nn.Module,
                       optimizer: torch.optim.Optimizer) -> tuple[int, list[dict[str, float]]]:
    """Put a ``read_checkpoint`` state's weights and optimizer state back; return (completed epochs,
    history). No RNG state: every step re-seeds from (seed, step, rank)."""
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]), list(state["history"])
