"""The ε ramp's shapes and ``--preset`` (issue 21)."""

from __future__ import annotations

import math

import pytest

from robnet_svc.training import RAMP_SHAPES, TrainSettings, eps_at, ramp_fraction


@pytest.mark.parametrize("shape", RAMP_SHAPES)
def test_ramp_runs_from_zero_to_one_monotonically_and_continuously(shape):
    ts = [i / 1000 for i in range(1001)]
    values = [ramp_fraction(t, shape) for t in ts]
    assert values[0] == 0.0 and math.isclose(values[-1], 1.0)
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert max(b - a for a, b in zip(values, values[1:])) < 2 / 1000  # no jump: slope at most 4/3
    assert ramp_fraction(-1.0, shape) == 0.0 and ramp_fraction(2.0, shape) == 1.0


def test_smooth_ramp_starts_far_below_the_linear_one_and_ends_at_the_target():
    assert ramp_fraction(1 / 8, "smooth") == pytest.approx(1 / 48)
    assert ramp_fraction(0.5, "smooth") < ramp_fraction(0.5, "linear")
    settings = TrainSettings(eps=0.4, epochs=14, ramp_shape="smooth")  # ramp: 8 epochs
    assert eps_at(0, 10, settings) == 0.0
    assert eps_at(80, 10, settings) == pytest.approx(0.4) and eps_at(200, 10, settings) == 0.4
    assert eps_at(10, 10, settings) < eps_at(10, 10, TrainSettings(eps=0.4, epochs=14, ramp_shape="linear")) / 5
    with pytest.raises(ValueError, match="unknown ramp shape"):
        ramp_fraction(0.5, "cubic")


def _params(args, tmp_path):
    from robnet_svc.cli import cli

    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    harden = cli.commands["harden"]
    with harden.make_context("harden", [str(model), *args]) as ctx:
        return dict(ctx.params)


def test_preset_paper_sets_the_paper_schedule_and_flags_and_config_win(tmp_path):
    base = _params([], tmp_path)
    assert base["epochs"] == 10 and base["ramp_shape"] == "linear" and base["max_clean_drop"] == 0.02
    paper = _params(["--preset", "paper"], tmp_path)
    assert (paper["epochs"], paper["ramp_epochs"], paper["ramp_shape"], paper["max_clean_drop"]) == \
        (175, 100.0, "linear", None)
    config = tmp_path / "run.toml"
    config.write_text("alpha = 2.0\nepochs = 50\n")
    mixed = _params(["--config", str(config), "--preset", "paper", "--epochs", "20"], tmp_path)
    assert mixed["epochs"] == 20 and mixed["alpha"] == 2.0 and mixed["ramp_epochs"] == 100.0
    swapped = _params(["--preset", "paper", "--config", str(config)], tmp_path)
    assert swapped["epochs"] == 50 and swapped["alpha"] == 2.0
