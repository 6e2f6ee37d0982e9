"""--config TOML files: every option, command-line flags win, effective config in the certificate."""

from __future__ import annotations

import json

import h5py
import pytest

from cli_support import FAST, invoke
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
    ("[dataset_options]\ncache = false\n", r"unknown table \[dataset_options\]"),
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
