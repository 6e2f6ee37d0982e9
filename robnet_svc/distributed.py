"""Several processes, one job: the process group of a ``torchrun`` launch and the few
collectives the pipeline needs (docs/distributed.md).

A run is distributed when torchrun's environment says ``WORLD_SIZE > 1``. Otherwise every
method here is a no-op (or the identity) and ``torch.distributed`` is never initialised, so
a plain ``robnet-svc harden`` needs no rendezvous, no backend and no ports.

- Backend: NCCL when this rank's device is CUDA (``cuda:LOCAL_RANK``), gloo on CPU;
  initialised from torchrun's environment (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
  ``WORLD_SIZE``) with a timeout on every collective (``ROBNET_SVC_DIST_TIMEOUT`` seconds,
  default 1800), so a rank that waits on a dead peer fails instead of hanging.
- Training: ``wrap`` puts a module in ``DistributedDataParallel`` (PyTorch's own gradient
  all-reduce); ``sum`` adds statistics over ranks.
- Certification: ``shard`` gives each rank a contiguous share of the test set, ``gather``
  collects per-rank results in rank order, i.e. in the original order.
- Failures: validation runs on every rank before the first collective; a rank that fails
  later exits at once (``abort``: no destructors that could wait on peers), and torchrun
  then stops the other ranks.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor, nn

from robnet_svc.errors import RobnetError

TIMEOUT_ENV = "ROBNET_SVC_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` in ``[0, world_size)``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """Whether there are other processes (and so a process group)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes files, logs and shows progress."""
        return self.rank == 0

    # ------------------------------------------------------------------ set-up

    def device(self, device: torch.device) -> torch.device:
        """This rank's device for the requested one: a distributed CUDA run uses ``cuda:LOCAL_RANK``."""
        if not self.active or device.type != "cuda":
            return device
        if device.index is not None:
            raise RobnetError(f"--device {device}: under torchrun every process uses cuda:LOCAL_RANK; "
                              "give --device cuda or auto")
        if self.local_rank >= torch.cuda.device_count():
            raise RobnetError(f"local rank {self.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                              "start at most one process per GPU (--nproc_per_node)")
        return torch.device("cuda", self.local_rank)

    def start(self, device: torch.device) -> None:
        """Join the process group (NCCL for a CUDA ``device``, else gloo); no-op when not distributed."""
        if not self.active or torch.distributed.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, timeout=timedelta(seconds=_timeout_s()))

    def stop(self) -> None:
        """Leave the process group after a successful run."""
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # ------------------------------------------------------------------ work split and collectives

    def shard(self, num: int) -> slice:
        """This rank's contiguous share of ``num`` items (sizes differ by at most one; rank order = item order)."""
        base, extra = divmod(num, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` in DistributedDataParallel (gradients averaged over ranks), or itself."""
        if not self.active:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, output_device=device.index if ids else None)

    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over ranks (in place; returned for chaining)."""
        if self.active:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` when not distributed."""
        if not self.active:
            return [obj]
        parts: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(parts, obj)
        return parts

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (others pass anything, e.g. None)."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def from_env() -> Dist:
    """The ``Dist`` torchrun describes in the environment (one process when it says nothing)."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise RobnetError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (launch with torchrun)") from None
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank)


def abort(code: int) -> None:
    """End a distributed process now with ``code``, when a process group is up.

    ``sys.exit`` would run destructors that may wait on peers (NCCL, pending collectives);
    ``os._exit`` does not. torchrun sees the exit code and stops the other ranks.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise RobnetError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise RobnetError(f"{TIMEOUT_ENV} must be > 0 seconds")
    return value
