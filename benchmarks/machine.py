"""What the benchmark ran on: one line for the results JSON and the docs table."""

from __future__ import annotations

import os
import platform

import torch


def usable_cores() -> int:
    """CPU cores this process may run on (affinity-aware; ``os.cpu_count`` ignores cgroups' cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device) -> str:
    """E.g. ``"CPU AMD EPYC, 2 cores, torch 2.4.1, 2 threads"`` (+ ``", GPU NVIDIA H100"`` on CUDA)."""
    text = (f"CPU {cpu_model()}, {usable_cores()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text
