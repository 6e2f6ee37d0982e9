"""Everyday use on shared machines and in pipelines (issue 17): threads, progress in logs,
interruptions, file modes, resolved config, exit codes, refusals, the exporter, start-up."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cli_support import FAST, FAST_TRAIN, interrupt_at, invoke
from robnet_svc import threads
from robnet_svc.atomic import atomic_path
from robnet_svc.pipeline import CHECKPOINT_FILE, MODEL_FILE, PARTIAL_MODEL_FILE, Options, harden
from robnet_svc.progress import LineProgress, rich_progress

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(digits_onnx, tmp_path_factory):
    """One harden run with plain progress lines at every update (stderr is not a terminal here)."""
    out = tmp_path_factory.mktemp("run") / "out"
    from robnet_svc.cli import main  # called directly: module-scoped, so no capsys

    old_mask = os.umask(0o022)
    os.environ["ROBNET_SVC_PROGRESS_INTERVAL"] = "0"
    err = io.StringIO()
    saved_err, sys.stderr = sys.stderr, err
    try:
        main(["harden", str(digits_onnx), *FAST, *FAST_TRAIN, "--threads", "1", "--out", str(out)])
    except SystemExit as exc:
        assert exc.code in (0, None)
    finally:
        sys.stderr = saved_err
        del os.environ["ROBNET_SVC_PROGRESS_INTERVAL"]
        os.umask(old_mask)
    return out, err.getvalue()


# --------------------------------------------------------------------------- 1. threads


def test_threads_option_sets_every_pool_and_is_recorded(run):
    out, _err = run
    assert torch.get_num_threads() == 1 and threads.current() == 1
    import onnxruntime as ort

    options = ort.SessionOptions()
    threads.apply_to_ort(options)
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    with h5py.File(out / "certificate.h5") as f:
        config = json.loads(f["provenance"].attrs["config_json"])
    assert config["threads"] == 1


def test_default_threads_leave_room_for_other_processes(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = threads.usable_cores()
    assert threads.default_threads() == min(threads.MAX_DEFAULT, max(1, cores // 2))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads() == 3
    before = torch.get_num_threads()
    try:
        assert threads.configure(2) == 2 and torch.get_num_threads() == 2 and threads.decode_workers() == 2
    finally:
        threads.configure(before)


# --------------------------------------------------------------------------- 2. progress


def test_plain_progress_lines_when_stderr_is_not_a_terminal(run):
    _out, err = run
    assert re.search(r"robnet-svc: epoch 1/1: 1/4 \(25%\), [\d.]+/s, ETA \S+, loss [\d.]+ acc [\d.]+ cert [\d.]+ eps",
                     err), err
    assert re.search(r"robnet-svc: certify before: 40/40 \(100%\), [\d.]+/s, ETA 0s, cert 0\.\d+", err), err
    assert "\r" not in err and "\x1b[" not in err  # no bar, no cursor movement in a log


def test_line_progress_keeps_a_steady_interval():
    now = [0.0]
    stream = io.StringIO()
    bar = LineProgress(stream, interval=30.0, clock=lambda: now[0])
    task = bar.add_task("epoch 1/3", total=100, stats="")
    for _ in range(100):  # one step per second
        now[0] += 1.0
        bar.update(task, advance=1, stats="loss 0.5")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3  # at 30, 60 and 90 s
    assert lines[0] == "robnet-svc: epoch 1/3: 30/100 (30%), 1/s, ETA 1m10s, loss 0.5"


def test_rich_bars_fit_80_columns():
    from rich.console import Console

    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    bar = rich_progress(console)
    stats = "loss 12.345 acc 0.99 cert 0.99 eps 0.25"  # the longest the training loop writes
    bar.add_task("epoch 10/10", total=12345, completed=678, stats=stats)
    bar.add_task("certify before", total=1311, completed=128, stats="cert 0.812")
    console.print(bar.get_renderable())
    lines = [line for line in console.file.getvalue().splitlines() if line.strip()]
    assert len(lines) == 2 and stats in lines[0] and all(len(line) <= 80 for line in lines), lines


# --------------------------------------------------------------------------- 3. interruptions


def _options(digits_onnx, out, **extra) -> Options:
    return Options(model=str(digits_onnx), dataset="digits", eps=0.05, order=1, max_test=40, attack_steps=3,
                   attack_restarts=2, device="cpu", epochs=1, max_train=128, batch_size=32, out=str(out), **extra)


def test_interrupt_in_the_final_certification_leaves_no_uncertified_model(digits_onnx, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        harden(_options(digits_onnx, out), {}, "test", interrupt_at("certifying the hardened model"))
    assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT_FILE]  # no model, no partial file
    assert not (out / MODEL_FILE).exists() and not (out / PARTIAL_MODEL_FILE).exists()


def test_failure_before_anything_is_written_leaves_no_empty_folder(digits_onnx, tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(KeyboardInterrupt):
        harden(_options(digits_onnx, out), {}, "test", interrupt_at("certifying the input model"))
    assert not out.exists()


def test_sigterm_is_an_interrupt_with_the_resume_command(digits_onnx, tmp_path):
    out = tmp_path / "out"
    args = ["harden", str(digits_onnx), *FAST, "--epochs", "50", "--max-train", "256", "--batch-size", "32",
            "--checkpoint-every", "0", "--force", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from robnet_svc.cli import main; main()", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / CHECKPOINT_FILE).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("robnet-svc: terminated; continue with: robnet-svc harden "), stderr
    assert last.endswith(f"--out {out} --resume") and "--force" not in last
    assert not (out / MODEL_FILE).exists()


# --------------------------------------------------------------------------- 4. outputs


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "f.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == mode


def test_outputs_are_readable_by_the_group_and_config_is_resolved(run):
    out, _err = run
    for name in ("certificate.h5", "summary.json", MODEL_FILE, CHECKPOINT_FILE):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    with h5py.File(out / "certificate.h5") as f:
        config = json.loads(f["provenance"].attrs["config_json"])
    assert config["mode"] == "mult" and config["order"] == 1 and config["coef_scale"] > 0
    assert config["ramp_epochs"] == pytest.approx(4 / 7) and config["max_test"] == 40
    assert config["max_train"] == 128 and config["device"] == "cpu"
    unresolved = sorted(k for k, v in config.items() if v is None)
    # not applicable here (no --radius, no data folder, no preset, ...), not unresolved defaults
    assert unresolved == ["data_dir", "fail_under", "image_shape", "preset", "radius_max", "radius_precision"]


def test_summary_reports_peak_memory(run):
    out, _err = run
    summary = json.loads((out / "summary.json").read_text())
    assert 50 < summary["peak_rss_mib"] < 64 * 1024 and summary["peak_gpu_mib"] is None


# --------------------------------------------------------------------------- 5. exit codes


def test_exit_codes_do_not_depend_on_debug(tmp_path, capsys, monkeypatch):
    for debug in ((), ("--debug",)):
        bad = invoke(capsys, *debug, "certify", tmp_path / "missing.onnx")
        assert bad.code == 2 and "robnet-svc: error:" in bad.err
        assert ("Traceback" in bad.err) == bool(debug)

    def broken(_path):  # a bug inside a command (an exception robnet-svc does not expect)
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("robnet_svc.report.read_report", broken)
    for debug in ((), ("--debug",)):
        r = invoke(capsys, *debug, "report", "show", tmp_path / "x.h5")
        assert r.code == 4 and "internal error: ZeroDivisionError" in r.err
        assert ("Traceback" in r.err) == bool(debug)


def _impossible_allocation(*_args, **_kwargs):
    """Stands in for a bound pass too big for the machine: a real request to torch's CPU
    allocator that it cannot serve (4 EiB), so the failure is the allocator's own."""
    return torch.empty(1 << 62, dtype=torch.uint8)


def test_out_of_memory_is_one_line_with_what_to_change(digits_onnx, tmp_path, capsys, monkeypatch):
    """A run that does not fit in memory is not a bug (exit 4, "internal error") but a usage
    problem: exit 2, the allocator's line and the options to change, nothing written."""
    import robnet_svc.bounds.propagate as propagate

    monkeypatch.setattr(propagate, "forward_pass", _impossible_allocation)
    for debug in ((), ("--debug",)):
        r = invoke(capsys, *debug, "certify", digits_onnx, *FAST, "--out", tmp_path / "out")
        assert r.code == 2, r.err
        last = r.err.strip().splitlines()[-1]
        assert last.startswith("robnet-svc: error: out of memory (DefaultCPUAllocator: can't allocate memory: "
                               f"you tried to allocate {1 << 62} bytes")
        assert "--cert-batch-size" in last and "--batch-size" in last
        assert ("Traceback" in r.err) == bool(debug)
        if not debug:  # the error is one line (after the progress lines)
            assert [line for line in r.err.splitlines() if "error" in line.lower()] == [last]
        assert not (tmp_path / "out").exists()


def test_allocation_failures_are_recognised_and_nothing_else():
    from robnet_svc.errors import allocation_failure, out_of_memory

    with pytest.raises(RuntimeError) as cpu:
        _impossible_allocation()
    assert allocation_failure(cpu.value).startswith(f"DefaultCPUAllocator: can't allocate memory: you tried to "
                                                    f"allocate {1 << 62} bytes")
    assert str(out_of_memory(cpu.value)).startswith("out of memory (DefaultCPUAllocator: ")
    with pytest.raises(MemoryError) as python:
        bytearray(1 << 62)
    assert allocation_failure(python.value) == "MemoryError"
    buried = RuntimeError("The following operation failed in the TorchScript interpreter.\nTraceback...\n"
                          "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert allocation_failure(buried) == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert allocation_failure(ValueError("bad value")) is None and out_of_memory(ZeroDivisionError()) is None


# --------------------------------------------------------------------------- 6. refusals


def test_model_without_trainable_weights_is_refused_before_any_work(tmp_path, capsys):
    from onnx import TensorProto, helper, numpy_helper
    from onnx_factory import write_graph

    # A constant elementwise scale only: nothing the importer makes trainable (a constant MatMul
    # would become an nn.Linear) and nothing to fine-tune.
    scale = np.random.default_rng(0).uniform(0.5, 2, size=(10,)).astype(np.float32)
    path = write_graph(tmp_path / "constant.onnx", [
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(scale, "w")),
        helper.make_node("Mul", ["f", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 1, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])])
    r = invoke(capsys, "harden", path, *FAST, *FAST_TRAIN, "--out", tmp_path / "out")
    assert r.code == 2 and "no weights robnet-svc can fine-tune" in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert invoke(capsys, "certify", path, *FAST).code == 0  # certifying it is still fine


# --------------------------------------------------------------------------- 7. exporting


def test_default_dynamo_exporter_works_in_this_environment(tmp_path):
    import onnxruntime as ort

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(2 * 6 * 6, 3)).eval()
    x = torch.rand(1, 1, 8, 8)
    torch.onnx.export(net, (x,), str(tmp_path / "d.onnx"), dynamo=True)  # needs onnxscript
    session = ort.InferenceSession(str(tmp_path / "d.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.allclose(got, net(x).detach().numpy(), atol=1e-5)


# --------------------------------------------------------------------------- 8. start-up


def _imported_by(*args: str) -> list[str]:
    """The heavy libraries ``robnet-svc ARGS`` imports, in a fresh interpreter."""
    code = ("import sys; from robnet_svc.cli import main; main(sys.argv[1:]); "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'onnx', 'onnx2torch', 'torchvision') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1].replace("'", '"'))


def test_quick_commands_do_not_import_what_they_do_not_use(run):
    out, _err = run
    assert _imported_by("report", "show", str(out / "certificate.h5")) == []
    assert _imported_by("plugins", "--json") == ["torch"]  # plugin classes are torch code; no onnx stack


def test_certify_without_native_kernels_warns_once_and_certifies_the_same(digits_onnx, tmp_path, capsys, monkeypatch):
    """Where the native CPU kernels cannot be built, a run says so in one warning before its
    work and computes the same certificates with PyTorch ops (tests/bounds/test_native.py
    builds and fails to build them for real; here the pipeline's report of it)."""
    import numpy as np

    from robnet_svc.bounds import native
    from robnet_svc.report import read_report

    args = ("certify", digits_onnx, *FAST, "--cert-method", "ssip")
    r = invoke(capsys, *args, "--out", tmp_path / "with")
    assert r.code == 0, r.err
    assert "native CPU kernels" not in r.err
    monkeypatch.setitem(native._state, "module", None)
    monkeypatch.setitem(native._state, "why", "RuntimeError: Error building extension 'robnet_svc_ssip_step'")
    r = invoke(capsys, *args, "--out", tmp_path / "without")
    assert r.code == 0, r.err
    warnings = [line for line in r.err.splitlines() if "native CPU kernels" in line]
    assert warnings == ["robnet-svc: warning: native CPU kernels of the SSIP step: unavailable (RuntimeError: Error "
                        "building extension 'robnet_svc_ssip_step'): PyTorch ops; the bounds are the same, the SSIP "
                        "passes outside training slower"]
    native_run, pytorch_run = (read_report(tmp_path / name / "certificate.h5").sections["model"]
                               for name in ("with", "without"))
    assert np.array_equal(native_run.certified, pytorch_run.certified)
    assert np.allclose(native_run.margin_lower, pytorch_run.margin_lower, rtol=1e-12, atol=1e-12)
