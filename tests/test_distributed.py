"""Distributed runs (torchrun, DDP): the work split, the loss weighting, per-sample attack seeds,
and real 2-process CPU (gloo) runs that must match a 1-process run."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from cli_support import FAST, digits_model, interrupt_at
from robnet_svc.bounder import Bounder
from robnet_svc.certify import AttackSettings, Certificates, certify_model
from robnet_svc.cli import main
from robnet_svc.distributed import Dist
from robnet_svc.models import export_onnx, tiny_cnn
from robnet_svc.pipeline import CHECKPOINT_FILE, Options, harden
from robnet_svc.plugins import load_registry
from robnet_svc.training import RobustObjective, epoch_batches

TORCHRUN = Path(sys.executable).parent / "torchrun"


# --------------------------------------------------------------------------- the split of the work


@pytest.mark.parametrize("num, world", [(10, 2), (7, 3), (2, 3), (0, 2), (5, 1)])
def test_shards_cover_everything_in_order(num, world):
    shards = [list(range(num))[Dist(rank, world).shard(num)] for rank in range(world)]
    assert sum(shards, []) == list(range(num))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_rank_gets_its_share_of_the_same_global_batches(world):
    """Global batch i is the same set of samples for any number of processes (batch 5, not divisible)."""
    one = epoch_batches(23, 5, seed=3, epoch=1)
    ranks = [epoch_batches(23, 5, seed=3, epoch=1, rank=r, world_size=world) for r in range(world)]
    assert {len(b) for b in ranks} == {len(one)} == {5}  # same number of steps on every rank
    for i, batch in enumerate(one):
        assert sorted(torch.cat([r[i] for r in ranks]).tolist()) == sorted(batch.tolist())


def test_rank_losses_average_to_the_one_process_gradient():
    """What DDP computes (the mean over ranks of each rank's gradient) is the 1-process gradient of
    the same global batch, with shards of unequal size and an empty one."""
    registry = load_registry()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3))
    images = torch.rand(5, 1, 4, 4)
    with torch.no_grad():
        labels = net(images).argmax(-1)
    labels[0] = (labels[0] + 1) % 3  # one misclassified sample: no robust loss for it
    pert = registry.perturbation("brightness")(0.5)  # some margins certified, some not
    bounder = Bounder(net, registry.bound_method("rsip-ssip")(), pert, (1, 4, 4))

    def gradient(objective, x, y):
        net.zero_grad()
        loss, stats = objective(x, y, 0.5, images.shape[0])
        loss.backward()
        return [p.grad.clone() for p in net.parameters()], stats

    full, stats = gradient(RobustObjective(bounder, alpha=2.0), images, labels)
    assert 0 < stats[3] < stats[2]  # the robust term contributes, for some correct samples
    for world in (2, 3, 6):  # 6 > 5 samples: one rank has an empty shard
        objective = RobustObjective(bounder, alpha=2.0, world_size=world)
        parts = [gradient(objective, images[r::world], labels[r::world]) for r in range(world)]
        mean = [sum(g) / world for g in zip(*(grads for grads, _ in parts))]
        for a, b in zip(full, mean):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sum(s for _, s in parts), stats)


def test_attack_depends_on_the_sample_not_on_its_batch_or_shard():
    registry = load_registry()
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    images = torch.rand(12, 1, 8, 8)
    with torch.no_grad():
        labels = net(images).argmax(-1)
    pert = registry.perturbation("bias-field")(0.3, order=1)
    bounder = Bounder(net, registry.bound_method("ibp")(), pert, (1, 8, 8))
    kwargs = dict(attack=AttackSettings(steps=3, restarts=4, seed=5), device=torch.device("cpu"))
    ids = torch.arange(100, 112)
    whole = certify_model(bounder, images, labels, batch_size=12, sample_ids=ids, **kwargs)
    parts = [certify_model(bounder, images[s], labels[s], batch_size=4, sample_ids=ids[s],
                           **kwargs) for s in (slice(0, 7), slice(7, 7), slice(7, 12))]
    sharded = Certificates.concat(parts)
    assert whole.index.tolist() == sharded.index.tolist() == ids.tolist()
    for name in ("certified", "attack_success", "prediction"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(sharded, name))
    np.testing.assert_allclose(whole.attack_margin, sharded.attack_margin, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(whole.margin_lower, sharded.margin_lower, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- real torchrun jobs

ARGS = (*FAST, "--epochs", "2", "--max-train", "120", "--batch-size", "30", "--json")


def _torchrun(*args, timeout: float = 150) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ROBNET_SVC_DIST_TIMEOUT": "60"}
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "robnet_svc",
                           *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same harden run with 1 process, with 2 (gloo), and with 2 resuming a killed 1-process run."""
    if not TORCHRUN.exists():
        pytest.skip(f"no torchrun next to {sys.executable}")
    root = tmp_path_factory.mktemp("dist")
    model = digits_model(root / "m.onnx")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what torchrun gives each rank: the same arithmetic in both runs
    try:
        one = _in_process(model, root / "one")
        with pytest.raises(KeyboardInterrupt):
            harden(_options(model, root / "resumed"), {}, "test", interrupt_at("epoch 1/"))
    finally:
        torch.set_num_threads(threads)
    two = _torchrun("harden", model, *ARGS, "--out", root / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    resumed = _torchrun("harden", model, *ARGS, "--out", root / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"one": (root / "one", one), "two": (root / "two", two.stdout),
            "resumed": (root / "resumed", resumed.stdout), "resumed_err": resumed.stderr}


def _options(model: Path, out: Path) -> Options:
    return Options(model=str(model), dataset="digits", eps=0.05, order=1, max_test=40, attack_steps=3,
                   attack_restarts=2, device="cpu", epochs=2, max_train=120, batch_size=30, out=str(out))


def _in_process(model: Path, out: Path) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        try:
            main(["harden", str(model), *ARGS, "--out", str(out)])
        except SystemExit as exc:
            assert exc.code in (0, None)
    return stdout.getvalue()


@pytest.mark.parametrize("run", ["two", "resumed"])
def test_two_processes_certify_the_same_samples_as_one(runs, run):
    (one, one_out), (other, other_out) = runs["one"], runs[run]
    assert {"model.robust.onnx", "certificate.h5", "summary.json", CHECKPOINT_FILE, "report"} == {
        p.name for p in other.iterdir()}
    a, b = torch.load(one / CHECKPOINT_FILE, weights_only=True), torch.load(other / CHECKPOINT_FILE, weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5)
    for row_a, row_b in zip(a["history"], b["history"]):  # statistics of the global batches
        for key in ("loss", "train_clean_accuracy", "train_certified_accuracy", "val_certified_accuracy"):
            assert row_a[key] == pytest.approx(row_b[key], rel=1e-4, abs=1e-6), key
    with h5py.File(one / "certificate.h5") as fa, h5py.File(other / "certificate.h5") as fb:
        for section in ("before", "after"):
            for name in ("index", "label", "prediction", "certified", "attack_success"):
                np.testing.assert_array_equal(fa[f"certificates/{section}/{name}"][()],
                                              fb[f"certificates/{section}/{name}"][()], err_msg=f"{section}/{name}")
            np.testing.assert_allclose(fa[f"certificates/{section}/margin_lower"][()],
                                       fb[f"certificates/{section}/margin_lower"][()], rtol=1e-4, atol=1e-4)
    # only rank 0 printed the summary: one JSON document on stdout, equal to the 1-process one's sections
    assert json.loads(other_out)["sections"].keys() == json.loads(one_out)["sections"].keys()
    assert json.loads(other_out)["sections"]["after"]["certified_accuracy"] == \
        json.loads(one_out)["sections"]["after"]["certified_accuracy"]


def test_a_distributed_run_resumes_a_checkpoint(runs):
    assert "resuming from" in runs["resumed_err"] and "after epoch 1" in runs["resumed_err"]


def test_a_failing_rank_stops_the_job_quickly_with_its_error(tmp_path):
    """Only rank 0 checks --out; rank 1 goes on and waits for it in the rendezvous: torchrun must stop it."""
    if not TORCHRUN.exists():
        pytest.skip(f"no torchrun next to {sys.executable}")
    model = tmp_path / "m.onnx"
    export_onnx(tiny_cnn(1, 10, 8, width=2), (1, 8, 8), model)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    began = time.monotonic()
    r = _torchrun("harden", model, *ARGS, "--out", busy, timeout=90)
    assert r.returncode != 0
    assert time.monotonic() - began < 60
    assert "rank 0/2: error: --out" in r.stderr and "not empty; use --force" in r.stderr
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
