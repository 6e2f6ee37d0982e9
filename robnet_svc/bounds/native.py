"""Hand-written CPU kernels for the SSIP step at an activation outside autograd (certification,
every bound pass under ``no_grad``), built once per machine from ``native/ssip_step.cpp``.

Why: outside autograd the step at an activation reads the centre and radius rows ``[B, k, N]``,
bounds both equations over the box, relaxes, and writes the next rows. As PyTorch ops (on
batch chunks, ``propagate._concretize_outside_autograd``) that is some fourteen passes over
each chunk (``c − r``, ``|·|``, two ``baddbmm`` per equation, then ``c ± r`` again, a multiply
and two ``addcmul``); the kernels here do it in two, one per kernel, each reading the rows once:

- ``bounds_of_rows(c, r, lo_const, up_const, mid, rad) -> (lower, upper)``;
- ``half_sums(c, r, hl, hu) -> (centre, radius)`` (slopes ``>= 0``).

The relaxation between them stays the rule's own (``rule.relax`` on ``[B, N]``), so every
activation with non-negative slopes uses them. Measured on one core (Xeon, batch 64, k = 16,
DM-small's first ReLU, 4,096 neurons): bounds 13.4 → 3.2 ms, rows 13.7 → 6.1 ms (the rows
kernel runs at the speed of a copy of the rows).
They equal the PyTorch ops up to the order of the ``k``-term sums, in float32 and float64;
certification's rounding analysis (``robnet_svc.rounding``) holds for any order.

Building: ``torch.utils.cpp_extension`` compiles the source (about 25 s, g++ and ninja, the
``ninja`` package is a dependency) into a private temporary directory, and the library is then
published atomically into ``$XDG_CACHE_HOME/robnet-svc/native/<key>/`` (``~/.cache`` by
default), ``key`` a hash of the source, the compiler flags, torch's and Python's versions and
the machine architecture: later processes load it in milliseconds, and two processes building
at once both finish (no lock to go stale when one is killed). Where it cannot be built (no
compiler, another platform) the engine runs the PyTorch ops, with the same results to rounding;
``status()`` says which and why. ``ROBNET_SVC_NATIVE=0`` turns the kernels off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

import torch

ENV = "ROBNET_SVC_NATIVE"
SOURCE = Path(__file__).with_name("native") / "ssip_step.cpp"
NAME = "robnet_svc_ssip_step"
#: -O3 vectorises the loops; -fno-trapping-math lets it vectorise the ones with comparisons
#: (it assumes no floating-point trap is enabled, as PyTorch does; every result stays IEEE's).
#: No -march=native: the cache may be shared by machines of one architecture but different
#: CPUs, and the kernels are bound by memory (AVX-512 measured no faster than baseline vectors).
FLAGS = ("-O3", "-fno-trapping-math")

_lock = threading.Lock()
_state: dict[str, object] = {}


def enabled() -> bool:
    """False when ``ROBNET_SVC_NATIVE=0`` asks for the PyTorch ops."""
    return os.environ.get(ENV, "1") != "0"


def cache_dir() -> Path:
    """Where built libraries are kept: ``$XDG_CACHE_HOME/robnet-svc/native`` (``~/.cache``)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "robnet-svc" / "native"


def build_key() -> str:
    """Hash of everything the built library depends on."""
    parts = [SOURCE.read_bytes(), " ".join(FLAGS).encode(), torch.__version__.encode(),
             sys.version.encode(), platform.machine().encode(), platform.system().encode()]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part + b"\0")
    return digest.hexdigest()[:16]


def library_path() -> Path:
    """The cached library for this source, torch and Python (it may not exist yet)."""
    return cache_dir() / build_key() / f"{NAME}.so"


def kernels(report=None) -> ModuleType | None:
    """The kernels' module, built or loaded once per process; None where they are turned off or
    cannot be built (``status()`` says why). ``report(line)``, if given, hears of a build
    before it starts (it takes about 25 s)."""
    if not enabled():
        return None
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" not in _state:
            module, why = None, None
            try:
                module = _load_or_build(report)
            except Exception as exc:  # noqa: BLE001 - any failure to build means: use the PyTorch ops
                why = f"{type(exc).__name__}: {_first_line(exc)}"
            _state["module"], _state["why"] = module, why
    return _state["module"]


def status() -> str:
    """One line: whether the engine uses the kernels, and why not."""
    if not enabled():
        return f"off ({ENV}=0): PyTorch ops"
    module = kernels()
    if module is not None:
        return f"built ({library_path()})"
    return f"unavailable ({_state.get('why')}): PyTorch ops"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_or_build(report) -> ModuleType:
    target = library_path()
    if target.exists():
        return _load(target)
    if report is not None:
        report("building the CPU kernels of the SSIP bound step (once per machine and torch version, about 30 s)")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"
    from torch.utils import cpp_extension

    path = os.environ.get("PATH", "")
    try:
        import ninja  # the PyPI package: its binary, also when the venv's bin is not on PATH

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    except ImportError:
        pass
    try:
        with tempfile.TemporaryDirectory(prefix="robnet-svc-build-") as build:
            module = cpp_extension.load(NAME, [str(SOURCE)], extra_cflags=list(FLAGS), build_directory=build,
                                        verbose=False)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{NAME}.{os.getpid()}.{threading.get_ident()}.so")
            shutil.copyfile(module.__file__, partial)
            os.replace(partial, target)  # atomic: a reader sees no library or a whole one
    finally:
        os.environ["PATH"] = path
    return module  # loaded from the build directory: the mapping outlives its file
