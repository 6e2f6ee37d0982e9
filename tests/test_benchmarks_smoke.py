"""Smoke test of the benchmark command (issue 7): it runs end to end on a miniature
configuration and writes valid results. No timing assertions: speed is the benchmark's
job, not the test suite's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
METHODS = ["standard", "ibp", "ssip", "rsip-ibp", "rsip-ssip"]
#: the run also times ssip and rsip-ssip with harden --compile's fused kernels where torch can compile
COMPILES = shutil.which(os.environ.get("CXX", "g++")) is not None


def run_benchmark(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "benchmarks.run", "--networks", "tiny", "--batch", "4",
               "--warmup", "0", "--repeats", "1", "--cert-batch", "4", "--rsip-cert-batch", "2",
               "--threads", "1", "--out", str(tmp_path / "results.json"),
               "--docs", str(tmp_path / "benchmarks.md"), *extra]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_benchmark_command_writes_issue7_results(tmp_path):
    (tmp_path / "benchmarks.md").write_text("# Benchmarks\n\nprose kept\n\n<!-- results:cpu -->\nold\n"
                                            "<!-- /results:cpu -->\n\ntail kept\n")
    done = run_benchmark(tmp_path, "--no-isolate", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-2000:]

    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"machine", "rows", "ssip_floor_ratio", "cert_samples_per_s"}
    assert "cores" in results["machine"] and "torch" in results["machine"]
    fused = ["ssip --compile", "rsip-ssip --compile"] if COMPILES else []
    assert [r["method"] for r in results["rows"]] == METHODS[:3] + fused[:1] + METHODS[3:] + fused[1:]
    for row in results["rows"]:
        assert set(row) == {"network", "method", "step_s", "ratio_to_standard", "peak_mem_mb"}
        assert row["network"] == "tiny"
        assert row["step_s"] > 0 and row["ratio_to_standard"] > 0 and row["peak_mem_mb"] > 0, row
    assert results["rows"][0]["ratio_to_standard"] == pytest.approx(1.0)
    assert results["ssip_floor_ratio"]["tiny"] > 0
    assert ("tiny --compile" in results["ssip_floor_ratio"]) == COMPILES
    assert set(results["cert_samples_per_s"]["tiny"]) == {"rsip-ssip", "rsip"}
    assert all(v > 0 for v in results["cert_samples_per_s"]["tiny"].values())

    assert "SSIP pass / floor [tiny]" in done.stdout  # every measured target is printed as a ratio
    from benchmarks.peer import unavailable
    if unavailable():  # peer mode says why it is off
        assert f"peer mode: {unavailable()}" in done.stdout
    docs = (tmp_path / "benchmarks.md").read_text()
    assert "prose kept" in docs and "tail kept" in docs and "old" not in docs
    assert "| tiny | rsip-ssip |" in docs and docs.count("<!-- results:cpu -->") == 1


def test_isolated_configuration_runs_in_a_fresh_process(tmp_path):
    from benchmarks.worker import Job, run_isolated

    got = run_isolated(Job("train", "tiny", "ibp", 4, "cpu", 0, 1, 1), timeout_s=120)
    assert "error" not in got, got
    assert got["step_s"] > 0 and got["peak_mem_mb"] > 0


def test_failed_configuration_is_reported_not_raised(capsys):
    from benchmarks.worker import MARKER, main

    assert main(['{"kind": "train", "network": "tiny", "method": "no-such-method", "batch": 4, '
                 '"device": "cpu", "warmup": 0, "repeats": 1, "threads": 1}']) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(MARKER) and "no-such-method" in json.loads(line[len(MARKER):])["error"]


def test_peer_jobs_follow_their_analogue_and_the_real_option_is_short():
    """With peer mode on, each job of a method with an auto_LiRPA analogue is followed by the
    analogue's job (interleaved); ``--real`` times only training steps of the real architectures."""
    import torch

    from benchmarks.run import parse_args, plan

    args = parse_args(["--networks", "tiny", "--mem-batch", "0"])
    args.peer = True
    _, jobs = plan(args, torch.device("cpu"))
    kinds = [(j.kind, j.method) for j in jobs]
    for ours, kind in (("rsip-ibp", "train"), ("ssip", "train"), ("rsip-ssip", "train"), ("rsip", "cert")):
        at = kinds.index((kind, ours))
        assert kinds[at + 1] == (f"peer-{kind}", ours)
        # the step with --compile's fused kernels follows the pair, for the methods with an SSIP pass
        assert (kinds[at + 2:at + 3] == [("train", ours + " --compile")]) == (ours in ("ssip", "rsip-ssip"))
    assert ("peer-train", "ibp") not in kinds and ("peer-train", "standard") not in kinds
    assert ("floor", "ssip --compile") in kinds

    args = parse_args(["--networks", "tiny", "--mem-batch", "0", "--no-compile"])
    args.peer = True
    _, jobs = plan(args, torch.device("cpu"))
    assert not [j for j in jobs if j.method.endswith(" --compile")]

    args = parse_args(["--real"])
    args.peer = False
    networks, jobs = plan(args, torch.device("cpu"))
    assert networks == ["resnet18", "efficientnet_b0"]
    assert {j.kind for j in jobs} == {"train"} and {j.batch for j in jobs} == {32}
    assert {(j.warmup, j.repeats) for j in jobs} == {(1, 1)}


def test_benchmarked_step_bounds_the_whole_batch():
    """The training step is the product's, which bounds only correctly classified samples: the
    benchmark's labels are the network's predictions, so it bounds every sample."""
    import torch

    from benchmarks.measure import build

    setup = build("tiny", 8, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(setup.model(setup.images).argmax(1), setup.labels)


def test_peer_crown_computes_our_rsip_bound():
    """Where auto_LiRPA is importable (benchmarks.peer says how to make it so), its CROWN on the
    peer wrapper and our ``rsip`` bound the same network over the same box: the margins agree to
    rounding, so the timing pair compares like with like."""
    pytest.importorskip("auto_LiRPA")
    import torch

    from benchmarks import measure

    got = measure.measure_peer_cert("tiny", "rsip", 2, torch.device("cpu"), 0, 1)
    assert got["max_abs_diff"] < 1e-4 * max(1.0, abs(got["mean_margin_ours"]))
    assert got["samples_per_s"] > 0


@pytest.mark.parametrize("method", ["ssip", "rsip-ssip"])
def test_peer_forward_modes_bound_the_same_margins(method):
    """auto_LiRPA's forward modes (the analogues of ``ssip`` / ``rsip-ssip``) run on the peer
    wrapper (the per-sample input map is a second, unperturbed input) and bound the margins
    that sampled coefficients of the same box reach: the timing pair bounds the same thing."""
    pytest.importorskip("auto_LiRPA")
    import torch

    from benchmarks import measure, peer
    from robnet_svc.bounds.spec import margin_spec

    setup = measure.build("tiny", 3, torch.device("cpu"))
    aset = setup.perturbation.affine_set(setup.images)
    with torch.no_grad():
        theirs = peer.margin_bounds(setup, peer.ANALOGUES[method][0])()
        coeffs = aset.sample(64, torch.Generator().manual_seed(0))  # [B, n, k]
        images = aset.clipped(aset.images(coeffs))  # [B, n, C, H, W]
        logits = setup.model(images.flatten(0, 1)).reshape(3, 64, -1)
        spec = margin_spec(setup.labels, logits.shape[-1])  # [B, K-1, K]
        margins = torch.einsum("bsk,bnk->bns", spec, logits)
    assert theirs.shape == (3, logits.shape[-1] - 1)
    assert (theirs.unsqueeze(1) <= margins + 1e-4).all()


def test_worker_caps_its_heap_below_physical_memory():
    """A CPU job that does not fit fails with an error of its own (RLIMIT_DATA), instead of
    waking the kernel's OOM killer."""
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_DATA caps the heap on Linux")
    code = ("from benchmarks.worker import cap_memory; import resource, torch; cap = cap_memory(); "
            "assert cap and resource.getrlimit(resource.RLIMIT_DATA)[0] == cap\n"
            "try:\n    torch.empty(cap // 4 + (1 << 28))\nexcept (MemoryError, RuntimeError) as e:\n"
            "    print('refused', type(e).__name__)")
    from benchmarks.worker import REPO

    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused" in done.stdout


def test_training_pairs_alternate_for_several_rounds_and_report_the_median():
    """On the networks of issue 20's training targets each (ours, peer) pair runs ``--rounds``
    times, alternating; each side's figure is the median over its rounds (a failed round
    counts only when every round failed)."""
    import torch

    from benchmarks.run import ROUNDS_NETWORKS, combine_rounds, parse_args, plan

    args = parse_args(["--networks", ROUNDS_NETWORKS[0], "tiny", "--mem-batch", "0", "--methods", "standard",
                       "rsip-ibp", "--cert-methods", "--rounds", "3"])
    args.peer = True
    _, jobs = plan(args, torch.device("cpu"))
    pairs = [(j.kind, j.network) for j in jobs if j.method == "rsip-ibp"]
    assert pairs == [("train", ROUNDS_NETWORKS[0]), ("peer-train", ROUNDS_NETWORKS[0])] * 3 + \
        [("train", "tiny"), ("peer-train", "tiny")]

    seen: list[dict] = []
    combine_rounds(seen, {"step_s": 3.0, "cpu_s": 3.0, "peak_mem_mb": 10.0})
    combine_rounds(seen, {"error": "timed out"})
    combine_rounds(seen, {"step_s": 1.0, "cpu_s": 1.5, "peak_mem_mb": 30.0})
    got = combine_rounds(seen, {"step_s": 2.0, "cpu_s": 2.0, "peak_mem_mb": 20.0})
    assert got["step_s"] == 2.0 and got["cpu_s"] == 2.0 and got["peak_mem_mb"] == 30.0
    assert got["rounds"] == 3 and got["cpu_s_rounds"] == [3.0, 1.5, 2.0]
    assert combine_rounds([], {"error": "x"}) == {"error": "x"}


def test_an_allocation_failure_is_reported_as_out_of_memory():
    """TorchScript puts its own line first; the report names the allocation failure."""
    from benchmarks.worker import error_line

    exc = RuntimeError("The following operation failed in the TorchScript interpreter.\nTraceback...\n"
                       "RuntimeError: [enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 3221225472 bytes.")
    assert error_line(exc).startswith("out of memory") and "3221225472 bytes" in error_line(exc)
    assert error_line(ValueError("bad\nsecond")) == "ValueError: bad"


def test_peer_targets_show_the_compiled_step_beside_the_default_one():
    """A training pair's ratio is printed for our default step and, when it was timed, for the
    step with ``--compile``'s fused kernels, both against the same auto_LiRPA figure."""
    from benchmarks.report import peer_targets

    train = {("DM-small", "ssip", 64): {"step_s": 1.5, "cpu_s": 1.4},
             ("DM-small", "ssip --compile", 64): {"step_s": 1.0, "cpu_s": 0.9}}
    peers = {("train", "DM-small", "ssip", 64): {"step_s": 2.0, "cpu_s": 2.0}}
    lines = [t.line() for t in peer_targets(train, {}, peers)]
    assert lines == ["MISS  ssip / auto_LiRPA Forward [DM-small, batch 64]: 0.75 (CPU time 0.70), target <= 0.60",
                     "PASS  ssip --compile / auto_LiRPA Forward [DM-small, batch 64]: 0.50 (CPU time 0.45), "
                     "target <= 0.60"]


@pytest.mark.parametrize("tuning", ["1", "0"])
def test_profile_runs_with_the_benchmarks_allocator_setting(tuning):
    """``benchmarks.profile`` tunes the allocator as the benchmark's workers do (untuned, page
    faults show up as autograd nodes' self time) and says which it used."""
    env = {**os.environ, "ROBNET_SVC_MALLOC_TUNING": tuning}
    command = [sys.executable, "-m", "benchmarks.profile", "--network", "tiny", "--method", "ssip",
               "--what", "bound", "--steps", "1", "--rows", "5", "--threads", "1", "--device", "cpu"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    header = next(line for line in done.stdout.splitlines() if "repetitions" in line)
    assert header.endswith("allocator tuned" if tuning == "1" else "allocator untuned")
    assert "1 threads" in header and "tiny, ssip bound" in header
    assert "aten::" in done.stdout  # the operator table
