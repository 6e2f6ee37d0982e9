"""--config TOML files: every option, command-line flags win, effective config in the certificate."""

from __future__ import annotations

import json

import h5py
import pytest

from cli_support import FAST, digits_model, invoke
from robnet_svc.config import read_config
from robnet_svc.errors import RobnetError

KNOWN = {"eps", "cert_method", "max_test", "dataset"}


def test_read_config_merges_top_level_and_command_table(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('eps = 0.1\ncert-method = "ibp"\n[certify]\neps = 0.3\n[harden]\neps = 0.9\n')
    assert read_config(path, "certify", KNOWN) == {"eps": 0.3, "cert_method": "ibp"}


@pytest.mark.parametrize("text, needle", [
    ("epz = 0.1\n", "unknown option 'epz'"),
    ("eps = \n", "not valid TOML"),
    ("[dataset_option]\ncache = false\n", r"unknown table \[dataset_option\]"),
])
def test_read_config_errors_name_the_file(tmp_path, text, needle):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(RobnetError, match=needle) as info:
        read_config(path, "certify", KNOWN)
    assert str(path) in str(info.value)


def test_missing_config_file_is_one_line_exit_2(tmp_path, capsys):
    r = invoke(capsys, "certify", tmp_path / "m.onnx", "--config", tmp_path / "absent.toml")
    assert r.code == 2
    assert "absent.toml does not exist" in r.err and len(r.err.strip().splitlines()) == 1


def test_flags_win_over_config_and_effective_config_is_stored(digits_onnx, tmp_path, capsys):
    model = digits_onnx
    config = tmp_path / "run.toml"
    config.write_text('eps = 0.3\nmax-test = 24\n[certify]\ncert-method = "rsip-ibp"\n')
    out = tmp_path / "out"
    r = invoke(capsys, "certify", model, *FAST, "--config", config, "--eps", "0.02", "--out", out, "--json")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["perturbation"]["eps"] == 0.02          # flag beats config
    assert summary["cert_method"] == "rsip-ibp"              # config beats built-in default
    with h5py.File(out / "certificate.h5") as f:
        stored = json.loads(f["provenance"].attrs["config_json"])
    assert stored["eps"] == 0.02 and stored["cert_method"] == "rsip-ibp"
    # FAST gives --max-test 40 on the command line: it wins over the config's 24
    assert stored["max_test"] == 40 and summary["sections"]["model"]["num_samples"] == 40


def test_repeatable_option_given_a_string_in_config_is_one_line_exit_2(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('dataset-option = "seed=1"\n')
    r = invoke(capsys, "certify", tmp_path / "m.onnx", "--config", config)
    assert r.code == 2
    assert 'dataset-option = ["seed=1"]' in r.err and len(r.err.strip().splitlines()) == 1


def test_plugin_option_tables_become_key_value_entries(tmp_path):
    """[perturbation_options] / [dataset_options] (top level and in the command's table) feed the
    repeatable KEY=VALUE options, after any list given as a key: a later key wins."""
    path = tmp_path / "run.toml"
    path.write_text('perturbation-option = ["mode=add"]\n[perturbation_options]\norder = 2\nmode = "both"\n'
                    '[dataset_options]\ncache = false\n[certify.perturbation_options]\ncoef_scale = 2.5\n'
                    '[harden.dataset_options]\nseed = 4\n')
    known = KNOWN | {"perturbation_option", "dataset_option"}
    assert read_config(path, "certify", known) == {
        "perturbation_option": ["mode=add", "order=2", "mode=both", "coef_scale=2.5"],
        "dataset_option": ["cache=false"]}
    assert read_config(path, "harden", known)["dataset_option"] == ["cache=false", "seed=4"]
    path.write_text("[certify.epochs]\nx = 1\n")
    with pytest.raises(RobnetError, match=r"unknown table \[epochs\] in a command's table"):
        read_config(path, "certify", known)


def test_plugin_options_from_config_and_flags_reach_the_run_and_are_recorded(tmp_path, capsys):
    model = digits_model(tmp_path / "m.onnx", epochs=1)
    config = tmp_path / "run.toml"
    config.write_text('[perturbation_options]\norder = 2\nmode = "add"\n[dataset_options]\ntest_fraction = 0.3\n')
    cheap = ("--max-test", "8", "--cert-method", "ibp", "--attack-steps", "0", "--attack-restarts", "0",
             "--device", "cpu")
    out = tmp_path / "out"
    r = invoke(capsys, "certify", model, *cheap, "--config", config, "--perturbation-option", "mode=both",
               "--out", out, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["perturbation"] == {"name": "bias-field", "eps": 0.1, "clip": [0.0, 1.0],
                                                 "order": 2, "mode": "both", "coef_scale": 8.0}
    with h5py.File(out / "certificate.h5") as f:
        stored = json.loads(f["provenance"].attrs["config_json"])
    assert stored["perturbation_options"] == {"order": 2, "mode": "both", "coef_scale": 8.0}
    assert stored["dataset_options"] == {"test_fraction": 0.3, "seed": 0}
    assert (stored["order"], stored["mode"]) == (2, "both")
    # the shorthand flag --order and --perturbation-option naming the same option differently: one line
    r = invoke(capsys, "certify", model, *cheap, "--order", "1", "--perturbation-option", "order=3")
    assert r.code == 2 and r.err.strip() == ("robnet-svc: error: --order 1 and --perturbation-option order=3 set "
                                             "the same option to different values; give one of them")
    for flag, value, needle in [
        ("--perturbation-option", "colour=red", "perturbation 'bias-field' has no option 'colour'; known: "
                                                "coef_scale, mode, order"),
        ("--perturbation-option", "order=two", "option order='two' of perturbation 'bias-field' is not a valid int"),
        ("--dataset-option", "seed=1.5", "option seed='1.5' of dataset 'digits' is not a valid int"),
    ]:
        r = invoke(capsys, "certify", model, *cheap, flag, value)
        assert r.code == 2 and needle in r.err and len(r.err.strip().splitlines()) == 1, r.err
