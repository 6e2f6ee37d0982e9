"""The native CPU kernels of the SSIP pass (``robnet_svc/bounds/native.py``): each kernel
against the PyTorch ops it replaces, NaN bounds kept unknown, bad input refused, and the
build: published to a cache that later processes load, reported before it starts, and a clean
fallback where it cannot be built. Whole passes with and without them: ``test_chunks.py``;
soundness through every method: ``test_soundness.py``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from robnet_svc.bounds import native, propagate
from robnet_svc.bounds.ops.relu import relu_relaxation

DTYPES = [torch.float32, torch.float64]


@pytest.fixture(scope="module")
def ext():
    module = native.kernels()
    if module is None:
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip(f"no C++ compiler here: {native.status()}")
        pytest.fail(f"the native kernels did not build though a compiler is here: {native.status()}")
    return module


def _close(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> bool:
    tol = 64 * torch.finfo(b.dtype).eps * max(scale, float(b.abs().max()) if b.numel() else 0.0, 1.0)
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a - b).abs() <= tol).all())


def _rows(b: int, k: int, n: int, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(b, k, n, generator=gen, dtype=dtype)
    r = torch.rand(b, k, n, generator=gen, dtype=dtype)
    cc, rc = torch.randn(b, n, generator=gen, dtype=dtype), torch.rand(b, n, generator=gen, dtype=dtype)
    mid, rad = torch.randn(b, k, generator=gen, dtype=dtype), torch.rand(b, k, generator=gen, dtype=dtype)
    return c, r, cc, rc, mid, rad


def _reference_bounds(c, r, lo_const, up_const, mid, rad):
    """The engine's ``_bound_of_rows`` on the whole batch."""
    m3, q3 = mid.unsqueeze(1), rad.unsqueeze(1)
    lo, up = c - r, c + r
    lower = propagate._bound_of_rows(lo_const, m3, q3, lo, lo.abs(), -1.0).squeeze(1)
    upper = propagate._bound_of_rows(up_const, m3, q3, up, up.abs(), 1.0).squeeze(1)
    return lower, upper


def test_the_kernels_build_where_a_compiler_is(ext):
    assert native.status().startswith("built") and native.library_path().is_file()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 16, 300), (1, 1, 1), (3, 5, 7)])
def test_bounds_and_rows_match_the_pytorch_ops(ext, dtype, shape):
    c, r, cc, rc, mid, rad = _rows(*shape, dtype)
    lower, upper = ext.bounds_of_rows(c, r, cc - rc, cc + rc, mid, rad)
    want_lower, want_upper = _reference_bounds(c, r, cc - rc, cc + rc, mid, rad)
    assert _close(lower, want_lower) and _close(upper, want_upper)
    hl, hu = torch.rand_like(cc) / 2, torch.rand_like(cc) / 2
    centre, radius = ext.half_sums(c, r, hl, hu)
    want_centre, want_radius = propagate._half_sums(c - r, c + r, hl.unsqueeze(1), hu.unsqueeze(1))
    assert _close(centre, want_centre) and _close(radius, want_radius)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interval", ["bounds", "mid_rad"])
@pytest.mark.parametrize("tight", [False, True])
def test_relu_step_matches_the_pytorch_ops(ext, dtype, interval, tight):
    """Bounds ∩ interval ∩ tighter bounds, ``relu_relaxation``, the next rows and constants,
    the output interval: as the engine's PyTorch ops compute them. The data puts neurons in
    every case: stable active and inactive, unstable both ways, and l = u = 0."""
    b, k, n = 3, 6, 200
    c, r, cc, rc, mid, rad = _rows(b, k, n, dtype, seed=1)
    c[:, :, :10], r[:, :, :10], cc[:, :10], rc[:, :10] = 0, 0, 0, 0  # l = u = 0
    gen = torch.Generator().manual_seed(2)
    iv_mid = cc + torch.randn(b, n, generator=gen, dtype=dtype)
    iv_rad = torch.rand(b, n, generator=gen, dtype=dtype) * 8
    iv_rad[:, :10], iv_mid[:, :10] = 0, 0
    t_lo = iv_mid - iv_rad + torch.rand(b, n, generator=gen, dtype=dtype)
    t_up = iv_mid + iv_rad - torch.rand(b, n, generator=gen, dtype=dtype)
    ivs = (iv_mid, iv_rad) if interval == "mid_rad" else (iv_mid - iv_rad, iv_mid + iv_rad)
    got = ext.relu_step(c, r, cc, rc, mid, rad, *ivs, interval == "mid_rad", *((t_lo, t_up) if tight else (None, None)))
    lower, upper = _reference_bounds(c, r, cc - rc, cc + rc, mid, rad)
    lower, upper = torch.maximum(iv_mid - iv_rad, lower), torch.minimum(iv_mid + iv_rad, upper)
    if tight:
        lower, upper = torch.maximum(lower, t_lo), torch.minimum(upper, t_up)
    relax = relu_relaxation(lower, upper)
    hl, hu = relax.lower_slope * 0.5, relax.upper_slope * 0.5
    centre, radius = propagate._half_sums(c - r, c + r, hl.unsqueeze(1), hu.unsqueeze(1))
    mid_b, rad_b = (relax.upper_bias + relax.lower_bias) * 0.5, (relax.upper_bias - relax.lower_bias) * 0.5
    consts = propagate._half_sum_consts(hl, hu, mid_b, rad_b, cc - rc, cc + rc)
    out_lo, out_up = torch.relu(lower), torch.relu(upper)
    want = [lower, upper, centre, radius, *consts, out_lo, out_up, (out_up + out_lo) / 2, (out_up - out_lo) / 2]
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert _close(g, w, scale=float(upper.abs().max())), f"output {i}"
    assert ((lower < 0) & (upper > 0)).any() and (lower >= 0).any() and (upper < 0).any()


def test_a_nan_bound_stays_unknown(ext):
    """A NaN interval bound must never turn into a finite relaxation (a 0 upper slope would
    claim ReLU(x) <= 0): the neuron's bounds, rows and constants stay NaN, the others are
    untouched; a NaN equation bound leaves the (sound) interval bound."""
    dtype = torch.float64
    c, r, cc, rc, mid, rad = _rows(2, 4, 6, dtype, seed=3)
    iv_lo, iv_up = cc - 50, cc + 50
    iv_up[0, 1] = float("nan")
    got = ext.relu_step(c, r, cc, rc, mid, rad, iv_lo, iv_up, False, None, None)
    upper, centre, radius, centre_const = got[1], got[2], got[3], got[4]
    assert upper[0, 1].isnan() and centre[0, :, 1].isnan().all() and radius[0, :, 1].isnan().all()
    assert centre_const[0, 1].isnan() and got[7][0, 1].isnan()  # relu(u) of the output interval
    others = torch.ones_like(upper, dtype=torch.bool)
    others[0, 1] = False
    assert torch.isfinite(upper[others]).all() and torch.isfinite(centre.transpose(1, 2)[others]).all()
    c[1, 2, 3] = float("nan")  # the equations of sample 1, neuron 3 are unknown: the interval bounds it
    got = ext.relu_step(c, r, cc, rc, mid, rad, cc - 50, cc + 50, False, None, None)
    assert got[0][1, 3] == (cc - 50)[1, 3] and got[1][1, 3] == (cc + 50)[1, 3]
    pixels = torch.rand(2, 5, dtype=dtype)
    pixels[1, 4] = float("nan")
    out = ext.clip_layer(pixels, torch.full_like(pixels, 0.1), torch.zeros_like(pixels), [False, True, False, True, False],
                         [1.0, 0.0, -1.0, 0.0, -1.0], [0.0, 0.0, 1.0, 0.0, 1.0], [torch.empty(0, dtype=dtype)] * 5,
                         [torch.empty(0, dtype=dtype)] * 5)
    assert all(t[1, 4].isnan() for t in out[-4:]) and all(torch.isfinite(t[0]).all() for t in out[-4:])


def test_the_kernels_refuse_bad_input(ext):
    c, r, cc, rc, mid, rad = _rows(2, 3, 4, torch.float32)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.bounds_of_rows(c.transpose(1, 2), r.transpose(1, 2), cc, rc, mid, rad)
    with pytest.raises(RuntimeError, match="dtype"):
        ext.half_sums(c, r, cc.double(), rc)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ext.half_sums(c.half(), r.half(), cc.half(), rc.half())
    with pytest.raises(RuntimeError, match=r"\[B, 3\]"):
        ext.bounds_of_rows(c, r, cc, rc, mid[:, :2], rad)


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


def test_a_build_is_reported_published_and_loaded_by_later_processes(tmp_path, ext):
    """A fresh cache: the first process reports the build before it starts and publishes the
    library; the next loads it without building."""
    code = """
        import time
        from robnet_svc.bounds import native
        start = time.perf_counter()
        assert native.kernels(report=lambda line: print("REPORT", line)) is not None, native.status()
        print("STATUS", native.status())
        print("SECONDS", time.perf_counter() - start)
        """
    env = {"XDG_CACHE_HOME": str(tmp_path), native.ENV: "1"}
    first = _python(code, env)
    assert first.returncode == 0, first.stderr
    assert "REPORT building the CPU kernels" in first.stdout
    assert f"STATUS built ({tmp_path}" in first.stdout
    assert [p.name for p in tmp_path.glob("robnet-svc/native/*/*")] == [f"{native.NAME}.so"]  # no partial file left
    second = _python(code, env)
    assert second.returncode == 0, second.stderr
    assert "REPORT" not in second.stdout and f"STATUS built ({tmp_path}" in second.stdout


def test_without_a_compiler_the_engine_falls_back_to_the_pytorch_ops(tmp_path):
    """No compiler: ``kernels()`` is None, ``status()`` says why, and a bound pass outside
    autograd still runs (on the PyTorch ops)."""
    code = """
        import torch
        from robnet_svc.bounds import compile_network, native
        from robnet_svc.plugins import load_registry
        assert native.kernels() is None
        print("STATUS", native.status())
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3))
        images = torch.rand(2, 1, 8, 8)
        aset = load_registry().perturbation("bias-field")(0.1, order=2, mode="mult", clip=(0.0, 1.0)).affine_set(images)
        with torch.no_grad():
            lower = load_registry().bound_method("ssip")().margin_lower(compile_network(net), aset, torch.zeros(2).long())
        print("BOUND", bool(torch.isfinite(lower).all()))
        """
    done = _python(code, {"XDG_CACHE_HOME": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler"),
                          native.ENV: "1"})
    assert done.returncode == 0, done.stderr
    assert "STATUS unavailable (" in done.stdout and "PyTorch ops" in done.stdout
    assert "BOUND True" in done.stdout
    assert not list(tmp_path.glob("robnet-svc/native/*/*.so"))


def test_the_switch_turns_them_off(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    assert native.kernels() is None and native.status().startswith("off")
