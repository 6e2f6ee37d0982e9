"""Robust fine-tuning: schedules, loss, batches, checkpoints, and exact --resume."""

from __future__ import annotations

import json

import pytest
import torch

from cli_support import FAST, FAST_TRAIN, digits_model, interrupt_at, invoke
from robnet_svc.pipeline import CHECKPOINT_FILE, Options, harden
from robnet_svc.progress import Reporter
from robnet_svc.training import TrainSettings, epoch_batches, eps_at, lr_at, robust_loss


def test_schedules_follow_the_paper_scaled():
    assert [lr_at(p, 5e-4) for p in (0.0, 0.5, 0.58, 0.8, 0.99)] == pytest.approx(
        [5e-4, 5e-4, 5e-5, 5e-5, 5e-6])
    s = TrainSettings(eps=0.2, epochs=7)
    assert s.ramp == pytest.approx(4.0)
    assert [eps_at(step, 10, s) for step in (0, 20, 40, 60)] == pytest.approx([0.0, 0.1, 0.2, 0.2])
    assert eps_at(0, 10, TrainSettings(eps=0.2, ramp_epochs=0)) == 0.2


def test_robust_loss_is_the_hinge_on_margin_bounds():
    margin = torch.tensor([[1.0, -0.5, -2.0], [0.1, 0.2, 0.3]])
    assert robust_loss(margin).tolist() == [2.5, 0.0]


def test_epoch_batches_are_seeded_and_split_across_ranks():
    a, b = epoch_batches(10, 3, seed=1, epoch=0), epoch_batches(10, 3, seed=1, epoch=0)
    assert [t.tolist() for t in a] == [t.tolist() for t in b]
    assert [t.tolist() for t in a] != [t.tolist() for t in epoch_batches(10, 3, seed=1, epoch=1)]
    ranks = [torch.cat(epoch_batches(10, 3, seed=1, epoch=0, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(torch.cat(ranks).tolist()) == list(range(10))


def _uninterrupted_run(tmp_path, capsys):
    """A digits model and a two-epoch harden of it run to the end: (model, harden args, result)."""
    model = digits_model(tmp_path / "m.onnx")
    args = (*FAST, "--epochs", "2", "--max-train", "96", "--batch-size", "32", "--eps", "0.1")
    full = invoke(capsys, "harden", model, *args, "--out", tmp_path / "full", "--json")
    assert full.code == 0, full.err
    return model, args, full


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path, capsys):
    model, args, full = _uninterrupted_run(tmp_path, capsys)

    killed = tmp_path / "killed"
    options = Options(model=str(model), dataset="digits", eps=0.1, order=1, max_test=40, attack_steps=3,
                      attack_restarts=2, device="cpu", epochs=2, max_train=96, batch_size=32, out=str(killed))
    with pytest.raises(KeyboardInterrupt):
        harden(options, {}, "test", interrupt_at("epoch 1/"))
    state = torch.load(killed / CHECKPOINT_FILE, weights_only=True)  # plain tensors/lists/dicts only
    assert state["epoch"] == 1 and len(state["history"]) == 1
    assert not (killed / "model.robust.onnx").exists()

    refused = invoke(capsys, "harden", model, *args, "--out", killed)
    assert refused.code == 2 and "--resume" in refused.err
    resumed = invoke(capsys, "harden", model, *args, "--out", killed, "--resume", "--json")
    assert resumed.code == 0, resumed.err
    assert "resuming from" in resumed.err

    a = torch.load(tmp_path / "full" / CHECKPOINT_FILE, weights_only=True)
    b = torch.load(killed / CHECKPOINT_FILE, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    _assert_same_selection(a, b)
    assert json.loads(full.out)["sections"]["after"] == json.loads(resumed.out)["sections"]["after"]
    assert json.loads(full.out)["selection"] == json.loads(resumed.out)["selection"]


def _assert_same_selection(a: dict, b: dict) -> None:
    """Two checkpoints carry the same selection: numbers, and the chosen state's weights bit for bit."""
    best_a, best_b = a["selection"]["best"], b["selection"]["best"]
    assert {k: v for k, v in best_a.items() if k != "model"} == {k: v for k, v in best_b.items() if k != "model"}
    assert a["selection"]["baseline"] == b["selection"]["baseline"]
    for key in best_a["model"]:
        assert torch.equal(best_a["model"][key], best_b["model"][key]), key


class _KillWithinEpoch2:
    """A progress sink that stands in for a killed process: raises after the second step of epoch 2
    (after the checkpoint that ``checkpoint_every=0`` writes after every step)."""

    def __init__(self):
        self.names = {}

    def add_task(self, name, total, stats="", **fields):
        self.names[name] = 0
        return name

    def update(self, task, advance=0, **fields):
        self.names[task] += advance
        if task.startswith("epoch 2/") and self.names[task] == 2:
            raise KeyboardInterrupt

    def remove_task(self, task):
        pass


def test_resume_from_within_an_epoch_is_exact_and_keeps_before(tmp_path, capsys):
    model, args, full = _uninterrupted_run(tmp_path, capsys)

    killed = tmp_path / "killed"
    options = Options(model=str(model), dataset="digits", eps=0.1, order=1, max_test=40, attack_steps=3,
                      attack_restarts=2, device="cpu", epochs=2, max_train=96, batch_size=32, out=str(killed),
                      checkpoint_every=0.0)
    with pytest.raises(KeyboardInterrupt):
        harden(options, {}, "test", Reporter(_KillWithinEpoch2()))
    state = torch.load(killed / CHECKPOINT_FILE, weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2) and len(state["history"]) == 1
    assert state["phases"]["before"]["certified"].shape == (40,)

    resumed = invoke(capsys, "harden", model, *args, "--out", killed, "--resume", "--json")
    assert resumed.code == 0, resumed.err
    assert "after epoch 1 and 2 step(s) of epoch 2" in resumed.err
    assert "before: kept from" in resumed.err and "certifying the input model" not in resumed.err
    a = torch.load(tmp_path / "full" / CHECKPOINT_FILE, weights_only=True)
    b = torch.load(killed / CHECKPOINT_FILE, weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    _assert_same_selection(a, b)
    assert json.loads(full.out)["sections"] == json.loads(resumed.out)["sections"]
    for row_a, row_b in zip(a["history"], b["history"]):  # the interrupted epoch's sums were carried over
        assert {k: v for k, v in row_a.items() if k != "seconds"} == {k: v for k, v in row_b.items()
                                                                     if k != "seconds"}


def test_resume_refuses_other_settings(digits_onnx, tmp_path, capsys):
    model = digits_onnx
    out = tmp_path / "run"
    assert invoke(capsys, "harden", model, *FAST, *FAST_TRAIN, "--out", out).code == 0
    r = invoke(capsys, "harden", model, *FAST, *FAST_TRAIN, "--alpha", "2", "--out", out, "--resume")
    assert r.code == 2 and "alpha" in r.err and len(r.err.strip().splitlines()) == 1


def test_resume_with_force_is_refused_before_anything_runs(digits_onnx, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINT_FILE).write_bytes(b"kept")
    r = invoke(capsys, "harden", digits_onnx, *FAST, *FAST_TRAIN, "--out", out,
               "--resume", "--force")
    assert r.code == 2 and "--resume and --force" in r.err and len(r.err.strip().splitlines()) == 1
    assert (out / CHECKPOINT_FILE).read_bytes() == b"kept"
