"""`robnet-svc harden --compile` end to end: the fused kernels train, the certificate comes from
the eager engine, and a machine that cannot compile gets one line and exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import h5py
import pytest

from cli_support import FAST, FAST_TRAIN, invoke

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="torch.compile needs a C++ compiler on the CPU")


@needs_compiler
def test_harden_with_compile_trains_with_the_fused_kernels_and_certifies_eagerly(digits_onnx, tmp_path, capsys):
    out = tmp_path / "out"
    r = invoke(capsys, "harden", digits_onnx, *FAST, *FAST_TRAIN, "--method", "ssip", "--compile", "--out", out)
    assert r.code == 0, r.err
    assert "--compile: fused kernels ready in" in r.err
    with h5py.File(out / "certificate.h5") as f:
        assert json.loads(f["provenance"].attrs["config_json"])["compile"] is True
        certified = f["certificates/after/certified"][()]
    # the certificate is the eager engine's: certifying the exported file again gives it exactly
    again = invoke(capsys, "certify", out / "model.robust.onnx", *FAST, "--out", tmp_path / "again")
    assert again.code == 0, again.err
    with h5py.File(tmp_path / "again" / "certificate.h5") as f:
        assert (f["certificates/model/certified"][()] == certified).all()


def test_compile_without_a_compiler_is_one_line_and_exit_2(digits_onnx, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}  # a fresh cache: nothing compiled earlier is reused
    done = subprocess.run([sys.executable, "-m", "robnet_svc", "harden", str(digits_onnx), *FAST, *FAST_TRAIN,
                           "--method", "ssip", "--compile", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "--compile" in lines[0] and "C++ compiler" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_compile_with_a_method_without_an_ssip_pass_warns_and_trains_as_usual(digits_onnx, tmp_path, capsys):
    r = invoke(capsys, "harden", digits_onnx, *FAST, *FAST_TRAIN, "--method", "rsip-ibp", "--compile",
               "--out", tmp_path / "out")
    assert r.code == 0, r.err
    assert "warning: --compile fuses the forward symbolic (SSIP) pass" in r.err and "rsip-ibp" in r.err
    assert "fused kernels ready" not in r.err
