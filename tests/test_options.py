"""The run options are declared once (robnet_svc.options): the command line, the service and the
library get the same defaults, and the docs name every flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from robnet_svc.cli import certify_cmd, harden_cmd
from robnet_svc.options import Options

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


@pytest.mark.parametrize("cmd", [harden_cmd, certify_cmd], ids=["harden", "certify"])
def test_a_bare_command_line_gives_the_library_defaults(cmd):
    with cmd.make_context(cmd.name, ["m.onnx"]) as ctx:
        options = Options.from_params(ctx.params)
    assert options == Options(model="m.onnx")


def test_flags_reach_their_fields_and_plugin_options_are_parsed():
    args = ["m.onnx", "--eps", "0.3", "--epochs", "2", "--max-clean-drop", "none", "--no-report-page",
            "--dataset-option", "seed=3", "--perturbation-option", "mode=add", "--perturbation-option", "mode=both",
            "--order", "2"]
    with harden_cmd.make_context("harden", args) as ctx:
        options = Options.from_params(ctx.params)
    assert (options.eps, options.epochs, options.max_clean_drop, options.report_page) == (0.3, 2, None, False)
    assert options.dataset_options == {"seed": "3"}
    assert options.perturbation_settings() == {"mode": "both", "order": 2}
    with harden_cmd.make_context("harden", ["m.onnx", "--coef-scale", "3", "--perturbation-option",
                                            "coef_scale=3.0"]) as ctx:
        assert Options.from_params(ctx.params).perturbation_settings() == {"coef_scale": 3}  # the same value


def test_every_declared_flag_is_documented():
    text = DOCS.read_text()
    flags = {p.opts[0] for cmd in (harden_cmd, certify_cmd) for p in cmd.params if p.opts[0].startswith("--")}
    missing = sorted(flag for flag in flags if f"`{flag}" not in text)
    assert not missing, f"docs/cli.md does not mention {missing}"
