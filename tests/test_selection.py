"""Model selection of harden: the clean-accuracy budget, the best validated epoch, the per-class guard.

Real training runs on the embedded digits; a progress sink "wrecks" the weights after the last
step of an epoch (before that epoch's validation), so that a later epoch is worse than an
earlier one by construction."""

from __future__ import annotations

import json

import torch

from cli_support import FAST, FAST_TRAIN, digits_model, invoke
from robnet_svc import pipeline
from robnet_svc.options import Options
from robnet_svc.progress import Reporter
from robnet_svc.training import train


class _WreckLastStep:
    """Progress sink that, after the last step of epoch ``epoch``, makes the model predict class 0
    for every input (a huge output bias): that epoch's validation clean accuracy collapses."""

    def __init__(self, module: torch.nn.Module, epoch: int):
        self.module, self.epoch, self.done = module, epoch, {}

    def add_task(self, name, total, stats="", **fields):
        self.done[name] = [0, total]
        return name

    def update(self, task, advance=0, **fields):
        self.done[task][0] += advance
        if task.startswith(f"epoch {self.epoch}/") and self.done[task][0] == self.done[task][1]:
            bias = [p for name, p in self.module.named_parameters() if name.endswith("bias")][-1]
            with torch.no_grad():
                bias.zero_()
                bias[0] = 1e3

    def remove_task(self, task):
        pass


def _run(tmp_path, epochs: int, wreck_epoch: int, max_clean_drop: float | None):
    """Train a digits model with ``pipeline``'s own plan; return (module, history, selection, weights after
    every epoch as the epoch-end log line saw them, the input weights)."""
    model = digits_model(tmp_path / "m.onnx")
    options = Options(model=str(model), dataset="digits", eps=0.05, order=1, max_test=10, device="cpu",
                      epochs=epochs, ramp_epochs=0, max_train=160, batch_size=32, out=str(tmp_path / "out"),
                      max_clean_drop=max_clean_drop)
    plan = pipeline.prepare(options, training=True)
    module = plan.imported.module
    start = {k: v.clone() for k, v in module.state_dict().items()}
    seen = {}

    def log(line: str) -> None:
        if line.startswith("epoch "):
            seen[int(line.split()[1].split("/")[0])] = {k: v.clone() for k, v in module.state_dict().items()}

    history, selection = train(plan.trainer, plan.data, pipeline._train_settings(options),
                               reporter=Reporter(_WreckLastStep(module, wreck_epoch), log=log))
    return module, history, selection, seen, start, plan


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_selection_exports_the_earlier_epoch_when_the_last_one_is_worse(tmp_path):
    module, history, selection, seen, _start, _plan = _run(tmp_path, epochs=2, wreck_epoch=2, max_clean_drop=0.25)
    baseline = selection.baseline["val_clean_accuracy"]
    assert history[1]["val_clean_accuracy"] < baseline - 0.25  # the last epoch is out of the budget
    assert history[0]["val_clean_accuracy"] >= baseline - 0.25
    assert selection.best["epoch"] == 1 and selection.within_budget
    assert _same(module.state_dict(), seen[1]) and not _same(module.state_dict(), seen[2])
    record = selection.record()
    assert record["epoch"] == 1 and record["eps"] == 0.05 and record["within_budget"]
    assert record["val_clean_accuracy"] == history[0]["val_clean_accuracy"]
    assert "best validation certified accuracy" in record["reason"]


def test_no_epoch_within_the_budget_keeps_the_input_weights_and_warns(tmp_path):
    module, history, selection, _seen, start, plan = _run(tmp_path, epochs=1, wreck_epoch=1, max_clean_drop=0.25)
    assert selection.best["epoch"] == 0 and not selection.within_budget
    assert _same(module.state_dict(), start)
    selected = pipeline.selection_summary(selection.record(), plan.splits.class_names)
    assert "input model's weights" in selected["reason"]
    lines = pipeline.selection_warnings(selected, 0.1, history[-1]["eps"])
    assert len(lines) == 1 and "no epoch reached the target eps 0.05" in lines[0] and "--method rsip-ibp" in lines[0]
    # a test accuracy well below the validation accuracy: the input model has seen the validation images
    val = selected["input_val_clean_accuracy"]
    seen = pipeline.selection_warnings(selected, 0.1, history[-1]["eps"], test_clean=val - 0.1)
    assert len(seen) == 2 and "probably trained on the validation images" in seen[0]
    assert pipeline.selection_warnings(selected, 0.1, history[-1]["eps"], test_clean=val - 0.01) == lines


def test_per_class_guard_names_the_classes_that_fell(tmp_path):
    _module, _history, selection, _seen, _start, plan = _run(tmp_path, epochs=1, wreck_epoch=1, max_clean_drop=None)
    assert selection.best["epoch"] == 1 and selection.within_budget  # no budget: the wrecked epoch is taken
    selected = pipeline.selection_summary(selection.record(), plan.splits.class_names)
    per_class = selected["val_class_accuracy"]
    assert per_class["0"]["after"] == 1.0
    fell = sorted(name for name, acc in per_class.items() if acc["before"] and acc["after"] == 0.0)
    assert fell  # every other class with validation samples it got right before
    lines = pipeline.selection_warnings(selected, 0.1, 0.05)
    assert sorted(line.split("'")[1] for line in lines) == fell
    assert all("--max-class-drop 0.1" in line for line in lines)
    assert pipeline.selection_warnings(selected, None, 0.05) == []


def test_target_not_reached_warns_and_strict_exits_5(tmp_path, capsys):
    model = digits_model(tmp_path / "m.onnx")
    args = (*FAST, *FAST_TRAIN, "--max-test", "10", "--attack-restarts", "0", "--ramp-epochs", "5",
            "--no-report-page", "--json")
    r = invoke(capsys, "harden", model, *args, "--out", tmp_path / "a")
    assert r.code == 0, r.err
    assert "warning: no epoch reached the target eps 0.05" in r.err and "more --epochs" in r.err
    selected = json.loads(r.out)["selection"]
    assert selected["within_budget"] is False and selected["epoch"] == 1 and selected["eps"] < 0.05
    assert selected["max_clean_drop"] == 0.02
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["selection"] == selected

    strict = invoke(capsys, "harden", model, *args, "--strict", "--max-clean-drop", "none", "--out", tmp_path / "b")
    assert strict.code == 5 and "--strict" in strict.err
    assert (tmp_path / "b" / "model.robust.onnx").exists()  # the outputs are written all the same
    assert json.loads(strict.out)["selection"]["max_clean_drop"] is None


def test_bad_budget_is_one_line_and_exit_2(tmp_path, capsys):
    r = invoke(capsys, "harden", tmp_path / "m.onnx", *FAST, "--max-clean-drop", "2%", "--out", tmp_path / "o")
    assert r.code == 2 and "--max-clean-drop" in r.err and not (tmp_path / "o").exists()


def test_ranking_radius_then_certified_then_clean_and_a_full_tie_takes_the_later_epoch():
    from robnet_svc.training import Selection, TrainSettings

    module = torch.nn.Linear(2, 2)
    selection = Selection.start(module, TrainSettings(eps=0.2, max_clean_drop=0.05), 0.9, 0.1, [0.9, 0.9])

    def offer(epoch, eps, clean, cert):
        with torch.no_grad():
            module.bias.fill_(epoch)  # tells the kept weights apart
        row = {"epoch": epoch, "eps": eps, "val_clean_accuracy": clean, "val_certified_accuracy": cert}
        return selection.offer(module, row, [clean, clean])

    assert offer(1, 0.1, 0.9, 0.6)            # a larger radius than the input model's 0
    assert not offer(2, 0.2, 0.8, 0.9)        # at the target, but 0.1 below the input's clean accuracy
    assert not selection.within_budget
    assert offer(3, 0.2, 0.86, 0.3)           # at the target beats any certified accuracy below it
    assert offer(4, 0.2, 0.85, 0.5)           # then certified accuracy (0.85 is exactly at the budget)
    assert not offer(5, 0.2, 0.84, 0.5)       # outside the budget
    assert offer(6, 0.2, 0.9, 0.5)            # same certified: higher clean
    assert not offer(7, 0.2, 0.88, 0.5)
    assert offer(8, 0.2, 0.9, 0.5)            # a full tie: the later epoch
    assert selection.best["epoch"] == 8 and selection.within_budget
    assert torch.equal(selection.best["model"]["bias"], torch.full((2,), 8.0))
    assert Selection.from_state(selection.to_state()).record() == selection.record()
